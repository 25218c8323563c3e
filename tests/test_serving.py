"""The reward API over real HTTP on the loopback: scores equal batch scoring, every bad
request gets a 4xx with a message, and a bounded load test completes without errors."""

import asyncio
import os

import click
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from ray import serve
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from pipelines.core.config import ServingConfig, load_config
from pipelines.core.errors import ConfigError
from pipelines.rm.model import RewardModel, sigmoid
from pipelines.rm.serving import APP_NAME, api_key, reward_app
from ray_jobs.serve import parse_models
from tests.conftest import free_port

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
PAIR = {"prompt": MESSAGES, "chosen": "Paris.", "rejected": "It is Lyon, I think."}
KEY = "test-key-4c1d"
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def api(ray_cluster, encoder_rm):
    """One Serve app for the module, at a free loopback port: the MiniLM RM (the default) and
    the response-length heuristic, so requests for two models share its batches."""
    port = free_port()
    serving = {"max_items": 8, "max_body_bytes": 1_000_000}
    config = load_config(None, {"serving": serving})  # the default lengths: 4096 asked
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    os.environ["SYNPREF_API_KEY"] = KEY  # read by reward_app: every request below needs it
    try:
        models = {"minilm": encoder_rm, "length": "heuristic:length"}
        app = reward_app(models, config.scoring, config.serving)
    finally:
        del os.environ["SYNPREF_API_KEY"]
    serve.run(app, name=APP_NAME, route_prefix="/")
    yield f"http://127.0.0.1:{port}", RewardModel(encoder_rm, max_length=config.scoring.max_length)
    serve.shutdown()


def test_scores_equal_batch_scoring(api):
    url, model = api
    conversations = [
        [*MESSAGES, {"role": "assistant", "content": "Paris."}],
        [*MESSAGES, {"role": "assistant", "content": "It is Lyon, I think."}],
    ]
    expected = model.score(conversations).rewards
    reply = httpx.post(
        f"{url}/v1/score", json={"conversations": conversations}, headers=AUTH, timeout=60
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["model"] == "minilm" and body["model_version"]
    assert [r["raw"] for r in body["rewards"]] == pytest.approx(expected, abs=1e-5)
    pairs = httpx.post(f"{url}/v1/score", json={"pairs": [PAIR]}, headers=AUTH, timeout=60)
    pairs = pairs.json()["pairs"]
    assert pairs[0]["chosen"]["raw"] == pytest.approx(expected[0], abs=1e-5)
    assert pairs[0]["rejected"]["raw"] == pytest.approx(expected[1], abs=1e-5)
    assert pairs[0]["p"] == pytest.approx(sigmoid(expected[0] - expected[1]), abs=1e-5)


@pytest.mark.parametrize("sent", [None, "Bearer wrong-key", KEY, f"Basic {KEY}"])
def test_a_score_request_without_the_api_key_is_a_401(api, sent):
    url, _ = api
    headers = {"authorization": sent} if sent else {}
    reply = httpx.post(f"{url}/v1/score", json={"nope": 1}, headers=headers, timeout=60)
    assert reply.status_code == 401 and "API key" in reply.text, "before the body is looked at"
    assert reply.headers["www-authenticate"] == "Bearer"


def test_an_api_beyond_loopback_needs_a_key(monkeypatch):
    monkeypatch.delenv("SYNPREF_API_KEY", raising=False)
    for host in ("127.0.0.1", "::1", "localhost"):
        assert api_key(ServingConfig(host=host)) is None
    with pytest.raises(ConfigError, match=r"0.0.0.0 is reachable .*\(set \$SYNPREF_API_KEY"):
        api_key(ServingConfig(host="0.0.0.0"))
    with pytest.raises(ConfigError, match="set serving.api_key_env"):
        api_key(ServingConfig(host="10.1.2.3", api_key_env=None))
    monkeypatch.setenv("SYNPREF_API_KEY", KEY)
    assert api_key(ServingConfig(host="0.0.0.0")) == KEY


def test_health_and_openapi(api):
    url, _ = api
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok", "models": ["length", "minilm"]}
    schema = httpx.get(f"{url}/openapi.json").json()
    assert "/v1/score" in schema["paths"] and "ScoreRequest" in schema["components"]["schemas"]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b'{"pairs": [', 422, "JSON"),
        (b"5\xff>\xfe", 400, "error parsing the body"),  # found by schemathesis
        ({"pairs": [{**PAIR, "prompt": [{"role": "robot", "content": "x"}]}]}, 422, "role"),
        ({"conversations": []}, 422, "nothing to score"),
        ({"pairs": [{**PAIR, "chosen": ""}]}, 422, "must not be empty or only whitespace"),
        ({"pairs": [{**PAIR, "chosen": " \n"}]}, 422, "must not be empty or only whitespace"),
        (
            b'{"pairs": [{"prompt": [{"role": "user", "content": "\\ud800"}], '
            b'"chosen": "a", "rejected": "b"}]}',
            422,
            "lone surrogate",
        ),
        ({"pairs": [PAIR], "note": "x" * 100_000}, 422, "Extra inputs are not permitted"),
        ({"pairs": [PAIR], "note": "x" * 1_000_001}, 413, "request body is over 1,000,000 bytes"),
        ({"conversations": [MESSAGES]}, 422, "must end with an assistant message"),
        (
            {"pairs": [{**PAIR, "prompt": [{"role": "assistant", "content": "Hi"}]}]},
            422,
            "must end with a user message",
        ),
        ({"pairs": [PAIR], "conversations": [MESSAGES]}, 422, "exactly one of"),
        ({}, 422, "exactly one of"),
        ({"pairs": [PAIR] * 9}, 413, "at most 8"),
        ({"pairs": [{**PAIR, "chosen": "x" * 400_001}]}, 413, "characters"),
        ({"model": "gpt-9", "pairs": [PAIR]}, 404, "unknown model 'gpt-9'"),
    ],
)
def test_bad_requests_get_a_4xx_with_the_reason(api, body, status, message):
    url, _ = api
    if isinstance(body, bytes):
        reply = httpx.post(
            f"{url}/v1/score", content=body, headers=AUTH | {"content-type": "application/json"}
        )
    else:
        reply = httpx.post(f"{url}/v1/score", json=body, headers=AUTH, timeout=60)
    assert reply.status_code == status
    assert message in reply.text
    assert len(reply.content) < 2_000, "the reason, not the input echoed back"


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_generated_requests_get_answers_the_schema_documents(api, mode):
    """Schemathesis (4.x) from the API's own OpenAPI schema, valid and invalid requests: never
    a 5xx; every status, content type and body as the schema documents (errors included: 401,
    404, 413, 422 with their reason); a 4xx always says why. Against the real Serve app over
    HTTP (the ingress cannot answer in-process: its routes need Serve's replica). Schemathesis'
    pytest loader needs pytest internals that pytest 9 removed, so its strategies are used with
    hypothesis directly."""
    url, _ = api
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    for result in schema.get_all_operations():
        operation = result.ok()
        if mode == GenerationMode.NEGATIVE and not list(operation.body):
            continue  # nothing to get wrong in a request without a body (GET /healthz)

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def answers_as_documented(case: schemathesis.Case) -> None:
            response = case.call_and_validate(headers=AUTH, checks=checks, timeout=60)
            if 400 <= response.status_code < 500:
                assert response.json()["detail"], "a 4xx says why"

        answers_as_documented()


def test_one_over_long_request_is_truncated_and_never_fails_its_batch(api):
    """40 concurrent requests and one far longer than the model reads: every answer is a 200
    (the batch it joins is scored together), the long one says it was cut from the left."""
    url, model = api
    long_prompt = [{"role": "user", "content": "Tell me about Paris. " * 2000}]
    long_body = {"pairs": [{**PAIR, "prompt": long_prompt}]}
    bodies = [{"pairs": [{**PAIR, "chosen": f"Paris, answer {i}."}]} for i in range(40)]

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=120) as client:
            requests = [
                client.post("/v1/score", json=b) for b in [*bodies[:20], long_body, *bodies[20:]]
            ]
            return await asyncio.gather(*requests)

    replies = asyncio.run(run())
    assert [r.status_code for r in replies] == [200] * 41, [
        r.text for r in replies if r.status_code != 200
    ]
    (long_pair,) = replies[20].json()["pairs"]
    assert long_pair["chosen"]["truncated"] and long_pair["rejected"]["truncated"]
    first = replies[0].json()["pairs"][0]
    assert not first["chosen"]["truncated"]
    alone = model.score([[*MESSAGES, {"role": "assistant", "content": "Paris, answer 0."}]])
    assert first["chosen"]["raw"] == pytest.approx(alone.rewards[0], abs=1e-5)


def test_concurrent_requests_for_two_models_each_get_their_own_models_rewards(api):
    """A batch that holds requests for both models scores each with its own."""
    url, model = api
    answers = [f"Paris{'!' * i}" for i in range(24)]
    bodies = [
        {"model": "length" if i % 2 else None, "pairs": [{**PAIR, "chosen": answer}]}
        for i, answer in enumerate(answers)
    ]

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/score", json=b) for b in bodies))

    replies = [r.json() for r in asyncio.run(run())]
    assert [r["model"] for r in replies] == ["minilm", "length"] * 12
    minilm = model.score([[*MESSAGES, {"role": "assistant", "content": a}] for a in answers])
    for i, (reply, answer) in enumerate(zip(replies, answers, strict=True)):
        chosen = reply["pairs"][0]["chosen"]["raw"]
        expected = len(answer) if i % 2 else minilm.rewards[i]
        assert chosen == pytest.approx(expected, abs=1e-5), (i, reply)


@pytest.mark.slow
def test_bounded_load_completes_without_errors(api):
    """640 requests from 32 concurrent clients (20 each, so every client waits in the queue behind
    the others many times); dynamic batching merges them."""
    url, _ = api
    requests = 640

    async def run() -> list[int]:
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(
            base_url=url, headers=AUTH, limits=limits, timeout=120
        ) as client:
            gate = asyncio.Semaphore(32)

            async def one(i: int) -> int:
                body = {"pairs": [{**PAIR, "chosen": f"Paris, answer {i}."}]}
                async with gate:
                    return (await client.post("/v1/score", json=body)).status_code

            return await asyncio.gather(*(one(i) for i in range(requests)))

    statuses = asyncio.run(run())
    assert statuses.count(200) == requests


def test_model_specs_are_parsed_with_clear_errors():
    assert parse_models(("rm=/models/rm", "/models/other/")) == {
        "rm": "/models/rm",
        "other": "/models/other/",
    }
    with pytest.raises(click.BadParameter, match="model name 'a' given twice"):
        parse_models(("a=/x", "a=/y"))
    for spec in ("=/x", "rm="):
        with pytest.raises(click.BadParameter, match=f"'{spec}': expected NAME=PATH"):
            parse_models((spec,))
    config = load_config(None)
    with pytest.raises(ValueError, match="serve at least one model"):
        reward_app({}, config.scoring, config.serving)
