"""Turn one raw record of a preference dataset into canonical pairs, or say why it cannot be.

A canonical pair is (history, chosen, rejected): history is the list of {role, content} messages
before the final assistant turn; chosen and rejected are the two final assistant turns. Every
format below is converted to that, then validated by the same rules, so a new format only has to
say where its fields are. Pure Python on one record; ``pipelines.ingest.job`` applies it to Arrow
batches on Ray Data.

Formats (``FORMATS``):

- ``messages``: ``chosen``/``rejected`` are full conversations (Skywork / HF preference sets).
- ``prompt``: ``prompt`` (string or messages) + ``chosen``/``rejected`` (strings or messages).
- ``hh``: Anthropic HH transcripts (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``).
- ``ratings``: a prompt with rated completions (UltraFeedback); binarised, ties never make a pair.
- ``rmbench``: RM-Bench, 3 chosen x 3 rejected styled responses -> 9 pairs with the style pair.
- ``judgebench``: JudgeBench, ``response_A``/``response_B`` with label ``A>B`` or ``B>A``.
- ``mapping``: any other layout, given as field paths (``chosen=responses.0.text``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from pipelines.core.errors import FormatError
from pipelines.core.text import Message
from storage_schemas import ROLES

FORMATS = ("messages", "prompt", "hh", "ratings", "rmbench", "judgebench", "mapping")
BENCHMARK_FORMATS = frozenset({"rmbench", "judgebench"})
MAPPING_TARGETS = ("history", "prompt", "chosen", "rejected")

PROMPT_KEYS = ("prompt", "instruction", "question")
COMPLETION_KEYS = ("completions", "responses")
COMPLETION_TEXT_KEYS = ("response", "text", "content", "output")
RATING_KEYS = ("overall_score", "rating", "score")


@dataclass(frozen=True)
class Limits:
    """Size limits beyond which a pair is quarantined as ``oversize``."""

    max_chars: int = 100_000
    max_turns: int = 256


@dataclass(frozen=True)
class Pair:
    """One canonical preference pair taken from a record (``item`` numbers pairs of a record)."""

    item: int
    history: list[Message]
    chosen: str
    rejected: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def pair_id(self) -> str:
        return pair_id(self.history, self.chosen, self.rejected)


@dataclass(frozen=True)
class Rejection:
    """Why a record (or one item of it) is not a valid pair."""

    item: int
    reason: str
    detail: str


class Reject(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


END_OF_HISTORY = "\x00end-of-history"


def pair_id(history: list[Message], chosen: str, rejected: str) -> str:
    """Stable content hash of a canonical pair: 128-bit BLAKE2b, 32 hex characters.

    Every string is length-prefixed, so no two different pairs encode to the same bytes.
    """
    digest = hashlib.blake2b(digest_size=16)
    for text in (
        *itertools.chain.from_iterable((m["role"], m["content"]) for m in history),
        END_OF_HISTORY,
        chosen,
        rejected,
    ):
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------- detection


def detect_format(record: Any) -> str | None:
    """The format of a parsed record, or ``None`` when it is not recognisable."""
    if not isinstance(record, Mapping):
        return None
    keys = record.keys()
    if {"response_A", "response_B", "label"} <= keys:
        return "judgebench"
    if any(k in keys for k in COMPLETION_KEYS) and _first(record, PROMPT_KEYS) is not None:
        return "ratings"
    if not {"chosen", "rejected"} <= keys:
        return None
    chosen = record["chosen"]
    if isinstance(chosen, list) and chosen and all(isinstance(c, str) for c in chosen):
        return "rmbench" if "prompt" in keys else None
    if isinstance(chosen, list) and chosen and isinstance(chosen[0], Mapping):
        # Full conversations start with the user; TRL's explicit-prompt style holds only the reply.
        return "prompt" if chosen[0].get("role") == "assistant" and "prompt" in keys else "messages"
    if isinstance(chosen, str):
        if "prompt" in keys:
            return "prompt"
        if _HH_TURN.search(chosen):
            return "hh"
    return None


def parse_mapping(specs: list[str], targets: tuple[str, ...] = MAPPING_TARGETS) -> dict[str, str]:
    """``["chosen=a.b", "rejected=c[0].d", "prompt=q"]`` -> target -> field path, validated."""
    mapping: dict[str, str] = {}
    for spec in specs:
        target, sep, path = spec.partition("=")
        target, path = target.strip(), path.strip()
        if not sep or not path:
            raise FormatError(f"field mapping {spec!r}: expected TARGET=FIELD.PATH")
        if target not in targets:
            raise FormatError(
                f"field mapping {spec!r}: the target must be one of {', '.join(targets)}"
            )
        mapping[target] = path
    if not {"chosen", "rejected"} <= mapping.keys():
        raise FormatError("a field mapping needs at least chosen=... and rejected=...")
    if "history" in mapping and "prompt" in mapping:
        raise FormatError("a field mapping takes history=... or prompt=..., not both")
    return mapping


# ---------------------------------------------------------------------------------- conversion


def convert(
    record: Any,
    fmt: str,
    limits: Limits,
    *,
    mapping: Mapping[str, str] | None = None,
    binarize: str = "all_pairs",
) -> list[Pair | Rejection]:
    """All pairs of ``record`` (validated) and the rejections of its bad items, in item order."""
    if not isinstance(record, Mapping):
        return [
            Rejection(0, "not_an_object", f"expected a JSON object, got {type(record).__name__}")
        ]
    try:
        if fmt == "messages":
            items = [_from_messages(record)]
        elif fmt == "prompt":
            items = [_from_prompt(record, record.get("prompt"), "prompt")]
        elif fmt == "hh":
            items = [_from_hh(record)]
        elif fmt == "ratings":
            items = _from_ratings(record, binarize)
        elif fmt == "rmbench":
            items = _from_rmbench(record)
        elif fmt == "judgebench":
            items = [_from_judgebench(record)]
        elif fmt == "mapping":
            if not mapping:
                raise FormatError("format 'mapping' needs field paths (TARGET=FIELD.PATH)")
            items = [_from_mapping(record, mapping)]
        else:
            raise FormatError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    except Reject as exc:
        return [Rejection(0, exc.reason, exc.detail)]
    return [_validated(item, limits) if isinstance(item, Pair) else item for item in items]


def _validated(pair: Pair, limits: Limits) -> Pair | Rejection:
    if pair.chosen == pair.rejected:
        return Rejection(pair.item, "identical_responses", "chosen and rejected are the same text")
    if len(pair.history) > limits.max_turns:
        return Rejection(
            pair.item, "oversize", f"history has {len(pair.history)} messages > {limits.max_turns}"
        )
    texts = [("chosen", pair.chosen), ("rejected", pair.rejected)]
    texts += [(f"history[{i}]", m["content"]) for i, m in enumerate(pair.history)]
    for name, text in texts:
        if len(text) > limits.max_chars:
            return Rejection(
                pair.item, "oversize", f"{name} has {len(text)} chars > {limits.max_chars}"
            )
    return pair


def _from_messages(record: Mapping[str, Any]) -> Pair:
    chosen = parse_messages(_require(record, "chosen"), "chosen")
    rejected = parse_messages(_require(record, "rejected"), "rejected")
    return _split_final_turns([], chosen, rejected, _meta(record, {"chosen", "rejected"}))


def _from_prompt(record: Mapping[str, Any], prompt: Any, prompt_field: str) -> Pair:
    if prompt is None:
        raise Reject("missing_field", f"'{prompt_field}' is missing or null")
    history = parse_messages(prompt, prompt_field, string_role="user")
    chosen = parse_messages(_require(record, "chosen"), "chosen", string_role="assistant")
    rejected = parse_messages(_require(record, "rejected"), "rejected", string_role="assistant")
    return _split_final_turns(
        history, chosen, rejected, _meta(record, {prompt_field, "chosen", "rejected"})
    )


HH_TURN_PATTERN = r"(?:^|\n\n)(Human|Assistant): ?"
"""Where a turn of an HH transcript starts, and its speaker."""
_HH_TURN = re.compile(HH_TURN_PATTERN)


def _from_hh(record: Mapping[str, Any]) -> Pair:
    chosen = _hh_messages(_require_str(record, "chosen"), "chosen")
    rejected = _hh_messages(_require_str(record, "rejected"), "rejected")
    return _split_final_turns([], chosen, rejected, _meta(record, {"chosen", "rejected"}))


def _hh_messages(transcript: str, name: str) -> list[Message]:
    parts = _HH_TURN.split(transcript)
    # parts = [text before the first turn, speaker, text, speaker, text, ...]
    if parts[0].strip():
        raise Reject("invalid_role", f"{name}: text before the first Human/Assistant turn")
    if len(parts) < 3:
        raise Reject("invalid_role", f"{name}: no Human/Assistant turns in the transcript")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [
        {"role": roles[speaker], "content": require_content(text.strip(), f"{name} turn {i}")}
        for i, (speaker, text) in enumerate(zip(parts[1::2], parts[2::2], strict=True))
    ]


def _from_ratings(record: Mapping[str, Any], binarize: str) -> list[Pair | Rejection]:
    prompt_field = next((k for k in PROMPT_KEYS if record.get(k) is not None), PROMPT_KEYS[0])
    history = parse_messages(_require(record, prompt_field), prompt_field, string_role="user")
    completions_field = next((k for k in COMPLETION_KEYS if k in record), COMPLETION_KEYS[0])
    completions = _require(record, completions_field)
    if not isinstance(completions, list):
        raise Reject("missing_field", f"'{completions_field}' must be a list of completions")
    rated: list[tuple[str, float]] = []
    for i, completion in enumerate(completions):
        where = f"{completions_field}[{i}]"
        if not isinstance(completion, Mapping):
            raise Reject("missing_field", f"{where} is not an object")
        text = _first(completion, COMPLETION_TEXT_KEYS)
        rating = _first(completion, RATING_KEYS)
        if text is None:
            raise Reject("missing_field", f"{where} has none of {COMPLETION_TEXT_KEYS}")
        if isinstance(rating, bool) or not isinstance(rating, int | float):
            raise Reject("missing_field", f"{where} has no numeric rating ({RATING_KEYS})")
        if not math.isfinite(rating):
            raise Reject("missing_field", f"{where} has rating {rating}, not a finite number")
        rated.append((require_content(text, where), float(rating)))
    if binarize == "best_vs_worst" and rated:
        best = max(range(len(rated)), key=lambda i: rated[i][1])
        worst = min(range(len(rated)), key=lambda i: rated[i][1])
        candidates = [(min(best, worst), max(best, worst))]
    else:
        candidates = list(itertools.combinations(range(len(rated)), 2))
    meta = _meta(record, {prompt_field, completions_field})
    pairs: list[Pair | Rejection] = []
    for i, j in candidates:
        if rated[i][1] == rated[j][1]:
            continue  # a tie is no preference
        win, lose = (i, j) if rated[i][1] > rated[j][1] else (j, i)
        item_meta = meta | {
            "chosen_index": win,
            "rejected_index": lose,
            "chosen_rating": rated[win][1],
            "rejected_rating": rated[lose][1],
        }
        pairs.append(Pair(i * len(rated) + j, history, rated[win][0], rated[lose][0], item_meta))
    if not pairs:
        raise Reject("no_preference", f"{len(rated)} completions, no two with different ratings")
    return pairs


RMBENCH_STYLES = ("concise", "detailed_plain", "detailed_markdown")


def _from_rmbench(record: Mapping[str, Any]) -> list[Pair | Rejection]:
    history = parse_messages(_require(record, "prompt"), "prompt", string_role="user")
    chosen, rejected = _require(record, "chosen"), _require(record, "rejected")
    if not (isinstance(chosen, list) and isinstance(rejected, list)) or not chosen or not rejected:
        raise Reject("missing_field", "RM-Bench 'chosen' and 'rejected' must be non-empty lists")
    meta = _meta(record, {"prompt", "chosen", "rejected"})
    items: list[Pair | Rejection] = []
    for (i, win), (j, lose) in itertools.product(enumerate(chosen), enumerate(rejected)):
        item = i * len(rejected) + j
        try:
            style = {"chosen_style": i, "rejected_style": j}
            if len(chosen) == len(rejected) == len(RMBENCH_STYLES):
                style |= {
                    "chosen_style_name": RMBENCH_STYLES[i],
                    "rejected_style_name": RMBENCH_STYLES[j],
                }
            items.append(
                Pair(
                    item,
                    history,
                    require_content(win, f"chosen[{i}]"),
                    require_content(lose, f"rejected[{j}]"),
                    meta | style,
                )
            )
        except Reject as exc:
            items.append(Rejection(item, exc.reason, exc.detail))
    return items


def _from_judgebench(record: Mapping[str, Any]) -> Pair:
    history = parse_messages(_require(record, "question"), "question", string_role="user")
    a = require_content(_require(record, "response_A"), "response_A")
    b = require_content(_require(record, "response_B"), "response_B")
    label = record.get("label")
    if label not in ("A>B", "B>A"):
        raise Reject("invalid_label", f"label must be 'A>B' or 'B>A', got {label!r}")
    chosen, rejected = (a, b) if label == "A>B" else (b, a)
    meta = _meta(record, {"question", "response_A", "response_B"})
    return Pair(0, history, chosen, rejected, meta)


def _from_mapping(record: Mapping[str, Any], mapping: Mapping[str, str]) -> Pair:
    values = {target: resolve_path(record, path) for target, path in mapping.items()}
    consumed = {re.split(r"[.\[]", path, maxsplit=1)[0] for path in mapping.values()}
    chosen = parse_messages(values["chosen"], mapping["chosen"], string_role="assistant")
    rejected = parse_messages(values["rejected"], mapping["rejected"], string_role="assistant")
    if "prompt" in values:
        history = parse_messages(values["prompt"], mapping["prompt"], string_role="user")
    elif "history" in values:
        history = parse_messages(values["history"], mapping["history"])
    else:
        history = []
    return _split_final_turns(history, chosen, rejected, _meta(record, consumed))


_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+|\*)\]")


def resolve_path(record: Any, path: str) -> Any:
    """The value at a dotted field path with list indices: ``a.b.0.c`` or ``a.b[0].c``; a ``*``
    (``a[*].c`` or ``a.*.c``) takes the rest of the path in every element of a list."""
    parts = [index or name for name, index in _PATH_PART.findall(path)]
    return _resolve(record, parts, path)


def _resolve(value: Any, parts: list[str], path: str) -> Any:
    for position, part in enumerate(parts):
        if part == "*":
            if not isinstance(value, list):
                raise Reject("missing_field", f"field path '{path}': '*' needs a list")
            return [_resolve(item, parts[position + 1 :], path) for item in value]
        key: str | int = int(part) if isinstance(value, list) and part.isdigit() else part
        try:
            value = value[key]
        except (KeyError, IndexError, TypeError):
            raise Reject("missing_field", f"field path '{path}' not found (at {key!r})") from None
    return value


# ---------------------------------------------------------------------------------- helpers


def _split_final_turns(
    prefix: list[Message], chosen: list[Message], rejected: list[Message], meta: dict[str, Any]
) -> Pair:
    """History = prefix + the shared turns; the final assistant turns are the two responses."""
    for name, conversation in (("chosen", chosen), ("rejected", rejected)):
        if not conversation:
            raise Reject("missing_field", f"'{name}' has no messages")
        if conversation[-1]["role"] != "assistant":
            raise Reject(
                "final_turn_not_assistant",
                f"the last turn of {name} is from {conversation[-1]['role']!r}",
            )
    if chosen[:-1] != rejected[:-1]:
        turn = next(
            (i for i, (c, r) in enumerate(zip(chosen[:-1], rejected[:-1], strict=False)) if c != r),
            min(len(chosen), len(rejected)) - 1,
        )
        raise Reject(
            "history_mismatch",
            f"chosen and rejected conversations differ before the final turn (at message {turn})",
        )
    return Pair(0, prefix + chosen[:-1], chosen[-1]["content"], rejected[-1]["content"], meta)


def parse_messages(value: Any, name: str, string_role: str | None = None) -> list[Message]:
    """A message list from a list of {role, content}, or from a string when ``string_role``."""
    if isinstance(value, str) and string_role:
        return [{"role": string_role, "content": require_content(value, name)}]
    if not isinstance(value, list):
        expected = "a string or a list of messages" if string_role else "a list of messages"
        raise Reject("non_string_content", f"'{name}' must be {expected}, got {_kind(value)}")
    messages = []
    for i, message in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise Reject("missing_field", f"{where} must be an object with 'role' and 'content'")
        role = message["role"]
        if role not in ROLES:
            raise Reject("invalid_role", f"{where}.role is {role!r}; expected one of {ROLES}")
        content = require_content(message["content"], f"{where}.content")
        messages.append({"role": role, "content": content})
    return messages


def require_content(value: Any, name: str) -> str:
    if value is None:
        raise Reject("missing_field", f"'{name}' is null")
    if not isinstance(value, str):
        raise Reject("non_string_content", f"'{name}' must be a string, got {_kind(value)}")
    if not value.strip():
        raise Reject("empty_content", f"'{name}' is empty")
    return value


def _require(record: Mapping[str, Any], key: str) -> Any:
    if record.get(key) is None:
        raise Reject("missing_field", f"'{key}' is missing or null")
    return record[key]


def _require_str(record: Mapping[str, Any], key: str) -> str:
    return require_content(_require(record, key), key)


def _first(record: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    return next((record[k] for k in keys if record.get(k) is not None), None)


def _meta(record: Mapping[str, Any], consumed: set[str]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in consumed}


def _kind(value: Any) -> str:
    return type(value).__name__ if value is not None else "null"


def parse_json(text: str) -> Any:
    """orjson's fast parse; the standard library's for what orjson refuses (integers beyond 64
    bits) and for its error messages. What is not JSON text (NaN, Infinity, a lone surrogate)
    and an object with a key twice (which value is meant is anyone's guess: parsers keep the
    last) are a ``ValueError``; nesting deeper than the parsers hold a ``json.JSONDecodeError``."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        try:
            value = json.loads(text, parse_constant=_not_a_json_number)
        except RecursionError:
            raise json.JSONDecodeError("nested too deep", text, 0) from None
        try:  # orjson refuses a lone surrogate escape (\ud800); the standard library does not
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(
                "a string holds a lone surrogate (such as \\ud800): not text"
            ) from None
    duplicate = duplicate_key(text, value)
    if duplicate is not None:
        raise ValueError(f"the key {duplicate!r} appears twice in one object")
    return value


_QUOTE_COLON = re.compile(r'"\s*:')
"""A quote and a colon: every key ends so, and so can an escaped quote inside a string."""


def duplicate_key(text: str, value: Any) -> str | None:
    """A key that appears twice in one object of the JSON ``text`` (parsed as ``value``), or
    None. The text has one key ending per key it holds; when the parsed objects hold as many,
    none was dropped (a count: a few microseconds). Only when they differ is the text parsed
    again to find the key."""
    keys = _keys(value)
    if len(_QUOTE_COLON.findall(text)) <= keys or _key_ends(text) <= keys:
        return None  # the first count is the quicker, the second exact where strings hold '":'
    try:
        return JsonObject.repeated_key(json.loads(text, object_pairs_hook=JsonObject.of))
    except RecursionError:
        raise json.JSONDecodeError("nested too deep", text, 0) from None


class JsonObject(dict):
    """A parsed JSON object that remembers a key it held twice (the dict keeps the last)."""

    repeated: str | None = None

    @classmethod
    def of(cls, pairs: list[tuple[str, Any]]) -> JsonObject:
        obj = cls(pairs)
        if len(obj) < len(pairs):
            keys = [k for k, _ in pairs]
            obj.repeated = next(k for i, k in enumerate(keys) if k in keys[:i])
        return obj

    @staticmethod
    def repeated_key(value: Any) -> str | None:
        """A key some object within ``value`` held twice, if any."""
        return next(
            (o.repeated for o in _objects(value) if isinstance(o, JsonObject) and o.repeated),
            None,
        )


def _key_ends(text: str) -> int:
    """How many keys the JSON ``text`` holds: quotes before a colon that end a string (after an
    even number of backslashes; a quote inside a string is escaped)."""
    count = 0
    for match in _QUOTE_COLON.finditer(text):
        start = before = match.start()
        while before and text[before - 1] == "\\":
            before -= 1
        count += (start - before) % 2 == 0
    return count


def _keys(value: Any) -> int:
    """How many object keys ``value`` holds, at every depth."""
    return sum(len(obj) for obj in _objects(value))


def _objects(value: Any) -> Iterator[dict[str, Any]]:
    """Every JSON object within ``value`` (itself included), at every depth."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _not_a_json_number(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def iter_items(
    record_text: str, fmt: str, limits: Limits, **options: Any
) -> Iterator[Pair | Rejection]:
    """Parse one raw JSON record and convert it; malformed JSON is a rejection, not an error."""
    try:
        record = parse_json(record_text)
    except json.JSONDecodeError as exc:
        yield Rejection(0, "malformed_json", f"{exc.msg} at line {exc.lineno} column {exc.colno}")
        return
    except ValueError as exc:  # NaN or Infinity
        yield Rejection(0, "malformed_json", str(exc))
        return
    yield from convert(record, fmt, limits, **options)
