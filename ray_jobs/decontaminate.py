"""`synpref decontaminate`: flag corpus pairs that share n-grams with the benchmark sources."""

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


@click.command("decontaminate")
@global_options
@json_option
@click.pass_context
def command(ctx: click.Context, as_json: bool, **options: Any) -> None:
    """Flag corpus pairs sharing n-grams with benchmark prompts; write `contamination`."""
    from pipelines import jobs

    config = resolve_config(ctx, **options)
    with user_errors():
        result = jobs.decontaminate(config)
    emit_result(result, as_json)


if __name__ == "__main__":
    configure_logging()
    command()
