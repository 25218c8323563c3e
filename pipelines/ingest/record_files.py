"""Raw records out of input files (jsonl, jsonl.gz, json, parquet; local or ``s3://``).

A raw record is one line of a jsonl file, one element of a JSON array, or one Parquet row (as
JSON text), with its file and 0-based position. Records are kept as text so that a malformed
line reaches the quarantine with its content instead of failing the read. The Ray Data
datasource reads each file in one task and streams blocks of records.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.datasource import FileBasedDatasource

from pipelines.core.errors import FormatError
from pipelines.ingest.formats import JsonObject

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
UTF8_BOM = b"\xef\xbb\xbf"
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
    """``read_records`` of one file."""
    with fs.open_input_stream(fs_path(path), compression=None) as stream:
        yield from read_records(stream, path)


def read_records(stream: pa.NativeFile, path: str) -> Iterator[tuple[int, str, str | None]]:
    """``(position, record text, read error)`` for every record of one file, as stored (a
    ``.gz`` name is decompressed here).

    A file that cannot be read to its end (a truncated gzip, a corrupt Parquet file) ends with
    one record that says so, at the position after the last record read: what came before is
    kept, the rest is reported with the file's name, and the job goes on with other files.
    Python's gzip reader is used because it hands over the data before a truncation when
    read by ``read1`` (Arrow's reader, and ``read``, drop the chunk they were decompressing)."""
    name = path.removesuffix(".gz")
    if name != path:
        stream = gzip.GzipFile(fileobj=stream)
    if name.endswith(".parquet"):
        records = _parquet_records(stream)
    elif name.endswith(".json"):
        records = _json_array_records(stream.read())
    else:
        records = _jsonl_records(stream)
    position = 0
    try:
        for record in records:
            position = record[0] + 1
            yield record
    except (OSError, EOFError, zlib.error, pa.ArrowException) as exc:
        yield position, "", f"unreadable file {path} from record {position} on: {exc}"


def _jsonl_records(stream: pa.NativeFile | gzip.GzipFile) -> Iterator[tuple[int, str, str | None]]:
    for position, line in enumerate(_lines(stream)):
        if position == 0:
            line = line.removeprefix(UTF8_BOM)
        if not line.strip():
            continue  # blank lines hold no record
        try:
            yield position, line.decode("utf-8").rstrip("\r"), None
        except UnicodeDecodeError as exc:
            yield position, line.decode("utf-8", errors="replace"), f"invalid UTF-8: {exc.reason}"


def _lines(stream: pa.NativeFile | gzip.GzipFile) -> Iterator[bytes]:
    pending = b""
    read = stream.read1 if isinstance(stream, gzip.GzipFile) else stream.read  # see read_records
    while chunk := read(4 << 20):
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        yield from lines
    if pending:
        yield pending


def _json_array_records(data: bytes) -> Iterator[tuple[int, str, str | None]]:
    # Undecodable bytes become lone surrogates, so that the elements that hold them are told
    # apart from those that do not (a U+FFFD replacement would be silent).
    text = data.removeprefix(UTF8_BOM).decode("utf-8", errors="surrogateescape")
    try:
        parsed = json.loads(text, object_pairs_hook=JsonObject.of)
    except (json.JSONDecodeError, RecursionError) as exc:
        where = f" at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deep"
        yield 0, _storable(text[:MAX_STORED_RECORD_CHARS]), f"malformed JSON file: {reason}{where}"
        return
    elements = parsed if isinstance(parsed, list) else [parsed]
    for position, element in enumerate(elements):
        try:
            record = json.dumps(element, ensure_ascii=False)
        except (RecursionError, ValueError) as exc:
            yield position, "", f"unrepresentable element: {exc}"
            continue
        repeated = JsonObject.repeated_key(element)
        if repeated is not None:
            yield position, _storable(record), f"the key {repeated!r} appears twice in one object"
        elif _storable(record) != record:
            yield position, _storable(record), "invalid UTF-8 or a lone surrogate in the element"
        else:
            yield position, record, None


def _storable(text: str) -> str:
    """``text`` with every lone surrogate (an undecodable byte, or a ``\\ud800`` escape) as
    U+FFFD: what a string column can hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", errors="surrogatepass").decode("utf-8", errors="replace")
    return text


def _parquet_records(stream: pa.NativeFile) -> Iterator[tuple[int, str, str | None]]:
    reader = pq.ParquetFile(pa.BufferReader(stream.read()))
    position = 0
    for batch in reader.iter_batches(batch_size=BLOCK_RECORDS):
        rows: list[dict[str, Any]] | list[pa.RecordBatch]
        try:
            rows = batch.to_pylist()
        except UnicodeDecodeError:  # a string holds invalid UTF-8: read the rows one by one
            rows = [batch.slice(i, 1) for i in range(batch.num_rows)]
        for row in rows:
            yield (position, *_parquet_record(row))
            position += 1


def _parquet_record(row: dict[str, Any] | pa.RecordBatch) -> tuple[str, str | None]:
    """One Parquet row as JSON text. Invalid UTF-8 (in a string or a bytes value) is reported,
    with the row's text made readable (U+FFFD for the bad bytes)."""
    try:
        values = row if isinstance(row, dict) else row.to_pylist()[0]
        return json.dumps(_finite(values), ensure_ascii=False, default=_json_default), None
    except UnicodeDecodeError as exc:
        if not isinstance(row, dict):
            schema = pa.schema([f.with_type(_bytes_for_strings(f.type)) for f in row.schema])
            row = row.cast(schema).to_pylist()[0]
        text = json.dumps(_finite(row), ensure_ascii=False, default=_lossy_json_default)
        return text, f"invalid UTF-8: {exc.reason}"


def _bytes_for_strings(type_: pa.DataType) -> pa.DataType:
    """``type_`` with every string (at any depth) read as bytes."""
    if pa.types.is_string(type_) or pa.types.is_large_string(type_):
        return pa.binary()
    if pa.types.is_list(type_) or pa.types.is_large_list(type_):
        return pa.list_(type_.value_field.with_type(_bytes_for_strings(type_.value_type)))
    if pa.types.is_struct(type_):
        return pa.struct([f.with_type(_bytes_for_strings(f.type)) for f in type_])
    return type_


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as the strings ``"NaN"``, ``"Infinity"``: JSON has no
    such numbers, and a rating that is not a number is then rejected as one."""
    if isinstance(value, float) and not math.isfinite(value):
        return json.dumps(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8")  # invalid UTF-8 raises: the row is reported
    raise TypeError(f"cannot represent {type(value).__name__} as JSON")


def _lossy_json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return _json_default(value)


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

    def resolve_compression(self, path: str, open_args: dict[str, Any]) -> str | None:
        return None  # read_records decompresses (and reports a truncated file)

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        block: list[tuple[int, str, str | None]] = []
        for record in read_records(f, path):
            block.append(record)
            if len(block) == self.records_per_block:
                yield records_table(path, block)
                block = []
        if block:
            yield records_table(path, block)
