"""Reward-model scoring on Ray Data: one model per actor, conversations in, rewards out.

The same ``RewardModel`` (and so the same chat formatting) as training and serving. Used by
``synpref eval --model`` for benchmark conversations and by ``synpref score`` for lake pairs,
which writes ``rm_scores`` incrementally: only pairs without a score from this model name and
version are scored, and the merge is idempotent, so a re-run after a crash adds what is missing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from deltalake.exceptions import DeltaError

from pipelines.core.config import ScoringConfig
from pipelines.core.lake import Lake
from pipelines.ingest.formats import Message
from pipelines.rm.model import RewardModel, model_version, pair_conversations, sigmoid
from storage_schemas import PAIRS, RM_SCORES

log = logging.getLogger(__name__)


def load_model(model: str, config: ScoringConfig) -> RewardModel:
    return RewardModel(
        model,
        max_length=config.max_length,
        batch_tokens=config.batch_tokens,
        device="cuda" if config.num_gpus > 0 else "cpu",
    )


def _actor_pool(config: ScoringConfig) -> dict[str, Any]:
    """``map_batches`` options of the scoring actor pool: one model per actor."""
    return {
        "batch_format": "pyarrow",
        "batch_size": config.batch_size,
        "compute": ray.data.ActorPoolStrategy(size=config.actors),
        "num_cpus": config.num_cpus,
        "num_gpus": config.num_gpus or None,
    }


class ConversationScorer:
    """Ray Data actor: loads the model once, scores the ``conversation`` column of a batch."""

    def __init__(self, model: str, config: ScoringConfig) -> None:
        self.model = load_model(model, config)

    def __call__(self, batch: pa.Table) -> pa.Table:
        scores = self.model.score(batch["conversation"].to_pylist())
        return pa.table(
            {
                "index": batch["index"],
                "reward": pa.array(scores.rewards, pa.float64()),
                "tokens": pa.array(scores.tokens, pa.int64()),
                "truncated": pa.array(scores.truncated, pa.bool_()),
            }
        )


@dataclass(frozen=True)
class ScoringRun:
    rewards: np.ndarray
    tokens: int
    truncated: int
    seconds: float

    @property
    def per_second(self) -> float:
        return len(self.rewards) / self.seconds if self.seconds else 0.0


def score_conversations(
    conversations: Sequence[Sequence[Message]],
    model: str,
    config: ScoringConfig,
) -> ScoringRun:
    """Rewards of ``conversations`` (in order) from ``config.actors`` Ray Data actors."""
    started = time.perf_counter()
    table = pa.table(
        {"index": np.arange(len(conversations)), "conversation": [list(c) for c in conversations]}
    )
    scored = ray.data.from_arrow(table).map_batches(
        ConversationScorer,
        fn_constructor_kwargs={"model": model, "config": config},
        **_actor_pool(config),
    )
    result = pa.concat_tables(ray.get(scored.to_arrow_refs())).sort_by("index")
    if result.num_rows != len(conversations):
        raise RuntimeError(f"scored {result.num_rows} of {len(conversations)} conversations")
    run = ScoringRun(
        rewards=result["reward"].to_numpy(),
        tokens=int(np.sum(result["tokens"].to_numpy())),
        truncated=int(np.sum(result["truncated"].to_numpy(zero_copy_only=False))),
        seconds=time.perf_counter() - started,
    )
    log.info(
        f"[score] {len(conversations):,} conversations with {model} in {run.seconds:.1f}s "
        f"({run.per_second:,.1f}/s, {run.tokens:,} tokens, {run.truncated:,} truncated)"
    )
    return run


class PairScorer:
    """Ray Data actor: pairs (history, chosen, rejected) -> ``rm_scores`` rows."""

    def __init__(self, model: str, name: str, version: str, config: ScoringConfig, run_id: str):
        self.model = load_model(model, config)
        self.name, self.version, self.run_id = name, version, run_id

    def __call__(self, batch: pa.Table) -> pa.Table:
        conversations = pair_conversations(
            batch["history"].to_pylist(), batch["chosen"].to_pylist(), batch["rejected"].to_pylist()
        )
        scores = self.model.score(conversations)
        n = batch.num_rows
        chosen, rejected = scores.rewards[:n], scores.rewards[n:]
        return pa.table(
            {
                "model_name": pa.array([self.name] * n, pa.string()),
                "model_version": pa.array([self.version] * n, pa.string()),
                "source": batch["source"],
                "pair_id": batch["pair_id"],
                "r_chosen": pa.array(chosen, pa.float64()),
                "r_rejected": pa.array(rejected, pa.float64()),
                "p": pa.array(sigmoid(chosen - rejected), pa.float64()),
                "tokens": pa.array(scores.tokens[:n] + scores.tokens[n:], pa.int64()),
                "truncated": pa.array(scores.truncated[:n] | scores.truncated[n:], pa.bool_()),
                "score_run_id": pa.array([self.run_id] * n, pa.string()),
                "scored_at": pa.array([datetime.now(UTC)] * n, pa.timestamp("us", tz="UTC")),
            },
            schema=RM_SCORES.schema,
        )


@dataclass(frozen=True)
class PairScoring:
    model_name: str
    model_version: str
    pairs_version: int
    selected: int
    already_scored: int
    scored: int
    truncated: int
    tokens: int
    seconds: float
    rm_scores_version: int | None
    accuracy: float | None
    """Share of all selected pairs whose chosen response scores higher (agreement with labels)."""

    def text(self) -> str:
        rate = self.scored / self.seconds if self.seconds else 0.0
        lines = [
            f"scored {self.scored:,} of {self.selected:,} selected pairs with "
            f"{self.model_name} ({self.model_version}) in {self.seconds:.1f}s ({rate:,.1f}/s)",
            f"  already scored    {self.already_scored:>10,}",
            f"  truncated         {self.truncated:>10,}",
        ]
        if self.accuracy is not None:
            lines.append(f"  chosen > rejected {100 * self.accuracy:>9.1f}%")
        return "\n".join(lines)


def score_pairs(
    lake: Lake,
    model: str,
    config: ScoringConfig,
    run_id: str,
    where: str | None = None,
    model_name: str | None = None,
) -> PairScoring:
    """Score the pairs matching ``where`` (SQL over ``pairs``) that ``model`` has not scored."""
    started = time.perf_counter()
    name, version = model_name or model, model_version(model)
    pairs_version = lake.version(PAIRS.name)
    try:
        selected = lake.read(PAIRS.name, pairs_version, ["source", "pair_id"], where)
    except DeltaError as exc:
        raise ValueError(f"--where {where!r} is not a SQL predicate on pairs: {exc}") from None
    scored_filter = f"model_name = '{_sql(name)}' AND model_version = '{_sql(version)}'"
    if lake.exists(RM_SCORES.name):
        done = lake.read(RM_SCORES.name, columns=["source", "pair_id"], where=scored_filter)
        missing = selected.join(done, ["source", "pair_id"], join_type="left anti")
    else:
        missing = selected
    log.info(
        f"[score] {selected.num_rows:,} pairs selected, {missing.num_rows:,} without a score "
        f"from {name} ({version})"
    )
    result = None
    new = RM_SCORES.schema.empty_table()
    cpus = ray.cluster_resources().get("CPU", 0)
    if missing.num_rows and config.actors * config.num_cpus >= cpus:
        raise ValueError(
            f"scoring.actors x scoring.num_cpus = {config.actors * config.num_cpus:g} takes all "
            f"{cpus:g} CPUs: Ray Data could never schedule the reads of pairs. Use fewer actors "
            "or a fractional scoring.num_cpus (e.g. 0.5)."
        )
    if missing.num_rows:
        rows = lake.dataset(
            PAIRS.name,
            pairs_version,
            ["source", "pair_id", "history", "chosen", "rejected"],
            keys=None if where is None and missing.num_rows == selected.num_rows else missing,
        ).map_batches(
            PairScorer,
            fn_constructor_args=(model, name, version, config, run_id),
            **_actor_pool(config),
        )
        new = pa.concat_tables([t for t in ray.get(rows.to_arrow_refs()) if t.num_rows])
        result = lake.insert_new(RM_SCORES, new)
    seconds = time.perf_counter() - started
    log.info(f"[score] {new.num_rows:,} pairs scored and written in {seconds:.1f}s")
    scores = lake.read(RM_SCORES.name, columns=["source", "pair_id", "p"], where=scored_filter)
    mine = scores.join(selected, ["source", "pair_id"], join_type="inner")
    accuracy = float(np.mean(mine["p"].to_numpy() > 0.5)) if mine.num_rows else None
    return PairScoring(
        model_name=name,
        model_version=version,
        pairs_version=pairs_version,
        selected=selected.num_rows,
        already_scored=selected.num_rows - missing.num_rows,
        scored=new.num_rows,
        truncated=int(pc.sum(new["truncated"]).as_py() or 0),
        tokens=int(pc.sum(new["tokens"]).as_py() or 0),
        seconds=seconds,
        rm_scores_version=result.version if result else None,
        accuracy=accuracy,
    )


def _sql(value: str) -> str:
    return value.replace("'", "''")
