"""Pair-aware exact dedup and flip detection: pure functions, then the job on real data."""

import gzip
import json

import mlflow
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines import jobs
from pipelines.core.config import DedupConfig
from pipelines.core.text import normalise_text
from pipelines.hygiene.curation_status import derive
from pipelines.hygiene.dedup import (
    KEYS_SCHEMA,
    content_keys,
    exact_clusters,
    flip_conflicts,
)
from pipelines.ingest.job import IngestRequest
from storage_schemas import CONTAMINATION
from tests.conftest import HH_HARMLESS, shared_data

USER = [{"role": "user", "content": "Which is larger, 2 or 3?"}]


def pairs(*rows):
    """rows of (source, pair_id, history, chosen, rejected)."""
    return pa.Table.from_pylist(
        [
            dict(zip(("source", "pair_id", "history", "chosen", "rejected"), r, strict=True))
            for r in rows
        ]
    )


def keys(*rows, casefold=False):
    return content_keys(pairs(*rows), casefold=casefold)


def test_normalisation_folds_unicode_forms_and_whitespace():
    assert normalise_text("caf\u0065\u0301  au\tlait\n") == normalise_text("café au lait")
    assert normalise_text("Hello") != normalise_text("hello")
    assert normalise_text("Hello", casefold=True) == normalise_text("hello", casefold=True)


def test_whitespace_variants_share_the_exact_key_and_flips_the_flip_key():
    k = keys(
        ("s", "1", USER, "3 is larger.", "2 is larger."),
        (
            "s",
            "2",
            [{"role": "user", "content": "Which is larger,  2 or 3? "}],
            "3 is  larger.",
            "2 is larger.",
        ),
        ("s", "3", USER, "2 is larger.", "3 is larger."),
        ("s", "4", USER, "3 IS LARGER.", "2 is larger."),
    ).to_pylist()
    assert k[0]["exact_key"] == k[1]["exact_key"] != k[2]["exact_key"]
    assert k[0]["flip_key"] == k[2]["flip_key"] and k[0]["side"] != k[2]["side"]
    assert k[3]["exact_key"] != k[0]["exact_key"]
    folded = keys(
        ("s", "1", USER, "3 is larger.", "2"), ("s", "4", USER, "3 IS LARGER.", "2"), casefold=True
    )
    assert folded["exact_key"][0] == folded["exact_key"][1]


def test_representative_is_the_most_trusted_source_then_the_smallest_pair_id():
    k = keys(
        ("web", "a1", USER, "x", "y"),
        ("gold", "z9", USER, "x", "y"),
        ("web", "a0", USER, "x ", "y"),
    )
    clusters = exact_clusters(k, DedupConfig(source_priority=["gold"]), "run").to_pylist()
    assert {(c["source"], c["pair_id"]) for c in clusters} == {
        ("web", "a1"),
        ("gold", "z9"),
        ("web", "a0"),
    }
    assert {c["representative_pair_id"] for c in clusters} == {"z9"}
    plain = exact_clusters(k, DedupConfig(), "run").to_pylist()
    assert {c["representative_pair_id"] for c in plain} == {"a0"}
    assert all(c["cluster_size"] == 3 for c in plain)


@pytest.mark.parametrize(
    ("policy", "priority", "expected"),
    [
        ("majority", (), {"a": "kept", "b": "overruled"}),
        ("source_priority", ("flipper",), {"a": "overruled", "b": "kept"}),
        ("judge", (), {"a": "unresolved", "b": "unresolved"}),
    ],
)
def test_flips_are_conflicts_resolved_by_the_policy(policy, priority, expected):
    k = keys(
        ("s1", "p1", USER, "3", "2"),
        ("s2", "p2", USER, "3", "2"),
        ("flipper", "p3", USER, "2", "3"),
    )
    conflicts = flip_conflicts(
        k, DedupConfig(conflict_policy=policy, source_priority=priority), "run"
    )
    side_of = {r["pair_id"]: r["side"] for r in conflicts.to_pylist()}
    outcome = {r["side"]: r["resolution"] for r in conflicts.to_pylist()}
    assert side_of["p1"] == side_of["p2"] != side_of["p3"]
    assert outcome[side_of["p1"]] == expected["a"] and outcome[side_of["p3"]] == expected["b"]


def test_a_tie_is_never_resolved_silently():
    k = keys(("s", "p1", USER, "3", "2"), ("s", "p2", USER, "2", "3"))
    conflicts = flip_conflicts(k, DedupConfig(conflict_policy="majority"), "run")
    assert set(conflicts["resolution"].to_pylist()) == {"unresolved"}


def test_status_precedence_conflict_over_duplicate_over_kept():
    k = keys(
        ("s", "p1", USER, "3", "2"),
        ("s", "p2", USER, "3 ", "2"),
        ("s", "p3", USER, "2", "3"),
        ("s", "p4", USER, "4", "5"),
    )
    options = DedupConfig(conflict_policy="majority")
    no_contamination = CONTAMINATION.schema.empty_table()
    status = derive(
        k, exact_clusters(k, options, "r"), flip_conflicts(k, options, "r"), no_contamination, "r"
    )
    by_pair = {r["pair_id"]: r["status"] for r in status.to_pylist()}
    assert by_pair == {"p1": "kept", "p2": "exact_dup", "p3": "conflict", "p4": "kept"}


decision_rows = st.lists(
    st.tuples(
        st.sampled_from(["s1", "s2"]),
        st.sampled_from(["Q1", "Q2"]),
        st.sampled_from(["a", "b", "c"]),
        st.sampled_from(["a", "b", "c"]),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(decision_rows, st.randoms())
def test_decisions_are_deterministic_and_order_independent(rows, rnd):
    table = pairs(
        *[
            (s, f"id{i}", [{"role": "user", "content": q}], c, r)
            for i, (s, q, c, r) in enumerate(rows)
        ]
    )
    options = DedupConfig(source_priority=["s2"])

    def decide(t):
        k = content_keys(t)
        clusters = exact_clusters(k, options, "r").drop_columns(["decided_at"]).to_pylist()
        conflicts = flip_conflicts(k, options, "r").drop_columns(["decided_at"]).to_pylist()
        return sorted(map(json.dumps, clusters)), sorted(map(json.dumps, conflicts))

    order = list(range(table.num_rows))
    rnd.shuffle(order)
    assert decide(table) == decide(table.take(order))


def test_empty_input_makes_no_decisions():
    empty = KEYS_SCHEMA.empty_table()
    assert exact_clusters(empty, DedupConfig(), "r").num_rows == 0
    assert flip_conflicts(empty, DedupConfig(), "r").num_rows == 0


# ------------------------------------------------------------------------------ the job


@pytest.mark.usefixtures("ray_cluster")
def test_dedup_job_on_real_and_planted_data(config, lake, tmp_path):
    hh = shared_data(HH_HARMLESS)
    jobs.ingest(config, IngestRequest(paths=[str(hh)], source="hh")).as_dict()
    flips = tmp_path / "flips.jsonl"
    records = [
        {"prompt": "Is the sky blue?", "chosen": "Yes, on a clear day.", "rejected": "No."},
        {"prompt": "Is the sky blue?", "chosen": "No.", "rejected": "Yes, on a clear day."},
        {"prompt": "Is  the sky blue?", "chosen": "Yes, on a clear day. ", "rejected": "No."},
    ]
    flips.write_text("\n".join(map(json.dumps, records)) + "\n")
    jobs.ingest(config, IngestRequest(paths=[str(flips)], source="edits")).as_dict()

    first = jobs.dedup(config).as_dict()
    # HH's repeated prompts have different responses: no pair duplicates among its pairs.
    assert first["by_source"]["hh"] == {"kept": 2303}
    assert first["conflicts"] == 1 and first["exact_duplicates"] == 1
    statuses = sorted(first["by_source"]["edits"].items())
    assert statuses == [("conflict", 1), ("exact_dup", 1), ("kept", 1)]

    status = lake.read("curation_status", where="source = 'edits'").to_pylist()
    assert all(row["reason"] for row in status)
    mlflow.set_tracking_uri(config.tracking.uri)
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(first["run_id"])}
    assert {"dedup_summary.json", "cluster_sizes.png"} <= artifacts

    again = jobs.dedup(config).as_dict()
    assert set(again["written"].values()) == {None}, "re-running dedup changes nothing"


@pytest.mark.usefixtures("ray_cluster")
def test_prompt_groups_on_hh_group_repeated_prompts_without_making_duplicates(
    config, lake, tmp_path
):
    # 200 HH records and the two prompts its harmless test split repeats (records 250 and 1483,
    # 1262 and 1452): embedding every prompt of HH would cost minutes and test nothing more.
    with gzip.open(shared_data(HH_HARMLESS), "rt") as file:
        lines = file.readlines()
    hh = tmp_path / "hh-sample.jsonl"
    hh.write_text("".join(lines[:200] + [lines[i] for i in (250, 1262, 1452, 1483)]))
    jobs.ingest(config, IngestRequest(paths=[str(hh)], source="hh")).as_dict()
    paraphrases = tmp_path / "paraphrases.jsonl"
    records = [
        {
            "prompt": "How do I bake sourdough bread at home?",
            "chosen": "Start with a starter.",
            "rejected": "Buy it.",
        },
        {
            "prompt": "How can I bake sourdough bread at home?",
            "chosen": "Feed a starter first.",
            "rejected": "You can't.",
        },
    ]
    paraphrases.write_text("\n".join(map(json.dumps, records)) + "\n")
    jobs.ingest(config, IngestRequest(paths=[str(paraphrases)], source="bread")).as_dict()
    config.dedup.prompt_groups.enabled = True
    result = jobs.dedup(config).as_dict()

    groups = lake.read("dedup_clusters", where="method = 'prompt'").to_pylist()
    by_cluster: dict[str, set] = {}
    for row in groups:
        by_cluster.setdefault(row["cluster_id"], set()).add((row["source"], row["pair_id"]))
    pairs = lake.read("pairs", columns=["source", "pair_id", "history"]).to_pylist()
    same_history: dict[str, set] = {}
    for p in pairs:
        same_history.setdefault(json.dumps(p["history"]), set()).add((p["source"], p["pair_id"]))
    repeated = [members for members in same_history.values() if len(members) > 1]
    assert len(repeated) == 2, "HH harmless-base test has 2 repeated prompts"
    hh_pairs = sum(1 for p in pairs if p["source"] == "hh")
    for members in repeated:
        assert any(members <= group for group in by_cluster.values())
    assert any(
        {m[0] for m in group} == {"bread"} and len(group) == 2 for group in by_cluster.values()
    )
    assert result["by_source"]["hh"] == {"kept": hh_pairs}, "prompt groups are not duplicates"
    assert result["prompt_groups"] == len(by_cluster)
