"""Ingest preference files into the lake: read -> normalise/validate -> stage -> commit.

Ray Data reads records (one task per file), converts and validates them in ``map_batches`` with
``normalise_batch`` (a pure Arrow function: clean records of the common layouts a block at a time
in ``columnar``, the others one by one in ``formats``), and stages the result as Parquet next to
the lake.
The driver then commits in two idempotent merges: new pairs into ``pairs``, bad rows into
``quarantine``. Nothing is dropped silently: every candidate row ends up kept, quarantined with
a reason, or counted as already present from an earlier ingest.

A pair is identified by (source, pair_id): re-ingesting the same input adds nothing, and the same
pair repeated inside one source is kept once, its repeats quarantined as ``duplicate_in_source``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import ray

from pipelines.core.config import IngestConfig
from pipelines.core.jobs import InputFile, JobSummary, TableVersion, versions
from pipelines.core.lake import Lake
from pipelines.core.sql import literal
from pipelines.ingest.columnar import COLUMNAR_FORMATS, columnar_pairs
from pipelines.ingest.formats import (
    BENCHMARK_FORMATS,
    FormatError,
    Limits,
    Pair,
    Rejection,
    detect_format,
    iter_items,
    parse_json,
)
from pipelines.ingest.record_files import (
    RecordFileDatasource,
    file_records,
    file_sha256,
    filesystem_for,
    find_record_files,
    fs_path,
)
from storage_schemas import PAIRS, QUARANTINE

log = logging.getLogger(__name__)

DETECTION_SAMPLE = 50
SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

STAGED_SCHEMA = pa.schema(
    [pa.field("kind", pa.string(), nullable=False), pa.field("row_id", pa.string(), nullable=False)]
    + [f.with_nullable(True) for f in PAIRS.schema]
    + [f.with_nullable(True) for f in QUARANTINE.schema if f.name not in PAIRS.schema.names]
)
"""One schema for both outcomes of normalisation; ``kind`` is ``pair`` or ``quarantine``."""


@dataclass(frozen=True)
class IngestRequest:
    """What to ingest: files or folders, the source name, and how to read them."""

    paths: list[str]
    source: str
    format: str | None = None
    """``None`` detects the format of each file from its first records."""
    mapping: dict[str, str] | None = None
    """Field paths for ``format="mapping"`` (see ``preference_formats.parse_mapping``)."""
    benchmark: bool = False
    """Tag the source as a benchmark (RM-Bench and JudgeBench formats always are)."""

    def __post_init__(self) -> None:
        if not SOURCE_NAME.fullmatch(self.source):
            raise FormatError(
                f"source name {self.source!r} must match {SOURCE_NAME.pattern} "
                "(it names a table partition)"
            )
        if not self.paths:
            raise FormatError("no input paths given")


@dataclass
class InputSummary:
    path: str
    format: str
    size: int
    sha256: str


@dataclass
class IngestSummary(JobSummary):
    """The accounting of one ingest: candidates = kept + already present + quarantined."""

    job: ClassVar[str] = "ingest"

    source: str
    source_kind: str
    run_id: str
    inputs: list[InputSummary]
    records_read: int = 0
    blank_lines: int = 0
    """Lines without a record (blank or whitespace only) between the records of JSON-lines
    files: nothing to keep, counted so that every line is accounted for."""
    candidates: int = 0
    pairs_inserted: int = 0
    pairs_already_present: int = 0
    quarantined_inserted: int = 0
    quarantined_already_present: int = 0
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    pairs_version: int | None = None
    quarantine_version: int | None = None
    seconds: float = 0.0

    @property
    def quarantined(self) -> int:
        return self.quarantined_inserted + self.quarantined_already_present

    @property
    def balanced(self) -> bool:
        return (
            self.candidates == self.pairs_inserted + self.pairs_already_present + self.quarantined
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"quarantined": self.quarantined, "balanced": self.balanced}

    def tables_written(self) -> list[TableVersion]:
        return versions((PAIRS, self.pairs_version), (QUARANTINE, self.quarantine_version))

    def input_files(self) -> list[InputFile]:
        return [
            InputFile(i.path, i.sha256, {"format": i.format, "size": str(i.size)})
            for i in self.inputs
        ]

    def metrics(self) -> dict[str, float]:
        return {
            "records_read": self.records_read,
            "blank_lines": self.blank_lines,
            "candidates": self.candidates,
            "pairs_inserted": self.pairs_inserted,
            "pairs_already_present": self.pairs_already_present,
            "quarantined_inserted": self.quarantined_inserted,
            "quarantined_already_present": self.quarantined_already_present,
            "seconds": self.seconds,
            **{f"quarantine.{r}": n for r, n in self.quarantine_reasons.items()},
        }

    def text(self) -> str:
        reasons = ", ".join(f"{r} {n:,}" for r, n in sorted(self.quarantine_reasons.items()))
        lines = [
            f"ingest {self.source} ({self.source_kind}) from {len(self.inputs)} file(s): "
            + ", ".join(f"{i.path} [{i.format}]" for i in self.inputs),
            f"  records read      {self.records_read:>10,}"
            + (
                f" (and {self.blank_lines:,} blank line{'s' * (self.blank_lines != 1)})"
                if self.blank_lines
                else ""
            ),
            f"  candidate pairs   {self.candidates:>10,}"
            f"  = kept {self.pairs_inserted + self.pairs_already_present:,}"
            f" + quarantined {self.quarantined:,}"
            + ("" if self.balanced else "  (UNBALANCED: rows unaccounted for)"),
            f"  kept              {self.pairs_inserted:>10,} new, "
            f"{self.pairs_already_present:,} already present (pairs v{self.pairs_version})",
            f"  quarantined       {self.quarantined_inserted:>10,} new, "
            f"{self.quarantined_already_present:,} already present"
            f" (quarantine v{self.quarantine_version})" + (f": {reasons}" if reasons else ""),
            f"  took {self.seconds:.1f}s"
            f" ({self.candidates / max(self.seconds, 1e-9):,.0f} candidate pairs/s)",
        ]
        return "\n".join(lines)


def row_id(source: str, source_file: str, source_row: int, source_item: int) -> str:
    """Identity of one candidate row (position in its input); the quarantine key."""
    text = f"{source}\x1f{source_file}\x1f{source_row}\x1f{source_item}"
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def normalise_batch(
    batch: pa.Table,
    *,
    source: str,
    source_kind: str,
    formats: dict[str, str],
    limits: Limits,
    run_id: str,
    mapping: dict[str, str] | None = None,
    binarize: str = "all_pairs",
    columnar: bool = True,
) -> pa.Table:
    """Raw records (``record_files.RAW_SCHEMA``) -> staged rows (``STAGED_SCHEMA``). Clean
    records of the common layouts take the columnar path and come first; every other record is
    converted one by one (``columnar=False``: all of them, to compare the paths)."""
    now = datetime.now(UTC)
    tables = []
    files = pc.unique(batch["source_file"])
    for source_file in files.to_pylist():
        records = batch if len(files) == 1 else batch.filter(pc.field("source_file") == source_file)
        fmt = formats[source_file]
        taken = np.empty(0, dtype=np.int64)
        if columnar and fmt in COLUMNAR_FORMATS:
            texts = records["record"]
            if records["read_error"].null_count < records.num_rows:  # some were unreadable
                texts = pc.if_else(pc.is_null(records["read_error"]), texts, None)
            taken, columns = columnar_pairs(texts.combine_chunks(), fmt, limits)
            position = records.select(["source_file", "source_row"]).take(taken)
            tables.append(_columnar_rows(position, columns, source, source_kind, run_id, now))
        rest = records.filter(pa.array(~np.isin(np.arange(records.num_rows), taken)))
        options = {"mapping": mapping, "binarize": binarize}
        tables.append(_record_rows(rest, source, source_kind, fmt, limits, run_id, now, options))
    return pa.concat_tables(tables) if tables else STAGED_SCHEMA.empty_table()


def _columnar_rows(
    position: pa.Table,
    columns: dict[str, pa.Array],
    source: str,
    source_kind: str,
    run_id: str,
    now: datetime,
) -> pa.Table:
    """Staged rows of the pairs ``columnar.columnar_pairs`` took (``position``: their files
    and rows)."""
    rows = position.num_rows
    files, numbers = position["source_file"].to_pylist(), position["source_row"].to_pylist()
    constants = {
        "kind": "pair",
        "source": source,
        "source_kind": source_kind,
        "source_item": 0,
        "ingest_run_id": run_id,
        "ingested_at": now,
    }
    given = columns | {
        "source_file": position["source_file"],
        "source_row": position["source_row"],
        "row_id": pa.array(
            [row_id(source, f, n, 0) for f, n in zip(files, numbers, strict=True)], pa.string()
        ),
    }
    return pa.table(
        [
            given[f.name]
            if f.name in given
            else pa.array([constants[f.name]] * rows, f.type)
            if f.name in constants
            else pa.nulls(rows, f.type)
            for f in STAGED_SCHEMA
        ],
        schema=STAGED_SCHEMA,
    )


def _record_rows(
    records: pa.Table,
    source: str,
    source_kind: str,
    fmt: str,
    limits: Limits,
    run_id: str,
    now: datetime,
    options: dict[str, Any],
) -> pa.Table:
    """Staged rows of ``records`` converted one by one (``formats.iter_items``)."""
    rows: list[dict[str, Any]] = []
    for source_file, source_row, record, read_error in zip(
        records["source_file"].to_pylist(),
        records["source_row"].to_pylist(),
        records["record"].to_pylist(),
        records["read_error"].to_pylist(),
        strict=True,
    ):
        position = {"source": source, "source_file": source_file, "source_row": source_row}
        if read_error is not None:
            items: list[Pair | Rejection] = [Rejection(0, "malformed_json", read_error)]
        else:
            items = list(iter_items(record, fmt, limits, **options))
        for item in items:
            pair = None
            if isinstance(item, Pair):
                try:
                    pair = _pair_columns(item, source_kind, now)
                except RecursionError:  # the JSON encoder's depth, below the parser's
                    item = Rejection(item.item, "malformed_json", "a field nests too deep to store")
            common = position | {
                "source_item": item.item,
                "row_id": row_id(source, source_file, source_row, item.item),
                "ingest_run_id": run_id,
            }
            if isinstance(item, Rejection):
                rows.append(
                    common
                    | {
                        "kind": "quarantine",
                        "quarantine_id": common["row_id"],
                        "reason": item.reason,
                        "detail": item.detail,
                        "record": record,
                        "quarantined_at": now,
                    }
                )
            else:
                rows.append(common | pair)
    return pa.Table.from_pylist(rows, schema=STAGED_SCHEMA)


def _pair_columns(pair: Pair, source_kind: str, now: datetime) -> dict[str, Any]:
    return {
        "kind": "pair",
        "pair_id": pair.pair_id,
        "source_kind": source_kind,
        "history": pair.history,
        "chosen": pair.chosen,
        "rejected": pair.rejected,
        "source_meta": json.dumps(pair.meta, ensure_ascii=False, sort_keys=True)
        if pair.meta
        else None,
        "history_turns": len(pair.history),
        "history_chars": sum(len(m["content"]) for m in pair.history),
        "chosen_chars": len(pair.chosen),
        "rejected_chars": len(pair.rejected),
        "ingested_at": now,
    }


def detect_file_format(path: str, fs: pafs.FileSystem) -> str:
    """The format of a file from its first records; ambiguity is an error naming the file."""
    seen: Counter[str] = Counter()
    for _, text, error in file_records(path, fs):
        if error is None:
            with contextlib.suppress(ValueError):  # malformed, NaN: the job quarantines it
                seen[detect_format(parse_json(text)) or "unknown"] += 1
        if sum(seen.values()) >= DETECTION_SAMPLE:
            break
    known = {fmt: n for fmt, n in seen.items() if fmt != "unknown"}
    if len(known) != 1:
        found = ", ".join(f"{f} x{n}" for f, n in seen.most_common()) or "no parseable records"
        raise FormatError(
            f"cannot detect the format of {path} ({found}); give the format, or field paths "
            "for a mapping"
        )
    return next(iter(known))


def ingest(
    request: IngestRequest,
    lake: Lake,
    config: IngestConfig,
    run_id: str,
) -> IngestSummary:
    """Ingest ``request`` into ``lake``; ``run_id`` (the MLflow run) is stamped on every row."""
    started = time.perf_counter()
    input_fs = filesystem_for(request.paths[0], lake.storage_options)
    files = find_record_files(request.paths, input_fs)
    formats = {f.path: request.format or detect_file_format(f.path, input_fs) for f in files}
    source_kind = (
        "benchmark" if request.benchmark or BENCHMARK_FORMATS & set(formats.values()) else "corpus"
    )
    inputs = [
        InputSummary(f.path, formats[f.path], f.size, file_sha256(f.path, input_fs)) for f in files
    ]
    summary = IngestSummary(request.source, source_kind, run_id, inputs)
    log.info(
        f"[ingest] {request.source}: {len(files)} file(s), formats {sorted(set(formats.values()))}"
    )

    staging = f"{lake.root}/_staging/ingest-{run_id}"
    lake_fs = filesystem_for(lake.root, lake.storage_options)
    _remove_dead_staging(lake_fs, f"{lake.root}/_staging")
    raw = ray.data.read_datasource(
        RecordFileDatasource(
            [fs_path(f.path) for f in files],
            filesystem=input_fs,
            records_per_block=config.batch_size,
        ),
        override_num_blocks=len(files),  # keeps read and normalise fused in one task
    )
    staged = raw.map_batches(
        normalise_batch,
        batch_format="pyarrow",
        batch_size=None,  # one block at a time, as read
        fn_kwargs={
            "source": request.source,
            "source_kind": source_kind,
            "formats": {fs_path(p): fmt for p, fmt in formats.items()},
            "limits": Limits(config.max_chars, config.max_turns),
            "run_id": run_id,
            "mapping": request.mapping,
            "binarize": config.binarize,
            "columnar": config.columnar,
        },
    )
    try:
        staged.write_parquet(fs_path(staging), filesystem=lake_fs, partition_cols=["kind"])
        log.info(f"[ingest] normalised and staged in {time.perf_counter() - started:.1f}s")
        if lake_fs.get_file_info(fs_path(staging)).type == pafs.FileType.NotFound:
            staged_rows = pads.dataset(STAGED_SCHEMA.empty_table())  # the inputs held no record
        else:
            staged_rows = pads.dataset(fs_path(staging), filesystem=lake_fs, partitioning="hive")
        _commit(staged_rows, lake, summary, run_id)
    finally:
        if lake_fs.get_file_info(fs_path(staging)).type != pafs.FileType.NotFound:
            lake_fs.delete_dir(fs_path(staging))
    summary.seconds = time.perf_counter() - started
    log.info(f"[ingest] committed in {summary.seconds:.1f}s")
    return summary


def _remove_dead_staging(lake_fs: pafs.FileSystem, root: str) -> None:
    """Staging left by ingests that ended without cleaning up (SIGKILL: a handled failure
    removes its own) goes, once their MLflow run is no longer RUNNING: an ingest that is
    still running keeps its own."""
    selector = pafs.FileSelector(fs_path(root), allow_not_found=True)
    client = mlflow.MlflowClient()
    for folder in lake_fs.get_file_info(selector):
        run_id = folder.base_name.removeprefix("ingest-")
        try:
            running = client.get_run(run_id).info.status == "RUNNING"
        except mlflow.exceptions.MlflowException:
            continue  # not a run of this tracking store: not ours to remove
        if not running:
            lake_fs.delete_dir(folder.path)
            log.info(f"[ingest] removed the staging of ended run {run_id}")


def blank_lines(records: pa.Table) -> int:
    """Positions a file skipped between its records (``source_file``, ``source_row`` of each
    record): a record's position is its line, so a gap is a blank line (and a file's last
    record ends the count: blank lines after it skip nothing)."""
    spans = records.group_by("source_file").aggregate(
        [("source_row", "max"), ("source_row", "count")]
    )
    return int(
        pc.sum(pc.subtract(pc.add(spans["source_row_max"], 1), spans["source_row_count"])).as_py()
        or 0
    )


def _commit(staged: pads.Dataset, lake: Lake, summary: IngestSummary, run_id: str) -> None:
    is_pair = pc.field("kind") == "pair"
    positions = ["source_file", "source_row", "source_item"]
    keys = staged.to_table(columns=["kind", "pair_id", "row_id", *positions])
    records = keys.group_by(["source_file", "source_row"]).aggregate([])
    summary.records_read = records.num_rows
    summary.blank_lines = blank_lines(records)
    summary.candidates = keys.num_rows

    pair_keys = keys.filter(pc.equal(keys["kind"], "pair"))
    repeats = _repeats_in_source(pair_keys)
    kept = staged.filter(is_pair & (~pc.field("row_id").isin(repeats["row_id"].combine_chunks())))
    pairs = lake.insert_new(PAIRS, kept)
    summary.pairs_version = pairs.version
    summary.pairs_inserted = pairs.rows_inserted
    summary.pairs_already_present = pair_keys.num_rows - repeats.num_rows - pairs.rows_inserted

    # Two merges: bad rows stream from staging (they can be many), repeats are built in memory.
    bad = staged.filter(~is_pair)
    quarantined = lake.insert_new(QUARANTINE, bad)
    repeat_rows = _repeat_quarantine_rows(staged, repeats, run_id)
    repeated = lake.insert_new(QUARANTINE, repeat_rows)
    summary.quarantine_version = repeated.version
    summary.quarantined_inserted = quarantined.rows_inserted + repeated.rows_inserted
    summary.quarantined_already_present = (
        bad.count_rows() + repeat_rows.num_rows - summary.quarantined_inserted
    )
    reasons = Counter(bad.to_table(columns=["reason"])["reason"].to_pylist())
    if repeats.num_rows:
        reasons["duplicate_in_source"] += repeats.num_rows
    summary.quarantine_reasons = dict(reasons)


def _repeats_in_source(pair_keys: pa.Table) -> pa.Table:
    """Rows whose pair occurs earlier in this source (by file, row, item), each with the
    ``first_row_id`` of that first occurrence."""
    ordered = pair_keys.sort_by(
        [(c, "ascending") for c in ("pair_id", "source_file", "source_row", "source_item")]
    )
    firsts = (
        ordered.group_by("pair_id", use_threads=False)  # ordered: "first" is the earliest
        .aggregate([("row_id", "first")])
        .rename_columns(["pair_id", "first_row_id"])
    )
    joined = ordered.select(["pair_id", "row_id"]).join(firsts, "pair_id")
    repeats = joined.filter(pc.not_equal(joined["row_id"], joined["first_row_id"]))
    return repeats.select(["row_id", "first_row_id"])


def _repeat_quarantine_rows(staged: pads.Dataset, repeats: pa.Table, run_id: str) -> pa.Table:
    if not repeats.num_rows:
        return QUARANTINE.schema.empty_table()
    rows = staged.to_table(filter=pc.field("row_id").isin(repeats["row_id"].combine_chunks()))
    first = dict(
        zip(repeats["row_id"].to_pylist(), repeats["first_row_id"].to_pylist(), strict=True)
    )
    firsts = staged.to_table(
        columns=["row_id", "source_file", "source_row", "source_item"],
        filter=pc.field("row_id").isin(repeats["first_row_id"].combine_chunks()),
    )
    where = {
        r["row_id"]: f"{r['source_file']} row {r['source_row']} item {r['source_item']}"
        for r in firsts.to_pylist()
    }
    now = datetime.now(UTC)
    records = [
        {
            "quarantine_id": r["row_id"],
            "source": r["source"],
            "source_file": r["source_file"],
            "source_row": r["source_row"],
            "source_item": r["source_item"],
            "reason": "duplicate_in_source",
            "detail": f"same pair as {where[first[r['row_id']]]} (pair_id {r['pair_id']})",
            "record": json.dumps(
                {"history": r["history"], "chosen": r["chosen"], "rejected": r["rejected"]},
                ensure_ascii=False,
            ),
            "pair_id": r["pair_id"],
            "ingest_run_id": run_id,
            "quarantined_at": now,
        }
        for r in rows.to_pylist()
    ]
    return pa.Table.from_pylist(records, schema=QUARANTINE.schema)


def log_quarantine_sample(lake: Lake, summary: IngestSummary, size: int) -> None:
    """Up to ``size`` quarantined rows of the source to the active run, for review."""
    if not size or not summary.quarantined:
        return
    sample = lake.read(QUARANTINE.name, where=f"source = {literal(summary.source)}", limit=size)
    mlflow.log_table(sample.drop_columns(["quarantined_at"]).to_pandas(), "quarantine_sample.json")
