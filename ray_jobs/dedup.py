"""`synpref dedup`: pair-aware exact dedup and label-conflict detection over the lake's pairs."""

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


@click.command("dedup")
@global_options
@json_option
@click.pass_context
def command(ctx: click.Context, as_json: bool, **options: Any) -> None:
    """Find exact duplicate pairs and label conflicts (flips); write the decision tables."""
    from pipelines import jobs

    config = resolve_config(ctx, **options)
    with user_errors():
        result = jobs.dedup(config)
    emit_result(result, as_json)


if __name__ == "__main__":
    configure_logging()
    command()
