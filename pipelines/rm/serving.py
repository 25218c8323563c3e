"""The reward API on Ray Serve: ``POST /v1/score`` for conversations or pairs, ``/healthz``.

One deployment, the FastAPI ingress, holds every served reward model in each replica (its
replicas and autoscaling from config). Requests are validated before they reach a model (clear
4xx: malformed JSON, unknown roles, empty or oversize input, too many items, unknown model).
``@serve.batch`` merges concurrent requests into one call of ``RewardModel.score`` per model,
which sorts their conversations by length and packs them into forward passes under the token
budget (``scoring.batch_tokens``): dynamic batching by requests, then by tokens. The chat formatting
and the length limit are the ones training and batch scoring use, so served rewards equal
``rm_scores``: a conversation longer than the model reads is cut from the left (its reward says
``truncated``). Should a merged call still fail, each request is scored alone, so one bad request
gets its own 422 and never fails the others of its batch.
"""

# No ``from __future__ import annotations``: FastAPI (inside Serve's ingress) must see the
# request model classes, not strings, to read them from the request body.
import asyncio
import hmac
import ipaddress
import os
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Self

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from ray import serve
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipelines.core.config import ScoringConfig, ServingConfig, load_config
from pipelines.core.errors import ConfigError
from pipelines.rm.model import model_version, pair_conversations, sigmoid
from pipelines.rm.scorers import load_model


def _text(value: str) -> str:
    """The rules ingest applies to a turn: not blank, and Unicode that UTF-8 can encode (a lone
    surrogate such as ``\\ud800`` is valid JSON but no text)."""
    if not value.strip():
        raise ValueError("must not be empty or only whitespace")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (it holds a lone surrogate)") from None
    return value


Text = Annotated[str, AfterValidator(_text)]


class _Strict(BaseModel):
    """A field the API does not know is an error, not ignored (it may be a typo)."""

    model_config = ConfigDict(extra="forbid")


APP_NAME = "synpref-rewards"
"""The Serve application of the reward API (what `serve status` and the dashboard show)."""


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Text


class PairIn(_Strict):
    prompt: list[ChatMessage] = Field(min_length=1)
    """The conversation before the two responses (ends with a user turn)."""
    chosen: Text
    rejected: Text

    @model_validator(mode="after")
    def _ends_with_user(self) -> Self:
        if self.prompt[-1].role != "user":
            raise ValueError("a pair's prompt must end with a user message")
        return self


class ScoreRequest(_Strict):
    """Exactly one of ``conversations`` (each ending with the assistant response to score) and
    ``pairs``; ``model`` names the reward model when the app serves several."""

    model: str | None = None
    conversations: list[list[ChatMessage]] | None = None
    pairs: list[PairIn] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Self:
        if (self.conversations is None) == (self.pairs is None):
            raise ValueError("give exactly one of 'conversations' and 'pairs'")
        items = self.conversations if self.conversations is not None else self.pairs
        if not items:
            raise ValueError("nothing to score: the list is empty")
        for i, conversation in enumerate(self.conversations or []):
            if not conversation or conversation[-1].role != "assistant":
                raise ValueError(f"conversations[{i}] must end with an assistant message")
        return self


class Reward(BaseModel):
    raw: float
    normalised: float
    truncated: bool = False
    """The conversation was longer than the model reads and was cut from the left."""


class PairScore(BaseModel):
    chosen: Reward
    rejected: Reward
    p: float
    """sigmoid(r_chosen - r_rejected): the model's probability that chosen is preferred."""


class ScoreResponse(BaseModel):
    model: str
    model_version: str
    rewards: list[Reward] | None = None
    pairs: list[PairScore] | None = None


class ErrorMessage(BaseModel):
    """Why a request was refused."""

    detail: str


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class InvalidRequest(BaseModel):
    """A request that is not valid JSON or breaks the request schema: each error's place,
    message and type (never the input); or a message when the model could not score it."""

    detail: list[FieldError] | str


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorMessage, "description": "a body that cannot be read (not UTF-8 text)"},
    401: {"model": ErrorMessage, "description": "no or a wrong API key"},
    404: {"model": ErrorMessage, "description": "an unknown model"},
    413: {"model": ErrorMessage, "description": "too many items, characters or bytes"},
    422: {"model": InvalidRequest, "description": "not a valid request"},
}
"""The error answers of ``/v1/score``, in its OpenAPI schema so clients (and schemathesis)
know them."""


@dataclass(frozen=True)
class Scored:
    """A request's rewards and truncation flags, or why it could not be scored."""

    rewards: list[float]
    truncated: list[bool]
    error: str | None = None


class BodyLimit:
    """ASGI middleware: a request body over ``app.state.max_body_bytes`` is a 413, read no
    further: its ``Content-Length`` is checked first, a chunked body is counted as it comes."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = getattr(scope["app"].state, "max_body_bytes", ServingConfig().max_body_bytes)
        too_large = HTTPException(413, f"the request body is over {limit:,} bytes")
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > limit:
            response = JSONResponse({"detail": too_large.detail}, status_code=413)
            return await response(scope, receive, send)
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise too_large
            return message

        await self.app(scope, counted, send)


app = FastAPI(
    title="synpref reward API",
    description="Rewards of conversations and preference pairs from the served reward models.",
)
app.add_middleware(BodyLimit)


async def _authorised(request: Request) -> None:
    """With an API key, a request must carry it (compared in constant time)."""
    key: str | None = getattr(request.app.state, "api_key", None)
    if key is None:
        return
    sent = request.headers.get("authorization", "").encode()
    if not hmac.compare_digest(sent, f"Bearer {key}".encode()):
        raise HTTPException(
            401, "an API key is required: Authorization: Bearer KEY", {"WWW-Authenticate": "Bearer"}
        )


def api_key(serving: ServingConfig) -> str | None:
    """The key in ``serving.api_key_env``; an API bound beyond loopback without one is refused."""
    key = os.environ.get(serving.api_key_env) if serving.api_key_env else None
    if not key and not _loopback(serving.host):
        where = f"${serving.api_key_env}" if serving.api_key_env else "serving.api_key_env"
        raise ConfigError(
            f"serving.host {serving.host} is reachable beyond this machine: the reward API needs "
            f"an API key there (set {where}; clients send Authorization: Bearer KEY)"
        )
    return key or None


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Each error's place, message and type, never the input: it can be megabytes, or hold
    what JSON cannot encode (a lone surrogate made the default handler answer 500)."""
    errors = [FieldError(loc=list(e["loc"]), msg=e["msg"], type=e["type"]) for e in exc.errors()]
    return JSONResponse(InvalidRequest(detail=errors).model_dump(), status_code=422)


@serve.deployment
@serve.ingress(app)
class RewardAPI:
    """The API and every served model in one replica. A separate model deployment behind the
    ingress cost a hop per request (the request and its rewards pickled through Ray, one more
    process on the CPUs): 0.59x a single-process FastAPI server on 2 cores
    (docs/performance.md). Concurrent requests are batched into one scoring call per model."""

    def __init__(
        self,
        models: dict[str, str],
        scoring: ScoringConfig,
        serving: ServingConfig,
        key: str | None,
    ) -> None:
        app.state.max_body_bytes = serving.max_body_bytes
        app.state.api_key = key
        self.models = {name: load_model(path, scoring) for name, path in models.items()}
        self.versions = {name: model_version(path) for name, path in models.items()}
        self.default = next(iter(models))
        self.limits = serving
        self.score_batch.set_max_batch_size(serving.max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(serving.batch_wait_timeout_s)

    @app.get("/healthz")
    async def healthz(self) -> dict[str, object]:
        return {"status": "ok", "models": sorted(self.models)}

    @app.post(
        "/v1/score",
        response_model=ScoreResponse,
        response_model_exclude_none=True,
        dependencies=[Depends(_authorised)],
        responses=ERRORS,
    )
    async def score(self, request: ScoreRequest) -> ScoreResponse:
        name = request.model or self.default
        if name not in self.models:
            raise HTTPException(404, f"unknown model {name!r}; served: {sorted(self.models)}")
        scored = await self.score_batch((name, self._conversations(request)))
        if scored.error is not None:
            raise HTTPException(422, f"the model could not score this request: {scored.error}")
        model = self.models[name]
        rewards = np.array(scored.rewards)
        normalised = (rewards - model.reward_mean) / model.reward_std
        out = [
            Reward(raw=r, normalised=n, truncated=t)
            for r, n, t in zip(rewards, normalised, scored.truncated, strict=True)
        ]
        if request.conversations is not None:
            return ScoreResponse(model=name, model_version=self.versions[name], rewards=out)
        half = len(rewards) // 2
        pairs = [
            PairScore(
                chosen=out[i],
                rejected=out[half + i],
                p=float(sigmoid(rewards[i] - rewards[half + i])),
            )
            for i in range(half)
        ]
        return ScoreResponse(model=name, model_version=self.versions[name], pairs=pairs)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def score_batch(self, requests: list[tuple[str, list[list[dict]]]]) -> list[Scored]:
        """Each model's requests of the batch in one scoring call, in a thread: the event loop
        goes on reading the requests of the next batch while torch works. Batches run one at a
        time (``serve.batch``'s default), so no two threads share a tokenizer (not thread-safe)."""
        return await asyncio.to_thread(self._score_by_model, requests)

    def _score_by_model(self, requests: list[tuple[str, list[list[dict]]]]) -> list[Scored]:
        scored: dict[int, Scored] = {}
        for name in dict.fromkeys(name for name, _ in requests):
            mine = [i for i, (n, _) in enumerate(requests) if n == name]
            results = self._score(name, [requests[i][1] for i in mine])
            scored |= dict(zip(mine, results, strict=True))
        return [scored[i] for i in range(len(requests))]

    def _score(self, name: str, requests: list[list[list[dict]]]) -> list[Scored]:
        """One call for all ``requests``; should it fail, each request alone, so one bad
        request gets its own 422 and never fails the others of its batch."""
        try:
            scores = self.models[name].score([c for request in requests for c in request])
        except Exception as exc:
            if len(requests) == 1:
                return [Scored([], [], error=f"{type(exc).__name__}: {exc}")]
            return [self._score(name, [request])[0] for request in requests]
        result, start = [], 0
        for request in requests:
            end = start + len(request)
            result.append(
                Scored(scores.rewards[start:end].tolist(), scores.truncated[start:end].tolist())
            )
            start = end
        return result

    def _conversations(self, request: ScoreRequest) -> list[list[dict]]:
        """Message dicts to score (pairs: every chosen, then every rejected), within limits."""
        if request.conversations is not None:
            conversations = [[m.model_dump() for m in c] for c in request.conversations]
        else:
            pairs = request.pairs or []
            conversations = pair_conversations(
                [[m.model_dump() for m in p.prompt] for p in pairs],
                [p.chosen for p in pairs],
                [p.rejected for p in pairs],
            )
        items = len(request.conversations or request.pairs or [])
        if items > self.limits.max_items:
            raise HTTPException(413, f"{items} items; at most {self.limits.max_items} a request")
        chars = sum(len(m["content"]) for c in conversations for m in c)
        if chars > self.limits.max_chars:
            raise HTTPException(
                413, f"{chars:,} characters; at most {self.limits.max_chars:,} a request"
            )
        return conversations


def reward_app(
    models: dict[str, str], scoring: ScoringConfig, serving: ServingConfig
) -> serve.Application:
    """The application serving ``name -> model path`` (the first name is the default). The API
    key, read here from the environment, goes to the replicas as an argument."""
    if not models:
        raise ValueError("serve at least one model (NAME=PATH)")
    scaling = (
        {"autoscaling_config": serving.autoscaling}
        if serving.autoscaling
        else {"num_replicas": serving.replicas}
    )
    return RewardAPI.options(
        ray_actor_options={"num_cpus": scoring.num_cpus, "num_gpus": scoring.num_gpus},
        max_ongoing_requests=serving.max_ongoing_requests,
        **scaling,
    ).bind(models, scoring, serving, api_key(serving))


class RewardAppArgs(_Strict):
    """The arguments of ``build_app``: what a Serve config file or a RayService's
    ``serveConfigV2`` gives under ``args`` (cluster/rayservice.yaml)."""

    models: dict[str, str] = Field(min_length=1)
    """Name -> model folder (or HF id) each scorer deployment loads."""
    config: str | None = None
    """A synpref config file for the ``scoring`` and ``serving`` sections (default: the
    embedded defaults); ``SYNPREF_*`` environment variables apply as everywhere."""


def build_app(args: RewardAppArgs) -> serve.Application:
    """The reward API as a Serve application builder, for ``serve run``, ``serve deploy`` and
    KubeRay's RayService (``import_path: pipelines.rm.serving:build_app``); Serve validates
    ``args`` against ``RewardAppArgs`` before the call."""
    config = load_config(args.config)
    return reward_app(args.models, config.scoring, config.serving)
