"""The per-pair verdict of the hygiene step, derived from the decision tables.

``curation_status`` is a materialised view: each hygiene job (dedup, decontaminate) writes its
own decision table, then rebuilds this one from all of them, so the verdict never depends on
which job ran last. Precedence, strongest first: ``contaminated``, ``conflict`` (overruled or
unresolved flip), ``exact_dup``/``near_dup`` (not the cluster's representative), ``kept``.
Rows are rewritten only when their status or reason changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.core.lake import Lake
from storage_schemas import CONFLICTS, CONTAMINATION, CURATION_STATUS, DEDUP_CLUSTERS

KEPT = ("kept", "no duplicate, conflict or contamination found")


@dataclass(frozen=True)
class StatusResult:
    version: int | None
    """The new ``curation_status`` version, or None when no verdict changed."""
    counts: dict[str, dict[str, int]]
    """{source: {status: pairs}}"""


def derive(
    pairs: pa.Table,
    clusters: pa.Table,
    conflicts: pa.Table,
    contamination: pa.Table,
    run_id: str,
) -> pa.Table:
    """One ``curation_status`` row per pair of ``pairs`` (columns source, pair_id)."""
    decided: dict[tuple[str, str], tuple[str, str]] = {}
    duplicates = clusters.filter(
        pc.and_(
            pc.not_equal(clusters["method"], "prompt"),  # prompt groups are not duplicates
            pc.or_(
                pc.not_equal(clusters["pair_id"], clusters["representative_pair_id"]),
                pc.not_equal(clusters["source"], clusters["representative_source"]),
            ),
        )
    )
    # near first, so that exact (the stronger finding) wins when a pair is in both
    for row in duplicates.sort_by([("method", "descending")]).to_pylist():
        decided[(row["source"], row["pair_id"])] = (
            f"{row['method']}_dup",
            f"{row['method']} duplicate of {row['representative_source']}/"
            f"{row['representative_pair_id']} (cluster of {row['cluster_size']})",
        )
    for row in conflicts.filter(pc.not_equal(conflicts["resolution"], "kept")).to_pylist():
        decided[(row["source"], row["pair_id"])] = (
            "conflict",
            f"label conflict {row['conflict_id'][:12]}: {row['resolution']} ({row['reason']})",
        )
    evidence_order = [(c, "descending") for c in ("field", "benchmark_source", "benchmark_pair_id")]
    for row in contamination.sort_by(evidence_order).to_pylist():  # the smallest evidence wins
        decided[(row["source"], row["pair_id"])] = (
            "contaminated",
            f"{row['field']} shares a {row['n']}-gram with {row['benchmark_source']}/"
            f'{row["benchmark_pair_id"]} {row["benchmark_field"]}: "{row["ngram"]}"',
        )
    statuses = [
        decided.get(key, KEPT)
        for key in zip(pairs["source"].to_pylist(), pairs["pair_id"].to_pylist(), strict=True)
    ]
    n = pairs.num_rows
    return pa.table(
        {
            "source": pairs["source"],
            "pair_id": pairs["pair_id"],
            "status": pa.array([s for s, _ in statuses], pa.string()),
            "reason": pa.array([r for _, r in statuses], pa.string()),
            "run_id": pa.array([run_id] * n, pa.string()),
            "decided_at": pa.array([datetime.now(UTC)] * n, pa.timestamp("us", tz="UTC")),
        },
        schema=CURATION_STATUS.schema,
    )


def rebuild_status(lake: Lake, pairs: pa.Table, run_id: str) -> StatusResult:
    """Re-derive every pair's status from the decision tables in the lake and store it."""
    decisions = [
        lake.read(spec.name) if lake.exists(spec.name) else spec.schema.empty_table()
        for spec in (DEDUP_CLUSTERS, CONFLICTS, CONTAMINATION)
    ]
    status = derive(pairs, *decisions, run_id)
    before = lake.version(CURATION_STATUS.name) if lake.exists(CURATION_STATUS.name) else None
    result = lake.replace_decisions(CURATION_STATUS, status, compare=("status", "reason"))
    counts: dict[str, dict[str, int]] = {}
    grouped = status.group_by(["source", "status"]).aggregate([("pair_id", "count")])
    for row in grouped.to_pylist():
        counts.setdefault(row["source"], {})[row["status"]] = row["pair_id_count"]
    return StatusResult(result.version if result.version != before else None, counts)
