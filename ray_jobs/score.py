"""`synpref score --model M`: score lake pairs with a reward model into `rm_scores`."""

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


@job_command("score")
@click.option("--model", required=True, help="Reward model: HF id or folder, or heuristic:length.")
@click.option("--model-name", help="Name in rm_scores (default: the --model value).")
@click.option("--where", help="SQL predicate selecting pairs, e.g. \"source = 'hh'\".")
def command(
    ctx: click.Context,
    model: str,
    model_name: str | None,
    where: str | None,
    as_json: bool,
    **options: Any,
) -> None:
    """Score pairs with a reward model (only those it has not scored) into `rm_scores`."""
    from pipelines import jobs

    config = resolve_config(ctx, **options)
    with user_errors():
        result = jobs.score(config, model, model_name, where)
    emit_result(result, as_json)


if __name__ == "__main__":
    main(command)
