"""Delta Lake access: tables under one root (path or ``s3://``), idempotent writes, time travel.

Every table is declared in ``storage_schemas``; this module creates it from its spec (schema,
partitioning, CHECK constraints) on first use. Writes return the new table version so that jobs
can record exactly what they wrote. Concurrent writers are expected (several Ray jobs on one
lake): a commit that loses the race raises ``CommitFailedError`` and is retried on the new
snapshot, which keeps key-based inserts idempotent.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import ray
from deltalake import CommitProperties, DeltaTable, QueryBuilder, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError

from pipelines.core.errors import SelectionError
from pipelines.core.sql import literal
from storage_schemas import SCHEMA_VERSION, TABLES, TableSpec

log = logging.getLogger(__name__)

T = TypeVar("T")
ArrowData = pa.Table | pads.Dataset
"""Data to write: an in-memory table, or a (re-scannable) dataset such as staged Parquet."""


@dataclass(frozen=True)
class WriteResult:
    """What a write did: the table version it produced and how many rows it added or changed."""

    table: str
    version: int
    rows_inserted: int
    rows_updated: int = 0
    rows_deleted: int = 0


@dataclass(frozen=True)
class TableInfo:
    name: str
    uri: str
    version: int
    rows: int
    files: int


class Lake:
    """The lake at ``root``: ``./lake``, ``/data/lake`` or ``s3://bucket/prefix``.

    ``storage_options`` go to deltalake unchanged (e.g. ``AWS_ENDPOINT_URL``, ``AWS_REGION``,
    ``AWS_ALLOW_HTTP``), so an object store is a matter of configuration.
    """

    def __init__(
        self,
        root: str,
        storage_options: dict[str, str] | None = None,
        max_commit_attempts: int = 8,
    ) -> None:
        self.root = root.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.max_commit_attempts = max_commit_attempts

    def uri(self, name: str) -> str:
        return f"{self.root}/{name}"

    def exists(self, name: str) -> bool:
        return DeltaTable.is_deltatable(self.uri(name), storage_options=self.storage_options)

    def table(self, spec: TableSpec, version: int | None = None) -> DeltaTable:
        """Open the table, creating it from its spec when it does not exist yet."""
        if version is None and not self.exists(spec.name):
            self._create(spec)
        return DeltaTable(
            self.uri(spec.name), version=version, storage_options=self.storage_options
        )

    def _create(self, spec: TableSpec) -> None:
        dt = DeltaTable.create(
            self.uri(spec.name),
            schema=spec.schema,
            partition_by=list(spec.partition_by) or None,
            name=spec.name,
            description=spec.description,
            storage_options=self.storage_options,
            mode="ignore",  # another writer may create it at the same moment
            commit_properties=CommitProperties(
                custom_metadata={"synpref.schemaVersion": str(SCHEMA_VERSION)}
            ),
        )
        existing = dt.metadata().configuration
        missing = {
            name: expr
            for name, expr in spec.constraints.items()
            if f"delta.constraints.{name}" not in existing
        }
        if missing:
            self._retry(lambda: dt.alter.add_constraint(missing), f"add constraints to {spec.name}")
        log.info("created Delta table %s at %s", spec.name, self.uri(spec.name))

    def append(self, spec: TableSpec, data: pa.Table) -> WriteResult:
        """Append rows as they are (use ``insert_new`` when re-runs must not duplicate)."""
        data = conform(data, spec)

        def attempt() -> WriteResult:
            dt = self.table(spec)
            write_deltalake(dt, data, mode="append")
            return WriteResult(spec.name, dt.version(), data.num_rows)

        return self._retry(attempt, f"append to {spec.name}")

    def insert_new(self, spec: TableSpec, data: ArrowData) -> WriteResult:
        """Insert the rows whose keys are not in the table yet; existing rows are untouched.

        This is the idempotent write of the platform: re-running a job re-sends its rows and adds
        nothing. ``data`` must be unique on the table's keys.
        """
        return self._merge(spec, data, update_existing=False)

    def upsert(
        self, spec: TableSpec, data: ArrowData, compare: tuple[str, ...] | None = None
    ) -> WriteResult:
        """Insert new keys and overwrite the non-key columns of existing ones.

        With ``compare``, an existing row is rewritten only when one of those columns differs, so
        a job that re-derives the same decisions (with a new run id) makes no commit.
        """
        return self._merge(spec, data, update_existing=True, compare=compare)

    def replace_decisions(
        self,
        spec: TableSpec,
        data: pa.Table,
        compare: tuple[str, ...],
        scope: str | None = None,
    ) -> WriteResult:
        """Make the table hold exactly ``data``: upsert it (rewriting only changed rows) and
        delete the rows it no longer has (only rows matching ``scope``, a SQL predicate on the
        table's columns, when given). For decision tables that a job re-derives in full;
        earlier decisions stay readable by time travel. Same decisions: no commit."""
        delete = scope if scope is not None else True
        return self._merge(spec, data, update_existing=True, compare=compare, delete_missing=delete)

    def _merge(
        self,
        spec: TableSpec,
        data: ArrowData,
        update_existing: bool,
        compare: tuple[str, ...] | None = None,
        delete_missing: bool | str = False,
    ) -> WriteResult:
        if isinstance(data, pa.Table):
            data = conform(data, spec)
            _check_unique(data, spec)
            if data.num_rows == 0 and not delete_missing:
                return WriteResult(spec.name, self.table(spec).version(), 0)
        predicate = " AND ".join(f"t.`{k}` = s.`{k}`" for k in spec.keys)

        def attempt() -> WriteResult:
            dt = self.table(spec)
            source = data if isinstance(data, pa.Table) else _conformed_reader(data, spec)
            merger = dt.merge(
                source=source,
                predicate=predicate,
                source_alias="s",
                target_alias="t",
                commit_properties=CommitProperties(
                    custom_metadata={"synpref.operation": "upsert" if update_existing else "insert"}
                ),
            )
            if update_existing:
                changed = " OR ".join(f"s.`{c}` <> t.`{c}`" for c in compare or ())
                merger = merger.when_matched_update_all(predicate=changed or None)
            merger = merger.when_not_matched_insert_all()
            if delete_missing:
                scope = delete_missing if isinstance(delete_missing, str) else None
                merger = merger.when_not_matched_by_source_delete(scope)
            metrics = merger.execute()
            return WriteResult(
                spec.name,
                dt.version(),
                int(metrics.get("num_target_rows_inserted", 0)),
                int(metrics.get("num_target_rows_updated", 0)),
                int(metrics.get("num_target_rows_deleted", 0)),
            )

        return self._retry(attempt, f"merge into {spec.name}")

    def read(
        self,
        name: str,
        version: int | None = None,
        columns: list[str] | None = None,
        where: str | None = None,
        limit: int | None = None,
    ) -> pa.Table:
        """Rows of table ``name`` at ``version`` (time travel; latest when ``None``).

        ``where`` is a SQL predicate (DataFusion dialect), e.g. ``"source = 'hh'"``. Reads go
        through deltalake's DataFusion engine rather than ``to_pyarrow_dataset``, whose Python
        filesystem wrapper aborts the interpreter at exit in deltalake 1.6.
        """
        dt = self._open(name, version)
        projection = ", ".join(f'"{c}"' for c in columns) if columns else "*"
        sql = f"SELECT {projection} FROM t" + _where(where)
        sql += f" LIMIT {int(limit)}" if limit is not None else ""
        rows = pa.table(QueryBuilder().register("t", dt).execute(sql))
        # DataFusion returns string_view; give callers the declared Arrow types (plain strings
        # for a table without a spec: Arrow joins and kernels do not all take views).
        spec = TABLES.get(name)
        if spec is not None:
            return rows.cast(pa.schema([spec.schema.field(c) for c in rows.column_names]))
        return rows.cast(
            pa.schema(
                pa.field(f.name, pa.string(), f.nullable) if f.type == pa.string_view() else f
                for f in rows.schema
            )
        )

    def dataset(
        self,
        name: str,
        version: int | None = None,
        columns: list[str] | None = None,
        filter: pc.Expression | None = None,
        keys: pa.Table | None = None,
        read_cpus: float | None = None,
    ) -> ray.data.Dataset:
        """Table ``name`` at ``version`` as a Ray Dataset, read in parallel by the workers;
        with ``keys`` (source, pair_id), only those pairs' rows. ``read_cpus`` below 1 lets
        reads run beside actors that hold most CPUs (training workers on a small machine).

        One block per data file (at least two per CPU): Ray's default of 200 blocks splits
        100 MB files into slivers whose per-task overhead dominated (7x slower, measured).
        """
        files = len(self._open(name, version).file_uris())
        cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1
        dataset = ray.data.read_delta(
            self.uri(name),
            version=version,
            storage_options=self.storage_options or None,
            columns=columns,
            filter=filter,
            override_num_blocks=max(files, 2 * cpus),
            num_cpus=read_cpus,
        )
        if keys is None:
            return dataset
        wanted = pair_keys(keys).combine_chunks()
        return dataset.map_batches(
            _only_keys, batch_format="pyarrow", fn_kwargs={"wanted": wanted}, num_cpus=read_cpus
        )

    def read_pairs(
        self, name: str, version: int | None, columns: list[str], keys: pa.Table
    ) -> pa.Table:
        """``columns`` of the rows of the pairs ``keys`` (source, pair_id) in table ``name``:
        ``dataset(keys=...)`` for a small set, read in this process (its ids in the query)."""
        ids = ", ".join(literal(p) for p in pc.unique(keys["pair_id"]).to_pylist()) or "NULL"
        rows = self.read(name, version, columns, f"pair_id IN ({ids})")
        return rows.filter(pc.is_in(pair_keys(rows), value_set=pair_keys(keys).combine_chunks()))

    def count(self, name: str, version: int | None = None, where: str | None = None) -> int:
        """Number of rows of table ``name`` (matching the SQL predicate ``where``)."""
        sql = "SELECT COUNT(*) AS n FROM t" + _where(where)
        result = pa.table(QueryBuilder().register("t", self._open(name, version)).execute(sql))
        return int(result["n"][0].as_py())

    def check_predicate(self, name: str, where: str, version: int | None = None) -> None:
        """Raise ``SelectionError`` unless ``where`` is one predicate over table ``name``.

        Parentheses around it already make a trailing ``LIMIT``, ``UNION`` or ``;`` a syntax
        error; what is left is a fragment that closes them itself (``1=0) UNION ALL SELECT ...
        WHERE (1=1``). The engine's own plan, before optimisation, shows that: a selection is
        a filter over one scan of the table, and nothing else (no union, join, subquery)."""
        sql = f"EXPLAIN VERBOSE SELECT * FROM t{_where(where)}"
        try:
            plans = pa.table(QueryBuilder().register("t", self._open(name, version)).execute(sql))
        except DeltaError as exc:
            raise SelectionError(f"{where!r} is not a SQL predicate on {name}: {exc}") from None
        by_type = dict(zip(plans["plan_type"].to_pylist(), plans["plan"].to_pylist(), strict=True))
        plan = by_type["initial_logical_plan"].splitlines()
        nodes = [line.strip().split(":")[0] for line in plan]
        if nodes != ["Projection", "Filter", "TableScan"]:
            raise SelectionError(
                f"{where!r} is not one predicate on the columns of {name}: the query it makes "
                f"has {', '.join(nodes)} (a selection is a filter, without subqueries)"
            )

    def version(self, name: str) -> int:
        return self._open(name).version()

    def table_schema(self, name: str, version: int | None = None) -> pa.Schema:
        """The Arrow schema of table ``name`` at ``version``."""
        return pa.schema(self._open(name, version).schema().to_arrow())

    def history(self, name: str, limit: int | None = None) -> list[dict[str, Any]]:
        """Commits of table ``name``, newest first (operation, timestamp, metrics)."""
        return self._open(name).history(limit)

    def tables(self) -> list[TableInfo]:
        """Every declared table that exists in this lake, with its version and row count."""
        infos = []
        for name in TABLES:
            if not self.exists(name):
                continue
            dt = self._open(name)
            actions = pa.table(dt.get_add_actions(flatten=True))
            rows = pc.sum(actions["num_records"]).as_py() if actions.num_rows else 0
            infos.append(TableInfo(name, self.uri(name), dt.version(), rows or 0, actions.num_rows))
        return infos

    def _open(self, name: str, version: int | None = None) -> DeltaTable:
        try:
            return DeltaTable(self.uri(name), version=version, storage_options=self.storage_options)
        except TableNotFoundError:
            raise TableNotFoundError(
                f"table {name!r} does not exist in lake {self.root} (yet): run a job that writes it"
            ) from None

    def _retry(self, operation: Callable[[], T], what: str) -> T:
        for attempt in range(1, self.max_commit_attempts + 1):
            try:
                return operation()
            except CommitFailedError:
                if attempt == self.max_commit_attempts:
                    raise
                delay = min(0.05 * 2**attempt, 5.0) * (0.5 + random.random())
                log.warning("%s: concurrent commit, retry %d in %.2fs", what, attempt, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")


def conform(data: pa.Table, spec: TableSpec) -> pa.Table:
    """``data`` with exactly the spec's columns, order and types, or a clear error."""
    missing = [name for name in spec.schema.names if name not in data.column_names]
    if missing:
        raise ValueError(f"table {spec.name}: data lacks columns {missing}")
    data = data.select(spec.schema.names)
    for field in spec.schema:
        if not field.nullable and data[field.name].null_count:
            raise ValueError(f"table {spec.name}: column {field.name} is NOT NULL but has nulls")
    return data.cast(spec.schema)


def _conformed_reader(data: pads.Dataset, spec: TableSpec) -> pa.RecordBatchReader:
    return data.scanner(columns=spec.schema.names).to_reader().cast(spec.schema)


def _check_unique(data: pa.Table, spec: TableSpec) -> None:
    counts = data.group_by(list(spec.keys)).aggregate([([], "count_all")])
    duplicated = counts.filter(pc.greater(counts["count_all"], 1))
    if duplicated.num_rows:
        raise ValueError(
            f"table {spec.name}: {duplicated.num_rows} keys occur more than once in the data "
            f"(keys {spec.keys}), e.g. {duplicated.slice(0, 1).to_pylist()[0]}"
        )


def pair_keys(table: pa.Table) -> pa.ChunkedArray:
    return pc.binary_join_element_wise(table["source"], table["pair_id"], "\x00")


def _where(predicate: str | None) -> str:
    """The WHERE clause of ``predicate``, in parentheses: whatever follows it cannot become part
    of the query (a ``LIMIT`` or ``UNION`` inside them is a syntax error)."""
    return f" WHERE ({predicate})" if predicate else ""


def _only_keys(batch: pa.Table, wanted: pa.Array) -> pa.Table:
    return batch.filter(pc.is_in(pair_keys(batch), value_set=wanted))
