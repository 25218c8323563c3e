"""LLM judging with the real offline SmolLM2 on real JudgeBench and HH pairs: both orders, the
judgment cache, invalid answers, verdicts, gold few-shot examples, and the OpenAI-compatible
backend against a real server on the loopback (429, 500 and timeouts injected)."""

import asyncio
import base64
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pyarrow as pa
import pytest
import ray

from pipelines import jobs
from pipelines.attributes.job import ATTRIBUTE_FIELDS, parse_attributes
from pipelines.core.config import DEFAULT_JUDGE_MODEL, GoldConfig, JudgeConfig, LLMConfig
from pipelines.core.errors import ConfigError
from pipelines.judging.actor import request_rows
from pipelines.judging.identity import JudgeIdentity, PromptInputs
from pipelines.judging.job import position_warning
from pipelines.judging.prompts import (
    Choice,
    judge_prompt,
    parse_logprobs,
    parse_structured,
    preference,
)
from pipelines.judging.verdicts import judge_verdict, panel_verdict
from pipelines.llm.backends import (
    Generation,
    HFBackend,
    OpenAIBackend,
    Sampling,
    prompt_limit,
    resolve_llm,
)
from pipelines.llm.retrieval import Embedder, SimilarityIndex
from tests.conftest import (
    HH_HARMLESS,
    JUDGEBENCH,
    REPO,
    smollm2_gguf,
)

SHORT = "history_chars + chosen_chars + rejected_chars < {n}"
JUDGEBENCH_SHORT = f"source = 'judgebench' AND {SHORT.format(n=1500)}"
HH_SHORT = f"source = 'hh' AND {SHORT.format(n=400)}"
API_KEY = "sk-test-loopback"


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def hf_backend():
    """SmolLM2 through transformers, loaded once for the session."""
    return HFBackend(LLMConfig(max_prompt_tokens=2048))


@pytest.fixture
def scripted(scripted_server_url):
    """The scripted server with no queued faults and zeroed counters."""
    httpx.post(f"{scripted_server_url}/stats/reset")
    return scripted_server_url


@pytest.fixture
def server(openai_server):
    """The session's server with no queued faults and zeroed counters."""
    httpx.post(f"{openai_server}/stats/reset")
    return openai_server


def faults(url: str, *queued: dict) -> None:
    httpx.post(f"{url}/faults", json={"faults": list(queued)})


def stats(url: str) -> dict:
    return httpx.get(f"{url}/stats").json()


# ------------------------------------------------------------------ pure rules


def test_small_sets_are_judged_in_the_jobs_process_only_where_no_model_loads_there():
    api = JudgeConfig(backend="openai", base_url="http://127.0.0.1:1/v1")
    assert api.in_process(256) and not api.in_process(257)
    assert not api.model_copy(update={"on_driver_max": 0}).in_process(1), "0: the pool"
    assert not JudgeConfig(backend="hf").in_process(1), "its model would run on the driver"
    assert JudgeConfig(backend="hf", on_driver_max=4).in_process(4), "unless asked to"
    assert not JudgeConfig(backend="hf", on_driver_max=4, num_gpus=1).in_process(1)


def test_structured_answers_are_parsed_or_rejected_with_a_reason():
    assert parse_structured(Generation('Sure. {"winner": "B"} because')).winner == "B"
    assert parse_structured(Generation('{"winner": "Tie"}')).winner == "tie"
    with pytest.raises(ValueError, match="unparseable: no"):
        parse_structured(Generation("Response A is better."))
    with pytest.raises(ValueError, match='winner must be "A", "B" or "tie"'):
        parse_structured(Generation('{"winner": "both"}'))


def test_a_minimum_choice_probability_rejects_answers_that_do_not_choose():
    weak = Generation("A", {"A": math.log(0.03), "B": math.log(0.01), "Sure": math.log(0.9)})
    assert parse_logprobs(weak).winner == "A", "no minimum: any mass will do"
    with pytest.raises(ValueError, match="choice_mass_low: A, B and tie hold 0.040"):
        parse_logprobs(weak, min_mass=0.5)
    strict = JudgeIdentity.of(JudgeConfig(min_choice_probability=0.5))
    assert strict.params_hash != JudgeIdentity.of(JudgeConfig()).params_hash


def test_the_gold_set_and_the_annotator_are_part_of_the_judges_that_use_them():
    def template_hash(judge, gold=None, annotator=None):
        return JudgeIdentity.of(judge, PromptInputs(gold, annotator)).template_hash

    few_shot, shows, plain = (
        JudgeConfig(few_shot=2),
        JudgeConfig(show_attributes=True),
        JudgeConfig(),
    )
    assert template_hash(few_shot, "gold-1", "ann") != template_hash(few_shot, "gold-2", "ann")
    assert template_hash(few_shot, "g", "ann-1") != template_hash(few_shot, "g", "ann-2")
    assert template_hash(shows, "gold-1", "ann") == template_hash(shows, "gold-2", "ann")
    assert template_hash(shows, None, "ann-1") != template_hash(shows, None, "ann-2")
    assert template_hash(plain, "gold", "ann") == JudgeIdentity.of(plain).template_hash


def test_structured_judges_ask_for_the_verdict_schema_and_prompts_leave_room_to_answer():
    structured = JudgeIdentity.of(JudgeConfig(verdict="structured"))
    assert structured.sampling(0).json_schema["properties"]["winner"]["enum"] == ["A", "B", "tie"]
    free = JudgeIdentity.of(JudgeConfig(verdict="structured", json_schema_decoding=False))
    assert free.sampling(0).json_schema is None and free.params_hash != structured.params_hash
    assert JudgeIdentity.of(JudgeConfig()).sampling(0).json_schema is None, "logprobs: 1 token"
    assert prompt_limit(8192, 4096, 64) == 4032, "prompt + answer within the context"
    assert prompt_limit(1000, 4096, 64) == 1000 and prompt_limit(1000, None, 64) == 1000


def test_logprob_verdicts_use_the_choice_tokens_only():
    choice = parse_logprobs(Generation("A", {"A": math.log(0.6), "B": math.log(0.2), "x": -0.1}))
    assert choice.winner == "A" and choice.p_a == pytest.approx(0.75)
    with pytest.raises(ValueError, match="choice_tokens_missing"):
        parse_logprobs(Generation("x", {"x": -0.1, "winner": -2.0}))
    with pytest.raises(ValueError, match="no_logprobs"):
        parse_logprobs(Generation("A"))
    # In order BA the chosen response is B: winner B means the label stands.
    assert preference("BA", Choice("B", 0.2)) == ("chosen", pytest.approx(0.8))
    assert preference("AB", Choice("B", None)) == ("rejected", 0.0)


def _judgment(ordering, pref, p=None, valid=True):
    p = {"chosen": 1.0, "rejected": 0.0, "tie": 0.5}[pref] if p is None else p
    return {"ordering": ordering, "preference": pref, "p_chosen": p, "valid": valid}


def test_verdicts_within_a_judge_need_both_orders_to_agree():
    agree = judge_verdict([_judgment("AB", "chosen", 0.9), _judgment("BA", "chosen", 0.7)])
    assert (agree.verdict, agree.confidence) == ("agree", pytest.approx(0.8))
    flip = judge_verdict([_judgment("AB", "rejected", 0.2), _judgment("BA", "rejected", 0.4)])
    assert (flip.verdict, flip.confidence) == ("disagree", pytest.approx(0.7))
    position = judge_verdict([_judgment("AB", "chosen", 0.9), _judgment("BA", "rejected", 0.1)])
    assert (position.verdict, position.confidence) == ("inconsistent", pytest.approx(0.8))
    assert judge_verdict([_judgment("AB", "tie"), _judgment("BA", "tie")]).verdict == "tie"
    even = [
        _judgment("AB", "chosen"),
        _judgment("AB", "rejected"),
        *[_judgment("BA", "chosen")] * 2,
    ]
    split = judge_verdict(even)
    assert split.verdict == "inconsistent" and "AB: split" in split.detail, "not a tie"
    samples = [
        _judgment("AB", "chosen"),
        _judgment("AB", "chosen"),
        _judgment("AB", "rejected"),
        _judgment("BA", "chosen"),
        _judgment("BA", "chosen"),
        _judgment("BA", "chosen"),
    ]
    assert judge_verdict(samples).verdict == "agree", "majority of the samples of each order"
    one_order = judge_verdict([_judgment("AB", "chosen"), _judgment("BA", None, 0, valid=False)])
    assert (one_order.verdict, one_order.invalid) == ("invalid", 1)
    assert "no valid judgment in order BA" in one_order.detail


def test_requests_of_a_pair_come_together_in_batch_order():
    """Both orders of a pair next to each other, AB first, pairs in batch order, whatever order
    the missing judgments arrive in: the engine's prefix cache still holds the conversation
    when the second order comes."""
    rng = np.random.default_rng(0)
    ids = [f"p{i:04d}" for i in range(500)]
    batch = pa.table({"source": ["s"] * 500, "pair_id": list(rng.permutation(ids))})
    wanted = [(pair, order) for pair in ids for order in ("AB", "BA")]
    wanted = [wanted[i] for i in rng.permutation(len(wanted))]
    missing = pa.table(
        {
            "source": ["s"] * len(wanted),
            "pair_id": [pair for pair, _ in wanted],
            "ordering": [order for _, order in wanted],
            "sample": [0] * len(wanted),
        }
    )
    rows = request_rows(batch, missing)
    pairs = rows["pair_id"].to_pylist()
    assert pairs[0::2] == pairs[1::2] == batch["pair_id"].to_pylist()
    assert rows["ordering"].to_pylist() == ["AB", "BA"] * 500


def test_panel_policies():
    agree = judge_verdict([_judgment("AB", "chosen"), _judgment("BA", "chosen")])
    disagree = judge_verdict([_judgment("AB", "rejected"), _judgment("BA", "rejected")])
    invalid = judge_verdict([])
    two_one = [(agree, 1.0), (agree, 1.0), (disagree, 3.0)]
    assert panel_verdict(two_one, "majority", 1).verdict == "agree"
    assert panel_verdict(two_one, "unanimity", 1).verdict == "inconsistent"
    assert panel_verdict(two_one, "weighted", 1).verdict == "disagree"
    split = panel_verdict([(agree, 1.0), (disagree, 1.0)], "majority", 1)
    assert split.verdict == "inconsistent" and "judges split" in split.detail
    assert panel_verdict([(agree, 1.0), (invalid, 1.0)], "majority", 2).verdict == "invalid"


def test_gold_retrieval_ranks_by_similarity_and_never_returns_the_pair_itself():
    import numpy as np

    vectors = np.array([[1, 0], [0.9, 0.1], [0, 1]], np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = SimilarityIndex([{"pair_id": p} for p in ("g0", "g1", "g2")], vectors)
    assert index.nearest(vectors[:1], 2, exclude=["g0"]) == [[1, 2]]
    assert index.nearest(vectors[2:], 1) == [[2]]


def test_an_embedder_embeds_each_text_once_per_process_and_gives_what_it_gave_before():
    """The loop embeds its gold and pool prompts again in every iteration: the second time
    comes from the process's memo (the real MiniLM), the same vectors, in the order asked."""
    model = GoldConfig().embedder
    texts = ["How do I bake bread?", "Tell me about Paris.", "How do I bake bread?"]
    first = Embedder(model)(texts)
    memo = Embedder(model).memo
    assert first.shape == (3, 384) and np.array_equal(first[0], first[2])
    assert np.linalg.norm(first, axis=1) == pytest.approx(1.0, abs=1e-5)
    size = len(memo)
    again = Embedder(model)(["Tell me about Paris.", "A new question?", *texts])
    assert len(memo) == size + 1, "only the new text was embedded"
    assert np.array_equal(again[2:], first) and np.array_equal(again[0], first[1])
    alone = Embedder(model).model.encode(["A new question?"], normalize_embeddings=True)
    assert again[1] == pytest.approx(alone[0], abs=1e-5)
    assert Embedder(model)([]).shape == (0, 384)


# ------------------------------------------------------------------ hf backend, whole job


@pytest.mark.slow
def test_a_gguf_is_dequantized_once_into_a_folder_that_loads_the_same_model(tmp_path):
    """A GGUF (the default SmolLM2's) is converted once, whatever path it is found at (each
    clone's venv holds it at a new one); the folder gives the logits and the chat prompts
    transformers gets from the GGUF itself."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    cache = tmp_path / "cache"
    folder = Path(resolve_llm(str(gguf), cache=cache))
    weights = folder / "model.safetensors"
    written = weights.stat().st_mtime_ns
    assert resolve_llm(DEFAULT_JUDGE_MODEL, cache=cache) == str(folder)
    copied = tmp_path / "another-venv" / gguf.name
    copied.parent.mkdir()
    shutil.copyfile(gguf, copied)
    assert resolve_llm(str(copied), cache=cache) == str(folder)
    assert weights.stat().st_mtime_ns == written, "converted once"
    assert [p.name for p in cache.iterdir()] == [folder.name], "no staging folder left"

    source = {"pretrained_model_name_or_path": gguf.parent, "gguf_file": gguf.name}
    ids = torch.tensor([[1, 504, 3717, 314, 260, 1492, 30]])
    with torch.no_grad():
        direct = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)(ids).logits
        copy = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(ids).logits
    assert torch.equal(direct, copy)
    chat = [{"role": "user", "content": "Which answer is better, A or B?"}]
    rendered = [
        AutoTokenizer.from_pretrained(**where).apply_chat_template(
            chat, tokenize=True, add_generation_prompt=True
        )
        for where in (source, {"pretrained_model_name_or_path": folder})
    ]
    assert rendered[0] == rendered[1]

    with pytest.raises(ConfigError, match="no such GGUF file"):
        resolve_llm(str(tmp_path / "missing.gguf"), cache=cache)
    assert (
        resolve_llm("HuggingFaceTB/SmolLM2-360M-Instruct") == "HuggingFaceTB/SmolLM2-360M-Instruct"
    )


@pytest.mark.slow
def test_hf_judges_real_pairs_in_both_orders_and_the_cache_stops_rejudging(
    config, ingested, lake, ray_cluster
):
    ingested(config, judgebench=JUDGEBENCH, hh=HH_HARMLESS)
    logprob = JudgeConfig(name="smol-logprobs", num_cpus=0.5, few_shot=2)
    structured = JudgeConfig(
        name="smol-json",
        verdict="structured",
        max_tokens=16,
        max_retries=1,
        max_prompt_tokens=560,
        num_cpus=0.5,
    )
    config.judging.judges = [logprob, structured]
    config.judging.gold.where = HH_SHORT
    where = f"({JUDGEBENCH_SHORT}) OR ({HH_SHORT} AND pair_id < '01')"
    first = jobs.judge(config, where=where).as_dict()
    pairs = first["selected"]
    assert pairs == lake.count("pairs", where=where) >= 3
    assert {r["source"] for r in lake.read("judgments", columns=["source"]).to_pylist()} == {
        "judgebench",
        "hh",
    }

    rows = lake.read("judgments").to_pylist()
    assert len(rows) == pairs * 2 * 2, "every pair, both orders, both judges"
    for judge in ("smol-logprobs", "smol-json"):
        mine = [r for r in rows if r["judge"] == judge]
        assert {(r["pair_id"], r["ordering"]) for r in mine} == {
            (p, o) for p in {r["pair_id"] for r in mine} for o in ("AB", "BA")
        }
    for r in rows:
        assert r["valid"] == (r["invalid_reason"] is None) == (r["winner"] is not None)
        if r["judge"] == "smol-logprobs":
            assert r["valid"], r["invalid_reason"]
            assert 0 <= r["p_chosen"] <= 1 and r["output_tokens"] == 1
            assert len(r["examples"]) == 2 and r["pair_id"] not in r["examples"]
        elif not r["valid"]:
            assert r["invalid_reason"].split(":")[0] in {"unparseable", "prompt_too_long"}
            assert r["invalid_reason"].startswith("prompt_too_long") or r["attempts"] == 2
    assert any(
        r["invalid_reason"] and r["invalid_reason"].startswith("prompt_too_long") for r in rows
    )

    verdicts = lake.read("verdicts").to_pylist()
    assert len(verdicts) == pairs * 3, "two judges and the panel"
    assert {v["level"] for v in verdicts} == {"judge", "panel"}
    assert all(0 <= v["confidence"] <= 1 for v in verdicts)
    quality = first["quality"]["smol-logprobs"]
    assert quality["pairs"] == pairs
    assert quality["agree_rate"] + quality["disagree_rate"] + quality["tie_rate"] + quality[
        "flip_rate"
    ] + quality["invalid_verdict_rate"] == pytest.approx(1)

    versions = lake.version("judgments"), lake.version("verdicts")
    again = jobs.judge(config, where=where).as_dict()
    assert [j["judged"] for j in again["judges"]] == [0, 0]
    assert [j["cached"] for j in again["judges"]] == [pairs * 2, pairs * 2]
    assert (lake.version("judgments"), lake.version("verdicts")) == versions, "no commit"
    assert again["verdict_counts"] == first["verdict_counts"]

    run = mlflow.get_run(first["run_id"])
    assert run.data.metrics["smol-logprobs.judgments_new"] == pairs * 2
    assert "smol-logprobs.flip_rate" in run.data.metrics
    assert (
        run.data.tags["synpref.judge.smol-json.template_hash"]
        == JudgeIdentity.of(structured).template_hash
    )
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(first["run_id"])}
    assert {"judge_verdicts.png", "judge_p_chosen.png"} <= artifacts


# ------------------------------------------------------------------ openai backend


def _openai(url: str, **kwargs) -> OpenAIBackend:
    options = {
        "backend": "openai",
        "base_url": f"{url}/v1",
        "model": "smollm2",
        "api_key_env": None,
        "http_retries": 3,
        "timeout_s": 30,
    }
    return OpenAIBackend(LLMConfig(**(options | kwargs)))


def test_openai_backend_answers_like_the_engine_it_serves(server, hf_backend):
    identity = JudgeIdentity.of(JudgeConfig())
    prompt = judge_prompt(identity, [{"role": "user", "content": "What is 2 + 2?"}], "4", "5", "BA")
    sampling = identity.sampling(0)
    direct = hf_backend.generate([prompt], sampling)[0]
    served = _openai(server).generate([prompt], sampling)[0]
    assert served.error is None
    assert served.text == direct.text
    best = max(direct.first_logprobs, key=direct.first_logprobs.get)
    assert served.first_logprobs[best] == pytest.approx(direct.first_logprobs[best], abs=1e-3)


def test_openai_backend_answers_from_inside_a_running_event_loop(scripted):
    """A notebook runs jobs inside an event loop, and a small set is judged in its process."""
    prompt = [{"role": "user", "content": "Say hello."}]

    async def in_a_notebook() -> list:
        return _openai(scripted).generate([prompt, prompt], Sampling(max_tokens=4))

    answers = asyncio.run(in_a_notebook())
    assert [a.text for a in answers] == ["I am a scripted judge."] * 2


def test_openai_backend_retries_429_500_and_timeouts_with_backoff(server, monkeypatch):
    prompt = [{"role": "user", "content": "Say hello."}]
    sampling = Sampling(max_tokens=4)
    faults(server, {"status": 429}, {"status": 500}, {"status": 503})
    assert _openai(server).generate([prompt], sampling)[0].error is None
    assert stats(server)["requests"] == 4, "three failures retried, then the answer"

    httpx.post(f"{server}/stats/reset")
    faults(server, {"delay_s": 5})
    started = time.monotonic()
    answer = _openai(server, timeout_s=1.5).generate([prompt], sampling)[0]
    assert answer.error is None and time.monotonic() - started < 5, "the slow request was abandoned"
    assert stats(server)["requests"] == 2

    httpx.post(f"{server}/stats/reset")
    faults(server, *[{"status": 429}] * 3)
    failed = _openai(server, http_retries=2).generate([prompt], sampling)[0]
    assert failed.error.startswith("request_failed: HTTP 429")

    faults(server, {"delay_s": 3})
    slow = _openai(server, http_retries=0, timeout_s=1).generate([prompt], sampling)[0]
    assert slow.error.startswith("request_failed: APITimeoutError")


def test_openai_backend_sends_the_key_from_the_environment_only(server, monkeypatch):
    monkeypatch.delenv("SYNPREF_TEST_KEY", raising=False)
    with pytest.raises(ValueError, match=r"\$SYNPREF_TEST_KEY, which is not set"):
        _openai(server, api_key_env="SYNPREF_TEST_KEY")
    httpx.post(f"{server}/auth", json={"api_key": API_KEY})
    prompt = [{"role": "user", "content": "Say yes."}]
    sampling = JudgeIdentity.of(JudgeConfig(verdict="structured")).sampling(0)

    monkeypatch.setenv("SYNPREF_TEST_KEY", API_KEY)
    backend = _openai(server, api_key_env="SYNPREF_TEST_KEY")
    assert API_KEY not in repr(backend.config) and API_KEY not in str(backend.config.model_dump())
    assert backend.generate([prompt], sampling)[0].error is None, "the key was sent"
    assert stats(server)["unauthorized"] == 0

    wrong = "sk-wrong-" + API_KEY[::-1]
    monkeypatch.setenv("SYNPREF_TEST_KEY", wrong)
    failed = _openai(server, api_key_env="SYNPREF_TEST_KEY").generate([prompt], sampling)[0]
    assert failed.error.startswith("request_failed: HTTP 401") and stats(server)["unauthorized"]
    assert wrong not in failed.error and "***" in failed.error, "the echoed key is redacted"

    # Credentials in the URL go as a Basic header, which the server echoes back: redacted too.
    monkeypatch.setenv("SYNPREF_TEST_KEY", API_KEY)
    with_credentials = server.replace("://", "://judge:pa%24%24word@")
    failed = _openai(with_credentials, api_key_env="SYNPREF_TEST_KEY").generate([prompt], sampling)
    basic = base64.b64encode(b"judge:pa$$word").decode()
    error = failed[0].error
    assert error.startswith("request_failed: HTTP 401") and "***" in error, error
    assert not [secret for secret in (basic, "pa$$word", "pa%24%24word") if secret in error]


def _served_judge(server: str, name: str, **options) -> JudgeConfig:
    """A judge on the session's test OpenAI server, with half a CPU per actor."""
    served = {"backend": "openai", "base_url": f"{server}/v1", "model": "smollm2"}
    return JudgeConfig(name=name, api_key_env=None, num_cpus=0.5, **served, **options)


@pytest.mark.slow
def test_openai_judge_in_the_job_records_failures_and_retries_them_next_run(
    config, ingested, lake, ray_cluster, scripted
):
    server = scripted
    ingested(config, judgebench=JUDGEBENCH, hh=HH_HARMLESS)
    config.judging.judges = [_served_judge(server, "served", http_retries=1, concurrency=1)]
    # The first two requests fail twice each (with one retry): those judgments are recorded
    # as failed requests, not guessed. The third is rejected for good (a 422).
    faults(server, *[{"status": 500}] * 4, {"status": 422})
    first = jobs.judge(config, where=HH_SHORT, limit=2).as_dict()
    rows = lake.read("judgments").to_pylist()
    reasons = sorted(r["invalid_reason"].split(":")[0] for r in rows if not r["valid"])
    assert len(rows) == 4 and reasons == ["request_failed"] * 2 + ["request_rejected"]
    assert first["verdict_counts"].get("invalid", 0) >= 1

    again = jobs.judge(config, where=HH_SHORT, limit=2).as_dict()
    assert again["judges"][0]["judged"] == 2 and again["judges"][0]["cached"] == 2
    rows = lake.read("judgments").to_pylist()
    assert len(rows) == 4 and [r["valid"] for r in rows].count(False) == 1, "failed ones again"

    last = jobs.judge(config, where=HH_SHORT, limit=2, retry_rejected=True).as_dict()
    assert last["judges"][0]["judged"] == 1, "the rejected request, asked again on request"
    rows = lake.read("judgments").to_pylist()
    assert len(rows) == 4 and all(r["valid"] for r in rows)
    assert "invalid" not in last["verdict_counts"]


@pytest.mark.slow
def test_samples_per_order_are_separate_cached_judgments(
    config, ingested, lake, ray_cluster, scripted
):
    server = scripted
    ingested(config, judgebench=JUDGEBENCH, hh=HH_HARMLESS)
    config.judging.judges = [
        _served_judge(server, "sampled", samples_per_order=2, temperature=0.7, verdict="structured")
    ]
    result = jobs.judge(config, where=HH_SHORT, limit=1).as_dict()
    sent = stats(server)
    assert sent["json_schema"] == sent["requests"] == 4, "every request asks for the schema"
    rows = lake.read("judgments", columns=["ordering", "sample", "valid"]).to_pylist()
    assert sorted((r["ordering"], r["sample"]) for r in rows) == [
        ("AB", 0),
        ("AB", 1),
        ("BA", 0),
        ("BA", 1),
    ]
    verdict = lake.read("verdicts", where="level = 'judge'").to_pylist()[0]
    assert verdict["votes"] + verdict["invalid"] == 4
    assert result["judges"][0]["judged"] == 4


@pytest.mark.slow
def test_verdicts_of_a_panel_match_what_its_judges_said(
    config, ingested, lake, ray_cluster, scripted
):
    """Scripted judges prefer the longer response, so every verdict is known in advance: agree
    where chosen is longer, disagree where shorter, inconsistent (position) where equal. One
    judge asks from the job's process (a small set), the other from the actor pool."""
    ingested(config, judgebench=JUDGEBENCH, hh=HH_HARMLESS)
    config.judging.judges = [
        _served_judge(scripted, "longer-lp"),
        _served_judge(scripted, "longer-json", verdict="structured", on_driver_max=0),
    ]
    where = "source = 'hh' AND pair_id < '08'"
    first = jobs.judge(config, where=where).summary
    pairs = lake.read("pairs", columns=["pair_id", "chosen", "rejected"], where=where).to_pylist()
    expected = {
        p["pair_id"]: "agree"
        if len(p["chosen"]) > len(p["rejected"])
        else "disagree"
        if len(p["chosen"]) < len(p["rejected"])
        else "inconsistent"
        for p in pairs
    }
    verdicts = lake.read("verdicts", columns=["pair_id", "level", "judge", "verdict"]).to_pylist()
    for level in ("judge", "panel"):
        got = {}
        for v in verdicts:
            if v["level"] == level:
                got.setdefault(v["pair_id"], set()).add(v["verdict"])
        assert got == {pair_id: {verdict} for pair_id, verdict in expected.items()}, level
    assert first.selected == len(pairs) > 10
    assert [run.judged for run in first.judges] == [2 * len(pairs)] * 2
    assert first.quality["longer-lp"]["longer_wins_rate"] == 1.0

    config.judging.judges[1] = config.judging.judges[1].model_copy(update={"name": "renamed"})
    again = jobs.judge(config, where=where).summary
    assert [run.judged for run in again.judges] == [0, 0], "a renamed judge keeps its cache"
    assert set(again.quality) == {"longer-lp", "renamed"}
    assert again.verdicts_version is None, "the same verdicts: nothing written"

    # Nothing selected (a loop iteration that retrieved nothing): nothing judged, no error.
    empty = jobs.judge(config, where="FALSE").summary
    assert empty.selected == 0 and [run.judged for run in empty.judges] == [0, 0]


@pytest.mark.slow
def test_a_killed_judge_job_keeps_what_it_merged_and_the_rerun_adds_only_the_rest(
    config, ingested, lake, ray_cluster, scripted, tmp_path
):
    """`synpref judge` killed (SIGKILL) mid-run: the blocks it merged stay, the re-run judges
    only what is missing, and no judgment is there twice."""
    ingested(config, judgebench=JUDGEBENCH, hh=HH_HARMLESS)
    slow = {"concurrency": 1, "batch_size": 4, "merge_every_s": 0, "on_driver_max": 0}
    judge = _served_judge(scripted, "slow", **slow)  # on the pool, merging every block
    settings = tmp_path / "judge.yaml"
    settings.write_text(json.dumps({"judging": {"judges": [judge.model_dump(mode="json")]}}))
    faults(scripted, *[{"delay_s": 0.5}] * 40)  # 40 requests, one at a time: 20 s of judging
    flags = ["--config", str(settings), "--lake", config.lake.root]
    flags += ["--tracking-uri", config.tracking.uri]
    flags += ["--ray-address", ray.get_runtime_context().gcs_address]
    job = subprocess.Popen(
        [sys.executable, "-m", "ray_jobs.judge", *flags, "--where", HH_SHORT, "--limit", "20"],
        cwd=REPO,
        env={**os.environ, "SYNPREF_LOG_FILE": str(tmp_path / "judge.log")},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not (lake.exists("judgments") and lake.count("judgments") > 0):
        assert job.poll() is None, "the job ended before it was killed"
        assert time.monotonic() < deadline, "no merge within 5 minutes"
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    kept = lake.count("judgments")
    assert 0 < kept < 40, "killed mid-run, after some blocks were merged"

    httpx.post(f"{scripted}/stats/reset")  # no more delays
    config.judging.judges = [judge]
    rerun = jobs.judge(config, where=HH_SHORT, limit=20).summary.judges[0]
    assert (rerun.cached, rerun.judged) == (kept, 40 - kept)
    rows = lake.read("judgments", columns=["pair_id", "ordering", "sample"]).to_pylist()
    assert len(rows) == len({tuple(r.values()) for r in rows}) == 40


def test_judge_usage_errors_are_clear(config, ingested, lake, ray_cluster):
    from pipelines.core.config import ConfigError, load_config

    ingested(config, judgebench=JUDGEBENCH, hh=HH_HARMLESS)
    with pytest.raises(ValueError, match="not a SQL predicate on pairs"):
        jobs.judge(config, where="no_such_column = 1").as_dict()
    config.judging.judges = [JudgeConfig(actors=2)]
    with pytest.raises(ValueError, match="take 2 of 2 CPUs"):
        jobs.judge(config, where=HH_SHORT, limit=1).as_dict()
    config.judging.judges = [JudgeConfig(name="a"), JudgeConfig(name="b")]
    with pytest.raises(ValueError, match="judges a and b have the same model"):
        jobs.judge(config, where=HH_SHORT, limit=1).as_dict()
    with pytest.raises(ConfigError, match="samples_per_order > 1 needs temperature > 0"):
        load_config(None, {"judging": {"judges": [{"samples_per_order": 3}]}})
    with pytest.raises(ConfigError, match="needs verdict: structured"):
        load_config(None, {"judging": {"judges": [{"samples_per_order": 2, "temperature": 1}]}})
    with pytest.raises(ConfigError, match="min_judges 2 is more than the 1 judge"):
        load_config(None, {"judging": {"aggregation": {"min_judges": 2}}})
    config.judging.judges = [JudgeConfig(few_shot=2)]
    with pytest.raises(ConfigError, match="few_shot > 0 needs judging.gold.where"):
        jobs.judge(config, where=HH_SHORT, limit=1).as_dict()
    with pytest.raises(ConfigError, match="judging.gold.where or judging.gold.set, not both"):
        load_config(None, {"judging": {"gold": {"where": "TRUE", "set": "loop/gold"}}})
    with pytest.raises(ConfigError, match="judge names must be unique"):
        load_config(None, {"judging": {"judges": [{"name": "a"}, {"name": "a"}]}})
    config.judging.judges = [JudgeConfig(template="pairwise-v9")]
    with pytest.raises(ConfigError, match="unknown template 'pairwise-v9'; known: pairwise-v1"):
        jobs.judge(config, where=HH_SHORT, limit=1).as_dict()
    config.judging.judges = [JudgeConfig(backend="openai", model="m")]
    with pytest.raises(ConfigError, match=r"the openai backend needs base_url \(model m\)"):
        jobs.judge(config, where=HH_SHORT, limit=1).as_dict()
    config.judging.annotator_template = "attributes-v9"
    with pytest.raises(ConfigError, match="unknown attributes template 'attributes-v9'"):
        jobs.annotate(config, where=HH_SHORT, limit=1).as_dict()


# ------------------------------------------------------------------ attributes


def test_attribute_answers_are_repaired_validated_or_rejected_with_the_errors():
    good = {
        "task_category": "coding and debugging",
        "objectivity": "Objective",
        "controversiality": "low",
        "desired_attributes": ["correct", "concise"],
        "guideline": "Prefer the response whose code runs and answers the question.",
    }
    fenced = Generation("Here you go:\n```json\n" + json.dumps(good) + "\n```")
    attributes = parse_attributes(fenced)
    assert (attributes.task_category, attributes.objectivity) == ("Coding & Debugging", "objective")
    with pytest.raises(ValueError, match="schema: task_category"):
        parse_attributes(Generation(json.dumps(good | {"task_category": "Cooking"})))
    with pytest.raises(ValueError, match="schema: desired_attributes"):
        parse_attributes(Generation(json.dumps(good | {"desired_attributes": []})))
    with pytest.raises(ValueError, match="schema: object: Field required|schema: guideline"):
        parse_attributes(
            Generation(json.dumps({k: v for k, v in good.items() if k != "guideline"}))
        )
    with pytest.raises(ValueError, match="unparseable"):
        parse_attributes(Generation("I think this is a coding task."))
    # Shown to a judge when configured.
    identity = JudgeIdentity.of(JudgeConfig(show_attributes=True))
    prompt = judge_prompt(
        identity, [{"role": "user", "content": "hi"}], "a", "b", "AB", (), attributes.model_dump()
    )
    assert "Task category: Coding & Debugging" in prompt[1]["content"]


@pytest.mark.slow
def test_annotate_writes_validated_attributes_once(config, ingested, lake, ray_cluster):
    ingested(config, judgebench=JUDGEBENCH, hh=HH_HARMLESS)
    config.judging.annotator = LLMConfig(max_tokens=64, max_retries=1, num_cpus=0.5)
    where = f"{HH_SHORT} AND pair_id < '02'"
    first = jobs.annotate(config, where=where).as_dict()
    assert first["annotated"] == first["selected"] == lake.count("pairs", where=where) >= 2
    rows = lake.read("attributes").to_pylist()
    assert len(rows) == first["selected"]
    # Greedy SmolLM2-135M writes prose, not the 5-tuple's JSON (valid answers are the parser
    # test's above): each row is recorded invalid with its reason after its one retry, nothing
    # half-filled.
    outcomes = {(r["valid"], r["attempts"], r["invalid_reason"]) for r in rows}
    assert outcomes == {(False, 2, "unparseable: no JSON object in the answer")}, outcomes
    assert all(r[k] is None for r in rows for k in ATTRIBUTE_FIELDS)
    assert all(r["output"].strip() for r in rows), "the answer is kept for a person to read"
    assert first["invalid"] == len(rows)

    version = lake.version("attributes")
    again = jobs.annotate(config, where=where).as_dict()
    assert (again["annotated"], again["cached"]) == (0, first["selected"])
    assert lake.version("attributes") == version


@pytest.mark.slow
def test_an_api_annotator_annotates_a_small_set_from_the_jobs_process(
    config, ingested, lake, ray_cluster, scripted, caplog
):
    """The annotate job's small-set path (the HF annotator above runs on the actor pool). The
    scripted server does not annotate: every answer is recorded unparseable, once."""
    ingested(config, judgebench=JUDGEBENCH, hh=HH_HARMLESS)
    served = {"backend": "openai", "base_url": f"{scripted}/v1", "model": "scripted"}
    config.judging.annotator = LLMConfig(**served, api_key_env=None, max_retries=0)
    caplog.set_level(logging.INFO)
    first = jobs.annotate(config, where=HH_SHORT, limit=3).as_dict()
    assert "[annotate] a small set: computed in this process" in caplog.text
    rows = lake.read("attributes").to_pylist()
    assert first["annotated"] == len(rows) == stats(scripted)["requests"] == 3
    assert all(r["invalid_reason"].startswith("unparseable") for r in rows)
    again = jobs.annotate(config, where=HH_SHORT, limit=3).as_dict()
    assert (again["annotated"], again["cached"]) == (0, 3), "an answer, even unparseable"


# ------------------------------------------------------------------ vllm backend


@pytest.mark.slow
def test_vllm_backend_matches_hf(request, monkeypatch):
    pytest.importorskip(
        "vllm",
        reason="vLLM is the gpu extra, not installed by make test (docs/judging.md: Backends)",
    )
    hf_backend = request.getfixturevalue("hf_backend")
    from pipelines.llm.backends import VLLMBackend

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    engine = VLLMBackend(LLMConfig(backend="vllm", gpu_memory_utilization=0.4, max_model_len=2048))
    identity = JudgeIdentity.of(JudgeConfig())
    prompts = [
        judge_prompt(identity, [{"role": "user", "content": "What is 2 + 2?"}], "4", "5", order)
        for order in ("AB", "BA")
    ]
    served = engine.generate(prompts, identity.sampling(0))
    direct = hf_backend.generate(prompts, identity.sampling(0))
    for ours, theirs in zip(served, direct, strict=True):
        assert parse_logprobs(ours).winner == parse_logprobs(theirs).winner
        assert parse_logprobs(ours).p_a == pytest.approx(parse_logprobs(theirs).p_a, abs=0.1)


@pytest.mark.slow
def test_vllm_judge_runs_in_the_ray_data_actor_pool(config, ingested, lake, ray_cluster):
    pytest.importorskip(
        "vllm",
        reason="vLLM is the gpu extra, not installed by make test (docs/judging.md: Backends)",
    )
    ingested(config, judgebench=JUDGEBENCH, hh=HH_HARMLESS)
    config.judging.judges = [
        JudgeConfig(
            name="vllm-smol",
            backend="vllm",  # the default SmolLM2, from its dequantized copy
            gpu_memory_utilization=0.4,
            max_model_len=2048,
            max_prompt_tokens=2000,
        )
    ]
    where = f"{HH_SHORT} AND pair_id < '02'"
    first = jobs.judge(config, where=where).as_dict()
    assert first["judges"][0]["judged"] == 2 * first["selected"] >= 4
    rows = lake.read("judgments").to_pylist()
    assert all(r["valid"] and r["output_tokens"] == 1 for r in rows)
    again = jobs.judge(config, where=where).as_dict()
    assert again["judges"][0]["judged"] == 0


def test_a_judge_that_always_picks_one_position_is_flagged():
    always_a = {"pairs": 8.0, "first_shown_wins_rate": 1.0}
    (warning,) = position_warning("smollm2", always_a)
    assert "chose A (the first response shown) in 100%" in warning and "Real judges" in warning
    assert "chose B" in position_warning("j", {"pairs": 8.0, "first_shown_wins_rate": 0.05})[0]
    assert position_warning("j", {"pairs": 8.0, "first_shown_wins_rate": 0.6}) == []
    assert position_warning("j", {"pairs": 2.0, "first_shown_wins_rate": 1.0}) == [], "too few"
    assert position_warning("j", {"pairs": 8.0, "first_shown_wins_rate": math.nan}) == []


def test_an_annotator_whose_answers_are_all_invalid_is_flagged():
    from pipelines.attributes.job import AnnotateSummary

    bad = AnnotateSummary("k", 1, 8, 0, 8, 8, {"schema": 8}, 100, 44.0, 2)
    assert "WARNING: 8 of 8 answers are invalid" in bad.text()
    assert "WARNING" not in AnnotateSummary("k", 1, 8, 0, 8, 1, {"schema": 1}, 100, 4.0, 2).text()
