"""`synpref train`: train a Bradley-Terry reward model on a lake selection with Ray Train."""

from __future__ import annotations

from typing import Any

import click

from ray_jobs.job import (
    emit_result,
    job_command,
    main,
    resolve_config,
    user_errors,
)


@job_command("train")
@click.option("--name", help="Run name; re-running a name resumes it (default: config hash).")
@click.option("--backbone", help="HF id or folder of the backbone (training.backbone).")
@click.option("--where", help="SQL predicate selecting the training pairs (training.data.where).")
@click.option("--validation-where", help="SQL predicate selecting the validation (gold) pairs.")
@click.option("--set", "set_", help="Curated set NAME[@VERSION] to train on (training.data.set).")
@click.option("--validation-set", help="Curated set NAME[@VERSION] of validation (gold) pairs.")
@click.option(
    "--workers", type=int, help="Ray Train workers (training.workers; 0: in this process)."
)
def command(
    ctx: click.Context,
    name: str | None,
    backbone: str | None,
    where: str | None,
    validation_where: str | None,
    set_: str | None,
    validation_set: str | None,
    workers: int | None,
    as_json: bool,
    **options: Any,
) -> None:
    """Train a reward model on lake pairs (Ray Train), log it to MLflow and register it."""
    from pipelines import jobs

    config = resolve_config(ctx, **options)
    training, data = config.training, config.training.data
    data = data.model_copy(
        update={
            "where": where or data.where,
            "validation_where": validation_where or data.validation_where,
            "set": set_ or data.set,
            "validation_set": validation_set or data.validation_set,
        }
    )
    training = training.model_copy(
        update={
            "backbone": backbone or training.backbone,
            "workers": training.workers if workers is None else workers,
            "data": data,
        }
    )
    with user_errors():
        result = jobs.train(config.model_copy(update={"training": training}), name)
    emit_result(result, as_json)


if __name__ == "__main__":
    main(command)
