"""The human-AI loop end to end on real HH pairs with the offline models: two Stage 1
iterations, Stage 2, the curated set and the final reward models; a loop whose driver is killed
as it trains and resumed, to the decisions the uninterrupted loop made; and a loop that waits
for people in Label Studio.

HH's labels are human, so its first 160 records play a human-labelled source (Stage 1) and the
next 200 a source without human labels (Stage 2), each with a share of records flipped (marked
``injected_flip``: the simulated annotator's ground truth). The judge is the scripted
OpenAI-compatible server (the longer response wins), so every verdict is known; the real judges
are tested in test_judging.py."""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mlflow
import pytest
import ray
import yaml

from pipelines import jobs
from pipelines.core.config import LoopConfig, ReviewConfig, SynprefConfig, load_config
from pipelines.core.errors import ConfigError, SelectionError
from pipelines.core.lake import Lake
from pipelines.ingest.job import IngestRequest
from pipelines.labels.events import LabelEvent, live_events, record_events
from pipelines.labels.sets import SetRef, read_set
from pipelines.loop.driver import loop_status, plan
from pipelines.loop.stage1 import iteration_sets, seed_review
from pipelines.loop.state import LoopState
from pipelines.loop.steps import LoopRun, retrieval_k
from storage_schemas import PAIRS
from tests.conftest import (
    HH_HARMLESS,
    REPO,
    RM_BENCH,
    first_items,
    local_stores,
    pairs_rows,
    scripted_judge,
    shared_data,
)
from tests.labelstudio import answer
from tests.test_review import choice_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

FLIPPED = "source_meta LIKE '%injected_flip%'"


@pytest.fixture(scope="module")
def hh_sources(tmp_path_factory) -> Path:
    """Two jsonl files of real HH records, 15% and 20% of them flipped (and marked)."""
    folder = tmp_path_factory.mktemp("hh-sources")
    with gzip.open(shared_data(HH_HARMLESS), "rt") as hh:
        lines = hh.read().splitlines()
    for name, part, share, seed in (
        ("verified", lines[:160], 0.15, 1),
        ("wild", lines[160:360], 0.2, 2),
    ):
        rng = random.Random(seed)
        with (folder / f"{name}.jsonl").open("w") as out:
            for line in part:
                record = json.loads(line)
                if rng.random() < share:
                    record = {
                        "chosen": record["rejected"],
                        "rejected": record["chosen"],
                        "injected_flip": True,
                    }
                out.write(json.dumps(record) + "\n")
    return folder


def loop_config(folder: Path, judge_url: str, backbone: str) -> dict:
    """The loop's whole configuration (a YAML mapping, so a subprocess can read it). The final
    models are evaluated on RM-Bench chat's first 30 items (the whole file is test_evaluation's)."""
    rmbench = shared_data(RM_BENCH / "chat_filtered.json")
    rmbench_sample = folder / "rmbench" / rmbench.name
    if not rmbench_sample.exists():
        first_items(rmbench, rmbench_sample.parent, 30)
    return {
        **local_stores(folder),
        "training": {
            # Ray Train's local mode (its workers: test_training.py, test_journey.py): no
            # worker processes to start, the same model in every run, two torch threads. A tiny
            # encoder reading 32 tokens: what is tested is what the loop decides and records,
            # not what its models learn (MiniLM on the defaults: test_journey.py).
            "backbone": backbone,
            "workers": 0,
            "cpus_per_worker": 1.5,
            "max_length": 32,
            "global_batch": 16,
            "learning_rate": 1e-3,
            "validate_every": 1000,
            "checkpoint_every": 1000,
            "storage_path": str(folder / "checkpoints"),
        },
        "scoring": {"max_length": 32},
        "judging": {"judges": [scripted_judge(judge_url, few_shot=2).model_dump()]},
        "loop": {
            "human_sources": ["hh-verified"],
            "seed_set": "source = 'hh-verified'",
            "seed_gold": 16,
            "human_budget": 6,
            "iterations": 2,
            "simulated_flips": FLIPPED,
            "stage2_judge_budget": 100,
            "benchmarks": {"rmbench": str(rmbench_sample)},
        },
    }


def prepared(
    folder: Path, sources: Path, judge_url: str, backbone: str, **loop: object
) -> SynprefConfig:
    """A lake with both sources ingested and deduplicated, and the loop's config."""
    values = loop_config(folder, judge_url, backbone)
    values["loop"] |= loop
    folder.mkdir(exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(values))
    config = load_config(folder / "config.yaml")
    for name in ("verified", "wild"):
        request = IngestRequest(paths=[str(sources / f"{name}.jsonl")], source=f"hh-{name}")
        jobs.ingest(config, request)
    jobs.dedup(config)
    return config


@pytest.fixture(scope="module")
def finished(tmp_path_factory, hh_sources, scripted_server_url, tiny_encoder_rm, ray_cluster):
    """The loop run as a user runs it, from an ingested and deduplicated lake."""
    folder = tmp_path_factory.mktemp("loop")
    config = prepared(folder, hh_sources, scripted_server_url, tiny_encoder_rm)
    return config, jobs.loop(config)


def _killed_in(config: SynprefConfig, folder: Path, run_name: str) -> set[str]:
    """Run the loop's driver in a process of its own, SIGKILL it while the MLflow run
    ``run_name`` is running, and return the steps committed by then."""
    lake = Lake(config.lake.root)
    mlflow.set_tracking_uri(config.tracking.uri)
    running = f"attributes.run_name = '{run_name}' and attributes.status = 'RUNNING'"
    log = (folder / "loop.log").open("w")
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ray_jobs.loop",
            "run",
            "--config",
            str(folder / "config.yaml"),
            "--ray-address",
            ray.get_runtime_context().gcs_address,
        ],
        cwd=REPO,
        stdout=log,
        stderr=log,
        env={**os.environ, "SYNPREF_LOG_FILE": str(folder / "synpref.log")},
    )
    deadline = time.monotonic() + 900
    while not mlflow.search_runs(experiment_names=["synpref"], filter_string=running).shape[0]:
        assert driver.poll() is None, (folder / "loop.log").read_text()[-3000:]
        assert time.monotonic() < deadline, f"the loop did not start {run_name}"
        time.sleep(1)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    return set(lake.read("loop_state", columns=["step"])["step"].to_pylist())


def test_the_loop_runs_stage1_stage2_and_the_final_models(finished):
    config, result = finished
    lake = Lake(config.lake.root)
    summary = result.summary
    assert summary.status == "finished" and summary.steps_done == summary.steps_total
    assert summary.steps_run == [step.name for step in plan(config.loop)]
    assert [round(m["gold_pairs"]) for m in summary.iterations] == [22, 28]
    assert "SIMULATED" in summary.text()

    # People: the simulated annotator flips exactly the injected flips it is shown.
    flipped = set(lake.read("pairs", columns=["pair_id"], where=FLIPPED)["pair_id"].to_pylist())
    human = live_events(lake, where="origin = 'human'").to_pylist()
    assert len(human) == 16 + 2 * 6 and {e["who"] for e in human} == {"simulated"}
    assert all((e["label"] == "flip") == (e["pair_id"] in flipped) for e in human)

    # Retrieval follows the k rule on the p the iteration's model gave each gold pair.
    edges = lake.read("retrievals").to_pylist()
    for edge in edges:
        assert edge["k"] == min(retrieval_k(edge["gold_p"], 8), 8)
    by_gold = {}
    for edge in edges:
        by_gold.setdefault((edge["iteration"], edge["gold_pair_id"]), []).append(edge)
    assert all(len(found) == found[0]["k"] for found in by_gold.values())
    assert {e["iteration"] for e in edges} == {1, 2}
    assert any(e["gold_p"] <= 0.5 and e["k"] == 8 for e in edges)

    # Gold never trains the model selected on it.
    state = {r["step"]: json.loads(r["result"]) for r in lake.read("loop_state").to_pylist()}
    for i in (1, 2):
        sets = state[f"s1/{i}/sets"]
        gold = read_set(lake, SetRef.parse(sets["gold"]))
        train = read_set(lake, SetRef.parse(sets["train"]))
        trained_gold = set(gold["pair_id"].to_pylist()) & set(train["pair_id"].to_pylist())
        assert not trained_gold

    # Every pair of the curated set is explained by a live label event with its label.
    curated = read_set(lake, SetRef.parse(summary.curated_set)).to_pylist()
    events = {e["event_id"]: e for e in live_events(lake).to_pylist()}
    assert curated and all(m["event_id"] in events for m in curated)
    for member in curated:
        event = events[member["event_id"]]
        assert event["pair_id"] == member["pair_id"] and event["label"] in ("keep", "flip")
        assert member["flipped"] == (event["label"] == "flip")
    origins = {m["origin"] for m in curated}
    assert {"human", "llm-judge"} <= origins and origins & {"rm-consistency", "recycled"}
    stage2 = [e for e in events.values() if e["step"] == "s2/decide"]
    assert len(stage2) == sum(summary.stage2.values())
    evidence = [json.loads(e["evidence"]) for e in stage2]
    assert all({"p_best", "p_gold", "verdict"} <= e.keys() for e in evidence)
    # The judges' budget went to the pairs the best RM was least sure of.
    judged = state["s2/judge"]
    assert judged["sent"] == 100 < judged["doubtful"]
    with_verdict = [abs(e["p_best"] - 0.5) for e in evidence if e["verdict"] is not None]
    without = [
        abs(e["p_best"] - 0.5) for e in evidence if e["verdict"] is None and e["p_best"] <= 0.5
    ]
    assert len(with_verdict) == 100 and max(with_verdict) <= min(without)

    # The final RM trained on the curated set (selected on gold) and was evaluated.
    assert set(summary.final) == {"curated", "all"}
    for metrics in summary.final.values():
        assert 0 <= metrics["gold_accuracy"] <= 1 and "rmbench.average" in metrics

    # MLflow: the loop, a child per part, a grandchild per step; numbers per iteration.
    mlflow.set_tracking_uri(config.tracking.uri)
    client = mlflow.MlflowClient()
    parent = client.get_run(result.run_id)
    runs = mlflow.search_runs(experiment_names=["synpref"], output_format="list")
    assert {r.info.status for r in runs} == {"FINISHED"}
    history = client.get_metric_history(result.run_id, "gold_pairs")
    assert sorted((m.step, m.value) for m in history) == [(1, 22.0), (2, 28.0)]
    plots = {a.path for a in client.list_artifacts(result.run_id, "loop")}
    assert plots == {"loop/iterations.png", "loop/curated_set.png"}
    experiment = parent.info.experiment_id
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{result.run_id}'")
    names = {c.info.run_name for c in children}
    assert names == {
        "stage 1: seed review",
        "iteration 1",
        "iteration 2",
        "stage 2",
        "final models",
    }
    iteration = next(c for c in children if c.info.run_name == "iteration 1")
    steps = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{iteration.info.run_id}'")
    parts = ("sets", "train", "score-gold", "retrieve", "review", "await-review", "judge", "label")
    assert {s.data.tags["synpref.loop.step"] for s in steps} == {f"s1/1/{p}" for p in parts}
    assert iteration.data.metrics["gold_accuracy"] >= 0
    trained = client.get_run(state["final/train-curated"]["run_id"]).data.tags
    assert summary.curated_set in trained["synpref.curated_sets"]

    # Running it again does nothing.
    again = jobs.loop(config).summary
    assert again.steps_run == [] and again.curated_set == summary.curated_set


def test_a_loop_killed_as_it_trains_resumes_to_what_an_uninterrupted_run_decides(
    tmp_path, hh_sources, scripted_server_url, tiny_encoder_rm, finished
):
    """The driver SIGKILLed while iteration 1 trains; the resumed run redoes that step, then
    each step left, once, and ends with the decisions the uninterrupted loop (``finished``, the
    same configuration) made up to the end of iteration 1. One Stage 1 iteration, no Stage 2
    and no final models: the kill and everything it could change are in that iteration."""
    short = {"iterations": 1, "stage2": False, "final": False}
    killed = prepared(
        tmp_path / "killed", hh_sources, scripted_server_url, tiny_encoder_rm, **short
    )
    committed = _killed_in(killed, tmp_path / "killed", "loop-s1-1-train")
    summary = jobs.loop(killed, resume=True).summary
    assert summary.status == "finished" and summary.steps_done == summary.steps_total
    assert summary.steps_run == [s.name for s in plan(killed.loop) if s.name not in committed]
    assert summary.steps_run[0] == "s1/1/train"
    lake = Lake(killed.lake.root)
    states = lake.read("loop_state", columns=["step"])["step"].to_pylist()
    assert len(states) == len(set(states))
    # The runs the killed driver left RUNNING are marked KILLED.
    runs = mlflow.search_runs(experiment_names=["synpref"], output_format="list")
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert any(r.info.status == "KILLED" for r in runs)

    expected = Lake(finished[0].lake.root)
    iteration_1 = "step LIKE 's1/0/%' OR step LIKE 's1/1/%'"
    for table, columns, where in (
        ("label_events", ["step", "source", "pair_id", "label", "origin", "who"], iteration_1),
        ("retrievals", ["gold_pair_id", "pair_id", "rank", "gold_p", "k"], "iteration = 1"),
    ):
        order = [(c, "ascending") for c in columns]
        want = expected.read(table, columns=columns, where=where).sort_by(order)
        got = lake.read(table, columns=columns).sort_by(order)
        assert want.num_rows and got.equals(want), table


def test_the_loop_waits_for_people_in_label_studio_and_goes_on_with_their_answers(
    config, lake, label_studio, hh_sources, monkeypatch, ray_cluster
):
    """The seed review as Label Studio tasks: the loop pauses, `status` counts the open tasks,
    people answer (one skips), and the resumed loop pulls the answers into D_gold."""
    monkeypatch.setenv(config.review.token_env, label_studio.token)
    config.review = ReviewConfig(url=label_studio.url, project="loop with people")
    config.loop = LoopConfig(
        name="people",
        human_sources=["hh-verified"],
        seed_gold=4,
        iterations=0,
        stage2=False,
        final=False,
        annotator="label-studio",
    )
    request = IngestRequest(paths=[str(hh_sources / "verified.jsonl")], source="hh-verified")
    jobs.ingest(config, request)
    jobs.dedup(config)

    paused = jobs.loop(config).summary
    assert paused.status == "waiting" and "4 of the 4 review tasks" in paused.waiting_for
    status = loop_status(config)
    assert (status.next_step, status.open_tasks) == ("s1/0/await-review", 4)
    assert jobs.loop(config).summary.status == "waiting", "nobody answered yet"

    tasks = httpx.get(
        f"{label_studio.url}/api/tasks",
        params={"project": paused_project(label_studio), "page_size": 100},
        headers={"Authorization": f"Token {label_studio.token}"},
    ).json()["tasks"]
    wanted = ["keep", "flip", "keep", None]  # the last one is skipped
    for task, label in zip(sorted(tasks, key=lambda t: t["data"]["pair_id"]), wanted, strict=True):
        choice = None if label is None else choice_for(label, task["data"]["order"])
        answer(label_studio, label_studio.token, task["id"], choice)

    finished = jobs.loop(config, resume=True).summary
    assert finished.status == "finished" and finished.pools["D_gold"] == 3
    gold = read_set(lake, SetRef("people/gold")).sort_by("pair_id").to_pylist()
    assert [m["flipped"] for m in gold] == [False, True, False]
    assert {e["who"] for e in live_events(lake).to_pylist()} == {
        f"labelstudio:{label_studio.email}"
    }


def paused_project(server) -> int:
    projects = httpx.get(
        f"{server.url}/api/projects",
        params={"title": "loop with people"},
        headers={"Authorization": f"Token {server.token}"},
    ).json()
    found = projects["results"] if isinstance(projects, dict) else projects
    return next(p["id"] for p in found if p["title"] == "loop with people")


def test_stage1_says_what_it_lacks(config, lake):
    """Stage 1's sets, from pairs written by hand: no human-labelled pairs, no gold pair after
    a review in which people decided nothing, and no training pairs without a seed set, each
    an error that names what to change."""
    lake.append(PAIRS, pairs_rows(range(12), source="web"))
    loop = config.loop.model_copy(
        update={"human_sources": ["hh"], "curated_only": False, "seed_gold": 4}
    )

    def run() -> LoopRun:
        current = config.model_copy(update={"loop": loop})
        return LoopRun(current, lake, LoopState(lake, loop.name), "run", lake.version("pairs"))

    with pytest.raises(SelectionError, match=r"no unverified pairs: loop.human_sources \['hh'\]"):
        seed_review(run())

    loop.human_sources = ["web"]
    sent = seed_review(run())["keys"]
    unsure = [
        LabelEvent(source, pair_id, "unsure", "human", "someone", "review-1")
        for source, pair_id in sent
    ]
    record_events(lake, unsure, "run")
    with pytest.raises(SelectionError, match="no gold pairs: people decided none"):
        iteration_sets(run(), 0)

    record_events(lake, [LabelEvent(*sent[0], "keep", "human", "someone", "review-2")], "run")
    with pytest.raises(ConfigError, match="nothing to train on: D_silver is empty.*seed_set"):
        iteration_sets(run(), 0)
