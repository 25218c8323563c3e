"""The loop's pairs and the pool each is in (D_un, D_gold, D_silver, D_wild, discarded).

A pair's pool follows from its label events (``pipelines.labels.events``); a pair without any
is in D_un when its source's labels come from humans (Stage 1), else in D_wild (Stage 2).
"""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.attributes.job import annotator_key, valid_attributes
from pipelines.core.config import JudgingConfig, LoopConfig
from pipelines.core.errors import SelectionError
from pipelines.core.lake import Lake
from pipelines.core.selection import select_pair_keys
from pipelines.core.sql import all_of, literal
from pipelines.labels.events import derive_labels, live_events
from storage_schemas import CURATION_STATUS, POOLS

KEYS = ["source", "pair_id"]
CONTROVERSY_RANK = {"low": 0, "medium": 1, "high": 2}


def loop_pairs(lake: Lake, loop: LoopConfig, pairs_version: int) -> pa.Table:
    """(source, pair_id) of the loop's pairs: corpus pairs matching ``loop.where``, only those
    hygiene kept when ``loop.curated_only``."""
    keys = select_pair_keys(lake, pairs_version, all_of("source_kind = 'corpus'", loop.where))
    if loop.curated_only:
        if not lake.exists(CURATION_STATUS.name):
            raise SelectionError(
                "loop.curated_only needs the curation_status table: run `synpref dedup` first "
                "(or set loop.curated_only: false)"
            )
        kept = lake.read(CURATION_STATUS.name, columns=KEYS, where="status = 'kept'")
        keys = keys.join(kept, KEYS, join_type="inner").sort_by(
            [("pair_id", "ascending"), ("source", "ascending")]
        )
    if keys.num_rows == 0:
        raise SelectionError(f"the loop has no pairs (loop.where {loop.where!r})")
    return keys


def pools(lake: Lake, loop: LoopConfig, pairs: pa.Table) -> pa.Table:
    """``pairs`` with their current ``label``, ``pool``, ``origin`` and deciding ``event_id``."""
    labels = derive_labels(live_events(lake), set(loop.human_sources))
    joined = pairs.join(
        labels.select([*KEYS, "label", "pool", "origin", "event_id"]), KEYS, join_type="left outer"
    )
    human = pc.is_in(joined["source"], pa.array(loop.human_sources, pa.string()))
    unlabelled = pc.is_null(joined["pool"])
    default_pool = pc.if_else(human, pa.scalar("D_un"), pa.scalar("D_wild"))
    columns = {
        "label": pc.fill_null(joined["label"], "keep"),
        "pool": pc.if_else(unlabelled, default_pool, joined["pool"]),
        "origin": pc.fill_null(joined["origin"], "original"),
    }
    for name, values in columns.items():
        joined = joined.set_column(joined.schema.get_field_index(name), name, values)
    return joined.sort_by([("pair_id", "ascending"), ("source", "ascending")])


def in_pool(table: pa.Table, *names: str) -> pa.Table:
    """The rows of a ``pools`` table in any of the pools ``names``."""
    return table.filter(pc.is_in(table["pool"], pa.array(names, pa.string())))


def composition(table: pa.Table) -> dict[str, int]:
    """Pairs per pool (every pool named, zero when empty)."""
    counts = Counter(table["pool"].to_pylist())
    return {pool: counts.get(pool, 0) for pool in POOLS}


def review_order(lake: Lake, judging: JudgingConfig, keys: pa.Table) -> pa.Table:
    """``keys`` ordered for people: objective before subjective, low controversiality first (as
    the paper sent the easiest-to-verify pairs to humans), pairs without attributes last, then
    in the order given."""
    key = annotator_key(judging.annotator, judging.annotator_template)
    attributes = {(a["source"], a["pair_id"]): a for a in valid_attributes(lake, key)}

    def rank(position: int, row: dict[str, str]) -> tuple[int, int, int]:
        found = attributes.get((row["source"], row["pair_id"]))
        if found is None:
            return (2, 3, position)
        objective = 0 if found["objectivity"] == "objective" else 1
        return (objective, CONTROVERSY_RANK.get(found["controversiality"], 3), position)

    rows = keys.select(KEYS).to_pylist()
    ordered = [row for _, row in sorted(enumerate(rows), key=lambda ir: rank(*ir))]
    return pa.Table.from_pylist(ordered, keys.select(KEYS).schema)


def keys_predicate(keys: pa.Table) -> str:
    """A SQL predicate on ``pairs`` selecting ``keys`` (and no other pair but the same content
    in another of their sources)."""
    if keys.num_rows == 0:
        return "FALSE"
    sources = ", ".join(literal(s) for s in sorted(set(keys["source"].to_pylist())))
    ids = ", ".join(literal(p) for p in keys["pair_id"].to_pylist())
    return f"source IN ({sources}) AND pair_id IN ({ids})"
