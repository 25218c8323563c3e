"""Reward-model scoring on Ray Data: one model per actor, conversations in, rewards out; a
small set is scored in the job's own process by the same scorer (``on_driver_max``).

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
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from matplotlib.figure import Figure

from pipelines.core import reporting
from pipelines.core.actor_pool import check_cpus, missing_rows, on_pool, run_on_pairs
from pipelines.core.config import ScoringConfig
from pipelines.core.jobs import PairsSummary, TableVersion, versions
from pipelines.core.lake import Lake
from pipelines.core.selection import select_pair_keys
from pipelines.core.sql import literal
from pipelines.core.text import Message
from pipelines.rm.model import model_version
from pipelines.rm.scorers import ConversationScorer, PairScorer
from storage_schemas import PAIRS, RM_SCORES

log = logging.getLogger(__name__)


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
    """Rewards of ``conversations`` (in order) from ``config.actors`` Ray Data actors, or from
    this process for a small set (``on_driver_max``)."""
    started = time.perf_counter()
    table = pa.table(
        {"index": np.arange(len(conversations)), "conversation": [list(c) for c in conversations]}
    )
    if config.in_process(len(conversations)):
        result = ConversationScorer(model, config)(table)
    else:
        check_cpus({"scoring": config})
        scored = on_pool(ray.data.from_arrow(table), ConversationScorer, (model, config), config)
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


@dataclass(frozen=True)
class ScoreSummary(PairsSummary):
    job: ClassVar[str] = "score"
    model_name: str
    model_version: str
    run_id: str
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

    def tables_written(self) -> list[TableVersion]:
        return versions((RM_SCORES, self.rm_scores_version))

    def tags(self) -> dict[str, str]:
        return {"synpref.model_version": self.model_version}

    def metrics(self) -> dict[str, float]:
        metrics = {
            "pairs_selected": self.selected,
            "pairs_scored": self.scored,
            "pairs_already_scored": self.already_scored,
            "pairs_truncated": self.truncated,
            "tokens": self.tokens,
            "pairs_per_s": self.scored / self.seconds if self.seconds else 0.0,
        }
        return metrics | ({"chosen_wins": self.accuracy} if self.accuracy is not None else {})

    def figures(self, lake: Lake) -> dict[str, Figure]:
        if not self.scored:
            return {}
        rows = lake.read(
            RM_SCORES.name,
            columns=["r_chosen", "r_rejected"],
            where=f"score_run_id = {literal(self.run_id)}",
        )
        margins = rows["r_chosen"].to_numpy() - rows["r_rejected"].to_numpy()
        return {"score_margins.png": reporting.margins(margins)}


PAIR_TEXT_COLUMNS = ["source", "pair_id", "history", "chosen", "rejected"]


def score_pairs(
    lake: Lake,
    model: str,
    config: ScoringConfig,
    run_id: str,
    where: str | None = None,
    model_name: str | None = None,
) -> ScoreSummary:
    """Score the pairs matching ``where`` (SQL over ``pairs``) that ``model`` has not scored."""
    started = time.perf_counter()
    name, version = model_name or model, model_version(model)
    pairs_version = lake.version(PAIRS.name)
    selected = select_pair_keys(lake, pairs_version, where)
    mine = f"model_name = {literal(name)} AND model_version = {literal(version)}"
    missing = missing_rows(lake, RM_SCORES, selected, mine)
    log.info(
        f"[score] {selected.num_rows:,} pairs selected, {missing.num_rows:,} without a score "
        f"from {name} ({version})"
    )
    new, version_written = RM_SCORES.schema.empty_table(), None
    if missing.num_rows:
        stage = run_on_pairs(
            "score",
            lake,
            pairs_version,
            PAIR_TEXT_COLUMNS,
            missing,
            PairScorer,
            (model, name, version, config, run_id),
            ("scoring", config),
            RM_SCORES,
            lambda rows: lake.insert_new(RM_SCORES, rows).version,
            in_process=config.in_process(2 * missing.num_rows),  # a pair is two conversations
            every_pair=where is None and missing.num_rows == selected.num_rows,
        )
        new, version_written = stage.rows, stage.version
    seconds = time.perf_counter() - started
    log.info(f"[score] {new.num_rows:,} pairs scored and written in {seconds:.1f}s")
    scores = lake.read(RM_SCORES.name, columns=["source", "pair_id", "p"], where=mine)
    scored = scores.join(selected, ["source", "pair_id"], join_type="inner")
    accuracy = float(np.mean(scored["p"].to_numpy() > 0.5)) if scored.num_rows else None
    return ScoreSummary(
        model_name=name,
        model_version=version,
        run_id=run_id,
        pairs_version=pairs_version,
        selected=selected.num_rows,
        already_scored=selected.num_rows - missing.num_rows,
        scored=new.num_rows,
        truncated=int(pc.sum(new["truncated"]).as_py() or 0),
        tokens=int(pc.sum(new["tokens"]).as_py() or 0),
        seconds=seconds,
        rm_scores_version=version_written,
        accuracy=accuracy,
    )
