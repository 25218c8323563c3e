"""Labels with lineage, curated sets and the loop's rules, on real Delta tables: every decision
is an event, the label is derived (human over judges over the Stage 2 rule over the original),
an undo falls back, sets are versioned, and training reads a set's flips."""

from __future__ import annotations

import math
from typing import Any

import pyarrow as pa
import pytest
from deltalake.exceptions import DeltaError

from pipelines import jobs
from pipelines.core.config import (
    LoopConfig,
    SynprefConfig,
    TrainingDataConfig,
    load_config,
    recipe,
)
from pipelines.core.errors import ConfigError, SelectionError
from pipelines.core.model_paths import resolve_model
from pipelines.ingest.job import IngestRequest
from pipelines.labels.events import (
    LabelEvent,
    derive_labels,
    event_rows,
    explain,
    live_events,
    rebuild_labels,
    record_events,
    undo,
)
from pipelines.labels.sets import SetRef, read_set, write_set
from pipelines.loop.driver import _check_unchanged, _recipe, plan, run_loop
from pipelines.loop.pools import keys_predicate, loop_pairs
from pipelines.loop.state import LoopState
from pipelines.loop.steps import retrieval_k
from pipelines.rm.data import PairTokenizer, row_keys, training_selection
from storage_schemas import LABEL_EVENTS, PAIRS
from tests.conftest import HH_HARMLESS, pairs_rows, shared_data


def event(pair: str, label: str | None, origin: str, who: str = "a", decision: str = "d", **more):
    return LabelEvent("hh", pair, label, origin, who, decision, **more)


def test_the_label_comes_from_the_most_trusted_origin_and_the_latest_decision(lake):
    record_events(lake, [event("p1", "flip", "llm-judge"), event("p1", "keep", "original")], "r")
    record_events(lake, [event("p2", "discard", "rm-consistency", decision="s2")], "r")
    record_events(
        lake, [event("p3", "keep", "human", "ann1"), event("p3", "flip", "human", "ann2")], "r"
    )
    labels = {r["pair_id"]: r for r in derive_labels(live_events(lake), {"hh"}).to_pylist()}
    assert (labels["p1"]["label"], labels["p1"]["pool"]) == ("flip", "D_silver")
    assert (labels["p2"]["label"], labels["p2"]["pool"]) == ("discard", "discarded")
    # Two people disagree: a tie is unsure, and the pair stays unverified.
    assert (labels["p3"]["label"], labels["p3"]["pool"], labels["p3"]["confidence"]) == (
        "unsure",
        "D_un",
        0.5,
    )
    # A third person breaks the tie: gold.
    record_events(lake, [event("p3", "flip", "human", "ann3")], "r")
    labels = {r["pair_id"]: r for r in derive_labels(live_events(lake), {"hh"}).to_pylist()}
    assert (labels["p3"]["label"], labels["p3"]["pool"]) == ("flip", "D_gold")
    assert labels["p3"]["confidence"] == pytest.approx(2 / 3)
    # A pair of a source without human labels is D_wild when nobody verified it.
    other = derive_labels(event_rows([event("p4", "unsure", "llm-judge")], None), {"elsewhere"})
    assert other["pool"].to_pylist() == ["D_wild"]


def test_recording_a_decision_twice_adds_nothing_and_an_undo_falls_back(lake):
    decisions = [event("p1", "keep", "llm-judge"), event("p1", "flip", "human", "ann1", "ls:7")]
    first = record_events(lake, decisions, "r1")
    again = record_events(lake, decisions, "r2")
    assert (first.rows_inserted, again.rows_inserted) == (2, 0)
    rebuild_labels(lake, ["hh"])
    assert lake.read("labels")["label"].to_pylist() == ["flip"]

    undo(lake, decisions[1].event_id, "lead", "clicked the wrong response", "r3")
    rebuilt = rebuild_labels(lake, ["hh"])
    assert rebuilt.rows_updated == 1
    assert [(r["label"], r["pool"]) for r in lake.read("labels").to_pylist()] == [
        ("keep", "D_silver")
    ]
    history = explain(lake, "p1").to_pylist()
    assert [e["revokes"] for e in history][-1] == decisions[1].event_id
    assert "clicked the wrong response" in history[-1]["evidence"]
    with pytest.raises(SelectionError, match="is an undo itself"):
        undo(lake, history[-1]["event_id"], "lead", "again", None)
    with pytest.raises(SelectionError, match="no label event"):
        undo(lake, "nope", "lead", "typo", None)
    # The table refuses an event that is neither a label nor an undo, or of an unknown origin.
    rows = event_rows([event("p9", None, "human")], None)
    with pytest.raises(DeltaError, match="1 rows failed validation"):
        lake.append(LABEL_EVENTS, rows)
    with pytest.raises(DeltaError, match="1 rows failed validation"):
        lake.append(LABEL_EVENTS, event_rows([event("p9", "keep", "oracle")], None))


def test_sets_are_versioned_and_writing_one_leaves_the_others(lake):
    members = pa.table(
        {
            "source": ["hh", "hh", "hh"],
            "pair_id": ["a", "b", "c"],
            "flipped": [False, True, False],
            "origin": ["human", "llm-judge", "original"],
            "event_id": pa.array([None, None, None], pa.string()),
        }
    )
    with pytest.raises(SelectionError, match="no curated set exists yet"):
        read_set(lake, SetRef("loop/gold"))
    with pytest.raises(SelectionError, match="'loop gold!' is not a set name"):
        write_set(lake, "loop gold!", members)
    first = write_set(lake, "loop/gold", members)
    other = write_set(lake, "loop/train", members.slice(0, 1))
    second = write_set(lake, "loop/gold", members.slice(1))
    assert read_set(lake, first)["pair_id"].to_pylist() == ["a", "b", "c"]
    assert read_set(lake, SetRef("loop/gold"))["pair_id"].to_pylist() == ["b", "c"]
    assert read_set(lake, SetRef.parse(str(other)))["pair_id"].to_pylist() == ["a"]
    assert read_set(lake, SetRef("loop/train"))["pair_id"].to_pylist() == ["a"]
    assert write_set(lake, "loop/gold", members.slice(1)) == second, "same members: no commit"
    with pytest.raises(SelectionError, match="not a set name"):
        SetRef.parse("gold@v2")
    with pytest.raises(SelectionError, match="has no pairs"):
        read_set(lake, SetRef("missing"))


def test_training_reads_a_set_with_its_flips_and_never_its_gold(config, lake, ray_cluster):
    jobs.ingest(config, IngestRequest(paths=[str(shared_data(HH_HARMLESS))], source="hh"))
    pairs = lake.read("pairs", columns=["source", "pair_id", "history", "chosen", "rejected"])
    pairs = pairs.sort_by("pair_id").slice(0, 12)
    keys = pairs.select(["source", "pair_id"])
    flips = [i % 3 == 0 for i in range(12)]
    members = (
        keys.append_column("flipped", pa.array(flips))
        .append_column("origin", pa.array(["llm-judge"] * 12))
        .append_column("event_id", pa.nulls(12, pa.string()))
    )
    train = write_set(lake, "t/train", members)
    gold = write_set(lake, "t/gold", members.slice(8))
    data = TrainingDataConfig(set=str(train), validation_set=str(gold))
    selection = training_selection(lake, data)
    assert selection.train.num_rows == 8 and selection.validation.num_rows == 4
    gold_ids = selection.validation["pair_id"].to_pylist()
    assert not set(selection.train["pair_id"].to_pylist()) & set(gold_ids)
    assert sorted(selection.flipped["pair_id"].to_pylist()) == sorted(
        p for p, f in zip(keys["pair_id"].to_pylist(), flips, strict=True) if f
    )
    assert [str(s) for s in selection.sets] == [str(train), str(gold)]
    assert len(gold_ids) == 4

    training = config.training.model_copy(
        update={"backbone": resolve_model(config.training.backbone), "max_length": 64}
    )
    flipped_rows = row_keys(selection.flipped["source"], selection.flipped["pair_id"])
    tokens = PairTokenizer(training, flipped_rows)(pairs).to_pylist()
    plain = PairTokenizer(training, flipped_rows[:0])(pairs).to_pylist()
    for row, unflipped, flipped in zip(tokens, plain, flips, strict=True):
        if flipped:
            assert (row["chosen_ids"], row["rejected_ids"]) == (
                unflipped["rejected_ids"],
                unflipped["chosen_ids"],
            )
        else:
            assert row["chosen_ids"] == unflipped["chosen_ids"]

    with pytest.raises(SelectionError, match="validation_set or validation_where"):
        training_selection(lake, data.model_copy(update={"validation_where": "TRUE"}))


@pytest.mark.parametrize(
    ("p", "k"), [(0.1, 8), (0.5, 8), (0.5001, 4), (0.75, 2), (0.9, 1), (0.99, 1), (1.0, 0)]
)
def test_retrieval_k_follows_the_papers_rule(p, k):
    assert retrieval_k(p, 8) == k == (8 if p <= 0.5 else math.ceil(8 * (1 - p)))


def test_keys_predicate_selects_exactly_the_keys(lake, config):
    keys = pa.table({"source": ["a", "b"], "pair_id": ["x'1", "y"]})
    assert keys_predicate(keys) == "source IN ('a', 'b') AND pair_id IN ('x''1', 'y')"
    assert keys_predicate(keys.slice(0, 0)) == "FALSE"


def test_loop_config_and_state_errors_are_clear(config, lake):
    with pytest.raises(ConfigError, match="stage2 needs Stage 1's best reward model"):
        load_config(None, {"loop": {"iterations": 0}})
    with pytest.raises(ConfigError, match="loop.stage2_judge_budget"):
        load_config(None, {"loop": {"stage2_judge_budget": -1}})
    steps = ["sets", "train", "score-gold", "retrieve", "review", "await-review", "judge", "label"]
    assert [s.name for s in plan(LoopConfig(iterations=1, stage2=False, final=False))] == [
        "s1/0/review",
        "s1/0/await-review",
        *(f"s1/1/{s}" for s in steps),
        "final/sets",
    ]
    config.loop.benchmarks = {"rmbench": "/nonexistent.json"}
    with pytest.raises(ConfigError, match="loop.benchmarks: data not found"):
        run_loop(config)
    config.loop.benchmarks = {}
    with pytest.raises(SelectionError, match="has not started"):
        run_loop(config, resume=True)
    cross_fitted = plan(LoopConfig(iterations=1, best_rm_folds=2, final=False))
    assert [s.name for s in cross_fitted if s.part == "s2"] == [
        "s2/sets",
        "s2/gold-rm",
        "s2/best-rm-0",
        "s2/best-rm-1",
        "s2/score",
        "s2/judge",
        "s2/decide",
    ]
    # A loop started before a config key existed resumes when that key is at its default (and
    # one started before recipes were recorded has its loop section checked).
    older = config.loop.model_dump()
    del older["best_rm_folds"]
    _check_unchanged({"loop": older}, config)
    with pytest.raises(ConfigError, match="started with other values of loop.best_rm_folds"):
        _check_unchanged({"loop": older}, changed(config, "loop", best_rm_folds=3))
    start = {"run_id": "x", "loop": config.loop.model_dump() | {"iterations": 5}}
    LoopState(lake, config.loop.name).commit("start", start, None)
    with pytest.raises(ConfigError, match="started with other values of loop.iterations"):
        run_loop(config)
    lake.insert_new(PAIRS, pairs_rows(range(3)))
    version = lake.version("pairs")
    with pytest.raises(SelectionError, match="loop.curated_only needs the curation_status table"):
        loop_pairs(lake, LoopConfig(curated_only=True), version)
    with pytest.raises(SelectionError, match=r"the loop has no pairs \(loop.where .pair_id < '0'"):
        loop_pairs(lake, LoopConfig(curated_only=False, where="pair_id < '0'"), version)


def test_a_loop_resumes_only_with_the_recipe_it_started_with(config):
    """Its committed steps trained, scored and judged with the recipe it started with; the
    resources may change (docs/loop.md, Resuming)."""
    started = {"recipe": _recipe(config)}
    judge = config.judging.judges[0]
    operational = [
        changed(config, "training", workers=0, cpus_per_worker=1.5, storage_path="elsewhere"),
        changed(config, "scoring", actors=3, batch_tokens=4096),
        changed(config, "judging", judges=[judge.model_copy(update={"concurrency": 2})]),
        changed(config, "training", data=TrainingDataConfig(where="source = 'x'")),  # per step
    ]
    for resumable in operational:
        _check_unchanged(started, resumable)
    other_model = judge.model_copy(update={"model": "another-judge"})
    refused = {
        "training.learning_rate": changed(config, "training", learning_rate=1e-5),
        "scoring.max_length": changed(config, "scoring", max_length=64),
        "judging.judges.0.model": changed(config, "judging", judges=[other_model]),
        "judging.judges.1.model": changed(config, "judging", judges=[judge, other_model]),
    }
    for key, resumed in refused.items():
        with pytest.raises(ConfigError, match=rf"started with other values of .*{key}"):
            _check_unchanged(started, resumed)
    removed = {"recipe": {"loop": recipe(config.loop) | {"a_key_since_removed": 1}}}
    with pytest.raises(ConfigError, match="started with a config this version cannot read"):
        _check_unchanged(removed, config)
    gguf = changed(config, "training", backbone_kwargs={"gguf_file": "model.gguf"})
    with pytest.raises(ConfigError, match=r"training\.backbone_kwargs\.gguf_file"):
        _check_unchanged(started, gguf)


def changed(config: SynprefConfig, section: str, **values: Any) -> SynprefConfig:
    """``config`` with ``values`` set in ``section``."""
    update = getattr(config, section).model_copy(update=values)
    return config.model_copy(update={section: update})
