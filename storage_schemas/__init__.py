"""The single source of truth for every table of the lake: schema, keys, partitioning, constraints.

Schema version history (bump ``SCHEMA_VERSION`` and add a line on any change):

- 1: ``pairs`` and ``quarantine``.
- 2: ``dedup_clusters``, ``conflicts``, ``contamination``, ``minhash_signatures``,
  ``curation_status`` (hygiene).
- 3: ``rm_scores`` (batch scoring with reward models).
- 4: ``judgments``, ``verdicts``, ``attributes`` (LLM judging and attribute annotation).
- 5: ``label_events``, ``labels``, ``curated_sets``, ``retrievals``, ``loop_state`` (the
  human-AI loop).

Later capabilities register their tables here the same way.
Hash columns are hex strings: Delta has no unsigned integer types.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

SCHEMA_VERSION = 5

MESSAGE = pa.struct(
    [
        pa.field("role", pa.string(), nullable=False),
        pa.field("content", pa.string(), nullable=False),
    ]
)
"""One chat message; a history is a list of them (roles: system, user, assistant, tool)."""

ROLES = ("system", "user", "assistant", "tool")
SOURCE_KINDS = ("corpus", "benchmark")


@dataclass(frozen=True)
class TableSpec:
    """What a table holds and how it is laid out in Delta.

    ``keys`` identify a row: writes are idempotent upserts/inserts on them. ``constraints`` are
    Delta CHECK constraints (SQL) added when the table is created; NOT NULL comes from the
    schema's non-nullable fields.
    """

    name: str
    description: str
    schema: pa.Schema
    keys: tuple[str, ...]
    partition_by: tuple[str, ...] = ()
    constraints: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [c for c in (*self.keys, *self.partition_by) if c not in self.schema.names]
        if missing:
            raise ValueError(f"table {self.name}: key/partition columns not in schema: {missing}")


def _sql_list(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


PAIRS = TableSpec(
    name="pairs",
    description=(
        "Canonical preference pairs as ingested; never modified. One row per distinct pair per "
        "source; curation decisions live in other tables keyed by pair_id."
    ),
    schema=pa.schema(
        [
            pa.field("pair_id", pa.string(), nullable=False),
            pa.field("source", pa.string(), nullable=False),
            pa.field("source_kind", pa.string(), nullable=False),
            pa.field("history", pa.list_(MESSAGE), nullable=False),
            pa.field("chosen", pa.string(), nullable=False),
            pa.field("rejected", pa.string(), nullable=False),
            pa.field("source_file", pa.string(), nullable=False),
            pa.field("source_row", pa.int64(), nullable=False),
            pa.field("source_item", pa.int32(), nullable=False),
            pa.field("source_meta", pa.string(), nullable=True),
            pa.field("history_turns", pa.int32(), nullable=False),
            pa.field("history_chars", pa.int64(), nullable=False),
            pa.field("chosen_chars", pa.int64(), nullable=False),
            pa.field("rejected_chars", pa.int64(), nullable=False),
            pa.field("ingest_run_id", pa.string(), nullable=False),
            pa.field("ingested_at", pa.timestamp("us", tz="UTC"), nullable=False),
        ]
    ),
    keys=("source", "pair_id"),
    partition_by=("source",),
    constraints={
        "source_kind_known": f"source_kind IN ({_sql_list(SOURCE_KINDS)})",
        "responses_differ": "chosen <> rejected",
        "responses_not_empty": "chosen_chars > 0 AND rejected_chars > 0",
        "position_valid": "source_row >= 0 AND source_item >= 0",
    },
)

QUARANTINE_REASONS = (
    "malformed_json",
    "not_an_object",
    "missing_field",
    "non_string_content",
    "empty_content",
    "invalid_role",
    "invalid_label",
    "identical_responses",
    "history_mismatch",
    "final_turn_not_assistant",
    "oversize",
    "no_preference",
    "duplicate_in_source",
)
"""Why an input row was not kept. ``duplicate_in_source`` points at the kept pair via pair_id."""

QUARANTINE = TableSpec(
    name="quarantine",
    description="Input rows that were not kept, with the reason and the raw record.",
    schema=pa.schema(
        [
            pa.field("quarantine_id", pa.string(), nullable=False),
            pa.field("source", pa.string(), nullable=False),
            pa.field("source_file", pa.string(), nullable=False),
            pa.field("source_row", pa.int64(), nullable=False),
            pa.field("source_item", pa.int32(), nullable=False),
            pa.field("reason", pa.string(), nullable=False),
            pa.field("detail", pa.string(), nullable=False),
            pa.field("record", pa.string(), nullable=False),
            pa.field("pair_id", pa.string(), nullable=True),
            pa.field("ingest_run_id", pa.string(), nullable=False),
            pa.field("quarantined_at", pa.timestamp("us", tz="UTC"), nullable=False),
        ]
    ),
    keys=("source", "quarantine_id"),
    partition_by=("source",),
    constraints={"reason_known": f"reason IN ({_sql_list(QUARANTINE_REASONS)})"},
)

DEDUP_METHODS = ("exact", "near", "prompt")

DEDUP_CLUSTERS = TableSpec(
    name="dedup_clusters",
    description=(
        "Membership of pairs in duplicate clusters (one row per member, singletons omitted); "
        "the representative is kept, the other members are duplicates of it."
    ),
    schema=pa.schema(
        [
            pa.field("method", pa.string(), nullable=False),
            pa.field("source", pa.string(), nullable=False),
            pa.field("pair_id", pa.string(), nullable=False),
            pa.field("cluster_id", pa.string(), nullable=False),
            pa.field("cluster_size", pa.int32(), nullable=False),
            pa.field("representative_source", pa.string(), nullable=False),
            pa.field("representative_pair_id", pa.string(), nullable=False),
            pa.field("dedup_run_id", pa.string(), nullable=False),
            pa.field("decided_at", pa.timestamp("us", tz="UTC"), nullable=False),
        ]
    ),
    keys=("method", "source", "pair_id"),
    partition_by=("method",),
    constraints={
        "method_known": f"method IN ({_sql_list(DEDUP_METHODS)})",
        "cluster_has_members": "cluster_size >= 2",
    },
)

CONFLICT_RESOLUTIONS = ("kept", "overruled", "unresolved")

CONFLICTS = TableSpec(
    name="conflicts",
    description=(
        "Pairs whose history and responses also occur with chosen and rejected swapped: one row "
        "per pair involved, with the side it is on, the policy applied and its outcome."
    ),
    schema=pa.schema(
        [
            pa.field("conflict_id", pa.string(), nullable=False),
            pa.field("source", pa.string(), nullable=False),
            pa.field("pair_id", pa.string(), nullable=False),
            pa.field("side", pa.string(), nullable=False),
            pa.field("side_votes", pa.int32(), nullable=False),
            pa.field("other_side_votes", pa.int32(), nullable=False),
            pa.field("policy", pa.string(), nullable=False),
            pa.field("resolution", pa.string(), nullable=False),
            pa.field("reason", pa.string(), nullable=False),
            pa.field("dedup_run_id", pa.string(), nullable=False),
            pa.field("decided_at", pa.timestamp("us", tz="UTC"), nullable=False),
        ]
    ),
    keys=("conflict_id", "source", "pair_id"),
    constraints={
        "side_known": "side IN ('a', 'b')",
        "resolution_known": f"resolution IN ({_sql_list(CONFLICT_RESOLUTIONS)})",
    },
)

CONTAMINATION = TableSpec(
    name="contamination",
    description=(
        "Corpus pairs sharing an n-gram with a benchmark text: one row per (pair, field, "
        "benchmark pair), with one matched n-gram as evidence."
    ),
    schema=pa.schema(
        [
            pa.field("source", pa.string(), nullable=False),
            pa.field("pair_id", pa.string(), nullable=False),
            pa.field("field", pa.string(), nullable=False),
            pa.field("benchmark_source", pa.string(), nullable=False),
            pa.field("benchmark_pair_id", pa.string(), nullable=False),
            pa.field("benchmark_field", pa.string(), nullable=False),
            pa.field("ngram", pa.string(), nullable=False),
            pa.field("n", pa.int32(), nullable=False),
            pa.field("decontamination_run_id", pa.string(), nullable=False),
            pa.field("decided_at", pa.timestamp("us", tz="UTC"), nullable=False),
        ]
    ),
    keys=("source", "pair_id", "field", "benchmark_source", "benchmark_pair_id"),
    partition_by=("source",),
    constraints={
        "field_known": "field IN ('history', 'chosen', 'rejected')",
        "benchmark_field_known": "benchmark_field IN ('prompt', 'response')",
    },
)

MINHASH_SIGNATURES = TableSpec(
    name="minhash_signatures",
    description=(
        "MinHash signatures and LSH band buckets of pairs, kept so that near-duplicate "
        "detection only hashes new pairs (incremental dedup). Raw little-endian arrays."
    ),
    schema=pa.schema(
        [
            pa.field("params_id", pa.string(), nullable=False),
            pa.field("source", pa.string(), nullable=False),
            pa.field("pair_id", pa.string(), nullable=False),
            pa.field("signature", pa.binary(), nullable=False),
            pa.field("buckets", pa.binary(), nullable=False),
        ]
    ),
    keys=("params_id", "source", "pair_id"),
    partition_by=("params_id",),
)

CURATION_STATUSES = ("kept", "exact_dup", "near_dup", "conflict", "contaminated")

CURATION_STATUS = TableSpec(
    name="curation_status",
    description=(
        "One row per pair: whether the hygiene step keeps it, and why not. Derived from the "
        "decision tables (dedup_clusters, conflicts, ...) and rebuilt by each hygiene job."
    ),
    schema=pa.schema(
        [
            pa.field("source", pa.string(), nullable=False),
            pa.field("pair_id", pa.string(), nullable=False),
            pa.field("status", pa.string(), nullable=False),
            pa.field("reason", pa.string(), nullable=False),
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("decided_at", pa.timestamp("us", tz="UTC"), nullable=False),
        ]
    ),
    keys=("source", "pair_id"),
    partition_by=("source",),
    constraints={"status_known": f"status IN ({_sql_list(CURATION_STATUSES)})"},
)

RM_SCORES = TableSpec(
    name="rm_scores",
    description=(
        "Reward-model scores of pairs: raw rewards of the chosen and the rejected response and "
        "p = sigmoid(r_chosen - r_rejected), per model and model version (batch scoring)."
    ),
    schema=pa.schema(
        [
            pa.field("model_name", pa.string(), nullable=False),
            pa.field("model_version", pa.string(), nullable=False),
            pa.field("source", pa.string(), nullable=False),
            pa.field("pair_id", pa.string(), nullable=False),
            pa.field("r_chosen", pa.float64(), nullable=False),
            pa.field("r_rejected", pa.float64(), nullable=False),
            pa.field("p", pa.float64(), nullable=False),
            pa.field("tokens", pa.int64(), nullable=False),
            pa.field("truncated", pa.bool_(), nullable=False),
            pa.field("score_run_id", pa.string(), nullable=False),
            pa.field("scored_at", pa.timestamp("us", tz="UTC"), nullable=False),
        ]
    ),
    keys=("model_name", "model_version", "source", "pair_id"),
    partition_by=("source",),
    constraints={"p_is_probability": "p >= 0 AND p <= 1"},
)

JUDGE_ORDERS = ("AB", "BA")
"""AB: chosen shown as response A; BA: chosen shown as response B."""
JUDGE_WINNERS = ("A", "B", "tie")
PREFERENCES = ("chosen", "rejected", "tie")

JUDGMENTS = TableSpec(
    name="judgments",
    description=(
        "One LLM judgment of a pair in one order (one sample): the judgment cache. Keyed by the "
        "pair, the judge model, the prompt template hash, the sampling parameters, the order and "
        "the sample index, so a re-run only judges what is missing. Invalid answers are rows too."
    ),
    schema=pa.schema(
        [
            pa.field("source", pa.string(), nullable=False),
            pa.field("pair_id", pa.string(), nullable=False),
            pa.field("model", pa.string(), nullable=False),
            pa.field("template_hash", pa.string(), nullable=False),
            pa.field("params_hash", pa.string(), nullable=False),
            pa.field("ordering", pa.string(), nullable=False),
            pa.field("sample", pa.int32(), nullable=False),
            pa.field("judge", pa.string(), nullable=False),
            pa.field("template", pa.string(), nullable=False),
            pa.field("valid", pa.bool_(), nullable=False),
            pa.field("invalid_reason", pa.string(), nullable=True),
            pa.field("winner", pa.string(), nullable=True),
            pa.field("preference", pa.string(), nullable=True),
            pa.field("p_chosen", pa.float64(), nullable=True),
            pa.field("output", pa.string(), nullable=False),
            pa.field("examples", pa.list_(pa.string()), nullable=False),
            pa.field("attempts", pa.int32(), nullable=False),
            pa.field("prompt_tokens", pa.int64(), nullable=False),
            pa.field("output_tokens", pa.int64(), nullable=False),
            pa.field("seconds", pa.float64(), nullable=False),
            pa.field("judge_run_id", pa.string(), nullable=False),
            pa.field("judged_at", pa.timestamp("us", tz="UTC"), nullable=False),
        ]
    ),
    keys=("source", "pair_id", "model", "template_hash", "params_hash", "ordering", "sample"),
    partition_by=("source",),
    constraints={
        "ordering_known": f"ordering IN ({_sql_list(JUDGE_ORDERS)})",
        "valid_has_winner": (
            f"(valid AND winner IN ({_sql_list(JUDGE_WINNERS)}) AND invalid_reason IS NULL) OR "
            "(NOT valid AND winner IS NULL AND invalid_reason IS NOT NULL)"
        ),
        "p_is_probability": "p_chosen IS NULL OR (p_chosen >= 0 AND p_chosen <= 1)",
    },
)

VERDICT_LEVELS = ("judge", "panel")
VERDICTS_KNOWN = ("agree", "disagree", "tie", "inconsistent", "invalid")
"""agree: the label stands; disagree: it should flip; tie: neither is better; inconsistent: the
verdict changed with the order (or the judges split); invalid: too few valid judgments."""

VERDICTS = TableSpec(
    name="verdicts",
    description=(
        "Aggregated LLM verdicts on pairs: one row per judge (over its samples and both orders) "
        "and one per panel (across judges, under an aggregation policy), with a confidence."
    ),
    schema=pa.schema(
        [
            pa.field("source", pa.string(), nullable=False),
            pa.field("pair_id", pa.string(), nullable=False),
            pa.field("judge_key", pa.string(), nullable=False),
            pa.field("level", pa.string(), nullable=False),
            pa.field("judge", pa.string(), nullable=False),
            pa.field("verdict", pa.string(), nullable=False),
            pa.field("confidence", pa.float64(), nullable=False),
            pa.field("p_chosen", pa.float64(), nullable=True),
            pa.field("votes", pa.int32(), nullable=False),
            pa.field("invalid", pa.int32(), nullable=False),
            pa.field("detail", pa.string(), nullable=False),
            pa.field("verdict_run_id", pa.string(), nullable=False),
            pa.field("decided_at", pa.timestamp("us", tz="UTC"), nullable=False),
        ]
    ),
    keys=("source", "pair_id", "judge_key"),
    partition_by=("source",),
    constraints={
        "level_known": f"level IN ({_sql_list(VERDICT_LEVELS)})",
        "verdict_known": f"verdict IN ({_sql_list(VERDICTS_KNOWN)})",
        "confidence_is_probability": "confidence >= 0 AND confidence <= 1",
    },
)

TASK_CATEGORIES = (
    "Information seeking",
    "Reasoning",
    "Planning",
    "Editing",
    "Coding & Debugging",
    "Math",
    "Role playing",
    "Data analysis",
    "Creative writing",
    "Advice seeking",
    "Brainstorming",
    "Others",
)
"""The Magpie task taxonomy."""
OBJECTIVITY = ("objective", "subjective")
CONTROVERSIALITY = ("low", "medium", "high")

ATTRIBUTES = TableSpec(
    name="attributes",
    description=(
        "The preference attributes of a pair written by an LLM (task category, objectivity, "
        "controversiality, desired attributes, instance-specific guideline), validated against "
        "a schema; answers still invalid after retries are rows with the reason."
    ),
    schema=pa.schema(
        [
            pa.field("source", pa.string(), nullable=False),
            pa.field("pair_id", pa.string(), nullable=False),
            pa.field("annotator_key", pa.string(), nullable=False),
            pa.field("model", pa.string(), nullable=False),
            pa.field("template", pa.string(), nullable=False),
            pa.field("template_hash", pa.string(), nullable=False),
            pa.field("valid", pa.bool_(), nullable=False),
            pa.field("invalid_reason", pa.string(), nullable=True),
            pa.field("task_category", pa.string(), nullable=True),
            pa.field("objectivity", pa.string(), nullable=True),
            pa.field("controversiality", pa.string(), nullable=True),
            pa.field("desired_attributes", pa.list_(pa.string()), nullable=True),
            pa.field("guideline", pa.string(), nullable=True),
            pa.field("output", pa.string(), nullable=False),
            pa.field("attempts", pa.int32(), nullable=False),
            pa.field("prompt_tokens", pa.int64(), nullable=False),
            pa.field("output_tokens", pa.int64(), nullable=False),
            pa.field("annotate_run_id", pa.string(), nullable=False),
            pa.field("annotated_at", pa.timestamp("us", tz="UTC"), nullable=False),
        ]
    ),
    keys=("source", "pair_id", "annotator_key"),
    partition_by=("source",),
    constraints={
        "valid_is_complete": (
            "(valid AND invalid_reason IS NULL AND task_category IS NOT NULL AND "
            "objectivity IS NOT NULL AND controversiality IS NOT NULL AND guideline IS NOT NULL) "
            "OR (NOT valid AND invalid_reason IS NOT NULL)"
        ),
        "task_category_known": (
            f"task_category IS NULL OR task_category IN ({_sql_list(TASK_CATEGORIES)})"
        ),
        "objectivity_known": f"objectivity IS NULL OR objectivity IN ({_sql_list(OBJECTIVITY)})",
        "controversiality_known": (
            f"controversiality IS NULL OR controversiality IN ({_sql_list(CONTROVERSIALITY)})"
        ),
    },
)

LABELS_KNOWN = ("keep", "flip", "discard", "unsure")
"""keep: the pair's label stands; flip: chosen and rejected swap; discard: out of the curated
data; unsure: no decision (the pair stays where it was)."""
LABEL_ORIGINS = ("original", "human", "llm-judge", "rm-consistency", "recycled")
POOLS = ("D_un", "D_gold", "D_silver", "D_wild", "discarded")
"""D_un: unverified Stage 1 pairs; D_gold: human-verified; D_silver: LLM-verified; D_wild: the
pairs of sources without human labels (Stage 2); discarded: a human or the loop dropped it."""

LABEL_EVENTS = TableSpec(
    name="label_events",
    description=(
        "Every labelling decision, append-only: one row per decision on a pair (keep, flip, "
        "discard, unsure) with its origin, who made it, the loop step, its evidence and the "
        "Delta versions it was made from. An undo is an event that revokes another."
    ),
    schema=pa.schema(
        [
            pa.field("event_id", pa.string(), nullable=False),
            pa.field("source", pa.string(), nullable=False),
            pa.field("pair_id", pa.string(), nullable=False),
            pa.field("label", pa.string(), nullable=True),
            pa.field("origin", pa.string(), nullable=False),
            pa.field("who", pa.string(), nullable=False),
            pa.field("loop", pa.string(), nullable=True),
            pa.field("iteration", pa.int32(), nullable=True),
            pa.field("step", pa.string(), nullable=True),
            pa.field("confidence", pa.float64(), nullable=True),
            pa.field("evidence", pa.string(), nullable=False),
            pa.field("read_versions", pa.string(), nullable=False),
            pa.field("revokes", pa.string(), nullable=True),
            pa.field("run_id", pa.string(), nullable=True),
            pa.field("decided_at", pa.timestamp("us", tz="UTC"), nullable=False),
        ]
    ),
    keys=("event_id",),
    constraints={
        "label_known": f"label IS NULL OR label IN ({_sql_list(LABELS_KNOWN)})",
        "origin_known": f"origin IN ({_sql_list(LABEL_ORIGINS)})",
        "label_or_undo": (
            "(label IS NULL AND revokes IS NOT NULL) OR (label IS NOT NULL AND revokes IS NULL)"
        ),
    },
)

LABELS = TableSpec(
    name="labels",
    description=(
        "Each labelled pair's current label and pool, derived from label_events (rebuilt by "
        "the loop and by `synpref labels`); the event that decided it explains it."
    ),
    schema=pa.schema(
        [
            pa.field("source", pa.string(), nullable=False),
            pa.field("pair_id", pa.string(), nullable=False),
            pa.field("label", pa.string(), nullable=False),
            pa.field("pool", pa.string(), nullable=False),
            pa.field("origin", pa.string(), nullable=False),
            pa.field("event_id", pa.string(), nullable=False),
            pa.field("confidence", pa.float64(), nullable=True),
            pa.field("events", pa.int32(), nullable=False),
        ]
    ),
    keys=("source", "pair_id"),
    constraints={
        "label_known": f"label IN ({_sql_list(LABELS_KNOWN)})",
        "pool_known": f"pool IN ({_sql_list(POOLS)})",
    },
)

CURATED_SETS = TableSpec(
    name="curated_sets",
    description=(
        "Named sets of pairs with the label they are trained with (flipped or not), e.g. a "
        "loop's curated set or its training and gold sets; a set at a Delta version is what "
        "`synpref train --set NAME@VERSION` reads."
    ),
    schema=pa.schema(
        [
            pa.field("set_name", pa.string(), nullable=False),
            pa.field("source", pa.string(), nullable=False),
            pa.field("pair_id", pa.string(), nullable=False),
            pa.field("flipped", pa.bool_(), nullable=False),
            pa.field("origin", pa.string(), nullable=False),
            pa.field("event_id", pa.string(), nullable=True),
        ]
    ),
    keys=("set_name", "source", "pair_id"),
    partition_by=("set_name",),
)

RETRIEVALS = TableSpec(
    name="retrievals",
    description=(
        "Stage 1 error-driven retrieval: for each gold pair, the unverified pairs most similar "
        "to it (k by the RM's p on the gold pair), per loop iteration."
    ),
    schema=pa.schema(
        [
            pa.field("loop", pa.string(), nullable=False),
            pa.field("iteration", pa.int32(), nullable=False),
            pa.field("gold_source", pa.string(), nullable=False),
            pa.field("gold_pair_id", pa.string(), nullable=False),
            pa.field("source", pa.string(), nullable=False),
            pa.field("pair_id", pa.string(), nullable=False),
            pa.field("rank", pa.int32(), nullable=False),
            pa.field("similarity", pa.float64(), nullable=False),
            pa.field("gold_p", pa.float64(), nullable=False),
            pa.field("k", pa.int32(), nullable=False),
        ]
    ),
    keys=("loop", "iteration", "gold_source", "gold_pair_id", "source", "pair_id"),
)

LOOP_STATE = TableSpec(
    name="loop_state",
    description=(
        "The steps of each loop as they commit, with what they produced (Delta versions, "
        "models, runs): a resumed loop starts at the first step not here."
    ),
    schema=pa.schema(
        [
            pa.field("loop", pa.string(), nullable=False),
            pa.field("step", pa.string(), nullable=False),
            pa.field("position", pa.int32(), nullable=False),
            pa.field("result", pa.string(), nullable=False),
            pa.field("run_id", pa.string(), nullable=True),
            pa.field("committed_at", pa.timestamp("us", tz="UTC"), nullable=False),
        ]
    ),
    keys=("loop", "step"),
)

TABLES: dict[str, TableSpec] = {
    spec.name: spec
    for spec in (
        PAIRS,
        QUARANTINE,
        DEDUP_CLUSTERS,
        CONFLICTS,
        CONTAMINATION,
        MINHASH_SIGNATURES,
        CURATION_STATUS,
        RM_SCORES,
        JUDGMENTS,
        VERDICTS,
        ATTRIBUTES,
        LABEL_EVENTS,
        LABELS,
        CURATED_SETS,
        RETRIEVALS,
        LOOP_STATE,
    )
}


def table_spec(name: str) -> TableSpec:
    """The spec of table ``name``, or a clear error listing the known tables."""
    try:
        return TABLES[name]
    except KeyError:
        raise KeyError(
            f"unknown table {name!r}; known tables: {', '.join(sorted(TABLES))}"
        ) from None
