"""Raw records out of input files (jsonl, jsonl.gz, json, parquet; local or ``s3://``).

A raw record is one line of a jsonl file, one element of a JSON array, or one Parquet row (as
JSON text), with its file and 0-based position. Records are kept as text so that a malformed
line reaches the quarantine with its content instead of failing the read. The Ray Data
datasource reads each file in one task and streams blocks of records.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.datasource import FileBasedDatasource

from pipelines.core.errors import FormatError

RECORD_FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".json", ".json.gz", ".parquet")
RAW_SCHEMA = pa.schema(
    [
        pa.field("source_file", pa.string(), nullable=False),
        pa.field("source_row", pa.int64(), nullable=False),
        pa.field("record", pa.string(), nullable=False),
        pa.field("read_error", pa.string()),
    ]
)
"""``read_error`` is set when the record could not be decoded (the text is kept as far as read)."""
MAX_STORED_RECORD_CHARS = 1_000_000
BLOCK_RECORDS = 8_192


@dataclass(frozen=True)
class InputFile:
    path: str
    size: int


def filesystem_for(uri: str, storage_options: dict[str, str] | None = None) -> pafs.FileSystem:
    """The pyarrow filesystem of ``uri``; ``s3://`` takes the lake's deltalake storage options."""
    if uri.startswith(("s3://", "s3a://")):
        options = {k.upper(): v for k, v in (storage_options or {}).items()}
        endpoint = options.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
        kwargs: dict[str, Any] = {
            "region": options.get("AWS_REGION") or os.environ.get("AWS_REGION"),
            "access_key": options.get("AWS_ACCESS_KEY_ID"),
            "secret_key": options.get("AWS_SECRET_ACCESS_KEY"),
        }
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            kwargs |= {"endpoint_override": host or scheme, "scheme": scheme if host else "https"}
        return pafs.S3FileSystem(**{k: v for k, v in kwargs.items() if v is not None})
    return pafs.LocalFileSystem()


def fs_path(uri: str) -> str:
    """The path of ``uri`` inside its filesystem (``s3://b/k`` -> ``b/k``)."""
    for scheme in ("s3://", "s3a://", "file://"):
        if uri.startswith(scheme):
            return uri[len(scheme) :]
    return os.path.abspath(uri)


def find_record_files(paths: list[str], fs: pafs.FileSystem) -> list[InputFile]:
    """The record files named by ``paths`` (files, or folders searched recursively), sorted."""
    found: list[InputFile] = []
    for path in paths:
        info = fs.get_file_info(fs_path(path))
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"input not found: {path}")
        if info.type == pafs.FileType.File:
            if not path.endswith(RECORD_FILE_SUFFIXES):
                raise FormatError(f"{path}: unsupported file type; expected {RECORD_FILE_SUFFIXES}")
            found.append(InputFile(path=_with_scheme(path, info.path), size=info.size))
            continue
        selector = pafs.FileSelector(info.path, recursive=True)
        files = [
            InputFile(path=_with_scheme(path, f.path), size=f.size)
            for f in fs.get_file_info(selector)
            if f.type == pafs.FileType.File and f.path.endswith(RECORD_FILE_SUFFIXES)
        ]
        if not files:
            raise FileNotFoundError(
                f"no record files ({', '.join(RECORD_FILE_SUFFIXES)}) in {path}"
            )
        found.extend(files)
    unique = {f.path: f for f in found}
    return [unique[p] for p in sorted(unique)]


def _with_scheme(original: str, path: str) -> str:
    scheme, sep, _ = original.partition("://")
    return f"{scheme}://{path}" if sep and scheme != "file" else path


def file_sha256(path: str, fs: pafs.FileSystem) -> str:
    """Content hash of an input file, recorded with the run so inputs can be verified later."""
    digest = hashlib.sha256()
    with fs.open_input_stream(fs_path(path), compression=None) as stream:  # the bytes, as stored
        while chunk := stream.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def file_records(path: str, fs: pafs.FileSystem) -> Iterator[tuple[int, str, str | None]]:
    """``read_records`` of one file, opened with its compression detected from the name."""
    with fs.open_input_stream(fs_path(path), compression="detect") as stream:
        yield from read_records(stream, path)


def read_records(stream: pa.NativeFile, path: str) -> Iterator[tuple[int, str, str | None]]:
    """``(position, record text, read error)`` for every record of one (decompressed) file."""
    name = path[:-3] if path.endswith(".gz") else path
    if name.endswith(".parquet"):
        yield from _parquet_records(stream)
    elif name.endswith(".json"):
        yield from _json_array_records(stream.read())
    else:
        yield from _jsonl_records(stream)


def _jsonl_records(stream: pa.NativeFile) -> Iterator[tuple[int, str, str | None]]:
    for position, line in enumerate(_lines(stream)):
        if not line.strip():
            continue  # blank lines hold no record
        try:
            yield position, line.decode("utf-8").rstrip("\r"), None
        except UnicodeDecodeError as exc:
            yield position, line.decode("utf-8", errors="replace"), f"invalid UTF-8: {exc.reason}"


def _lines(stream: pa.NativeFile) -> Iterator[bytes]:
    pending = b""
    while chunk := stream.read(4 << 20):
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        yield from lines
    if pending:
        yield pending


def _json_array_records(data: bytes) -> Iterator[tuple[int, str, str | None]]:
    text = data.decode("utf-8", errors="replace")
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        yield (
            0,
            text[:MAX_STORED_RECORD_CHARS],
            f"malformed JSON file: {exc.msg} at line {exc.lineno}",
        )
        return
    elements = parsed if isinstance(parsed, list) else [parsed]
    for position, element in enumerate(elements):
        yield position, json.dumps(element, ensure_ascii=False), None


def _parquet_records(stream: pa.NativeFile) -> Iterator[tuple[int, str, str | None]]:
    reader = pq.ParquetFile(pa.BufferReader(stream.read()))
    position = 0
    for batch in reader.iter_batches(batch_size=BLOCK_RECORDS):
        for row in batch.to_pylist():
            yield position, json.dumps(row, ensure_ascii=False, default=_json_default), None
            position += 1


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    raise TypeError(f"cannot represent {type(value).__name__} as JSON")


def records_table(path: str, records: list[tuple[int, str, str | None]]) -> pa.Table:
    positions, texts, errors = zip(*records, strict=True) if records else ((), (), ())
    return pa.table(
        {
            "source_file": pa.array([path] * len(positions), pa.string()),
            "source_row": pa.array(positions, pa.int64()),
            "record": pa.array(texts, pa.string()),
            "read_error": pa.array(errors, pa.string()),
        },
        schema=RAW_SCHEMA,
    )


class RecordFileDatasource(FileBasedDatasource):
    """Ray Data source of raw records: one read task per file, streaming blocks of records.

    Read with ``override_num_blocks=len(files)`` so that Ray fuses the read with the next
    ``map_batches``: splitting blocks breaks the fusion and costs a round trip through the
    object store per block (measured: 1.8x slower end to end, see docs/performance.md).
    """

    def __init__(self, paths: list[str], *, records_per_block: int = BLOCK_RECORDS, **kwargs: Any):
        super().__init__(paths, **kwargs)
        self.records_per_block = records_per_block

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        block: list[tuple[int, str, str | None]] = []
        for record in read_records(f, path):
            block.append(record)
            if len(block) == self.records_per_block:
                yield records_table(path, block)
                block = []
        if block:
            yield records_table(path, block)
