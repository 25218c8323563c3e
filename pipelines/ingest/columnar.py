"""The fast path of ingest: clean records of the common layouts converted a block at a time.

``formats.convert`` runs Python on every record. Here a block's records are parsed by orjson
(about twice as fast as Arrow's JSON reader on these records, and exact where Arrow's type
inference is not: see docs/ingest.md), their conversations become Arrow arrays in one conversion
each, the rules of ``formats`` run as compute kernels over the flattened messages, and
``pair_id`` hashes each pair's length-prefixed bytes, gathered by one ``take``, in a tight loop.
Python is left with what has no kernel: pulling the fields out of the parsed objects,
``source_meta``'s JSON text, and the hash calls.

Only rows that pass every rule are taken. Any other row (malformed, a rejection, a type Arrow
would coerce, a key that may be repeated, a null) is left to the per-record path, which gives
its rejection exactly as before: both paths give identical rows
(tests/test_ingest_columnar.py).

Layouts: ``messages`` (conversation lists), ``prompt`` (strings or message lists) and ``hh``
transcripts, split by the same pattern as ``formats`` with Arrow's regex kernels.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.ingest.formats import END_OF_HISTORY, HH_TURN_PATTERN, Limits
from storage_schemas import MESSAGE, ROLES

COLUMNAR_FORMATS = frozenset({"messages", "prompt", "hh"})
CONSUMED = {
    "messages": ("chosen", "rejected"),
    "prompt": ("prompt", "chosen", "rejected"),
    "hh": ("chosen", "rejected"),
}
"""The fields each layout reads; every other field of a record goes to ``source_meta``."""

PYTHON_WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
    "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
"""What ``str.strip()`` removes (``str.isspace``); Arrow's own whitespace set differs."""
KEY_END = r'"[ \t\n\r]*:'
"""A quote before a colon: at least one per key of a JSON text (a string may hold more)."""
_STRING_ROLES = {"prompt": "user", "chosen": "assistant", "rejected": "assistant"}
"""Who says a ``prompt`` layout's field given as a string (``formats._from_prompt``)."""


@dataclass(frozen=True)
class Conversations:
    """The messages of a block's rows, flattened: row ``i`` holds elements
    ``offsets[i]:offsets[i + 1]``; a row that is not ``ok`` holds none and is not taken."""

    offsets: np.ndarray
    roles: pa.Array
    contents: pa.Array
    ok: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def finals(self) -> np.ndarray:
        """Element index of each row's last message (meaningless for a row without any)."""
        return np.maximum(self.offsets[1:] - 1, 0)


def columnar_pairs(
    records: pa.Array, fmt: str, limits: Limits
) -> tuple[np.ndarray, dict[str, pa.Array]]:
    """The rows of ``records`` (JSON texts; null: a read error) that are clean pairs of layout
    ``fmt``, as (their indices, their pair columns: ``PAIRS`` names, ``source_meta`` and
    ``pair_id`` included). The other rows are for ``formats.convert``."""
    consumed = CONSUMED[fmt]
    rows = len(records)
    meta: list[str | None] = [None] * rows
    keys = np.full(rows, -1, dtype=np.int64)
    fields = {name: _Field(rows) for name in consumed}
    with _no_cycle_collection():  # parsed JSON holds no cycles; collecting them costs half
        for i, record in enumerate(_parsed(records.to_pylist())):
            if record is None:
                continue
            counted = _layout_fields(record, fmt, fields, i)
            if counted is None:
                continue
            rest = {k: v for k, v in record.items() if k not in consumed}
            try:
                meta[i] = json.dumps(rest, ensure_ascii=False, sort_keys=True) if rest else None
            except (RecursionError, ValueError):
                continue
            keys[i] = counted + len(record) + _keys(list(rest.values()))
        if fmt == "hh":
            prefix = None
            chosen, rejected = (_hh_conversations(fields[n].texts) for n in ("chosen", "rejected"))
        else:
            prefix = fields["prompt"].conversations() if fmt == "prompt" else None
            chosen, rejected = (fields[n].conversations() for n in ("chosen", "rejected"))
    key_ends = pc.count_substring_regex(records, KEY_END)
    fit = keys == np.asarray(key_ends.fill_null(-2), dtype=np.int64)  # no key given twice
    taken, columns = _pairs(prefix, chosen, rejected, fit, limits)
    columns["source_meta"] = pa.array([meta[i] for i in taken.tolist()], pa.string())
    return taken, columns


@contextlib.contextmanager
def _no_cycle_collection() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _parsed(texts: list[str | None]) -> Iterator[dict[str, Any] | None]:
    for text in texts:
        try:
            value = orjson.loads(text) if text is not None else None
        except orjson.JSONDecodeError:
            value = None
        yield value if type(value) is dict else None


class _Field:
    """One layout field of a block as the kernels take it: the rows' transcripts (``hh``), or
    the roles and contents of their messages end to end with each row's message count."""

    def __init__(self, rows: int) -> None:
        self.texts: list[str | None] = [None] * rows
        self.lengths = np.zeros(rows, dtype=np.int64)
        self.roles: list[Any] = []
        self.contents: list[Any] = []

    def add_messages(self, row: int, messages: list[dict[str, Any]]) -> int | None:
        """The messages of ``row``; their key count, or None when one is not an object."""
        keys, start = 0, len(self.roles)
        for message in messages:
            if type(message) is not dict:
                del self.roles[start:], self.contents[start:]
                return None
            keys += len(message)
            self.roles.append(message.get("role"))
            self.contents.append(message.get("content"))
        self.lengths[row] = len(messages)
        return keys

    def conversations(self) -> Conversations:
        offsets = _offsets(self.lengths)
        ok = np.ones(len(self.lengths), dtype=bool)  # a bad message is caught by its values
        roles, contents = (_to_arrow(v, pa.string()) for v in (self.roles, self.contents))
        return Conversations(offsets, roles, contents, ok)


def _layout_fields(
    record: dict[str, Any], fmt: str, fields: dict[str, _Field], row: int
) -> int | None:
    """Put the record's layout fields into ``fields`` at ``row``; their key count, or None for a
    record this path does not take (the rows a field filled are then never taken)."""
    counted = 0
    for name, field in fields.items():
        value = record.get(name)
        if fmt == "hh":
            if type(value) is not str:
                return None
            field.texts[row] = value
            continue
        if type(value) is str and fmt == "prompt":  # one message, and no key in the text
            field.add_messages(row, [{"role": _STRING_ROLES[name], "content": value}])
            continue
        if type(value) is not list:
            return None
        keys = field.add_messages(row, value)
        if keys is None:
            return None
        counted += keys
    return counted


def _keys(values: list[Any]) -> int:
    """How many object keys ``values`` hold, at every depth."""
    count, stack = 0, values
    while stack:
        value = stack.pop()
        if type(value) is dict:
            count += len(value)
            stack.extend(value.values())
        elif type(value) is list:
            stack.extend(value)
    return count


def _to_arrow(values: list[Any], type_: pa.DataType) -> pa.Array:
    """``values`` as an array of ``type_``; a value Arrow cannot convert becomes null (halves are
    converted apart until the culprits are alone, so one bad row costs a few conversions)."""
    try:
        return pa.array(values, type_)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        if len(values) == 1:
            return pa.nulls(1, type_)
    half = len(values) // 2
    return pa.concat_arrays([_to_arrow(values[:half], type_), _to_arrow(values[half:], type_)])


def _hh_conversations(values: list[str | None]) -> Conversations:
    """Transcripts split as ``formats._hh_messages`` splits them: ``[text before the first turn,
    speaker, text, speaker, text, ...]`` from one regex replace and one split on NUL."""
    transcripts = pa.array(values, pa.string())
    ok = np.asarray(transcripts.is_valid(), dtype=bool)
    ok &= ~np.asarray(pc.match_substring(transcripts, "\x00").fill_null(True), dtype=bool)
    marked = pc.replace_substring_regex(transcripts, HH_TURN_PATTERN, "\x00\\1\x00")
    parts = pc.split_pattern(marked, "\x00")
    part_counts = np.asarray(pc.list_value_length(parts).fill_null(0), dtype=np.int64)
    ok &= part_counts >= 3
    part_counts = np.where(ok, part_counts, 0)
    flat = pc.list_flatten(pc.if_else(pa.array(ok), parts, pa.nulls(len(parts), parts.type)))
    position = np.arange(len(flat)) - np.repeat(_offsets(part_counts)[:-1], part_counts)
    before_first = position == 0
    preamble = pc.utf8_trim(pc.filter(flat, before_first), PYTHON_WHITESPACE)
    ok[ok] &= np.asarray(pc.utf8_length(preamble), dtype=np.int64) == 0
    speakers = pc.filter(flat, (position % 2 == 1))
    texts = pc.utf8_trim(pc.filter(flat, ~before_first & (position % 2 == 0)), PYTHON_WHITESPACE)
    roles = pc.if_else(pc.equal(speakers, "Human"), "user", "assistant")
    turns = np.where(part_counts > 0, (part_counts - 1) // 2, 0)
    return Conversations(_offsets(turns), roles, texts, ok)


def _pairs(
    prefix: Conversations | None,
    chosen: Conversations,
    rejected: Conversations,
    fit: np.ndarray,
    limits: Limits,
) -> tuple[np.ndarray, dict[str, pa.Array]]:
    """The rules of ``formats._split_final_turns`` and ``formats._validated`` over whole
    columns; the pair columns of the rows that pass them all."""
    ok = fit.copy()
    for conversation in (c for c in (prefix, chosen, rejected) if c is not None):
        bad = _any_per_row(_bad_messages(conversation, limits), conversation.offsets)
        ok &= conversation.ok & ~bad
    n_chosen = chosen.lengths
    ok &= (n_chosen >= 1) & (n_chosen == rejected.lengths)
    history_turns = n_chosen - 1 + (prefix.lengths if prefix is not None else 0)
    ok &= history_turns <= limits.max_turns
    for conversation in (chosen, rejected):
        last_roles = pc.take(conversation.roles, conversation.finals()[ok])
        ok[ok] &= np.asarray(pc.equal(last_roles, "assistant"), dtype=bool)
    ok &= _same_history_other_answer(chosen, rejected, ok)
    taken = np.flatnonzero(ok)

    prefix_counts = prefix.lengths[taken] if prefix is not None else np.zeros(len(taken), np.int64)
    shared_counts = n_chosen[taken] - 1
    element_rows = [(chosen, chosen.offsets[taken], shared_counts)]
    if prefix is not None:
        element_rows.insert(0, (prefix, prefix.offsets[taken], prefix_counts))
    history_roles, history_contents = _gather(element_rows)
    counts = prefix_counts + shared_counts
    history = pa.ListArray.from_arrays(
        pa.array(_offsets(counts), pa.int32()),
        pa.StructArray.from_arrays([history_roles, history_contents], fields=list(MESSAGE)),
    )
    chosen_text, rejected_text = (pc.take(c.contents, c.finals()[ok]) for c in (chosen, rejected))
    content_chars = np.asarray(pc.utf8_length(history_contents), dtype=np.int64)
    return taken, {
        "history": history,
        "chosen": chosen_text,
        "rejected": rejected_text,
        "history_turns": pa.array(counts, pa.int32()),
        "history_chars": pa.array(_sum_per_row(content_chars, _offsets(counts)), pa.int64()),
        "chosen_chars": pc.utf8_length(chosen_text).cast(pa.int64()),
        "rejected_chars": pc.utf8_length(rejected_text).cast(pa.int64()),
        "pair_id": pa.array(
            _pair_ids(history_roles, history_contents, counts, chosen_text, rejected_text),
            pa.string(),
        ),
    }


def _bad_messages(conversation: Conversations, limits: Limits) -> np.ndarray:
    """Per message: a role outside ``ROLES``, or content that is null, blank or too long."""
    contents = conversation.contents
    good = pc.and_kleene(
        pc.is_in(conversation.roles, pa.array(ROLES)),
        pc.and_kleene(
            pc.greater(pc.utf8_length(pc.utf8_trim(contents, PYTHON_WHITESPACE)), 0),
            pc.less_equal(pc.utf8_length(contents), limits.max_chars),
        ),
    )
    return ~np.asarray(good.fill_null(False), dtype=bool)


def _same_history_other_answer(
    chosen: Conversations, rejected: Conversations, ok: np.ndarray
) -> np.ndarray:
    """Rows (of those ``ok``, where both have as many messages) whose chosen and rejected agree
    on every message but the last, and whose last messages differ."""
    rows = np.flatnonzero(ok)
    if np.array_equal(chosen.offsets, rejected.offsets):  # aligned: compare in place
        offsets = chosen.offsets
        pairs = [(chosen.roles, rejected.roles), (chosen.contents, rejected.contents)]
    else:
        offsets = _offsets(chosen.lengths[rows])
        left = _ranges(chosen.offsets[rows], chosen.lengths[rows])
        right = _ranges(rejected.offsets[rows], rejected.lengths[rows])
        pairs = [
            (pc.take(getattr(chosen, c), left), pc.take(getattr(rejected, c), right))
            for c in ("roles", "contents")
        ]
    same_role, same_content = (
        np.asarray(pc.equal(a, b).fill_null(False), dtype=bool) for a, b in pairs
    )
    mismatch = ~(same_role & same_content)
    finals = np.maximum(offsets[1:] - 1, 0)
    has_final = offsets[1:] > offsets[:-1]
    answers_differ = np.zeros(len(finals), dtype=bool)
    answers_differ[has_final] = ~same_content[finals[has_final]]
    mismatch[finals[has_final]] = False
    result = ~_any_per_row(mismatch, offsets) & answers_differ
    if len(offsets) == len(ok) + 1:
        return result & ok
    agreed = np.zeros(len(ok), dtype=bool)
    agreed[rows] = result
    return agreed


def _gather(
    parts: list[tuple[Conversations, np.ndarray, np.ndarray]],
) -> tuple[pa.Array, pa.Array]:
    """Roles and contents of each row's messages: for every row, ``counts`` messages from
    ``starts`` of each conversation in turn (a prompt's, then the shared turns)."""
    pool_roles = pa.concat_arrays([c.roles for c, _, _ in parts])
    pool_contents = pa.concat_arrays([c.contents for c, _, _ in parts])
    base = np.cumsum([0] + [len(c.roles) for c, _, _ in parts])[:-1]
    starts = np.stack([b + s for b, (_, s, _) in zip(base, parts, strict=True)], axis=1)
    counts = np.stack([n for _, _, n in parts], axis=1)
    indices = _ranges(starts.ravel(), counts.ravel())
    return pc.take(pool_roles, indices), pc.take(pool_contents, indices)


def _pair_ids(
    roles: pa.Array,
    contents: pa.Array,
    counts: np.ndarray,
    chosen: pa.Array,
    rejected: pa.Array,
) -> list[str]:
    """``formats.pair_id`` of every row: each row's strings length-prefixed and laid end to end
    by Arrow (role, content, ..., the end-of-history mark, chosen, rejected), hashed per row."""
    rows, messages = len(counts), len(roles)
    marks = pa.array([END_OF_HISTORY] * rows, pa.string())
    pieces = pa.concat_arrays([roles, contents, marks, chosen, rejected])
    sizes = np.asarray(pc.binary_length(pieces), dtype="<i8")
    prefixes = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(8), len(sizes), [None, pa.py_buffer(sizes.tobytes())]
    )
    pool = pa.concat_arrays([prefixes.cast(pa.large_binary()), pieces.cast(pa.large_binary())])
    # Per row: role and content of each history message, then mark, chosen, rejected; each
    # piece preceded by its length (piece k's length is pool[k], the piece pool[len(sizes) + k]).
    per_row = 2 * counts + 3
    starts = _offsets(per_row)
    piece_order = np.empty(starts[-1], dtype=np.int64)
    message_row = np.repeat(np.arange(rows), counts)
    slot = 2 * np.arange(messages) + 3 * message_row
    piece_order[slot] = np.arange(messages)
    piece_order[slot + 1] = messages + np.arange(messages)
    tail = starts[1:] - 3
    for k in range(3):
        piece_order[tail + k] = 2 * messages + k * rows + np.arange(rows)
    order = np.empty(2 * len(piece_order), dtype=np.int64)
    order[0::2] = piece_order
    order[1::2] = piece_order + len(sizes)
    starts = 2 * starts
    laid = pc.take(pool, order)
    data = memoryview(laid.buffers()[2] or b"")
    offsets = np.frombuffer(laid.buffers()[1], dtype=np.int64)[laid.offset :]
    bounds = offsets[starts].tolist()
    return [
        hashlib.blake2b(data[a:b], digest_size=16).hexdigest()
        for a, b in itertools.pairwise(bounds)
    ]


def _offsets(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concat(range(s, s + n) for s, n in zip(starts, lengths))`` without a Python loop."""
    lengths = np.asarray(lengths, dtype=np.int64)
    shift = np.asarray(starts, dtype=np.int64) - _offsets(lengths)[:-1]
    return np.repeat(shift, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)


def _sum_per_row(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    totals = _offsets(values)
    return totals[offsets[1:]] - totals[offsets[:-1]]


def _any_per_row(flags: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    return _sum_per_row(flags.astype(np.int64), offsets) > 0
