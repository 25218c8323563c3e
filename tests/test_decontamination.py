"""Decontamination against benchmark sources: pure matching, then the job on real benchmarks."""

import json

import pyarrow as pa
import pytest

from pipelines import jobs
from pipelines.core.config import DecontaminationConfig
from pipelines.hygiene.decontamination import BenchmarkIndex, find_contamination, tokens
from pipelines.ingest.job import IngestRequest
from pipelines.ingest.synthetic import CorpusSpec, benchmark_prompts, write_corpus
from tests.conftest import JUDGEBENCH, RM_BENCH, shared_data

LONG = "Explain in detail how the water cycle moves moisture from the oceans to the mountains and back again"
SHORT = "Name three primary colours please now"  # 6 words
TURN = "Write a poem about cats"  # 5 words: only an identical whole turn matches
TINY = "Thank you"  # too common to be evidence even as a whole turn


def rows(*items, kind="corpus", source="corpus"):
    """Pairs from (pair_id, prompt or list of user turns, chosen)."""
    return pa.Table.from_pylist(
        [
            {
                "source": source,
                "source_kind": kind,
                "pair_id": pid,
                "history": _history([prompt] if isinstance(prompt, str) else prompt),
                "chosen": chosen,
                "rejected": "no",
            }
            for pid, prompt, chosen in items
        ]
    )


def _history(turns):
    history = []
    for turn in turns:
        history += [{"role": "user", "content": turn}, {"role": "assistant", "content": "Sure."}]
    return history[:-1]


INDEX = BenchmarkIndex.build(
    rows(
        ("b1", LONG, "x"),
        ("b2", SHORT, "y"),
        ("b3", TURN, "z"),
        ("b4", ["Tell me a story about a dragon and a knight", TINY], "w"),
        kind="benchmark",
        source="bench",
    ),
    DecontaminationConfig(n=13, min_tokens=6, min_turn_tokens=4),
)


def hits(*items):
    return find_contamination(rows(*items), INDEX, "run").to_pylist()


def test_tokens_are_normalised_words():
    assert tokens("Héllo,  WORLD!\n") == ["héllo", "world"]


def test_long_prompts_match_by_13_grams_anywhere():
    (hit,) = hits(("p1", "Please: " + LONG.upper() + "!!", "fine"))
    assert (hit["field"], hit["benchmark_pair_id"], hit["n"]) == ("history", "b1", 13)
    (in_response,) = hits(("p2", "unrelated", "As asked: " + LONG))
    assert in_response["field"] == "chosen"
    assert hits(("p3", " ".join(LONG.split()[:12]), "partial overlap of 12 words")) == []


def test_short_prompts_match_whole_and_shorter_ones_only_as_a_whole_turn():
    (short,) = hits(("p1", "so: " + SHORT + " thanks", "ok"))
    assert short["benchmark_pair_id"] == "b2" and short["n"] == 6
    (turn,) = hits(("p2", "write a poem about cats!", "ok"))
    assert turn["benchmark_pair_id"] == "b3" and turn["ngram"] == "write a poem about cats"
    assert hits(("p3", "Please write a poem about cats", "ok")) == []


def test_a_short_turn_of_a_multi_turn_benchmark_is_no_evidence():
    """The false positive users met: an HH conversation ending with "Thank you." was flagged
    because a multi-turn benchmark's last turn was "thank you"."""
    assert hits(("p1", ["How do I bake bread at home?", "Thank you."], "ok")) == []
    (story,) = hits(("p2", ["hi", "Tell me a story about a dragon and a knight"], "ok"))
    assert (story["benchmark_pair_id"], story["field"]) == ("b4", "history")


def test_benchmark_rows_are_never_flagged_against_themselves():
    assert find_contamination(rows(("b1", LONG, "x"), kind="benchmark"), INDEX, "r").num_rows == 0


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"n": 4}, "greater than or equal to 5"),
        ({"n": 14}, "less than or equal to 13"),
        ({"min_tokens": 0}, "greater than or equal to 1"),
        ({"n": 5, "min_tokens": 6}, "must be at most n"),
        ({"min_turn_tokens": 0}, "greater than or equal to 1"),
    ],
)
def test_bad_options_are_rejected(values, message):
    with pytest.raises(ValueError, match=message):
        DecontaminationConfig(**values)


@pytest.mark.usefixtures("ray_cluster")
def test_planted_benchmark_prompts_are_all_caught_and_clean_pairs_are_not(config, lake, tmp_path):
    jobs.ingest(
        config, IngestRequest(paths=[str(shared_data(RM_BENCH))], source="rm-bench")
    ).as_dict()
    jobs.ingest(
        config, IngestRequest(paths=[str(shared_data(JUDGEBENCH))], source="judgebench")
    ).as_dict()
    prompts = benchmark_prompts(JUDGEBENCH) + benchmark_prompts(RM_BENCH / "chat_filtered.json")
    spec = CorpusSpec(pairs=400, seed=9, contamination_rate=0.1, bad_row_rate=0)
    files = write_corpus(spec, tmp_path / "corpus", benchmark_prompts=prompts)
    jobs.ingest(config, IngestRequest(paths=[str(f) for f in files], source="web")).as_dict()

    decontaminated = jobs.decontaminate(config)
    result, text = decontaminated.as_dict(), decontaminated.text()
    pairs = lake.read(
        "pairs", columns=["pair_id", "source_meta"], where="source = 'web'"
    ).to_pylist()
    planted = {
        p["pair_id"]
        for p in pairs
        if json.loads(p["source_meta"])["truth"]["kind"] == "contaminated"
    }
    flagged = set(lake.read("contamination", columns=["pair_id"])["pair_id"].to_pylist())
    assert len(planted) == 40
    assert flagged == planted, "every planted pair caught, no clean pair flagged"
    assert result["contaminated_pairs"] == {"web": 40}
    assert len(result["evidence"]) == 10 and "evidence (10 of 40 pairs" in text
    assert {e["pair_id"] for e in result["evidence"]} <= planted
    assert set(result["by_benchmark"]) <= {"rm-bench", "judgebench"}
    status = lake.read("curation_status", where="status = 'contaminated'")
    assert set(status["pair_id"].to_pylist()) == planted
    assert all("-gram with" in r for r in status["reason"].to_pylist())
    assert lake.count("curation_status", where="source = 'rm-bench'") == 0, (
        "benchmarks are not curated"
    )
    assert (
        lake.count("curation_status") == 400 + 12 + 4 + 40
    )  # originals, near-dups, flips, planted

    again = jobs.decontaminate(config).as_dict()
    assert again["contamination_version"] == result["contamination_version"]
    assert again["status_version"] is None, "re-running changes nothing"
