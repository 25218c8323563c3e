"""Reward-model scoring on Ray Data: one model per actor, conversations in, rewards out.

The same ``RewardModel`` (and so the same chat formatting) as training and serving. Used by
``synpref eval --model`` for benchmark conversations and by batch scoring of lake pairs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray

from pipelines.config import ScoringConfig
from pipelines.preference_formats import Message
from pipelines.reward_model import RewardModel


class ConversationScorer:
    """Ray Data actor: loads the model once, scores the ``conversation`` column of a batch."""

    def __init__(self, model: str, config: ScoringConfig) -> None:
        self.model = RewardModel(
            model,
            max_length=config.max_length,
            batch_tokens=config.batch_tokens,
            device="cuda" if config.num_gpus > 0 else "cpu",
        )

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
    progress: Callable[[str], None] = print,
) -> ScoringRun:
    """Rewards of ``conversations`` (in order) from ``config.actors`` Ray Data actors."""
    started = time.perf_counter()
    table = pa.table(
        {"index": np.arange(len(conversations)), "conversation": [list(c) for c in conversations]}
    )
    scored = ray.data.from_arrow(table).map_batches(
        ConversationScorer,
        fn_constructor_kwargs={"model": model, "config": config},
        batch_format="pyarrow",
        batch_size=config.batch_size,
        compute=ray.data.ActorPoolStrategy(size=config.actors),
        num_cpus=config.num_cpus,
        num_gpus=config.num_gpus or None,
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
    progress(
        f"[score] {len(conversations):,} conversations with {model} in {run.seconds:.1f}s "
        f"({run.per_second:,.1f}/s, {run.tokens:,} tokens, {run.truncated:,} truncated)"
    )
    return run
