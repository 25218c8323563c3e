"""The synthetic corpus: seeded, with the planted defects it promises."""

import gzip
import json

import pytest

from pipelines.ingest.formats import Limits, Pair, convert
from pipelines.ingest.synthetic import (
    BAD_ROW_KINDS,
    CorpusGenerator,
    CorpusSpec,
    benchmark_prompts,
    write_corpus,
)
from tests.conftest import JUDGEBENCH, shared_data


def lines(paths):
    return [line for p in paths for line in gzip.open(p, "rt", encoding="utf-8")]


def test_same_seed_same_corpus_other_seed_other_corpus(tmp_path):
    spec = CorpusSpec(pairs=50, seed=7)
    a = lines(write_corpus(spec, tmp_path / "a"))
    b = lines(write_corpus(spec, tmp_path / "b"))
    c = lines(write_corpus(CorpusSpec(pairs=50, seed=8), tmp_path / "c"))
    assert a == b and a != c


def test_planted_rows_match_the_spec():
    spec = CorpusSpec(
        pairs=400,
        exact_duplicate_rate=0.05,
        near_duplicate_rate=0.1,
        flip_rate=0.02,
        bad_row_rate=0.03,
    )
    records = list(CorpusGenerator(spec).records())
    kinds = [r["truth"]["kind"] if isinstance(r, dict) else "bad:malformed_json" for r in records]
    assert kinds.count("original") == 400
    assert (kinds.count("exact_dup"), kinds.count("near_dup"), kinds.count("flip")) == (20, 40, 8)
    assert sum(k.startswith("bad:") for k in kinds) == 12
    originals = {
        r["truth"]["id"]: r
        for r in records
        if isinstance(r, dict) and r["truth"]["kind"] == "original"
    }
    for record in records:
        if isinstance(record, dict) and record["truth"]["kind"] == "flip":
            original = originals[record["truth"]["of"]]
            assert (
                record["chosen"] == original["rejected"]
                and record["rejected"] == original["chosen"]
            )
        if isinstance(record, dict) and record["truth"]["kind"] == "near_dup":
            original = originals[record["truth"]["of"]]
            words = original["chosen"][-1]["content"].split()
            edited = record["chosen"][-1]["content"].split()
            same = sum(x == y for x, y in zip(words, edited, strict=True))
            assert 0.9 <= same / len(words) < 1


def test_every_bad_row_kind_is_rejected_for_its_reason():
    spec = CorpusSpec(
        pairs=10, bad_row_rate=0.6, exact_duplicate_rate=0, near_duplicate_rate=0, flip_rate=0
    )
    for record in CorpusGenerator(spec).records():
        if isinstance(record, str):
            with pytest.raises(json.JSONDecodeError):
                json.loads(record)
            continue
        kind = record["truth"]["kind"]
        (item,) = convert(record, "messages", Limits())
        if kind == "original":
            assert isinstance(item, Pair)
        else:
            assert kind.removeprefix("bad:") in BAD_ROW_KINDS and item.reason == kind.removeprefix(
                "bad:"
            )


def test_contamination_plants_real_benchmark_prompts():
    prompts = benchmark_prompts(shared_data(JUDGEBENCH))
    assert len(prompts) > 300
    spec = CorpusSpec(pairs=100, contamination_rate=0.1)
    planted = [
        r
        for r in CorpusGenerator(spec, prompts).records()
        if isinstance(r, dict) and r["truth"]["kind"] == "contaminated"
    ]
    assert len(planted) == 10
    assert all(r["chosen"][0]["content"] == prompts[r["truth"]["prompt"]] for r in planted)
    with pytest.raises(ValueError, match="needs benchmark prompts"):
        CorpusGenerator(spec)
