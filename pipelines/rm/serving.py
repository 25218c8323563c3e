"""The reward API on Ray Serve: ``POST /v1/score`` for conversations or pairs, ``/healthz``.

One ``RewardScorer`` deployment per reward model (its replicas and autoscaling from config)
behind one FastAPI ingress. Requests are validated before they reach a model (clear 4xx:
malformed JSON, unknown roles, empty or oversize input, too many items, unknown model).
``@serve.batch`` merges concurrent requests into one call of ``RewardModel.score``, which
sorts their conversations by length and packs them into forward passes under the token budget
(``scoring.batch_tokens``): dynamic batching by requests, then by tokens. The chat formatting
and the length limit are the ones training and batch scoring use, so served rewards equal
``rm_scores``: a conversation longer than the model reads is cut from the left (its reward says
``truncated``). Should a merged call still fail, each request is scored alone, so one bad request
gets its own 422 and never fails the others of its batch.
"""

# No ``from __future__ import annotations``: FastAPI (inside Serve's ingress) must see the
# request model classes, not strings, to read them from the request body.
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
from ray.serve.handle import DeploymentHandle
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


@serve.deployment
class RewardScorer:
    """One reward model; concurrent requests are batched into one scoring call."""

    def __init__(self, model: str, scoring: ScoringConfig, serving: ServingConfig) -> None:
        self.model = load_model(model, scoring)
        self.version = model_version(model)
        self.score_batch.set_max_batch_size(serving.max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(serving.batch_wait_timeout_s)

    def info(self) -> tuple[str, float, float]:
        return self.version, self.model.reward_mean, self.model.reward_std

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def score_batch(self, requests: list[list[list[dict]]]) -> list[Scored]:
        try:
            return self._score(requests)
        except Exception:  # one bad request must not fail its batch: score each alone
            return [self._score_alone(request) for request in requests]

    def _score(self, requests: list[list[list[dict]]]) -> list[Scored]:
        flat = [conversation for request in requests for conversation in request]
        scores = self.model.score(flat)
        result, start = [], 0
        for request in requests:
            end = start + len(request)
            result.append(
                Scored(scores.rewards[start:end].tolist(), scores.truncated[start:end].tolist())
            )
            start = end
        return result

    def _score_alone(self, request: list[list[dict]]) -> Scored:
        try:
            return self._score([request])[0]
        except Exception as exc:
            return Scored([], [], error=f"{type(exc).__name__}: {exc}")

    async def __call__(self, conversations: list[list[dict]]) -> Scored:
        return await self.score_batch(conversations)


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
    def __init__(
        self, scorers: dict[str, DeploymentHandle], serving: ServingConfig, key: str | None
    ) -> None:
        app.state.max_body_bytes = serving.max_body_bytes
        app.state.api_key = key
        self.scorers = scorers
        self.limits = serving
        self.default = next(iter(scorers))
        self.info: dict[str, tuple[str, float, float]] = {}

    @app.get("/healthz")
    async def healthz(self) -> dict[str, object]:
        return {"status": "ok", "models": sorted(self.scorers)}

    @app.post(
        "/v1/score",
        response_model=ScoreResponse,
        response_model_exclude_none=True,
        dependencies=[Depends(_authorised)],
        responses=ERRORS,
    )
    async def score(self, request: ScoreRequest) -> ScoreResponse:
        name = request.model or self.default
        if name not in self.scorers:
            raise HTTPException(404, f"unknown model {name!r}; served: {sorted(self.scorers)}")
        conversations = self._conversations(request)
        handle = self.scorers[name]
        if name not in self.info:
            self.info[name] = await handle.info.remote()
        version, mean, std = self.info[name]
        scored: Scored = await handle.remote(conversations)
        if scored.error is not None:
            raise HTTPException(422, f"the model could not score this request: {scored.error}")
        rewards = np.array(scored.rewards)
        out = [
            Reward(raw=r, normalised=n, truncated=t)
            for r, n, t in zip(rewards, (rewards - mean) / std, scored.truncated, strict=True)
        ]
        if request.conversations is not None:
            return ScoreResponse(model=name, model_version=version, rewards=out)
        half = len(rewards) // 2
        pairs = [
            PairScore(
                chosen=out[i],
                rejected=out[half + i],
                p=float(sigmoid(rewards[i] - rewards[half + i])),
            )
            for i in range(half)
        ]
        return ScoreResponse(model=name, model_version=version, pairs=pairs)

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
    """The application: a scorer deployment per ``name -> model path`` and the API in front.
    The API key, read here from the environment, goes to the API replica as an argument."""
    if not models:
        raise ValueError("serve at least one model (NAME=PATH)")
    scaling = (
        {"autoscaling_config": serving.autoscaling}
        if serving.autoscaling
        else {"num_replicas": serving.replicas}
    )
    resources = {"num_cpus": scoring.num_cpus, "num_gpus": scoring.num_gpus}
    scorers = {
        name: RewardScorer.options(
            name=f"scorer-{name}",
            ray_actor_options=resources,
            max_ongoing_requests=2 * serving.max_batch_size,  # room to fill the next batch
            **scaling,
        ).bind(path, scoring, serving)
        for name, path in models.items()
    }
    return RewardAPI.options(
        ray_actor_options={"num_cpus": 0}, max_ongoing_requests=serving.max_ongoing_requests
    ).bind(scorers, serving, api_key(serving))


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
