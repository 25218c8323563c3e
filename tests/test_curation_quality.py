"""The curation-quality benchmark, small and with one seed: it runs the platform's jobs and loop
end to end and accounts for every pair; its accuracy numbers mean nothing at this size (the
report in docs/curation_quality.md is the full run)."""

from __future__ import annotations

import dataclasses
import json
import sys

import mlflow
import pytest

from pipelines.core.lake import Lake
from pipelines.labels.events import live_events
from tests.conftest import HH_HARMLESS, REPO, shared_data

sys.path.insert(0, str(REPO / "benchmarks"))
import curation_quality

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def test_every_injected_flip_is_kept_recycled_or_discarded_once(
    tmp_path, ray_cluster, monkeypatch, tiny_encoder_rm
):
    shared_data(HH_HARMLESS)
    # Ray Train's local mode with two threads (SYNPREF_* settings apply to every config the
    # benchmark loads): its seven trainings start no worker processes. The "minilm" arm's
    # backbone is a tiny BERT with MiniLM's tokenizer: what is tested is the accounting, and
    # MiniLM's forward and backward passes were most of this test's CPU.
    monkeypatch.setenv("SYNPREF_TRAINING__WORKERS", "0")
    monkeypatch.setenv("SYNPREF_TRAINING__CPUS_PER_WORKER", "1.5")
    monkeypatch.setenv("SYNPREF_TRAINING__BACKBONE", tiny_encoder_rm)
    experiment = curation_quality.Experiment(
        test=40,
        gold=40,
        train=120,
        seeds=(3,),
        backbones=("minilm",),
        max_length=32,
        bootstrap_rounds=200,
        rmbench=False,
        best_rm_folds=2,  # each fold of D_wild scored by an RM that never trained on it
        learning_rates=(1e-6, 2e-4),  # chosen on D_gold by the noisy RM of the first seed
    )
    summary = curation_quality.run(experiment, work=tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    (seed,) = results["seeds"]

    lake = Lake(str(tmp_path / "minilm" / "seed3" / "lake"))
    wild = lake.read("pairs", columns=["pair_id"], where="source = 'hh-wild'")
    flipped = lake.read("pairs", columns=["pair_id"], where=curation_quality.FLIPPED)
    assert flipped.num_rows == 30, "a quarter of the 120 training labels"
    decided = [d["pair_id"] for d in seed["stage2"]]
    assert sorted(decided) == sorted(wild["pair_id"].to_pylist()), "every D_wild pair once"
    flips = [d for d in seed["stage2"] if d["injected_flip"]]
    assert sorted(d["pair_id"] for d in flips) == sorted(flipped["pair_id"].to_pylist())
    assert {d["outcome"] for d in seed["stage2"]} <= {"kept", "recycled", "discarded"}
    events = live_events(lake, where="step = 's2/decide'").to_pylist()
    best_models = {json.loads(e["evidence"])["best_model"] for e in events}
    assert best_models == {"minilm-seed3-s2-best-rm-0", "minilm-seed3-s2-best-rm-1"}

    minilm = summary["minilm"]
    tried = minilm["learning_rate_gold_accuracy"]
    assert set(tried) == {1e-6, 2e-4} and minilm["learning_rate"] == max(tried, key=tried.get)
    assert seed["learning_rate"] == minilm["learning_rate"]
    detection = minilm["flip_detection"]
    outcomes = sum(detection[f"{o}_pairs"][0] for o in ("recycled", "discarded"))
    assert outcomes + sum(d["outcome"] == "kept" for d in seed["stage2"]) == 120
    assert all(0 <= detection[k][0] <= 1 for k in ("auroc_gold_rm", "auroc_best_rm"))
    for condition, row in minilm["conditions"].items():
        assert len(seed["conditions"][condition]["test_correct"]) == 40, condition
        assert 0 <= row["test_accuracy"][0] <= 1
    curated, random = minilm["conditions"]["curated"], minilm["conditions"]["random"]
    assert curated["train_pairs"] == random["train_pairs"], "the control drops as many"
    assert minilm["conditions"]["clean"]["train_pairs"] == 120

    report = (tmp_path / "report.md").read_text()
    assert "| curated |" in report and "gap the curated set closes" in report
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns.db'}")
    (parent,) = mlflow.search_runs(
        experiment_names=[curation_quality.EXPERIMENT],
        filter_string="tags.mlflow.runName = 'curation-quality'",
        output_format="list",
    )
    runs = mlflow.search_runs(experiment_names=[curation_quality.EXPERIMENT], output_format="list")
    assert {"minilm-seed3-lr1e-06", "minilm-seed3-lr0.0002"} <= {r.info.run_name for r in runs}
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id)}
    assert {"report.md", "test_accuracy.png", "flip_detection_roc.png"} <= artifacts

    # A finished seed is reported again from its result.json, nothing trained (seeds can run
    # apart); another recipe is refused.
    def seed_runs() -> list[str]:
        runs = mlflow.search_runs(
            experiment_names=[curation_quality.EXPERIMENT], output_format="list"
        )
        seed_and_jobs = ("minilm seed 3", "minilm-seed3")  # the seed's run, its loop and trainings
        return sorted(r.info.run_name for r in runs if r.info.run_name.startswith(seed_and_jobs))

    before, chosen = seed_runs(), (minilm["learning_rate"],)
    again = curation_quality.run(dataclasses.replace(experiment, learning_rates=chosen), tmp_path)
    assert again["minilm"]["conditions"] == minilm["conditions"] and seed_runs() == before
    assert seed["conditions"]["curated"]["model_folder"].startswith("minilm/seed3/")
    other = dataclasses.replace(experiment, learning_rates=chosen, flip_fraction=0.5)
    with pytest.raises(SystemExit, match="seed3/result.json was made with"):
        curation_quality.run(other, tmp_path)


@pytest.mark.parametrize("content", ["{", "[1, 2]", '{"recipe": {}}'])
def test_a_seed_result_that_cannot_be_read_is_refused_with_its_path(tmp_path, content):
    written = tmp_path / "smollm2" / "seed0" / curation_quality.SEED_RESULT
    written.parent.mkdir(parents=True)
    written.write_text(content)
    experiment = curation_quality.Experiment()
    with pytest.raises(SystemExit, match=r"seed0/result.json is not a seed's result \("):
        curation_quality.finished_seed(tmp_path, experiment, "smollm2", 0, 3e-5)
    assert curation_quality.finished_seed(tmp_path, experiment, "smollm2", 1, 3e-5) is None
