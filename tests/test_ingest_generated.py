"""Generated bad input for ingest's reading and normalisation (the two steps every Ray task of
an ingest runs): files of every supported format with bad rows mixed in. Whatever the rows,
nothing raises, every record read is a pair or a quarantine row with a known reason, and a
file cut short keeps what came before the cut and reports the rest with the file's name.

The job itself (Ray, Delta commits, re-runs) is tested on such files in test_ingest.py; this
is where the cases are many."""

from __future__ import annotations

import gzip
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.ingest.formats import Limits
from pipelines.ingest.job import blank_lines, normalise_batch
from pipelines.ingest.record_files import file_records, records_table
from storage_schemas import QUARANTINE_REASONS
from tests.conftest import REPO

LIMITS = Limits(max_chars=2_000, max_turns=8)
text = st.text(st.characters(codec="utf-8"), min_size=1, max_size=30).filter(str.strip)


def good_row(draw: st.DrawFn) -> dict:
    return {"prompt": draw(text), "chosen": draw(text), "rejected": draw(text)}


REASON_OF_KIND = {
    "missing": "missing_field",
    "wrong_role": "invalid_role",
    "blank_turn": "empty_content",
    "identical": "identical_responses",
    "oversize": "oversize",
    "invalid_utf8": "malformed_json",
    "lone_surrogate": "malformed_json",
    "nan": "malformed_json",
    "duplicate_key": "malformed_json",
    "not_an_object": "not_an_object",
    "malformed": "malformed_json",
}
"""What each way of going wrong is quarantined as (the others depend on the record)."""


@st.composite
def json_row(draw: st.DrawFn) -> tuple[bytes, str]:
    """One JSON-lines record, a good pair or one of the ways a record goes wrong, and what it
    must become: ``pair`` or its quarantine reason."""
    row = good_row(draw)
    kind = draw(st.sampled_from(["good", "wrong_type", "deep", *REASON_OF_KIND]))
    # Equal responses are drawn often; such a pair states no preference.
    same = row["chosen"] == row["rejected"]
    expected = REASON_OF_KIND.get(kind, "identical_responses" if same else "pair")
    if kind == "wrong_type":
        row["chosen"] = draw(st.one_of(st.integers(), st.booleans(), st.lists(st.integers())))
        # A list is read as messages, each missing its role and content.
        expected = "missing_field" if isinstance(row["chosen"], list) else "non_string_content"
    elif kind == "missing":
        del row[draw(st.sampled_from(sorted(row)))]
    elif kind == "wrong_role":
        row["prompt"] = [{"role": draw(st.sampled_from(["robot", "", "USER"])), "content": "hi"}]
    elif kind == "blank_turn":
        row[draw(st.sampled_from(sorted(row)))] = draw(st.sampled_from(["", " ", "\n\t"]))
    elif kind == "identical":
        row["rejected"] = row["chosen"]
    elif kind == "oversize":
        row["chosen"] = "x" * (LIMITS.max_chars + 1)
    data = json.dumps(row, ensure_ascii=False).encode()
    if kind == "deep":
        levels = draw(st.sampled_from([100, 1_000, 5_000]))
        data = data[:-1] + b', "extra": ' + b'{"x": ' * levels + b"1" + b"}" * levels + b"}"
        expected = "malformed_json" if levels == 5_000 else expected  # too deep for the parsers
    elif kind == "invalid_utf8":
        data = data[:-1] + b', "extra": "\xff\xfe"}'
    elif kind == "lone_surrogate":
        data = data[:-1] + b', "extra": "' + draw(st.sampled_from([b"\\ud800", b"\\udfff"])) + b'"}'
    elif kind == "nan":
        data = data[:-1] + b', "score": ' + draw(st.sampled_from([b"NaN", b"Infinity"])) + b"}"
    elif kind == "duplicate_key":
        data = data[:-1] + b', "chosen": "again"}'
    elif kind == "not_an_object":
        data = draw(st.sampled_from([b"[1, 2]", b'"text"', b"null", b"3"]))
    elif kind == "malformed":
        data = data[: draw(st.integers(1, max(1, len(data) - 1)))]
    return data, expected


@st.composite
def jsonl_file(draw: st.DrawFn) -> tuple[str, bytes, list[str], int]:
    """(name, bytes, what each record must become, blank lines between them) of a JSON-lines
    file, maybe gzipped, with a BOM, CRLF line ends, blank lines and a last line without its
    newline."""
    rows, expected = zip(*draw(st.lists(json_row(), min_size=1, max_size=12)), strict=True)
    ending = draw(st.sampled_from([b"\n", b"\r\n"]))
    lines, blanks = [], 0
    for i, row in enumerate(rows):
        lines.append(row)
        if draw(st.integers(0, 5)) == 0:
            lines.append(draw(st.sampled_from([b"", b"  ", b"\t"])))  # a blank line: no record
            blanks += i < len(rows) - 1
    data = ending.join(lines) + draw(st.sampled_from([ending, b""]))
    if draw(st.booleans()):
        data = b"\xef\xbb\xbf" + data
    if draw(st.booleans()):
        return "records.jsonl.gz", gzip.compress(data), list(expected), blanks
    return "records.jsonl", data, list(expected), blanks


Records = list[tuple[int, str, str | None]]


def read_raw(path: Path) -> tuple[Records, pa.Table]:
    """The records of ``path`` as ingest reads them, and the table a Ray task gets of them."""
    records = list(file_records(str(path), pafs.LocalFileSystem()))
    return records, records_table(str(path), records)


def staged(
    path: Path, layout: str = "prompt", limits: Limits = LIMITS, columnar: bool = True
) -> tuple[Records, pa.Table]:
    """The records of ``path`` and the rows ingest stages from them."""
    records, raw = read_raw(path)
    rows = normalise_batch(
        raw,
        source="gen",
        source_kind="corpus",
        formats={str(path): layout},
        limits=limits,
        run_id="run",
        columnar=columnar,
    )
    return records, rows


def assert_accounted(records: Records, rows: pa.Table, expected: list[str] | None = None) -> None:
    """Every record read is at least one staged row, and every staged row is a pair or has a
    known reason and a detail; with ``expected`` (per record), the reason of each."""
    assert {r[0] for r in records} == set(rows["source_row"].to_pylist())
    if expected is not None:
        wanted = {record[0]: reason for record, reason in zip(records, expected, strict=True)}
        became = {r["source_row"]: r["reason"] or r["kind"] for r in rows.to_pylist()}
        assert became == wanted
    for row in rows.to_pylist():
        if row["kind"] == "pair":
            assert row["pair_id"] and row["chosen"].strip() and row["rejected"].strip()
            if row["source_meta"] is not None:
                json.loads(row["source_meta"], parse_constant=lambda name: 1 / 0)
        else:
            assert row["kind"] == "quarantine" and row["reason"] in QUARANTINE_REASONS
            assert row["detail"]


FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@FUZZ
@given(file=jsonl_file())
def test_every_jsonl_record_is_a_pair_or_quarantined_with_a_reason(tmp_path, file):
    name, data, expected, blanks = file
    path = tmp_path / name
    path.write_bytes(data)
    records, rows = staged(path)
    assert len(records) == len(expected), "one record per non-blank line, the BOM is no record"
    assert blank_lines(records_table(str(path), records)) == blanks, "each blank line counted"
    assert_accounted(records, rows, expected)


@FUZZ
@given(file=jsonl_file(), cut=st.floats(0.05, 0.95))
def test_a_file_cut_short_keeps_what_came_before_and_names_itself(tmp_path, file, cut):
    name, data, *_ = file
    if not name.endswith(".gz"):
        name, data = f"{name}.gz", gzip.compress(data)
    path = tmp_path / name
    path.write_bytes(data[: max(1, int(len(data) * cut))])
    records, rows = staged(path)
    *before, last = records
    assert last[2] is not None and str(path) in last[2], "the cut is reported with the file"
    assert [r[0] for r in before] == sorted(r[0] for r in before) and last[0] >= len(before)
    assert_accounted(records, rows)


@FUZZ
@given(rows=st.lists(json_row(), min_size=1, max_size=12), bom=st.booleans())
def test_every_element_of_a_json_array_is_a_pair_or_quarantined(tmp_path, rows, bom):
    parseable = [(data, reason) for data, reason in rows if _parses(data)]
    data = b"[" + b", ".join(data for data, _ in parseable) + b"]"
    path = tmp_path / "records.json"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)
    records, staged_rows = staged(path)
    file_error = len(records) == 1 and records[0][2] is not None
    assert len(records) == len(parseable) or file_error, "the elements, or one file error"
    assert_accounted(records, staged_rows, None if file_error else [r for _, r in parseable])


@FUZZ
@given(
    values=st.lists(
        st.one_of(text, st.sampled_from(["", " ", "\n"]), st.binary(min_size=1, max_size=8)),
        min_size=3,
        max_size=30,
    )
)
def test_every_parquet_row_is_a_pair_or_quarantined(tmp_path, values):
    """String columns with blank text and bytes that are not UTF-8 (Parquet does not check)."""
    cells = [v.encode() if isinstance(v, str) else v for v in values]
    columns = [cells[i::3] for i in range(3)]
    size = min(len(c) for c in columns)
    table = pa.table(
        {
            name: pa.array(column[:size], pa.binary()).view(pa.string())
            for name, column in zip(("prompt", "chosen", "rejected"), columns, strict=True)
        }
    )
    path = tmp_path / "records.parquet"
    pq.write_table(table, path)
    records, rows = staged(path)
    assert len(records) == size
    assert_accounted(records, rows)


def _parses(record: bytes) -> bool:
    """Whether one record is a JSON value the standard library reads (a JSON array of the
    generated records holds those: a malformed one would make the whole file malformed)."""
    try:
        json.loads(record.decode("utf-8", errors="surrogateescape"))
    except (ValueError, RecursionError):
        return False
    return True


@pytest.mark.parametrize(
    ("record", "key"),
    [
        ('{"prompt": "p", "chosen": "a", "rejected": "b", "chosen": "c"}', "chosen"),
        ('{"prompt": "p", "chosen": "a", "rejected": "b", "extra": {"x": 1, "x": 2}}', "x"),
        ('{"prompt": "say \\"a\\": 1", "chosen": "a", "rejected": "b", "n": {"k": 1}}', None),
    ],
)
@pytest.mark.parametrize("layout", ["jsonl", "json"])
def test_a_key_twice_in_one_object_is_quarantined_naming_the_key(tmp_path, record, key, layout):
    """Parsers keep the last of two values of a key, so which one the author meant is
    unknown: such a record is quarantined, not read as the last value (a string that holds
    ``":`` is no second key)."""
    path = tmp_path / f"records.{layout}"
    path.write_text(record + "\n" if layout == "jsonl" else f"[{record}]")
    _, rows = staged(path)
    (row,) = rows.to_pylist()
    if key is None:
        assert row["kind"] == "pair"
    else:
        assert (row["kind"], row["reason"]) == ("quarantine", "malformed_json")
        assert f"the key {key!r} appears twice in one object" in row["detail"]


def test_the_atheris_target_finds_nothing_in_a_short_run(tmp_path):
    """tests/fuzz_records.py, coverage-guided, briefly (a longer run is documented there and in
    docs/reliability.md): what it finds is a crash of reading or normalising, or a record that
    is neither a pair nor a quarantine row with a reason."""
    # libFuzzer's memory check reads the peak RSS, which Linux carries over from this process
    # into the child it execs (a pytest worker that loaded models is over the 2 GB default):
    # the fuzzer gets its 2 GB on top of what it inherits.
    inherited_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    fuzz = ["-atheris_runs=10000", "-seed=1", f"-artifact_prefix={tmp_path}/"]
    fuzz.append(f"-rss_limit_mb={inherited_mb + 2048}")
    result = subprocess.run(
        [sys.executable, "-m", "tests.fuzz_records", *fuzz],
        cwd=REPO,
        env=os.environ | {"TMPDIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Done 10000 in" in result.stderr
