"""`synpref loop run|resume|status`: the human-AI loop, committed step by step."""

from __future__ import annotations

from typing import Any

import click

from ray_jobs.job import (
    emit,
    global_options,
    job_command,
    json_option,
    main,
    resolve_config,
    run_and_emit,
    user_errors,
)


@click.group("loop")
def command() -> None:
    """The human-AI loop (config section `loop`): Stage 1 with people and LLM judges, Stage 2
    with two reward models, the curated set and the final reward models (docs/loop.md)."""


@job_command("run")
def run(ctx: click.Context, as_json: bool, **options: Any) -> None:
    """Start the loop, or go on from the first step not committed. It stops with status
    `waiting` when it needs people's answers (`synpref review pull`, then run it again)."""
    run_and_emit(ctx, as_json, options, "loop")


@job_command("resume")
def resume(ctx: click.Context, as_json: bool, **options: Any) -> None:
    """Go on with a started loop (after a crash, or once people answered)."""
    run_and_emit(ctx, as_json, options, "loop", True)


@click.command("status")
@global_options
@json_option
@click.pass_context
def status(ctx: click.Context, as_json: bool, **options: Any) -> None:
    """Steps done, the next step, the pools, and the review tasks still open."""
    from pipelines.loop.driver import loop_status

    config = resolve_config(ctx, **options)
    with user_errors():
        found = loop_status(config)
    emit(found.as_dict(), found.text(), as_json)


command.add_command(run)
command.add_command(resume)
command.add_command(status)

if __name__ == "__main__":
    main(command)
