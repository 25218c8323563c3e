"""`synpref demo`: the platform's main job on the embedded defaults (see pipelines/demo.py)."""

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


@click.command("demo")
@global_options
@json_option
@click.pass_context
def command(ctx: click.Context, as_json: bool, **options: Any) -> None:
    """Run the main job on the embedded defaults: generate, ingest, dedup, decontaminate."""
    from pipelines import jobs

    config = resolve_config(ctx, **options)
    with user_errors():
        result = jobs.demo(config)
    emit_result(result, as_json)


if __name__ == "__main__":
    configure_logging()
    command()
