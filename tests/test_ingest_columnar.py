"""The columnar fast path of ingest gives exactly the rows of the per-record path.

Generated files of the three layouts it takes (messages, prompt, hh) mix clean pairs with every
way a record goes wrong and with the values a column-wise rewrite could get subtly wrong:
Unicode whitespace, quotes and colons inside strings, NUL, nested metadata, integers next to
floats, duplicate keys. Both paths must stage the same table; the pair ids of the real HH data
must stay what they are."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.ingest import columnar
from pipelines.ingest.formats import Limits
from pipelines.ingest.synthetic import CorpusSpec, write_corpus
from tests.conftest import HH_HARMLESS
from tests.test_ingest_generated import read_raw, staged

LIMITS = Limits(max_chars=40, max_turns=4)
TRICKY = ' \t\n\r\x0b\x0c\x1c\x85\xa0\u2028\u3000\x00"\\:{}[],'
words = st.text(
    st.one_of(st.sampled_from(TRICKY), st.characters(codec="utf-8")), min_size=0, max_size=12
)
content = st.one_of(
    words.filter(str.strip), words, st.sampled_from(["Human: hi", '"a": 1', "null", " x "])
)
role = st.sampled_from(["user", "assistant", "system", "tool", "robot"])
json_value = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | words,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(words, inner, max_size=3),
    max_leaves=6,
)


def sometimes(draw: st.DrawFn, odds: int = 10) -> bool:
    """True about once in ``odds`` draws: most generated rows are clean, so both paths'
    handling of clean rows is compared as often as that of bad ones."""
    return draw(st.sampled_from([False] * (odds - 1) + [True]))


clean_content = words.filter(str.strip)


@st.composite
def message(draw: st.DrawFn, roles: st.SearchStrategy = role) -> object:
    text = draw(content) if sometimes(draw) else draw(clean_content)
    value = {"role": draw(roles), "content": text}
    if not sometimes(draw, 20):
        return value
    mutation = draw(st.sampled_from(["null", "number", "extra", "pairs", "drop"]))
    if mutation == "null":
        value[draw(st.sampled_from(["role", "content"]))] = None
    elif mutation == "number":
        value["content"] = draw(st.integers())
    elif mutation == "extra":
        value["name"] = draw(json_value)
    elif mutation == "pairs":
        return [[k, v] for k, v in value.items()]
    elif mutation == "drop":
        del value[draw(st.sampled_from(["role", "content"]))]
    return value


def speaking(draw: st.DrawFn) -> st.SearchStrategy:
    return role if sometimes(draw) else st.sampled_from(["user", "assistant", "system"])


def answering(draw: st.DrawFn) -> st.SearchStrategy:
    return st.sampled_from(["user", "tool"]) if sometimes(draw) else st.just("assistant")


@st.composite
def messages_record(draw: st.DrawFn) -> dict:
    history = draw(st.lists(message(speaking(draw)), max_size=5))
    other = draw(st.lists(message(), max_size=5)) if sometimes(draw) else history
    chosen = draw(message(answering(draw)))
    rejected = chosen if sometimes(draw) else other_answer(chosen, draw(message(answering(draw))))
    return {"chosen": [*history, chosen], "rejected": [*other, rejected]}


def other_answer(chosen: object, rejected: object) -> object:
    """``rejected``, made to differ from ``chosen`` where it is a copy by chance."""
    if rejected == chosen and isinstance(rejected, dict) and isinstance(rejected["content"], str):
        return rejected | {"content": rejected["content"] + " (other)"}
    if rejected == chosen and isinstance(rejected, str):
        return rejected + " (other)"
    return rejected


@st.composite
def prompt_record(draw: st.DrawFn) -> dict:
    def side(roles: st.SearchStrategy) -> object:
        if sometimes(draw):
            return draw(st.one_of(content, st.integers(), st.lists(message(roles), max_size=3)))
        return draw(st.one_of(clean_content, st.lists(message(roles), min_size=1, max_size=3)))

    record = {"prompt": side(speaking(draw)), "chosen": side(answering(draw))}
    chosen = record["chosen"]
    record["rejected"] = chosen if sometimes(draw) else other_answer(chosen, side(answering(draw)))
    return record


@st.composite
def hh_record(draw: st.DrawFn) -> dict:
    """Transcripts that mostly alternate Human and Assistant and end with the Assistant; now
    and then a wrong speaker, separator or colon, a preamble, or other shared turns."""

    def turn(speaker: str) -> str:
        if sometimes(draw):
            speaker = draw(st.sampled_from(["Human", "Assistant", "human", "Narrator"]))
        separator = draw(st.sampled_from(["\n", "", " \n\n"])) if sometimes(draw) else "\n\n"
        colon = draw(st.sampled_from([":", ":  ", ":\n"])) if sometimes(draw) else ": "
        text = draw(content) if sometimes(draw) else draw(clean_content)
        return separator + speaker + colon + text

    preamble = draw(st.sampled_from([" ", "hello", "\u3000"])) if sometimes(draw) else ""
    shared = preamble + "".join(turn(s) for s in ["Human", "Assistant"] * draw(st.integers(0, 2)))
    shared += turn("Human")
    other = turn("Human") + turn("Assistant") + turn("Human") if sometimes(draw) else shared
    chosen = shared + turn("Assistant")
    rejected = chosen if sometimes(draw) else other_answer(chosen, other + turn("Assistant"))
    return {"chosen": chosen, "rejected": draw(st.sampled_from([rejected] * 6 + [7, None]))}


RECORDS = {"messages": messages_record, "prompt": prompt_record, "hh": hh_record}


@st.composite
def record_line(draw: st.DrawFn, layout: str) -> bytes:
    """One JSON-lines record of ``layout``, maybe with metadata, maybe broken as JSON."""
    record = draw(RECORDS[layout]())
    if draw(st.booleans()):
        keys = words if sometimes(draw) else st.text("abc_", min_size=1, max_size=4)
        record |= draw(st.dictionaries(keys, json_value, max_size=3))
    if sometimes(draw, 20):
        del record[draw(st.sampled_from(sorted(record)))]
    data = json.dumps(record, ensure_ascii=draw(st.booleans())).encode()
    breakage = draw(
        st.sampled_from(
            ["none"] * 25 + ["duplicate", "truncated", "nan", "array", "surrogate", "invalid_utf8"]
        )
    )
    if breakage == "duplicate" and data.endswith(b"}") and len(data) > 2:
        data = data[:-1] + b', "chosen": ' + json.dumps(record.get("chosen")).encode() + b"}"
    elif breakage == "truncated":
        data = data[: draw(st.integers(1, max(1, len(data) - 1)))]
    elif breakage == "nan" and data.endswith(b"}") and len(data) > 2:
        data = data[:-1] + b', "score": NaN}'
    elif breakage == "surrogate" and data.endswith(b"}") and len(data) > 2:
        data = data[:-1] + b', "extra": "\\ud800"}'
    elif breakage == "invalid_utf8" and data.endswith(b"}") and len(data) > 2:
        data = data[:-1] + b', "extra": "\xff"}'
    elif breakage == "array":
        data = b"[" + data + b"]"
    return data


def stage(path: Path, layout: str, limits: Limits, columnar_path: bool) -> pa.Table:
    _, rows = staged(path, layout, limits, columnar_path)
    order = [(c, "ascending") for c in ("source_file", "source_row", "source_item")]
    return rows.drop_columns(["ingested_at", "quarantined_at"]).sort_by(order)


def assert_same_rows(path: Path, layout: str, limits: Limits = LIMITS) -> pa.Table:
    """Both paths stage ``path`` alike; returns the staged rows."""
    fast, reference = stage(path, layout, limits, True), stage(path, layout, limits, False)
    for name in reference.column_names:
        assert fast[name].to_pylist() == reference[name].to_pylist(), name
    return reference


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    layout=st.sampled_from(sorted(RECORDS)),
    lines=st.data(),
)
def test_columnar_and_per_record_paths_stage_identical_rows(tmp_path, layout, lines):
    rows = lines.draw(st.lists(record_line(layout), min_size=1, max_size=10))
    if lines.draw(st.booleans()):
        path = tmp_path / f"{layout}.jsonl"
        path.write_bytes(b"\n".join(rows) + b"\n")
    else:  # a JSON array: a repeated key or bad UTF-8 is a read error of its element
        path = tmp_path / f"{layout}.json"
        path.write_bytes(b"[" + b",\n".join(rows) + b"]")
    assert_same_rows(path, layout)


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("repeated.json", b'[{"prompt": "p", "chosen": "a", "rejected": "b", "chosen": "c"}]'),
        ("bad-utf8.jsonl", b'{"prompt": "p", "chosen": "a", "rejected": "b\xff"}\n'),
    ],
)
def test_a_block_of_read_errors_only_is_quarantined_by_both_paths(tmp_path, name, data):
    """A record the reader flagged (a repeated key in a JSON array, bad UTF-8) parses as a
    clean pair once read: the flag, not the text, decides, also when every record has one."""
    path = tmp_path / name
    path.write_bytes(data)
    (row,) = assert_same_rows(path, "prompt").to_pylist()
    assert (row["kind"], row["reason"]) == ("quarantine", "malformed_json")


def test_the_fast_path_takes_the_clean_rows_of_a_corpus_and_stages_them_alike(tmp_path):
    """On the synthetic corpus (messages with metadata, 6% planted bad rows), the fast path
    takes every row that becomes a pair: nothing clean is left to the slow path."""
    (path,) = write_corpus(CorpusSpec(pairs=600, bad_row_rate=0.06, seed=3), tmp_path)
    rows = assert_same_rows(path, "messages", Limits())
    _, raw = read_raw(path)
    taken, _ = columnar.columnar_pairs(raw["record"].combine_chunks(), "messages", Limits())
    pairs = rows.filter(pc.equal(rows["kind"], "pair"))
    assert len(taken) == pairs.num_rows > 500


CLEAN = {
    "prompt": [
        {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away.", "id": 1},
        {"prompt": [{"role": "user", "content": "Hi?"}], "chosen": "Yes.", "rejected": "No."},
        {
            "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Q"}],
            "chosen": [{"role": "assistant", "content": "A"}],
            "rejected": [{"role": "assistant", "content": "B"}],
            "meta": {"rating": [1, 2.5], "ok": True},
        },
    ],
    "messages": [
        {
            "chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
            "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "B"}],
            "source": "x",
        }
    ],
    "hh": [{"chosen": "\n\nHuman: Q\n\nAssistant: A", "rejected": "\n\nHuman: Q\n\nAssistant: B"}],
}


@pytest.mark.parametrize("layout", sorted(CLEAN))
def test_clean_records_of_every_layout_are_all_taken_by_the_fast_path(tmp_path, layout):
    """Strings and message lists, with metadata: nothing clean is left to the slow path."""
    path = tmp_path / f"{layout}.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in CLEAN[layout]) + "\n")
    rows = assert_same_rows(path, layout)
    _, raw = read_raw(path)
    taken, _ = columnar.columnar_pairs(raw["record"].combine_chunks(), layout, LIMITS)
    assert len(taken) == rows.num_rows == len(CLEAN[layout])
    assert set(rows["kind"].to_pylist()) == {"pair"}


def test_real_hh_pair_ids_are_unchanged():
    """The real HH transcripts: the fast path takes nearly all, with the ids ingest gave them
    before it existed (a digest of all of them, pinned)."""
    path = HH_HARMLESS
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared/data holds the real datasets)")
    rows = assert_same_rows(path, "hh", Limits())
    _, raw = read_raw(path)
    taken, _ = columnar.columnar_pairs(raw["record"].combine_chunks(), "hh", Limits())
    assert len(taken) >= 0.99 * raw.num_rows
    ids = sorted(p for p in rows["pair_id"].to_pylist() if p)
    digest = hashlib.blake2b("\n".join(ids).encode(), digest_size=16).hexdigest()
    assert digest == "a177ae938c20521fbf31944f05b030a4"


def test_the_whitespace_python_strips_is_the_set_the_kernels_trim():
    everything = "".join(map(chr, range(sys.maxunicode + 1)))
    python_strips = "".join(c for c in everything if c.isspace())
    assert python_strips == columnar.PYTHON_WHITESPACE
