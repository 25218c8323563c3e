"""The Ray Data actors that score with a reward model, and how they load it.

They live apart from the scoring job because an actor that unpickles a class imports its
module: the job's module (MLflow, matplotlib, Delta, Ray Data's planner) cost every scorer
actor about 4 s of CPU before it loaded its model. Serving's replicas load models here too.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pyarrow as pa

from pipelines.core.config import ScoringConfig
from pipelines.rm.model import RewardModel, pair_conversations, sigmoid
from storage_schemas import RM_SCORES


def load_model(model: str, config: ScoringConfig) -> RewardModel:
    return RewardModel(
        model,
        max_length=config.max_length,
        batch_tokens=config.batch_tokens,
        device="cuda" if config.num_gpus > 0 else "cpu",
    )


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
