"""The single source of truth for every table of the lake: schema, keys, partitioning, constraints.

Schema version history (bump ``SCHEMA_VERSION`` and add a line on any change):

- 1: ``pairs`` and ``quarantine``.

Later capabilities register their tables here the same way (``dedup_clusters``,
``contamination``, ``attributes``, ``judgments``, ``labels``, ``rm_scores``, ``curated_sets``).
Hash columns are hex strings: Delta has no unsigned integer types.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

SCHEMA_VERSION = 1

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

TABLES: dict[str, TableSpec] = {spec.name: spec for spec in (PAIRS, QUARANTINE)}


def table_spec(name: str) -> TableSpec:
    """The spec of table ``name``, or a clear error listing the known tables."""
    try:
        return TABLES[name]
    except KeyError:
        raise KeyError(
            f"unknown table {name!r}; known tables: {', '.join(sorted(TABLES))}"
        ) from None
