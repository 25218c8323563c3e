"""The incremental actor-pool stage of judging, attributes and scoring: work out which output
rows are missing, compute only those on a Ray Data actor pool, and merge them into their Delta
table as blocks finish, so that a crash loses at most the blocks in flight and a re-run does
only what is still missing."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray
from ray.data._internal.logical.interfaces import LogicalPlan

from pipelines.core.config import ActorPoolConfig
from pipelines.core.errors import ResourceError
from pipelines.core.lake import Lake
from storage_schemas import PAIRS, TableSpec

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
    """Refuse actor pools whose CPUs together leave less than a task's share of the cluster: Ray
    Data could then never schedule the tasks that read the pairs, and the job would hang."""
    cpus = ray.cluster_resources().get("CPU", 0)
    wanted = sum(pool.actors * pool.num_cpus for pool in pools.values())
    if wanted > cpus - REQUEST_BLOCK_CPUS:
        detail = ", ".join(f"{name} {p.actors} x {p.num_cpus:g}" for name, p in pools.items())
        raise ResourceError(
            f"actor pools take {wanted:g} of {cpus:g} CPUs ({detail}: actors x num_cpus): Ray "
            "Data could never schedule the reads of pairs. Use fewer actors or a fractional "
            "num_cpus (e.g. 0.5)."
        )


def on_pool(
    dataset: ray.data.Dataset, actor: type, actor_args: tuple[Any, ...], pool: ActorPoolConfig
) -> ray.data.Dataset:
    """``dataset`` mapped through ``actor(*actor_args)`` on ``pool``'s actors (Arrow batches).

    An actor whose node dies is started again elsewhere and the batches it held are sent again:
    Ray Data's actor pools default to ``max_restarts``/``max_task_retries`` -1, which the
    node-loss test relies on (every actor's work is idempotent). They are not passed here: Ray
    2.60 deprecates ``map_batches``' other remote arguments, and 2.64 removes them."""
    return dataset.map_batches(
        actor,
        fn_constructor_args=actor_args,
        batch_format="pyarrow",
        batch_size=pool.batch_size,
        compute=ray.data.ActorPoolStrategy(size=pool.actors),
        num_cpus=pool.num_cpus,
        num_gpus=pool.num_gpus or None,
        resources=pool.resources or None,
    )


def in_blocks_of(dataset: ray.data.Dataset, rows: int, num_cpus: float) -> ray.data.Dataset:
    """``dataset`` in blocks of exactly ``rows`` rows but the last (a streaming repartition, no
    shuffle; ``strict``: without it a block may be cut short wherever an input block ends, and
    a training worker then brings fewer pairs to that step), its tasks asking ``num_cpus``.

    Ray Data's ``repartition`` takes no resources argument and its tasks ask for a whole CPU,
    which is never free beside training workers or actor pools on a small machine (the job
    hangs): the same logical operator is planned with the given CPUs instead."""
    repartition = dataset.repartition(target_num_rows_per_block=rows, strict=True)
    repartition = repartition._logical_plan.dag
    light = dataclasses.replace(repartition, ray_remote_args={"num_cpus": num_cpus})
    return ray.data.Dataset._from_parent(dataset, LogicalPlan(light, dataset.context))


REQUEST_BLOCK_CPUS = 0.25
"""CPUs per task that reads a stage's pairs and cuts them into request blocks (the actors hold
the rest). A whole CPU would wait for ever where the actors leave less than one on every node
(two 0.5-CPU actors on two 1-CPU nodes, the third lost): at 1.0 the node-loss test hangs on two
such nodes (tests/multinode_faults.py, docs/reliability.md)."""


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
    # One block per actor call: the pool's actors share the work, and each finished call is a
    # block the driver can merge (a stage of few, large blocks would merge only at the end).
    requests = in_blocks_of(dataset, pool.batch_size, REQUEST_BLOCK_CPUS)
    mapped = on_pool(requests, actor, actor_args, pool)
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
    _check_count(name, rows, expected_rows)
    return StageResult(rows, version)


def stage_pairs(
    lake: Lake, version: int, columns: list[str], keys: pa.Table | None
) -> ray.data.Dataset:
    """``columns`` of ``pairs`` at ``version`` (only the pairs ``keys``, when given) for a stage,
    read by tasks of ``REQUEST_BLOCK_CPUS``, the share its actor pools leave."""
    return lake.dataset(PAIRS.name, version, columns, keys=keys, read_cpus=REQUEST_BLOCK_CPUS)


def run_on_pairs(
    name: str,
    lake: Lake,
    version: int,
    columns: list[str],
    keys: pa.Table,
    actor: type,
    actor_args: tuple[Any, ...],
    pool: tuple[str, ActorPoolConfig],
    output: TableSpec,
    merge: Callable[[pa.Table], int],
    in_process: bool,
    every_pair: bool = False,
) -> StageResult:
    """The stage over the pairs ``keys``, one output row each: ``columns`` of ``pairs`` at
    ``version`` through ``actor``, in this process for a small set (``in_process``), else on
    the named pool (``every_pair``: all pairs are wanted, so the read filters no keys)."""
    if in_process:
        rows = lake.read_pairs(PAIRS.name, version, columns, keys)
        return run_in_process(name, rows, actor, actor_args, merge, keys.num_rows)
    pool_name, config = pool
    check_cpus({pool_name: config})
    dataset = stage_pairs(lake, version, columns, None if every_pair else keys)
    return run_stage(name, dataset, actor, actor_args, config, output, merge, keys.num_rows)


def run_in_process(
    name: str,
    rows: pa.Table,
    actor: type,
    actor_args: tuple[Any, ...],
    merge: Callable[[pa.Table], int],
    expected_rows: int,
) -> StageResult:
    """``run_stage`` for a small set (``ActorPoolConfig.in_process``): the same actor class,
    built and called in this process on all of ``rows``, merged once."""
    log.info(f"[{name}] a small set: computed in this process (on_driver_max)")
    new = actor(*actor_args)(rows)
    _check_count(name, new, expected_rows)
    return StageResult(new, merge(new))


def _check_count(name: str, rows: pa.Table, expected_rows: int) -> None:
    if rows.num_rows != expected_rows:
        raise RuntimeError(f"{name}: {rows.num_rows} output rows for {expected_rows} requests")
