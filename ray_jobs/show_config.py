"""`synpref config`: the effective configuration, every field with its documentation."""

from __future__ import annotations

from typing import Any

import click

from pipelines.core.config import describe, masked
from ray_jobs.job import emit, job_command, resolve_config


@job_command("config")
def command(ctx: click.Context, as_json: bool, **options: Any) -> None:
    """Show the effective configuration (file, environment, flags), each field documented."""
    config = resolve_config(ctx, **options)
    emit(masked(config.model_dump(mode="json")), "\n".join(describe(config)), as_json)
