"""The incremental actor-pool stage of judging, attributes and scoring: work out which output
rows are missing, compute only those on a Ray Data actor pool, and merge them into their Delta
table as blocks finish, so that a crash loses at most the blocks in flight and a re-run does
only what is still missing."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray

from pipelines.core.config import ActorPoolConfig
from pipelines.core.errors import ResourceError
from pipelines.core.lake import Lake
from storage_schemas import TableSpec

log = logging.getLogger(__name__)

FAILED_REQUEST = "invalid_reason LIKE 'request_failed%'"
"""Output rows of requests that never got an answer (server down, timeout, rate limit): a later
run asks again, unlike rows with an answer, valid or not."""
REJECTED_REQUEST = "invalid_reason LIKE 'request_rejected%'"
"""Output rows of requests the server refused for good (a 4xx such as 400 or 422): asked again
only when a run says so (``retry_rejected``), since the same request fails the same way."""


def missing_rows(
    lake: Lake, output: TableSpec, wanted: pa.Table, identity: str, retry_rejected: bool = False
) -> pa.Table:
    """The rows of ``wanted`` (key columns only) for which ``output`` has no row matching the
    SQL predicate ``identity`` (this judge, annotator or model). Failed requests count as
    missing, and rejected ones when ``retry_rejected``."""
    if not lake.exists(output.name) or not wanted.num_rows:
        return wanted
    where = identity
    if "invalid_reason" in output.schema.names:
        again = [FAILED_REQUEST] + ([REJECTED_REQUEST] if retry_rejected else [])
        where = f"({identity}) AND (invalid_reason IS NULL OR NOT ({' OR '.join(again)}))"
    done = lake.read(output.name, columns=wanted.column_names, where=where)
    return wanted.join(done, wanted.column_names, join_type="left anti")


def check_cpus(pools: dict[str, ActorPoolConfig]) -> None:
    """Refuse actor pools whose CPUs together take every CPU of the cluster: Ray Data could
    then never schedule the tasks that read the pairs, and the job would hang."""
    cpus = ray.cluster_resources().get("CPU", 0)
    wanted = sum(pool.actors * pool.num_cpus for pool in pools.values())
    if wanted >= cpus:
        detail = ", ".join(f"{name} {p.actors} x {p.num_cpus:g}" for name, p in pools.items())
        raise ResourceError(
            f"actor pools take {wanted:g} of {cpus:g} CPUs ({detail}: actors x num_cpus): Ray "
            "Data could never schedule the reads of pairs. Use fewer actors or a fractional "
            "num_cpus (e.g. 0.5)."
        )


def on_pool(
    dataset: ray.data.Dataset, actor: type, actor_args: tuple[Any, ...], pool: ActorPoolConfig
) -> ray.data.Dataset:
    """``dataset`` mapped through ``actor(*actor_args)`` on ``pool``'s actors (Arrow batches)."""
    return dataset.map_batches(
        actor,
        fn_constructor_args=actor_args,
        batch_format="pyarrow",
        batch_size=pool.batch_size,
        compute=ray.data.ActorPoolStrategy(size=pool.actors),
        num_cpus=pool.num_cpus,
        num_gpus=pool.num_gpus or None,
    )


@dataclass(frozen=True)
class StageResult:
    rows: pa.Table
    """Every output row this run computed."""
    version: int | None
    """The output table's version after the last merge (``None``: nothing merged)."""


def run_stage(
    name: str,
    dataset: ray.data.Dataset,
    actor: type,
    actor_args: tuple[Any, ...],
    pool: ActorPoolConfig,
    output: TableSpec,
    merge: Callable[[pa.Table], int],
    expected_rows: int,
) -> StageResult:
    """Map ``dataset`` through ``actor`` on ``pool`` and merge the output rows (``merge``
    returns the new table version) as blocks finish, every ``pool.merge_every_s`` seconds."""
    mapped = on_pool(dataset, actor, actor_args, pool)
    done: list[pa.Table] = []
    pending: list[pa.Table] = []
    version = None
    last_merge = time.monotonic()

    def merge_pending() -> None:
        nonlocal version, last_merge
        if pending:
            rows = pa.concat_tables(pending)
            version = merge(rows)
            done.append(rows)
            pending.clear()
            log.info(f"[{name}] {sum(t.num_rows for t in done):,}/{expected_rows:,} rows merged")
        last_merge = time.monotonic()

    for block in mapped.iter_batches(batch_size=None, batch_format="pyarrow"):
        if block.num_rows:
            pending.append(block)
        if time.monotonic() - last_merge >= pool.merge_every_s:
            merge_pending()
    merge_pending()
    rows = pa.concat_tables(done) if done else output.schema.empty_table()
    if rows.num_rows != expected_rows:
        raise RuntimeError(f"{name}: {rows.num_rows} output rows for {expected_rows} requests")
    return StageResult(rows, version)
