"""`synpref review push|pull`: human verification of pairs in Label Studio (docs/review.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ray_jobs.job import job_command, main, run_and_emit


@click.group("review")
def command() -> None:
    """Human verification in Label Studio: push pairs as pairwise tasks, pull the answers as
    human labels (server and project: the `review` config section)."""


@job_command("push")
@click.option("--where", help="SQL predicate selecting pairs, e.g. \"source = 'hh'\".")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    help="Push only this many of the selected pairs: those with the smallest pair_id (a fixed "
    "pseudo-random sample).",
)
@click.option(
    "--to-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the tasks as Label Studio's JSON import file instead (for annotators without "
    "access to our server); no server needed.",
)
def push(
    ctx: click.Context,
    where: str | None,
    limit: int | None,
    to_file: Path | None,
    as_json: bool,
    **options: Any,
) -> None:
    """Push the selected pairs to Label Studio as tasks (pairs already there are skipped)."""
    run_and_emit(ctx, as_json, options, "review_push", where, limit, to_file)


@job_command("pull")
@click.option(
    "--from-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Read a Label Studio JSON export file (e.g. a vendor's) instead of the server.",
)
def pull(ctx: click.Context, from_file: Path | None, as_json: bool, **options: Any) -> None:
    """Record the answers as human label events, rebuild `labels`, report agreement."""
    run_and_emit(ctx, as_json, options, "review_pull", from_file)


command.add_command(push)
command.add_command(pull)

if __name__ == "__main__":
    main(command)
