"""`synpref judge`: LLM judges on lake pairs into `judgments` and `verdicts`, quality to MLflow."""

from __future__ import annotations

from typing import Any

import click

from ray_jobs.job import (
    configure_logging,
    emit_result,
    global_options,
    json_option,
    resolve_config,
    user_errors,
)


@click.command("judge")
@click.option("--where", help="SQL predicate selecting pairs, e.g. \"source = 'hh'\".")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    help="Judge only this many of the selected pairs: those with the smallest pair_id (a fixed "
    "pseudo-random sample).",
)
@global_options
@json_option
@click.pass_context
def command(
    ctx: click.Context, where: str | None, limit: int | None, as_json: bool, **options: Any
) -> None:
    """Judge pairs with the configured LLM judges (both orders; only missing judgments) into
    `judgments`, and their verdicts into `verdicts`."""
    from pipelines import jobs

    config = resolve_config(ctx, **options)
    with user_errors():
        result = jobs.judge(config, where, limit)
    emit_result(result, as_json)


if __name__ == "__main__":
    configure_logging()
    command()
