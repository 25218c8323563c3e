"""`synpref annotate`: the attributes 5-tuple of lake pairs, written by an LLM, validated."""

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


@click.command("annotate")
@click.option("--where", help="SQL predicate selecting pairs, e.g. \"source = 'hh'\".")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    help="Annotate only this many selected pairs (smallest pair_id first).",
)
@global_options
@json_option
@click.pass_context
def command(
    ctx: click.Context, where: str | None, limit: int | None, as_json: bool, **options: Any
) -> None:
    """Label pairs with their attributes (task category, objectivity, controversiality, desired
    attributes, guideline) into `attributes`; only pairs this annotator has not labelled."""
    from pipelines import jobs

    config = resolve_config(ctx, **options)
    with user_errors():
        result = jobs.annotate(config, where, limit)
    emit_result(result, as_json)


if __name__ == "__main__":
    configure_logging()
    command()
