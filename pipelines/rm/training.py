"""Bradley-Terry reward-model training on Ray Train (TorchTrainer, DDP or FSDP, CPU or GPU).

Each worker reads its shard of the tokenised training set (``get_dataset_shard``) in steps of
``global_batch / workers`` pairs; the set is cut into blocks of that many pairs before it is
split, so every worker holds about the same share and contributes to every step (Ray Data splits
by whole blocks: one large block would leave a worker idle and halve the batch). Pairs of
similar length train together (``length_grouped_steps``), and a worker cuts a step's pairs into
micro-batches under a padded-token budget (gradient accumulation reaches the global batch);
chosen and rejected go through one forward pass. The loss is normalised by the weight of the
whole global batch, so uneven shards and micro-batch splits change nothing. Workers move in
lockstep: a worker with nothing left runs one-token dummy passes, so no collective waits forever
and no row is dropped (Ray Train's default split drops up to ``workers - 1`` rows to equalise
shards; we split unevenly).

A checkpoint holds the model (HF format, ready to load), optimizer, scheduler and the data
position: the keys of every pair trained in the current epoch. A restarted or re-run job filters
those out of its shard, so at most one checkpoint interval is redone and no pair is trained
twice. Every checkpoint is validated first, which makes "best by validation accuracy" exact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray.data
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from transformers import get_scheduler

from pipelines.core.batching import length_batches
from pipelines.core.config import TrainingConfig
from pipelines.core.errors import ConfigError
from pipelines.core.jobs import JobSummary, TableVersion
from pipelines.core.lake import Lake
from pipelines.core.model_paths import resolve_model
from pipelines.rm.data import TrainingSelection, tokenized_pairs, training_selection
from pipelines.rm.launch import EveryRowDataConfig, WorkerSetup, in_read_order, train_loop
from pipelines.rm.local_checkpoints import LocalCheckpoints
from pipelines.rm.losses import pairwise_loss
from pipelines.rm.model import (
    backbone_max_length,
    load_backbone,
    load_tokenizer,
    model_version,
    save_reward_model,
    without_dropout,
)
from storage_schemas import CURATED_SETS

if TYPE_CHECKING:  # the training workers import this module: they need neither
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

MODEL_DIR = "model"
STATE_FILE = "state.json"
SEEN_FILE = "seen.npy"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
LENGTH_WINDOW_STEPS = 8
"""Steps per window of pairs sorted by length (HF's length-grouped sampler uses 50 batches:
fewer keeps a small run's order random)."""
SUMS = ("loss", "weight", "pairs", "correct", "margin", "reward", "reward_sq", "tokens", "padded")
"""Per-pair statistics summed over micro-batches and workers (``loss`` is weighted)."""


@dataclass
class TrainState:
    """What a checkpoint restores besides tensors: the position in the data is ``seen``, the
    keys of the pairs trained (or dropped) in epoch ``seen_epoch``."""

    step: int = 0
    epoch: int = 0
    seen_epoch: int = 0
    pairs: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    seen: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    validation: dict[str, float] = field(default_factory=dict)

    def save(self, folder: Path) -> None:
        np.save(folder / SEEN_FILE, self.seen)
        values = {k: v for k, v in asdict(self).items() if k != "seen"}
        (folder / STATE_FILE).write_text(json.dumps(values, indent=1))

    @classmethod
    def load(cls, folder: Path) -> TrainState:
        values = json.loads((folder / STATE_FILE).read_text())
        return cls(**values, seen=np.load(folder / SEEN_FILE))


class _Worker:
    """One training worker's model, optimizer and collectives (one per Ray Train worker)."""

    def __init__(self, setup: WorkerSetup) -> None:
        self.setup, self.config = setup, setup.training
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        if self.device.type == "cpu":  # Ray sets OMP_NUM_THREADS to int(num_cpus): 1 for 1.5
            torch.set_num_threads(max(1, math.ceil(self.config.cpus_per_worker)))
        self.tokenizer = load_tokenizer(self.config.backbone, **self.config.backbone_kwargs)
        model = load_backbone(self.config.backbone, self.config.seed, **self.config.backbone_kwargs)
        model.config.pad_token_id = self.tokenizer.pad_token_id
        if self.config.disable_dropout:
            without_dropout(model)
        if self.config.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.base = model
        self.model = ray.train.torch.prepare_model(model, parallel_strategy=self.config.strategy)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=self.config.learning_rate,
            weight_decay=self.config.weight_decay,
        )
        self.scheduler = get_scheduler(
            self.config.lr_schedule,
            self.optimizer,
            num_warmup_steps=warmup_steps(self.config, setup.total_steps),
            num_training_steps=max(setup.total_steps, 1),
        )
        self.bf16 = _use_bf16(self.config.precision, self.device)
        self.mlflow = MlflowClient(setup.tracking_uri) if self.rank == 0 else None

    # --- collectives -------------------------------------------------------------------------

    def all_sum(self, values: list[float]) -> np.ndarray:
        tensor = torch.tensor(values, dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor.numpy()

    def lockstep(self, items: list[Any]) -> Iterator[Any]:
        """``items``, then ``None`` until every worker has had as many (FSDP and DDP need each
        worker to run the same number of forward/backward passes)."""
        rounds = int(self.all_max(len(items)))
        yield from items
        yield from [None] * (rounds - len(items))

    def all_max(self, value: float) -> float:
        tensor = torch.tensor([value], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor.item())

    # --- model passes ------------------------------------------------------------------------

    def rewards(self, sequences: list[list[int]]) -> torch.Tensor:
        """Rewards of token sequences, padded exactly as ``RewardModel.score`` pads them."""
        inputs = self.tokenizer.pad({"input_ids": sequences}, return_tensors="pt").to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.model(**inputs).logits[:, 0].float()

    def dummy_loss(self) -> torch.Tensor:
        """A zero loss over every parameter: keeps a worker without data in the collectives."""
        return self.rewards([[self.tokenizer.pad_token_id]]).sum() * 0.0

    def pair_rewards(self, rows: pa.Table) -> tuple[torch.Tensor, torch.Tensor]:
        n = rows.num_rows
        rewards = self.rewards(rows["chosen_ids"].to_pylist() + rows["rejected_ids"].to_pylist())
        return rewards[:n], rewards[n:]

    def micro_batches(self, rows: pa.Table) -> list[pa.Table]:
        lengths = 2 * rows["length"].to_numpy().astype(np.int64)
        groups = length_batches(
            lengths, self.config.micro_batch_tokens, self.config.group_by_length
        )
        return [rows.take(pa.array(g)) for g in groups]

    # --- training ----------------------------------------------------------------------------

    def train_step(self, rows: pa.Table, weight_total: float) -> np.ndarray:
        """One optimizer step over this worker's ``rows`` (maybe none); returns its ``SUMS``."""
        self.model.train()
        sums = np.zeros(len(SUMS))
        parts = list(self.lockstep(self.micro_batches(rows) if rows.num_rows else []))
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            sync = contextlib.nullcontext() if last or self.world == 1 else self.model.no_sync()
            with sync:
                if part is None:
                    self.dummy_loss().backward()
                    continue
                chosen, rejected = self.pair_rewards(part)
                loss_sum = pairwise_loss(
                    chosen,
                    rejected,
                    self.config.loss,
                    margin=_tensor(part["margin"]) if self.config.data.margin_column else None,
                    weights=_tensor(part["weight"]),
                    centering=self.config.center_rewards_coefficient,
                    normaliser=1.0,
                )
                (loss_sum * self.world / weight_total).backward()
            sums += _pair_sums(chosen.detach(), rejected.detach(), loss_sum.item(), part)
        if self.config.max_grad_norm is not None:
            if hasattr(self.model, "clip_grad_norm_"):  # FSDP clips across shards
                self.model.clip_grad_norm_(self.config.max_grad_norm)
            else:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return sums

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Loss, accuracy, margin and reward mean/std over every worker's validation shard."""
        self.model.eval()
        sums = np.zeros(len(SUMS))
        shard = ray.train.get_dataset_shard("validation")
        batches = shard.iter_batches(batch_size=256, batch_format="pyarrow")
        for batch in self.lockstep_batches(batches):
            rows = _trainable(batch) if batch is not None else _EMPTY
            for part in self.lockstep(self.micro_batches(rows) if rows.num_rows else []):
                if part is None:
                    self.dummy_loss()
                    continue
                chosen, rejected = self.pair_rewards(part)
                loss = pairwise_loss(chosen, rejected, normaliser=1.0).item()
                sums += _pair_sums(chosen, rejected, loss, part)
        return _summary(self.all_sum(list(sums)))

    def lockstep_batches(self, batches: Any) -> Iterator[pa.Table | None]:
        """Batches of a shard until every worker's shard is exhausted (``None`` once mine is)."""
        iterator = iter(batches)
        while True:
            batch = next(iterator, None)
            if self.all_sum([batch is None])[0] == self.world:
                return
            yield batch

    # --- checkpoints -------------------------------------------------------------------------

    def restore(self) -> TrainState:
        local = self.setup.local_checkpoints
        checkpoint = local.latest() if local else ray.train.get_checkpoint()
        if checkpoint is None:
            return TrainState()
        # Imported where used: 0.8 s that the driver, which imports this module, never needs.
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        with checkpoint.as_directory() as directory:
            folder = Path(directory)
            state = TrainState.load(folder)
            if not (folder / OPTIMIZER_FILE).exists():  # final: the driver refuses more epochs
                return state
            weights: dict[str, torch.Tensor] = {}
            for file in sorted((folder / MODEL_DIR).glob("*.safetensors")):
                weights |= load_file(file)
            full = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, weights, options=full)
            optimizer = torch.load(folder / OPTIMIZER_FILE, weights_only=False)
            set_optimizer_state_dict(self.model, self.optimizer, optimizer, options=full)
            self.scheduler.load_state_dict(torch.load(folder / SCHEDULER_FILE, weights_only=False))
            return state

    def save(self, state: TrainState, metrics: dict[str, float], final: bool = False) -> None:
        """Report a checkpoint (every worker calls this; rank 0 writes it). The ``final`` one
        holds no optimizer state: nothing resumes from it, and AdamW's moments are twice the
        model's size (a third of the write and of the copy into storage)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(self.model, options=full)
        optimizer_state = None
        if not final:
            optimizer_state = get_optimizer_state_dict(self.model, self.optimizer, options=full)
        if self.rank != 0:
            ray.train.report(metrics)
            return
        local = self.setup.local_checkpoints
        if local:
            with local.new(metrics) as folder:
                self.write(folder, state, model_state, optimizer_state)
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as directory:
            self.write(Path(directory), state, model_state, optimizer_state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))

    def write(
        self,
        folder: Path,
        state: TrainState,
        model_state: dict[str, torch.Tensor],
        optimizer_state: dict[str, Any] | None,
    ) -> None:
        """A checkpoint's files: the model (HF format), optimizer, scheduler and ``state``."""
        normalisation = None
        if state.validation:
            normalisation = (state.validation["reward_mean"], state.validation["reward_std"])
        save_reward_model(
            self.base,
            self.tokenizer,
            folder / MODEL_DIR,
            model_state,
            normalisation,
            self.config.max_length,
        )
        if optimizer_state is not None:
            torch.save(optimizer_state, folder / OPTIMIZER_FILE)
            torch.save(self.scheduler.state_dict(), folder / SCHEDULER_FILE)
        state.save(folder)

    def gather_keys(self, keys: list[np.ndarray]) -> np.ndarray:
        """Every worker's trained keys since the last checkpoint."""
        mine = np.concatenate(keys) if keys else np.empty(0, np.int64)
        if self.world == 1:
            return mine
        everyone: list[Any] = [None] * self.world
        dist.all_gather_object(everyone, mine)
        return np.concatenate(everyone)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.mlflow is None:
            return
        now = int(time.time() * 1000)
        self.mlflow.log_batch(
            self.setup.run_id, [Metric(k, float(v), now, step) for k, v in metrics.items()]
        )


def train_worker(setup: WorkerSetup) -> None:
    """The Ray Train loop of one worker."""
    worker = _Worker(setup)
    config = worker.config
    state = worker.restore()
    if state.step:
        worker.log({"restored_from_step": state.step}, state.step)
    local_batch = math.ceil(config.global_batch / worker.world)
    pending: list[np.ndarray] = []
    while state.epoch < config.epochs:
        if state.seen_epoch != state.epoch:  # a new epoch: every pair is trainable again
            state.seen, state.seen_epoch = np.empty(0, np.int64), state.epoch
        window = local_batch * (LENGTH_WINDOW_STEPS if config.group_by_length else 1)
        batches = ray.train.get_dataset_shard("train").iter_batches(
            batch_size=window,
            batch_format="pyarrow",
            local_shuffle_buffer_size=4 * local_batch,
            local_shuffle_seed=config.seed + state.epoch,
        )
        if config.group_by_length:
            batches = length_grouped_steps(batches, local_batch, (config.seed, state.epoch))
        trained = np.sort(state.seen)  # restored from a checkpoint: skip these pairs
        started = time.perf_counter()
        for batch in worker.lockstep_batches(batches):
            new = _unseen(batch, trained)
            rows = _trainable(new) if new is not None else _EMPTY
            if new is not None:
                pending.append(new["row_key"].to_numpy())
            counts = worker.all_sum(
                [rows.num_rows, _weight(rows), _count(new, "dropped"), _count(new, "truncated")]
            )
            state.dropped += int(counts[2])
            state.truncated += int(counts[3])
            if counts[0] == 0:
                continue  # every pair of this step was trained before a restart, or dropped
            sums = worker.all_sum(list(worker.train_step(rows, counts[1])))
            state.step += 1
            state.pairs += int(counts[0])
            state.tokens += int(sums[SUMS.index("tokens")])
            metrics = _step_metrics(sums, time.perf_counter() - started, state)
            started = time.perf_counter()  # the next step's time includes waiting for data
            metrics |= {"step": state.step, "learning_rate": worker.scheduler.get_last_lr()[0]}
            if state.step % config.checkpoint_every == 0 or state.step % config.validate_every == 0:
                _validate(worker, state, metrics)
            worker.log(metrics, state.step)
            if state.step % config.checkpoint_every == 0:
                state.seen = np.concatenate([state.seen, worker.gather_keys(pending)])
                pending = []
                worker.save(state, metrics)
        state.seen = np.concatenate([state.seen, worker.gather_keys(pending)])
        state.epoch, pending = state.epoch + 1, []
        final = {
            "step": state.step,
            "epoch": state.epoch,
            "pairs_trained": state.pairs,
            "pairs_truncated": state.truncated,
            "pairs_dropped": state.dropped,
            "tokens_trained": state.tokens,
        }
        _validate(worker, state, final)
        worker.log(final, state.step)
        worker.save(state, final | {"final": 1.0}, final=state.epoch == config.epochs)


def length_grouped_steps(
    windows: Iterable[pa.Table], local_batch: int, seed: tuple[int, ...]
) -> Iterator[pa.Table]:
    """Steps of ``local_batch`` rows cut from each window sorted by length, in an order drawn
    from ``seed`` and the window's index only. Every worker draws the same order, so the
    workers of a step hold pairs of about the same length quantile and none waits long for
    the others (DDP steps at the pace of the slowest)."""
    for index, window in enumerate(windows):
        # By length, then by content (row_key): the order does not depend on arrival order.
        ordered = window.sort_by([("length", "ascending"), ("row_key", "ascending")])
        steps = [ordered.slice(at, local_batch) for at in range(0, ordered.num_rows, local_batch)]
        for position in np.random.default_rng([*seed, index]).permutation(len(steps)):
            yield steps[position]


def warmup_steps(training: TrainingConfig, total_steps: int) -> int:
    """``warmup_steps`` when set, else ``warmup_ratio`` of the planned steps."""
    return training.warmup_steps or math.ceil(training.warmup_ratio * total_steps)


def _validate(worker: _Worker, state: TrainState, metrics: dict[str, Any]) -> None:
    if not worker.setup.has_validation:
        return
    state.validation = worker.validate()
    metrics |= {f"val_{k}": v for k, v in state.validation.items()}


def _unseen(batch: pa.Table | None, trained: np.ndarray) -> pa.Table | None:
    """The rows of ``batch`` whose key is not in the sorted ``trained`` keys."""
    if batch is None or not len(trained):
        return batch
    keys = batch["row_key"].to_numpy()
    found = trained[np.minimum(np.searchsorted(trained, keys), len(trained) - 1)] == keys
    return batch.filter(pa.array(~found))


def _trainable(rows: pa.Table) -> pa.Table:
    return rows.filter(pc.invert(rows["dropped"]))


_EMPTY = pa.table({"weight": pa.array([], pa.float32())})


def _weight(rows: pa.Table) -> float:
    return float(pc.sum(rows["weight"]).as_py() or 0.0) if rows.num_rows else 0.0


def _count(rows: pa.Table | None, column: str) -> int:
    return 0 if rows is None else int(pc.sum(rows[column].cast(pa.int64())).as_py() or 0)


def _tensor(column: pa.ChunkedArray | pa.Array) -> torch.Tensor:
    return torch.from_numpy(column.to_numpy().astype(np.float32))


def _pair_sums(
    chosen: torch.Tensor, rejected: torch.Tensor, loss_sum: float, rows: pa.Table
) -> np.ndarray:
    """The ``SUMS`` of a micro-batch (``loss_sum``: its weighted loss sum)."""
    c, r = chosen.detach().cpu().double().numpy(), rejected.detach().cpu().double().numpy()
    rewards = np.concatenate([c, r])
    tokens = sum(
        int(pc.sum(pc.list_value_length(rows[side])).as_py())
        for side in ("chosen_ids", "rejected_ids")
    )
    padded = 2 * rows.num_rows * int(pc.max(rows["length"]).as_py())
    return np.array(
        [
            loss_sum,
            float(pc.sum(rows["weight"]).as_py()),
            rows.num_rows,
            np.sum(c > r),
            np.sum(c - r),
            np.sum(rewards),
            np.sum(rewards**2),
            tokens,
            padded,
        ]
    )


def _summary(sums: np.ndarray) -> dict[str, float]:
    """Means of summed pair statistics (over all workers)."""
    values = dict(zip(SUMS, sums, strict=True))
    pairs = values["pairs"]
    if not pairs:
        return {}
    mean = values["reward"] / (2 * pairs)
    return {
        "loss": values["loss"] / values["weight"],
        "accuracy": values["correct"] / pairs,
        "margin": values["margin"] / pairs,
        "reward_mean": mean,
        "reward_std": math.sqrt(max(values["reward_sq"] / (2 * pairs) - mean**2, 0.0)),
    }


def _step_metrics(sums: np.ndarray, seconds: float, state: TrainState) -> dict[str, float]:
    values = dict(zip(SUMS, sums, strict=True))
    return _summary(sums) | {
        "batch_pairs": values["pairs"],
        "pairs_per_s": values["pairs"] / seconds,
        "tokens_per_s": values["tokens"] / seconds,
        "padding_fraction": 1 - values["tokens"] / values["padded"],
        "pairs_trained": state.pairs,
        "pairs_truncated": state.truncated,
        "pairs_dropped": state.dropped,
        "epoch": state.epoch,
    }


def _use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast where asked for (``auto``: GPUs that support it); the loss stays fp32."""
    if precision == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return precision == "bf16"


@dataclass(frozen=True)
class TrainSummary(JobSummary):
    """What ``synpref train`` did: data, steps, the selected checkpoint and its metrics, and
    where the model is registered."""

    job: ClassVar[str] = "train"
    name: str
    run_id: str
    training_set: str
    table: str
    table_version: int
    train_pairs: int
    validation_pairs: int
    steps: int
    pairs_trained: int
    pairs_truncated: int
    pairs_dropped: int
    max_length: int
    """The tokens per conversation trained with (at most what the backbone reads)."""
    seconds: float
    selected_step: int
    selected_metrics: dict[str, float]
    checkpoint: str
    model_folder: str
    model_uri: str | None = None
    """The logged MLflow model (``models:/NAME/VERSION`` when registered)."""
    registered_as: str | None = None
    registered_version: str | None = None
    sets: list[str] = field(default_factory=list)
    """The curated sets trained and validated on, as ``NAME@VERSION``."""

    def text(self) -> str:
        val = self.selected_metrics.get("val_accuracy")
        chosen = f"step {self.selected_step}" + (f", val accuracy {val:.3f}" if val else "")
        text = (
            f"trained {self.name}: {self.pairs_trained:,} of {self.train_pairs:,} pairs "
            f"({self.table} v{self.table_version}) in {self.steps} steps, {self.seconds:.0f}s; "
            f"{self.pairs_truncated:,} truncated, {self.pairs_dropped:,} dropped; "
            f"model from {chosen}: {self.model_folder}"
        )
        if self.registered_version:
            text += f"\nregistered: {self.registered_as} v{self.registered_version}"
        return text

    def tables_read(self) -> list[TableVersion]:
        set_versions = sorted({int(s.rpartition("@")[2]) for s in self.sets})
        return [TableVersion(self.table, self.table_version)] + [
            TableVersion(CURATED_SETS.name, v) for v in set_versions
        ]

    def tags(self) -> dict[str, str]:
        tags = {"synpref.training_set": self.training_set, "synpref.train_run": self.name}
        return tags | ({"synpref.curated_sets": ", ".join(self.sets)} if self.sets else {})

    def metrics(self) -> dict[str, float]:
        return {f"selected_{k}": v for k, v in self.selected_metrics.items()} | {
            "train_pairs": self.train_pairs,
            "validation_pairs": self.validation_pairs,
        }

    def figures(self, lake: Lake) -> dict[str, Figure]:
        """Training curves from the run's step metrics (none when this run trained nothing: a
        finished run re-run)."""
        from pipelines.core import reporting

        client = MlflowClient()
        curves = {
            key: sorted((m.step, m.value) for m in client.get_metric_history(self.run_id, key))
            for key in CURVES
        }
        if not curves["loss"]:
            return {}
        return {"training_curves.png": reporting.training_curves(curves)}


CURVES = ("loss", "accuracy", "val_accuracy", "val_loss")


def default_run_name(lake: Lake, training: TrainingConfig) -> str:
    """A fingerprint of the training config and the selected table version (and of
    ``curated_sets`` when it trains on sets), so re-running the same job resumes it and
    changing either starts a new one."""
    data = training.data
    version = data.version
    if version is None and lake.exists(data.table):
        version = lake.version(data.table)
    sets_version = None
    if (data.set or data.validation_set) and lake.exists(CURATED_SETS.name):
        sets_version = lake.version(CURATED_SETS.name)
    identity = json.dumps(
        [training.model_dump(), version] + ([sets_version] if sets_version is not None else []),
        sort_keys=True,
        default=str,
    )
    return f"rm-{data.name}-{hashlib.blake2b(identity.encode(), digest_size=5).hexdigest()}"


def register(summary: TrainSummary, register_as: str | None) -> TrainSummary:
    """Log the trained model to the active run and register it as ``register_as`` (unless that
    name already holds this very model: a re-run registers nothing twice)."""
    from pipelines.rm.registry import MODEL_VERSION_TAG, log_reward_model, registered_version

    tags = {
        "synpref.train_run": summary.name,
        "synpref.step": str(summary.selected_step),
        MODEL_VERSION_TAG: model_version(summary.model_folder),
    }
    version = registered_version(register_as, tags) if register_as else None
    if version is None:
        info, version = log_reward_model(summary.model_folder, register_as, tags)
        model_uri = info.model_uri
    else:
        model_uri = f"models:/{register_as}/{version}"
        log.info(f"[train] {model_uri} already holds this model: not registered again")
    return dataclasses.replace(
        summary, model_uri=model_uri, registered_as=register_as, registered_version=version
    )


@dataclass(frozen=True)
class RunCheckpoints:
    """A Ray Train run's kept checkpoints with the metrics reported with each (in report
    order), and its last checkpoint with its metrics (kept even when it ranks below ``kept``)."""

    kept: list[tuple[ray.train.Checkpoint, dict[str, Any]]]
    last: ray.train.Checkpoint | None
    last_metrics: dict[str, Any]

    @classmethod
    def of_local_run(cls, local: LocalCheckpoints) -> RunCheckpoints:
        kept, last = local.reported(), local.latest()
        metrics = next((m for c, m in kept if last and c.path == last.path), {})
        return cls(kept, last, metrics)

    @classmethod
    def of_result(cls, result: ray.train.Result) -> RunCheckpoints:
        return cls(result.best_checkpoints, result.checkpoint, result.metrics or {})


def train_reward_model(
    lake: Lake,
    training: TrainingConfig,
    tracking_uri: str,
    run_id: str,
    name: str,
) -> TrainSummary:
    """Train on the configured selection with Ray Train; resumes run ``name`` if it exists."""
    started = time.perf_counter()
    backbone = resolve_model(training.backbone)
    try:
        max_length = backbone_max_length(backbone, training.max_length, **training.backbone_kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"training.backbone {training.backbone!r} cannot be loaded: {exc}"
        ) from None
    if max_length < training.max_length:
        log.info(
            f"[train] max_length {training.max_length} is more than {training.backbone} reads: "
            f"training with {max_length} tokens (longer pairs: truncation {training.truncation})"
        )
    training = training.model_copy(update={"backbone": backbone, "max_length": max_length})
    selection = training_selection(lake, training.data)
    n_train, n_val = selection.train.num_rows, selection.validation.num_rows
    steps = training.epochs * math.ceil(n_train / training.global_batch)
    where = f"on {training.workers} worker(s)" if training.workers else "in this process"
    log.info(
        f"[train] {name}: {n_train:,} training and {n_val:,} validation pairs from "
        f"{selection.table} v{selection.version}; {steps} steps of {training.global_batch} pairs "
        f"{where}"
    )
    storage = training.storage_path
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    by_accuracy = bool(n_val) and training.select == "best"
    score = "val_accuracy" if by_accuracy else "step"
    local = None
    if not training.workers:
        local = LocalCheckpoints(Path(storage, name), training.keep_checkpoints, score)
    run = _checkpoints(f"{storage}/{name}", local)
    if _finished(run, training.epochs):
        log.info(f"[train] {name} finished before: nothing to train")
    else:
        setup = WorkerSetup(training, steps, tracking_uri, run_id, bool(n_val), local)
        run = _fit(lake, selection, setup, storage, name, score)
    checkpoint, metrics = _select(run, training.select, bool(n_val))
    state_folder = Path(checkpoint.path)
    final = run.last_metrics  # the last report is the end of the last epoch
    log.info(
        f"[train] {name}: {int(final.get('step', 0))} steps done; model from step "
        f"{int(metrics['step'])} ({training.select})"
    )
    return TrainSummary(
        name=name,
        run_id=run_id,
        training_set=training.data.name,
        table=selection.table,
        table_version=selection.version,
        train_pairs=n_train,
        validation_pairs=n_val,
        steps=int(final.get("step", metrics["step"])),
        pairs_trained=int(final.get("pairs_trained", 0)),
        pairs_truncated=int(final.get("pairs_truncated", 0)),
        pairs_dropped=int(final.get("pairs_dropped", 0)),
        max_length=max_length,
        seconds=time.perf_counter() - started,
        selected_step=int(metrics["step"]),
        selected_metrics={k: float(v) for k, v in metrics.items()},
        checkpoint=checkpoint.path,
        model_folder=str(state_folder / MODEL_DIR),
        sets=[str(ref) for ref in selection.sets],
    )


def _fit(
    lake: Lake,
    selection: TrainingSelection,
    setup: WorkerSetup,
    storage: str,
    name: str,
    score: str,
) -> RunCheckpoints:
    """Run (or resume) the Ray Train run ``name`` under ``storage``, keeping checkpoints by
    ``score``."""
    training = setup.training
    local_batch = math.ceil(training.global_batch / max(training.workers, 1))
    datasets = {"train": tokenized_pairs(lake, selection, selection.train, training, local_batch)}
    if setup.has_validation:
        # Gold sets are small and read at every validation: tokenise them once.
        validation = tokenized_pairs(lake, selection, selection.validation, training)
        datasets["validation"] = validation.materialize()
    if setup.local_checkpoints:  # local mode: no data config splits the training set
        train = datasets["train"]
        datasets["train"] = in_read_order(train, train.context.execution_options)
    resources = {"CPU": training.cpus_per_worker} | ({"GPU": 1} if training.use_gpu else {})
    trainer = ray.train.torch.TorchTrainer(
        train_loop,
        train_loop_config={"setup": setup},
        scaling_config=ray.train.ScalingConfig(
            num_workers=training.workers,
            use_gpu=training.use_gpu,
            resources_per_worker=resources,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=training.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=training.keep_checkpoints,
                # Kept: the best by validation accuracy, or the latest for ``select: last``.
                checkpoint_score_attribute=score,
                checkpoint_score_order="max",
            ),
        ),
        datasets=datasets,
        dataset_config=EveryRowDataConfig(),
    )
    threads = torch.get_num_threads()  # local mode sets this process's threads
    with _ProgressLines(setup.tracking_uri, setup.run_id, name, setup.total_steps, training.epochs):
        try:
            result = trainer.fit()
        finally:
            torch.set_num_threads(threads)
    if result.error is not None:
        raise result.error
    if setup.local_checkpoints:
        return RunCheckpoints.of_local_run(setup.local_checkpoints)
    return RunCheckpoints.of_result(result)


def _checkpoints(run_folder: str, local: LocalCheckpoints | None) -> RunCheckpoints:
    """The checkpoints of the run in ``run_folder`` so far (none before its first report)."""
    if local:
        return RunCheckpoints.of_local_run(local)
    try:
        return RunCheckpoints.of_result(ray.train.Result.from_path(run_folder))
    except RuntimeError:  # no such run, or one that never reported
        return RunCheckpoints([], None, {})


def _finished(run: RunCheckpoints, epochs: int) -> bool:
    """Whether the run's last checkpoint is its final one, which keeps no optimizer state:
    then there is nothing to train, and more epochs than it trained are an error."""
    if run.last is None:
        return False
    optimizer = run.last.filesystem.get_file_info(f"{run.last.path}/{OPTIMIZER_FILE}")
    if optimizer.type != pafs.FileType.NotFound:
        return False
    trained = int(run.last_metrics["epoch"])
    if trained < epochs:
        raise ConfigError(
            f"this run finished after {trained} epoch(s) and its final checkpoint keeps no "
            f"optimizer state: train under a new name to train {epochs} epochs"
        )
    return True


class _ProgressLines:
    """Progress lines on the driver while Ray Train runs: workers log step metrics to MLflow
    and this thread reads them back (the one channel that works on any cluster)."""

    def __init__(
        self,
        tracking_uri: str,
        run_id: str,
        name: str,
        steps: int,
        epochs: int,
        every_s: float = 15.0,
    ) -> None:
        self.client, self.run_id, self.name = MlflowClient(tracking_uri), run_id, name
        self.steps, self.epochs, self.every_s = steps, epochs, every_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.shown: tuple[float, float] = (0.0, 0.0)

    def __enter__(self) -> _ProgressLines:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self._show()

    def _watch(self) -> None:
        while not self.stop.wait(self.every_s):
            self._show()

    def _show(self) -> None:
        with contextlib.suppress(Exception):  # progress must never fail the run
            metrics = self.client.get_run(self.run_id).data.metrics
            step, epoch = metrics.get("step", 0.0), metrics.get("epoch", 0.0)
            if (step, epoch) == self.shown or not step:
                return
            self.shown = (step, epoch)
            line = (
                f"[train] {self.name}: step {int(step)}/{self.steps}, epoch "
                f"{min(int(epoch) + 1, self.epochs)}/{self.epochs}: loss "
                f"{metrics.get('loss', float('nan')):.3f}, accuracy "
                f"{metrics.get('accuracy', float('nan')):.3f}, "
                f"{metrics.get('pairs_per_s', 0.0):.1f} pairs/s"
            )
            if "val_accuracy" in metrics:
                line += f"; validation accuracy {metrics['val_accuracy']:.3f}"
            log.info(line)


def _select(
    run: RunCheckpoints, select: str, has_validation: bool
) -> tuple[ray.train.Checkpoint, dict[str, Any]]:
    """The checkpoint to keep: the ``last``, or the kept one of the best validation accuracy
    (the later wins a tie)."""
    if select == "last" or not has_validation:
        return run.last, run.last_metrics
    ranked = enumerate(run.kept)
    return max(ranked, key=lambda icm: (icm[1][1]["val_accuracy"], icm[0]))[1]
