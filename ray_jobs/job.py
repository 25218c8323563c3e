"""What every job command shares: the global options, config resolution and summary output."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from pipelines.core.config import SynprefConfig, load_config
from pipelines.core.errors import SynprefError

if TYPE_CHECKING:
    from pipelines.core.jobs import JobResult

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


JSON_STDOUT = "synpref.json_stdout"


def json_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        callback=_stdout_for_json_only,
        help="Print the summary as one JSON object on stdout.",
    )(command)


def _stdout_for_json_only(ctx: click.Context, _: click.Parameter, as_json: bool) -> bool:
    """With --json, stdout carries the JSON summary and nothing else: until the command ends,
    whatever else is printed there (Ray relays its workers' and raylet's output to the driver's
    stdout) goes to stderr."""
    if as_json and JSON_STDOUT not in ctx.meta:
        ctx.meta[JSON_STDOUT] = sys.stdout
        ctx.with_resource(redirect_stdout(sys.stderr))
    return as_json


def resolve_config(ctx: click.Context, **options: Any) -> SynprefConfig:
    """The config from the file, the environment, then flags (command flags over group flags)."""
    given = dict(ctx.find_root().obj or {}) if isinstance(ctx.find_root().obj, dict) else {}
    given |= {k: v for k, v in options.items() if k in GLOBAL_OPTIONS and v is not None}
    overrides: dict[str, Any] = {}
    if given.get("lake"):
        overrides["lake"] = {"root": given["lake"]}
    if given.get("tracking_uri"):
        overrides["tracking"] = {"uri": given["tracking_uri"]}
    if given.get("ray_address"):
        overrides["ray"] = {"address": given["ray_address"]}
    with user_errors():
        return load_config(given.get("config_path"), overrides)


@contextmanager
def user_errors() -> Iterator[None]:
    """The library's errors about the user's input (a config field, a predicate, a file) as
    one-line messages instead of tracebacks."""
    try:
        yield
    except (SynprefError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None


def job_command(name: str) -> Callable[[Callable[..., Any]], click.Command]:
    """A synpref command: the global options, ``--json`` and the click context."""

    def wrap(function: Callable[..., Any]) -> click.Command:
        return click.command(name)(global_options(json_option(click.pass_context(function))))

    return wrap


def run_and_emit(
    ctx: click.Context, as_json: bool, options: dict[str, Any], job: str, *args: Any
) -> None:
    """Resolve the config, run ``pipelines.jobs.<job>(config, *args)``, print its summary."""
    from pipelines import jobs

    config = resolve_config(ctx, **options)
    with user_errors():
        result = getattr(jobs, job)(config, *args)
    emit_result(result, as_json)


def config_only_command(name: str, help: str) -> click.Command:
    """The command of a job that needs nothing but the config (``pipelines.jobs.<name>``)."""

    def command(ctx: click.Context, as_json: bool, **options: Any) -> None:
        run_and_emit(ctx, as_json, options, name)

    command.__doc__ = help
    return job_command(name)(command)


def pair_selection_command(name: str, help: str, limit_help: str) -> click.Command:
    """The command of an LLM job over a selection of pairs: ``--where``, ``--limit`` and
    ``--retry-rejected``."""

    def command(
        ctx: click.Context,
        where: str | None,
        limit: int | None,
        retry_rejected: bool,
        as_json: bool,
        **options: Any,
    ) -> None:
        run_and_emit(ctx, as_json, options, name, where, limit, retry_rejected)

    command.__doc__ = help
    command = click.option(
        "--retry-rejected",
        is_flag=True,
        help="Ask again the requests a server rejected for good (a 4xx such as 400 or 422); "
        "failed requests (timeouts, 5xx, 429) are always asked again.",
    )(command)
    command = click.option("--limit", type=click.IntRange(min=1), help=limit_help)(command)
    command = click.option(
        "--where", help="SQL predicate selecting pairs, e.g. \"source = 'hh'\"."
    )(command)
    return job_command(name)(command)


def emit_result(result: JobResult[Any], as_json: bool) -> None:
    """End a job command with its summary and its MLflow run (or all of it as JSON)."""
    emit(result.as_dict(), result.text(), as_json)


def emit(summary: dict[str, Any], text: str, as_json: bool) -> None:
    """End a command: the human summary, or the same summary as one JSON object (``--json``
    after the command name or before it, as a global flag)."""
    context = click.get_current_context(silent=True)
    root = context.find_root().obj if context is not None else None
    if as_json or (isinstance(root, dict) and root.get("as_json")):
        stdout = context.meta.get(JSON_STDOUT) if context is not None else None
        click.echo(json.dumps(summary, default=str, sort_keys=True), file=stdout)
    else:
        click.echo(text)


LOG_FILE_ENV = "SYNPREF_LOG_FILE"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(take_over_ray: bool = True) -> Path:
    """Console for people, a log file for the rest: our progress lines and everyone's warnings
    go to stderr; Ray's banners, Ray Data's execution plans and progress logs, and every
    library's INFO lines go to the log file (``synpref.log``, or ``$SYNPREF_LOG_FILE``). Of
    Ray's own records only errors reach the console (``take_over_ray``; the CLI does it when a
    command runs, so that ``--help`` need not import Ray)."""
    log_file = Path(os.environ.get(LOG_FILE_ENV, "synpref.log")).resolve()
    to_file = logging.FileHandler(log_file)
    to_file.setFormatter(logging.Formatter(LOG_FORMAT))
    to_console = logging.StreamHandler(sys.stderr)
    to_console.setFormatter(_ConsoleFormatter())
    to_console.addFilter(_for_people)
    logging.basicConfig(level=logging.INFO, handlers=[to_file, to_console], force=True)
    chatty_loggers = ("mlflow", "alembic", "urllib3", "filelock", "httpx", "httpx2", "transformers")
    for chatty in chatty_loggers:
        logging.getLogger(chatty).setLevel(logging.WARNING)
    if take_over_ray:
        take_over_ray_logging()
    return log_file


def main(command: click.Command) -> None:
    """Run ``command`` as a script (``python -m ray_jobs.<job>``, what a Ray job submits), with
    the logging the ``synpref`` CLI sets up."""
    configure_logging()
    command()


def take_over_ray_logging() -> None:
    """Ray's and Ray Data's loggers into ours (file, and errors on the console); Ray Data draws
    progress bars when stderr is a terminal. Nothing when ``configure_logging`` has not run
    (the CLI embedded in another program or a test keeps that program's logging)."""
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    if not files:
        return
    import ray.data  # sets up the "ray" and "ray.data" loggers, which we take over

    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    ray_logger = logging.getLogger("ray")  # ray.init clears its handlers: use the root's
    ray_logger.handlers.clear()
    ray_logger.propagate = True
    data_logger = logging.getLogger("ray.data")  # Ray Data keeps handlers of its own
    for handler in data_logger.handlers:
        if type(handler) is not logging.FileHandler and isinstance(handler, logging.StreamHandler):
            handler.setLevel(logging.ERROR)
    data_logger.addHandler(files[0])


class _ConsoleFormatter(logging.Formatter):
    """INFO lines as bare messages, like the progress lines; warnings and errors say so."""

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno == logging.INFO:
            return record.getMessage()
        return f"{record.levelname} {record.name}: {super().format(record)}"


def _for_people(record: logging.LogRecord) -> bool:
    """What the console shows: our own INFO lines, Ray's errors, other libraries' warnings."""
    if record.name == "ray" or record.name.startswith("ray."):
        return record.levelno >= logging.ERROR
    return record.levelno >= logging.WARNING or record.name.startswith(("pipelines", "ray_jobs"))
