"""What every job command shares: the global options, config resolution and summary output."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from pipelines.config import ConfigError, SynprefConfig, TrackingConfig, load_config
from pipelines.tracking import run_location

GLOBAL_OPTIONS = ("config_path", "lake", "tracking_uri", "ray_address")


def global_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add --config/--lake/--tracking-uri/--ray-address (accepted before or after COMMAND)."""
    for option in reversed(
        [
            click.option(
                "--config",
                "config_path",
                type=click.Path(dir_okay=False),
                help="YAML config (default: configs/local.yaml).",
            ),
            click.option("--lake", help="Lake root: a path or s3://bucket/prefix."),
            click.option("--tracking-uri", help="MLflow tracking URI."),
            click.option("--ray-address", help="Ray cluster address (default: local Ray)."),
        ]
    ):
        command = option(command)
    return command


def json_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--json", "as_json", is_flag=True, help="Print the summary as one JSON object on stdout."
    )(command)


def resolve_config(ctx: click.Context, **options: Any) -> SynprefConfig:
    """The config from the file, the environment, then flags (command flags over group flags)."""
    given = dict((ctx.obj or {}) if isinstance(ctx.obj, dict) else {})
    given |= {k: v for k, v in options.items() if k in GLOBAL_OPTIONS and v is not None}
    overrides: dict[str, Any] = {}
    if given.get("lake"):
        overrides["lake"] = {"root": given["lake"]}
    if given.get("tracking_uri"):
        overrides["tracking"] = {"uri": given["tracking_uri"]}
    if given.get("ray_address"):
        overrides["ray"] = {"address": given["ray_address"]}
    try:
        return load_config(given.get("config_path"), overrides)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def progress(message: str) -> None:
    """A progress line for people; on stderr so that --json keeps stdout clean."""
    click.echo(message, err=True)


def job_result(
    summary: dict[str, Any], text: str, run: Any, tracking: TrackingConfig, dashboard: str | None
) -> dict[str, Any]:
    """A job's summary plus where a person finds its MLflow run and the Ray dashboard."""
    return summary | {
        "run_id": run.info.run_id,
        "text": text,
        "mlflow_run": run_location(run, tracking),
        "ray_dashboard": dashboard,
    }


def emit_job_result(result: dict[str, Any], as_json: bool) -> None:
    """End a job command with its summary and the MLflow run (or all of it as JSON)."""
    text = "\n".join([result.pop("text"), f"MLflow: {result['mlflow_run']}"])
    emit(result, text, as_json)


def emit(summary: dict[str, Any], text: str, as_json: bool) -> None:
    """End a command: the human summary, or the same summary as one JSON object."""
    if as_json:
        click.echo(json.dumps(summary, default=str, sort_keys=True))
    else:
        click.echo(text)


def configure_logging() -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("ray", "mlflow", "alembic", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
