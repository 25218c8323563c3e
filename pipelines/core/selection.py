"""Which pairs a job works on: a SQL predicate over ``pairs`` at a pinned version, optionally
cut to a fixed pseudo-random sample."""

from __future__ import annotations

import pyarrow as pa
from deltalake.exceptions import DeltaError

from pipelines.core.errors import SelectionError
from pipelines.core.lake import Lake
from storage_schemas import PAIRS


def select_pair_keys(
    lake: Lake, version: int, where: str | None = None, limit: int | None = None
) -> pa.Table:
    """(source, pair_id) of the pairs matching ``where``; with ``limit``, the ``limit`` pairs with
    the smallest pair_id (a fixed pseudo-random sample: ids are content hashes)."""
    if where:
        lake.check_predicate(PAIRS.name, where, version)
    try:
        selected = lake.read(PAIRS.name, version, ["source", "pair_id"], where)
    except DeltaError as exc:
        raise SelectionError(f"{where!r} is not a SQL predicate on pairs: {exc}") from None
    selected = selected.sort_by([("pair_id", "ascending"), ("source", "ascending")])
    return selected.slice(0, limit) if limit is not None else selected
