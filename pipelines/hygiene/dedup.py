"""Pair-aware deduplication: exact duplicates, label conflicts (flips), and the dedup job.

``dedup()`` runs the whole hygiene dedup step: the exact and flip decisions of this module,
near-duplicates (``near_dedup``) and optional prompt groups (``prompt_groups``).

Text-level dedup engines key on one column; a preference pair is a duplicate only when its
history and both responses match, and the same history and responses with chosen and rejected
swapped is a *conflict* between annotations, not a duplicate. Both are found from two content
keys per pair, computed on normalised text:

- ``exact_key``: hash of (history, chosen, rejected);
- ``flip_key``: hash of (history, {chosen, rejected}) with the two responses in a fixed order,
  plus the ``side`` (``a``/``b``) that says which order the pair uses.

Normalisation (``text_normalisation``): Unicode NFC, whitespace runs collapsed, ends stripped,
and (``casefold=True``) case folded. Raw pairs are never changed: decisions are rows of
``dedup_clusters`` and ``conflicts``; ``curation_status`` says per pair what hygiene keeps.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc
import ray
from matplotlib.figure import Figure

from pipelines.core import reporting
from pipelines.core.config import DedupConfig
from pipelines.core.jobs import PairsSummary, TableVersion
from pipelines.core.lake import Lake
from pipelines.core.text import normalise_text
from pipelines.hygiene.curation_status import rebuild_status
from pipelines.hygiene.near_dedup import near_duplicates
from pipelines.hygiene.prompt_groups import prompt_groups
from pipelines.ingest.formats import pair_id as content_hash
from storage_schemas import CONFLICTS, CURATION_STATUS, DEDUP_CLUSTERS, PAIRS

log = logging.getLogger(__name__)


KEYS_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("pair_id", pa.string(), nullable=False),
        pa.field("exact_key", pa.string(), nullable=False),
        pa.field("flip_key", pa.string(), nullable=False),
        pa.field("side", pa.string(), nullable=False),
        pa.field("prompt_key", pa.string(), nullable=False),
    ]
)


def content_keys(batch: pa.Table, casefold: bool = False) -> pa.Table:
    """``pairs`` rows -> ``KEYS_SCHEMA`` rows (pure; runs in Ray Data ``map_batches``)."""
    exact, flip, side, prompt = [], [], [], []
    for history, chosen, rejected in zip(
        batch["history"].to_pylist(),
        batch["chosen"].to_pylist(),
        batch["rejected"].to_pylist(),
        strict=True,
    ):
        h = [
            {"role": m["role"], "content": normalise_text(m["content"], casefold)} for m in history
        ]
        c, r = normalise_text(chosen, casefold), normalise_text(rejected, casefold)
        first, second = sorted((c, r))
        exact.append(content_hash(h, c, r))
        flip.append(content_hash(h, first, second))
        side.append("a" if c == first else "b")
        prompt.append(content_hash(h, "", ""))
    return pa.table(
        {
            "source": batch["source"],
            "pair_id": batch["pair_id"],
            "exact_key": pa.array(exact, pa.string()),
            "flip_key": pa.array(flip, pa.string()),
            "side": pa.array(side, pa.string()),
            "prompt_key": pa.array(prompt, pa.string()),
        },
        schema=KEYS_SCHEMA,
    )


def _ranked(keys: pa.Table, options: DedupConfig) -> pa.Table:
    ranks = [options.rank(s) for s in keys["source"].to_pylist()]
    return keys.append_column("rank", pa.array(ranks, pa.int32()))


def exact_clusters(keys: pa.Table, options: DedupConfig, run_id: str) -> pa.Table:
    """``dedup_clusters`` rows (method ``exact``) for every exact key shared by two or more pairs.

    The representative is the member from the highest-priority source, then the smallest
    pair_id: deterministic and independent of input order.
    """
    ordered = _ranked(keys, options).sort_by(
        [
            ("exact_key", "ascending"),
            ("rank", "ascending"),
            ("pair_id", "ascending"),
            ("source", "ascending"),
        ]
    )
    groups = ordered.group_by("exact_key", use_threads=False).aggregate(
        [("pair_id", "first"), ("source", "first"), ("pair_id", "count")]
    )
    groups = groups.filter(pc.greater_equal(groups["pair_id_count"], 2))
    members = ordered.join(groups, "exact_key", join_type="inner")
    now = datetime.now(UTC)
    return pa.table(
        {
            "method": pa.array(["exact"] * members.num_rows, pa.string()),
            "source": members["source"],
            "pair_id": members["pair_id"],
            "cluster_id": members["exact_key"],
            "cluster_size": pc.cast(members["pair_id_count"], pa.int32()),
            "representative_source": members["source_first"],
            "representative_pair_id": members["pair_id_first"],
            "dedup_run_id": pa.array([run_id] * members.num_rows, pa.string()),
            "decided_at": pa.array([now] * members.num_rows, pa.timestamp("us", tz="UTC")),
        },
        schema=DEDUP_CLUSTERS.schema,
    ).sort_by([("cluster_id", "ascending"), ("source", "ascending"), ("pair_id", "ascending")])


def flip_conflicts(keys: pa.Table, options: DedupConfig, run_id: str) -> pa.Table:
    """``conflicts`` rows for every flip key seen on both sides, resolved by the policy."""
    ranked = _ranked(keys, options)
    per_side = ranked.group_by(["flip_key", "side"]).aggregate(
        [("pair_id", "count"), ("rank", "min")]
    )
    sides = per_side.group_by("flip_key").aggregate([("side", "count_distinct")])
    conflicted = sides.filter(pc.equal(sides["side_count_distinct"], 2))["flip_key"]
    votes = {
        (row["flip_key"], row["side"]): (row["pair_id_count"], row["rank_min"])
        for row in per_side.filter(pc.is_in(per_side["flip_key"], conflicted)).to_pylist()
    }
    rows = []
    now = datetime.now(UTC)
    members = ranked.filter(pc.is_in(ranked["flip_key"], conflicted))
    for member in members.sort_by(
        [
            ("flip_key", "ascending"),
            ("side", "ascending"),
            ("source", "ascending"),
            ("pair_id", "ascending"),
        ]
    ).to_pylist():
        mine = votes[(member["flip_key"], member["side"])]
        theirs = votes[(member["flip_key"], "b" if member["side"] == "a" else "a")]
        resolution, reason = _resolve(mine, theirs, options)
        rows.append(
            {
                "conflict_id": member["flip_key"],
                "source": member["source"],
                "pair_id": member["pair_id"],
                "side": member["side"],
                "side_votes": mine[0],
                "other_side_votes": theirs[0],
                "policy": options.conflict_policy,
                "resolution": resolution,
                "reason": reason,
                "dedup_run_id": run_id,
                "decided_at": now,
            }
        )
    return pa.Table.from_pylist(rows, schema=CONFLICTS.schema)


def _resolve(
    mine: tuple[int, int], theirs: tuple[int, int], options: DedupConfig
) -> tuple[str, str]:
    """(resolution, reason) for one side; ``mine``/``theirs`` are (votes, best source rank)."""
    if options.conflict_policy == "majority":
        if mine[0] == theirs[0]:
            return "unresolved", f"tie {mine[0]} vs {theirs[0]}: left for judging"
        won = mine[0] > theirs[0]
        return ("kept" if won else "overruled"), f"majority {mine[0]} vs {theirs[0]}"
    if options.conflict_policy == "source_priority":
        if mine[1] == theirs[1]:
            return "unresolved", "both sides come from equally trusted sources: left for judging"
        won = mine[1] < theirs[1]
        return ("kept" if won else "overruled"), "source priority"
    return "unresolved", "policy 'judge': left for LLM judging"


@dataclass
class DedupSummary(PairsSummary):
    job: ClassVar[str] = "dedup"
    pairs_version: int
    pairs: int
    exact_clusters: int
    exact_duplicates: int
    near_clusters: int
    near_duplicates: int
    prompt_groups: int
    pairs_in_prompt_groups: int
    conflicts: int
    conflict_pairs_overruled: int
    conflict_pairs_unresolved: int
    by_source: dict[str, dict[str, int]]
    cluster_sizes: dict[str, dict[int, int]]
    """method -> {cluster size: clusters}"""
    written: dict[str, int | None]
    """Table -> new version, or None when the run changed nothing in it."""
    seconds: float

    def text(self) -> str:
        lines = [
            f"dedup of pairs v{self.pairs_version}: {self.pairs:,} pairs",
            f"  exact duplicates  {self.exact_duplicates:>10,} in {self.exact_clusters:,} clusters",
            f"  near duplicates   {self.near_duplicates:>10,} in {self.near_clusters:,} clusters",
            f"  prompt groups     {self.prompt_groups:>10,} ({self.pairs_in_prompt_groups:,} pairs "
            "whose histories say the same thing)",
            f"  label conflicts   {self.conflicts:>10,} ({self.conflict_pairs_overruled:,} pairs "
            f"overruled, {self.conflict_pairs_unresolved:,} left for judging)",
        ]
        for source, counts in sorted(self.by_source.items()):
            detail = ", ".join(f"{status} {n:,}" for status, n in sorted(counts.items()))
            lines.append(f"  {source:<24} {detail}")
        changed = [f"{t} v{v}" for t, v in self.written.items() if v is not None]
        lines.append(
            f"  wrote {', '.join(changed) if changed else 'nothing (no decision changed)'}"
        )
        lines.append(f"  took {self.seconds:.1f}s")
        return "\n".join(lines)

    def tables_written(self) -> list[TableVersion]:
        return [TableVersion(t, v) for t, v in self.written.items() if v is not None]

    def metrics(self) -> dict[str, float]:
        counts = {
            "pairs": self.pairs,
            "exact_clusters": self.exact_clusters,
            "exact_duplicates": self.exact_duplicates,
            "near_clusters": self.near_clusters,
            "near_duplicates": self.near_duplicates,
            "prompt_groups": self.prompt_groups,
            "conflicts": self.conflicts,
            "conflict_pairs_overruled": self.conflict_pairs_overruled,
            "conflict_pairs_unresolved": self.conflict_pairs_unresolved,
        }
        return counts | {
            f"status.{source}.{status}": n
            for source, by_status in self.by_source.items()
            for status, n in by_status.items()
        }

    def figures(self, lake: Lake) -> dict[str, Figure]:
        if not any(self.cluster_sizes.values()):
            return {}
        return {"cluster_sizes.png": reporting.cluster_sizes(self.cluster_sizes)}


CORPUS = pc.field("source_kind") == "corpus"
"""Hygiene applies to training data; benchmark sources are only read to decontaminate."""


def compute_keys(lake: Lake, version: int, casefold: bool) -> pa.Table:
    """Content keys of every corpus pair at ``version``, computed in parallel on Ray Data.

    Only the keys (about 100 bytes a pair) come back to the driver, where grouping is a
    multi-threaded Arrow hash aggregation.
    """
    pairs = lake.dataset(
        PAIRS.name, version, ["source", "pair_id", "history", "chosen", "rejected"], CORPUS
    )
    keys = pairs.map_batches(content_keys, batch_format="pyarrow", fn_kwargs={"casefold": casefold})
    tables = [t for t in ray.get(keys.to_arrow_refs()) if t.num_rows]
    return pa.concat_tables(tables).cast(KEYS_SCHEMA) if tables else KEYS_SCHEMA.empty_table()


DECISION_COLUMNS = {
    DEDUP_CLUSTERS.name: (
        "cluster_id",
        "cluster_size",
        "representative_source",
        "representative_pair_id",
    ),
    CONFLICTS.name: ("side", "side_votes", "other_side_votes", "policy", "resolution", "reason"),
}
"""Columns whose change makes a re-run rewrite a decision row (run ids and times do not)."""


def dedup(lake: Lake, options: DedupConfig, run_id: str) -> DedupSummary:
    """Exact dedup, flip detection and near-dedup over all pairs; writes the decision tables."""
    started = time.perf_counter()
    version = lake.version(PAIRS.name)
    keys = compute_keys(lake, version, options.casefold)
    log.info(
        f"[dedup] content keys of {keys.num_rows:,} pairs (pairs v{version}) "
        f"in {time.perf_counter() - started:.1f}s"
    )
    exact = exact_clusters(keys, options, run_id)
    conflicts = flip_conflicts(keys, options, run_id)
    near = DEDUP_CLUSTERS.schema.empty_table()
    if options.minhash.enabled:
        # near-duplicates among the pairs that are not exact duplicates of another pair
        repeats = exact.filter(
            pc.or_(
                pc.not_equal(exact["pair_id"], exact["representative_pair_id"]),
                pc.not_equal(exact["source"], exact["representative_source"]),
            )
        )
        near = near_duplicates(lake, version, repeats, options.minhash, options.rank, run_id)
    prompts = DEDUP_CLUSTERS.schema.empty_table()
    if options.prompt_groups.enabled:
        prompts = prompt_groups(lake, version, keys, options.prompt_groups, run_id)
    clusters = pa.concat_tables([exact, near, prompts])
    written = {}
    for spec, rows in ((DEDUP_CLUSTERS, clusters), (CONFLICTS, conflicts)):
        before = lake.version(spec.name) if lake.exists(spec.name) else None
        result = lake.replace_decisions(spec, rows, compare=DECISION_COLUMNS[spec.name])
        written[spec.name] = result.version if result.version != before else None
    status = rebuild_status(lake, keys.select(["source", "pair_id"]), run_id)
    written[CURATION_STATUS.name] = status.version
    log.info(f"[dedup] decisions written in {time.perf_counter() - started:.1f}s")
    sizes = exact.group_by("cluster_id").aggregate([("cluster_size", "min")])
    near_sizes = near.group_by("cluster_id").aggregate([("cluster_size", "min")])
    resolutions = conflicts["resolution"].to_pylist()
    return DedupSummary(
        pairs_version=version,
        pairs=keys.num_rows,
        exact_clusters=sizes.num_rows,
        exact_duplicates=exact.num_rows - sizes.num_rows,
        near_clusters=near_sizes.num_rows,
        near_duplicates=near.num_rows - near_sizes.num_rows,
        prompt_groups=len(set(prompts["cluster_id"].to_pylist())),
        pairs_in_prompt_groups=prompts.num_rows,
        conflicts=len(set(conflicts["conflict_id"].to_pylist())),
        conflict_pairs_overruled=resolutions.count("overruled"),
        conflict_pairs_unresolved=resolutions.count("unresolved"),
        by_source=status.counts,
        cluster_sizes={
            "exact": dict(Counter(sizes["cluster_size_min"].to_pylist())),
            "near": dict(Counter(near_sizes["cluster_size_min"].to_pylist())),
        },
        written=written,
        seconds=time.perf_counter() - started,
    )
