"""Every format converts to canonical pairs; every bad record gets its quarantine reason."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipelines.ingest.formats import (
    FormatError,
    Limits,
    Pair,
    Reject,
    Rejection,
    convert,
    detect_format,
    iter_items,
    pair_id,
    parse_mapping,
    resolve_path,
)

LIMITS = Limits(max_chars=1_000, max_turns=8)
USER = {"role": "user", "content": "What is 2+2?"}


def reply(text):
    return {"role": "assistant", "content": text}


def only_pair(items) -> Pair:
    assert len(items) == 1 and isinstance(items[0], Pair), items
    return items[0]


def reason(items) -> str:
    assert len(items) == 1 and isinstance(items[0], Rejection), items
    return items[0].reason


# ------------------------------------------------------------------------------ good records


def test_messages_format_splits_shared_history_and_final_turns():
    record = {"chosen": [USER, reply("4")], "rejected": [USER, reply("5")], "id": 7}
    pair = only_pair(convert(record, "messages", LIMITS))
    assert pair.history == [USER]
    assert (pair.chosen, pair.rejected) == ("4", "5")
    assert pair.meta == {"id": 7}


@pytest.mark.parametrize(
    "record",
    [
        {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": [USER], "chosen": [reply("4")], "rejected": [reply("5")]},
    ],
)
def test_prompt_format_with_strings_or_messages(record):
    pair = only_pair(convert(record, "prompt", LIMITS))
    assert pair.history == [USER] and (pair.chosen, pair.rejected) == ("4", "5")


def test_hh_transcripts_become_messages():
    record = {
        "chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: 4",
        "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: 5",
    }
    pair = only_pair(convert(record, "hh", LIMITS))
    assert [m["role"] for m in pair.history] == ["user", "assistant", "user"]
    assert pair.history[2]["content"] == "2+2?"
    assert (pair.chosen, pair.rejected) == ("4", "5")


def test_ratings_are_binarised_and_ties_never_make_a_pair():
    record = {
        "instruction": "Name a colour.",
        "completions": [
            {"response": "red", "overall_score": 8},
            {"response": "blue", "overall_score": 8},
            {"response": "car", "overall_score": 2},
        ],
    }
    pairs = convert(record, "ratings", LIMITS)
    assert {(p.chosen, p.rejected) for p in pairs} == {("red", "car"), ("blue", "car")}
    best_worst = convert(record, "ratings", LIMITS, binarize="best_vs_worst")
    assert [(p.chosen, p.rejected) for p in best_worst] == [("red", "car")]
    assert best_worst[0].meta["chosen_rating"] == 8.0


def test_all_tied_ratings_are_quarantined_as_no_preference():
    record = {
        "prompt": "x",
        "completions": [{"text": "a", "rating": 3}, {"text": "b", "rating": 3}],
    }
    assert reason(convert(record, "ratings", LIMITS)) == "no_preference"


def test_rmbench_gives_nine_pairs_with_the_style_pair():
    record = {
        "id": 1,
        "prompt": "p",
        "chosen": ["c0", "c1", "c2"],
        "rejected": ["r0", "r1", "r2"],
        "subset": "chat",
    }
    pairs = convert(record, "rmbench", LIMITS)
    assert len(pairs) == 9 and all(isinstance(p, Pair) for p in pairs)
    assert pairs[5].item == 5 and (pairs[5].chosen, pairs[5].rejected) == ("c1", "r2")
    assert pairs[5].meta["chosen_style"] == 1 and pairs[5].meta["rejected_style"] == 2
    assert pairs[5].meta["subset"] == "chat"


def test_rmbench_quarantines_only_the_bad_item():
    record = {"prompt": "p", "chosen": ["c0", "", "c2"], "rejected": ["r0", "r1", "r2"]}
    items = convert(record, "rmbench", LIMITS)
    bad = [i for i in items if isinstance(i, Rejection)]
    assert [b.item for b in bad] == [3, 4, 5] and {b.reason for b in bad} == {"empty_content"}


@pytest.mark.parametrize(("label", "chosen"), [("A>B", "a"), ("B>A", "b")])
def test_judgebench_label_decides_the_chosen_response(label, chosen):
    record = {"question": "q", "response_A": "a", "response_B": "b", "label": label, "source": "x"}
    assert only_pair(convert(record, "judgebench", LIMITS)).chosen == chosen


def test_mapping_reads_any_layout_by_field_paths():
    record = {"conv": {"turns": [USER]}, "answers": [{"text": "4"}, {"text": "5"}], "meta": 1}
    mapping = parse_mapping(
        ["history=conv.turns", "chosen=answers[0].text", "rejected=answers.1.text"]
    )
    pair = only_pair(convert(record, "mapping", LIMITS, mapping=mapping))
    assert pair.history == [USER] and (pair.chosen, pair.rejected) == ("4", "5")
    assert pair.meta == {"meta": 1}


# ------------------------------------------------------------------------------ bad records


@pytest.mark.parametrize(
    ("fmt", "record", "expected"),
    [
        ("messages", {"chosen": [USER, reply("4")]}, "missing_field"),
        ("messages", {"chosen": [USER, reply("4")], "rejected": None}, "missing_field"),
        (
            "messages",
            {"chosen": [USER, reply("4")], "rejected": [USER, reply(5)]},
            "non_string_content",
        ),
        (
            "messages",
            {"chosen": [USER, reply("4")], "rejected": [USER, reply(" ")]},
            "empty_content",
        ),
        (
            "messages",
            {"chosen": [USER, reply("4")], "rejected": [USER, reply("4")]},
            "identical_responses",
        ),
        (
            "messages",
            {
                "chosen": [USER, reply("4")],
                "rejected": [{"role": "user", "content": "Hi"}, reply("5")],
            },
            "history_mismatch",
        ),
        ("messages", {"chosen": [USER], "rejected": [USER]}, "final_turn_not_assistant"),
        (
            "messages",
            {
                "chosen": [{"role": "narrator", "content": "x"}, reply("4")],
                "rejected": [USER, reply("5")],
            },
            "invalid_role",
        ),
        ("messages", {"chosen": "4", "rejected": [USER, reply("5")]}, "non_string_content"),
        ("prompt", {"chosen": "4", "rejected": "5"}, "missing_field"),
        (
            "hh",
            {"chosen": "no turns here", "rejected": "\n\nHuman: a\n\nAssistant: b"},
            "invalid_role",
        ),
        (
            "hh",
            {"chosen": "\n\nHuman: a\n\nAssistant:", "rejected": "\n\nHuman: a\n\nAssistant: b"},
            "empty_content",
        ),
        (
            "judgebench",
            {"question": "q", "response_A": "a", "response_B": "b", "label": "A=B"},
            "invalid_label",
        ),
        ("ratings", {"prompt": "x", "completions": [{"text": "a"}]}, "missing_field"),
    ],
)
def test_each_bad_record_gets_its_reason(fmt, record, expected):
    assert reason(convert(record, fmt, LIMITS)) == expected


def test_oversize_text_and_history_are_quarantined():
    long = {"prompt": "x", "chosen": "a" * 1_001, "rejected": "b"}
    assert reason(convert(long, "prompt", LIMITS)) == "oversize"
    turns = [USER, reply("ok")] * 5
    deep = {"chosen": [*turns, reply("4")], "rejected": [*turns, reply("5")]}
    assert reason(convert(deep, "messages", LIMITS)) == "oversize"


def test_malformed_json_and_non_objects_are_quarantined():
    assert reason(list(iter_items('{"chosen": [', "messages", LIMITS))) == "malformed_json"
    assert reason(list(iter_items("[1, 2]", "messages", LIMITS))) == "not_an_object"


def test_a_missing_mapping_path_is_a_row_error_and_a_bad_mapping_a_usage_error():
    mapping = parse_mapping(["prompt=q", "chosen=a.0", "rejected=a.1"])
    assert reason(convert({"q": "x", "a": ["only one"]}, "mapping", LIMITS, mapping=mapping)) == (
        "missing_field"
    )
    with pytest.raises(FormatError, match="chosen"):
        parse_mapping(["prompt=q"])
    with pytest.raises(FormatError, match="target must be one of"):
        parse_mapping(["answer=a", "chosen=b", "rejected=c"])
    with pytest.raises(FormatError, match="history=... or prompt=..., not both"):
        parse_mapping(["history=h", "prompt=p", "chosen=c", "rejected=r"])
    with pytest.raises(FormatError, match="'chosen': expected TARGET=FIELD.PATH"):
        parse_mapping(["chosen", "rejected=r"])
    with pytest.raises(FormatError, match="unknown format"):
        convert({}, "csv", LIMITS)
    with pytest.raises(FormatError, match="format 'mapping' needs field paths"):
        convert({"q": "x"}, "mapping", LIMITS)


def test_resolve_path_handles_dots_indices_and_wildcards():
    record = {"a": [{"b": {"c": "x"}}, {"b": {"c": "y"}}]}
    assert resolve_path(record, "a[0].b.c") == resolve_path(record, "a.0.b.c") == "x"
    assert resolve_path(record, "a[*].b.c") == resolve_path(record, "a.*.b.c") == ["x", "y"]
    with pytest.raises(Reject, match="'\\*' needs a list"):
        resolve_path(record, "a.0.*")
    with pytest.raises(Reject, match="not found"):
        resolve_path(record, "a[*].b.d")


# ------------------------------------------------------------------------------ detection


@pytest.mark.parametrize(
    ("record", "fmt"),
    [
        ({"chosen": [USER, reply("4")], "rejected": [USER, reply("5")]}, "messages"),
        ({"prompt": [USER], "chosen": [reply("4")], "rejected": [reply("5")]}, "prompt"),
        ({"prompt": "p", "chosen": "4", "rejected": "5"}, "prompt"),
        (
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"},
            "hh",
        ),
        ({"instruction": "p", "completions": []}, "ratings"),
        ({"prompt": "p", "chosen": ["a"], "rejected": ["b"]}, "rmbench"),
        ({"question": "q", "response_A": "a", "response_B": "b", "label": "A>B"}, "judgebench"),
        ({"text": "hello"}, None),
        ([1, 2], None),
    ],
)
def test_detect_format(record, fmt):
    assert detect_format(record) == fmt


# ------------------------------------------------------------------------------ pair identity


def test_pair_id_is_a_stable_128_bit_hex_hash():
    pid = pair_id([USER], "4", "5")
    assert len(pid) == 32 and int(pid, 16) >= 0
    assert pid == pair_id([dict(USER)], "4", "5")
    assert pid != pair_id([USER], "5", "4"), "a flipped pair is a different pair"


texts = st.text(max_size=20)
messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": texts}),
    max_size=3,
)


@given(messages, texts, texts, messages, texts, texts)
def test_pair_id_differs_exactly_when_the_content_differs(h1, c1, r1, h2, c2, r2):
    same = (h1, c1, r1) == (h2, c2, r2)
    assert (pair_id(h1, c1, r1) == pair_id(h2, c2, r2)) == same


def test_meta_keeps_unconsumed_fields_as_json():
    record = {"chosen": [USER, reply("4")], "rejected": [USER, reply("5")], "truth": {"kind": "x"}}
    assert (
        json.dumps(only_pair(convert(record, "messages", LIMITS)).meta)
        == '{"truth": {"kind": "x"}}'
    )
