"""The loop's running context and the jobs its steps run: reward models trained on sets, pairs
scored and judged, each as a job of ``pipelines.jobs`` nested under the active MLflow run."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import mlflow
import pyarrow as pa
import pyarrow.compute as pc

from pipelines import jobs
from pipelines.core.config import SynprefConfig, TrainingDataConfig
from pipelines.core.lake import Lake
from pipelines.core.sql import literal
from pipelines.labels.sets import write_set
from pipelines.loop.pools import KEYS, keys_predicate
from pipelines.loop.state import LoopState
from storage_schemas import RM_SCORES, VERDICTS


@dataclass
class LoopRun:
    """A loop as it runs: its config, lake, committed steps, MLflow parent run and the pairs
    version it was started on."""

    config: SynprefConfig
    lake: Lake
    state: LoopState
    run_id: str
    pairs_version: int

    @property
    def name(self) -> str:
        return self.config.loop.name


def tag_step(run_id: str, loop: str, step: str) -> None:
    """Mark a job's run as the loop step it ran for."""
    client = mlflow.MlflowClient()
    client.set_tag(run_id, "synpref.loop", loop)
    client.set_tag(run_id, "synpref.loop.step", step)


def save_set(run: LoopRun, name: str, members: pa.Table) -> str:
    """Write a set of the loop (``<loop>/<name>``); returns ``NAME@VERSION``."""
    return str(write_set(run.lake, f"{run.name}/{name}", members))


def train_rm(
    run: LoopRun,
    step: str,
    train_set: str,
    validation_set: str | None = None,
    register: bool = False,
) -> dict[str, Any]:
    """A reward model on ``train_set`` selected on ``validation_set`` (without one: on
    ``loop.gold_validation_fraction`` of the training set), run name ``<loop>-<step>``."""
    config, name = run.config, f"{run.name}-{step.replace('/', '-')}"
    training = config.training
    data = TrainingDataConfig(
        name=name,
        set=train_set,
        validation_set=validation_set,
        validation_fraction=0.0 if validation_set else config.loop.gold_validation_fraction,
    )
    training = training.model_copy(
        update={"data": data, "register_as": training.register_as if register else None}
    )
    result = jobs.train(config.model_copy(update={"training": training}), name)
    tag_step(result.run_id, run.name, step)
    summary = result.summary
    return {
        "name": name,
        "model_folder": summary.model_folder,
        "model_uri": summary.model_uri,
        "run_id": result.run_id,
        "train_pairs": summary.train_pairs,
        "validation_pairs": summary.validation_pairs,
        "val_accuracy": summary.selected_metrics.get("val_accuracy"),
    }


def score(run: LoopRun, step: str, model: dict[str, Any], keys: pa.Table) -> dict[str, Any]:
    """Score ``keys`` with a trained model of the loop (only pairs it has not scored)."""
    result = jobs.score(run.config, model["model_folder"], model["name"], keys_predicate(keys))
    tag_step(result.run_id, run.name, step)
    return {"model_name": result.summary.model_name, "model_version": result.summary.model_version}


def p_of(run: LoopRun, scored: dict[str, Any], keys: pa.Table) -> pa.Table:
    """``keys`` with ``p``: the model's probability that ``chosen`` is better, σ(r_w - r_l)."""
    where = (
        f"model_name = {literal(scored['model_name'])} "
        f"AND model_version = {literal(scored['model_version'])}"
    )
    scores = run.lake.read(RM_SCORES.name, columns=[*KEYS, "p"], where=where)
    return (
        keys.select(KEYS)
        .join(scores, KEYS, join_type="inner")
        .sort_by([("pair_id", "ascending"), ("source", "ascending")])
    )


def judge(run: LoopRun, step: str, keys: pa.Table, gold_set: str) -> dict[str, Any]:
    """The panel's verdicts on ``keys`` (judges shown gold examples from ``gold_set``)."""
    judging = run.config.judging
    if any(j.few_shot for j in judging.judges):
        gold = judging.gold.model_copy(update={"where": None, "set": gold_set})
        judging = judging.model_copy(update={"gold": gold})
    config = run.config.model_copy(update={"judging": judging})
    result = jobs.judge(config, where=keys_predicate(keys))
    tag_step(result.run_id, run.name, step)
    return {"panel_key": result.summary.panel_key, "run_id": result.run_id}


def verdicts_of(run: LoopRun, panel_key: str, keys: pa.Table) -> pa.Table:
    """``keys`` with the panel's ``verdict``, ``confidence``, ``p_chosen`` and ``detail``."""
    where = f"level = 'panel' AND judge_key = {literal(panel_key)}"
    columns = [*KEYS, "verdict", "confidence", "p_chosen", "detail"]
    verdicts = run.lake.read(VERDICTS.name, columns=columns, where=where)
    return keys.select(KEYS).join(verdicts, KEYS, join_type="inner")


def oriented(p: pa.Table, labels: pa.Table) -> pa.Table:
    """``p`` turned towards each pair's current label: the probability the labelled winner
    wins (1 - p where the label is ``flip``)."""
    joined = p.join(labels.select([*KEYS, "label"]), KEYS, join_type="inner")
    flipped = pc.equal(joined["label"], "flip")
    towards = pc.if_else(flipped, pc.subtract(1.0, joined["p"]), joined["p"])
    return joined.append_column("p_label", towards)


def retrieval_k(p: float, max_k: int) -> int:
    """The paper's error-driven k: ``max_k`` when the RM gets the gold pair wrong (p <= 0.5),
    else ceil(max_k (1 - p)): the less sure the RM, the more similar pairs are checked."""
    return max_k if p <= 0.5 else math.ceil(max_k * (1 - p))
