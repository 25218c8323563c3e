"""`synpref train`: train a Bradley-Terry reward model on a lake selection with Ray Train."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import click
import mlflow
from matplotlib.figure import Figure

from pipelines.core.config import SynprefConfig, TrainingConfig
from pipelines.core.lake import Lake
from pipelines.core.ray_cluster import connect
from pipelines.core.tracking import absolute_uri, job_run, log_delta_table
from pipelines.rm.model import model_version
from pipelines.rm.registry import MODEL_VERSION_TAG, log_reward_model, registered_version
from pipelines.rm.training import train_reward_model
from ray_jobs.job import (
    configure_logging,
    emit_job_result,
    global_options,
    job_result,
    json_option,
    progress,
    resolve_config,
)

CURVES = ("loss", "accuracy", "val_accuracy", "val_loss")


def run_name(lake: Lake, training: TrainingConfig) -> str:
    """The default run name: a fingerprint of the training config and the selected table version,
    so re-running the same job resumes it and changing either starts a new one."""
    data = training.data
    version = data.version
    if version is None and lake.exists(data.table):
        version = lake.version(data.table)
    identity = json.dumps([training.model_dump(), version], sort_keys=True, default=str)
    return f"rm-{data.name}-{hashlib.blake2b(identity.encode(), digest_size=5).hexdigest()}"


def run_train(
    config: SynprefConfig, name: str | None = None, report: Callable[[str], None] = progress
) -> dict[str, Any]:
    lake = Lake(config.lake.root, config.lake.storage_options)
    dashboard = connect(config.ray)
    training = config.training
    name = name or run_name(lake, training)
    with job_run(config, "train", {"run_name": name}, run_name=name) as run:
        result = train_reward_model(
            lake, training, absolute_uri(config.tracking.uri), run.info.run_id, name, report
        )
        log_delta_table(lake, result.table, result.table_version, context="input")
        mlflow.set_tags({"synpref.training_set": training.data.name, "synpref.train_run": name})
        mlflow.log_metrics(
            {f"selected_{k}": v for k, v in result.selected_metrics.items()}
            | {"train_pairs": result.train_pairs, "validation_pairs": result.validation_pairs}
        )
        curves = _curves(run.info.run_id)
        if curves is not None:
            mlflow.log_figure(curves, "training_curves.png")
        tags = {
            "synpref.train_run": name,
            "synpref.step": str(result.selected_step),
            MODEL_VERSION_TAG: model_version(result.model_folder),
        }
        version = registered_version(training.register_as, tags) if training.register_as else None
        if version is None:
            info, version = log_reward_model(result.model_folder, training.register_as, tags)
            model_uri = info.model_uri
        else:
            model_uri = f"models:/{training.register_as}/{version}"
            report(f"[train] {model_uri} already holds this model: not registered again")
    summary = asdict(result) | {"model_uri": model_uri, "registered_version": version}
    text = result.text() + (f"\nregistered: {training.register_as} v{version}" if version else "")
    return job_result(summary, text, run, config.tracking, dashboard)


def _curves(run_id: str) -> Figure | None:
    """Training loss and accuracy per step, with validation, from the run's metrics (``None``
    when this run trained nothing: a finished run re-run)."""
    client = mlflow.MlflowClient()
    histories = {key: client.get_metric_history(run_id, key) for key in CURVES}
    if not histories["loss"]:
        return None
    figure = Figure(figsize=(10, 4))
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    for key, history in histories.items():
        points = sorted((m.step, m.value) for m in history)
        axes = loss_axes if key.endswith("loss") else accuracy_axes
        axes.plot([s for s, _ in points], [v for _, v in points], label=key)
    loss_axes.set(xlabel="step", ylabel="loss", title="Bradley-Terry loss")
    accuracy_axes.set(xlabel="step", ylabel="accuracy", title="chosen ranked above rejected")
    for axes in (loss_axes, accuracy_axes):
        axes.legend()
    figure.tight_layout()
    return figure


@click.command("train")
@click.option("--name", help="Run name; re-running a name resumes it (default: config hash).")
@click.option("--backbone", help="HF id or folder of the backbone (training.backbone).")
@click.option("--where", help="SQL predicate selecting the training pairs (training.data.where).")
@click.option("--validation-where", help="SQL predicate selecting the validation (gold) pairs.")
@click.option("--workers", type=int, help="Ray Train workers (training.workers).")
@global_options
@json_option
@click.pass_context
def command(
    ctx: click.Context,
    name: str | None,
    backbone: str | None,
    where: str | None,
    validation_where: str | None,
    workers: int | None,
    as_json: bool,
    **options: Any,
) -> None:
    """Train a reward model on lake pairs (Ray Train), log it to MLflow and register it."""
    config = resolve_config(ctx, **options)
    training = config.training
    training.backbone = backbone or training.backbone
    training.workers = workers or training.workers
    training.data.where = where or training.data.where
    training.data.validation_where = validation_where or training.data.validation_where
    try:
        result = run_train(config, name)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    emit_job_result(result, as_json)


if __name__ == "__main__":
    configure_logging()
    command()
