"""`synpref submit JOB [ARGS]` and `synpref jobs list|status|logs|stop`: jobs on a Ray
cluster through Ray's Job Submission API, as `ray job submit` runs them, with this checkout as
the working directory and cluster/runtime_env.yaml (docs/operations.md)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import click

from pipelines.core.submission import DEFAULT_ADDRESS
from ray_jobs.job import emit, json_option, user_errors

address_option = click.option(
    "--address",
    envvar="RAY_ADDRESS",
    default=DEFAULT_ADDRESS,
    show_default=True,
    help="The cluster's dashboard (Ray's RAY_ADDRESS, as `ray job` reads it).",
)
ENDED = {"SUCCEEDED", "FAILED", "STOPPED"}


@click.command(
    "submit", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False}
)
@address_option
@click.option(
    "--working-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=".",
    show_default=True,
    help="Shipped to the cluster as the job's working directory (.gitignore'd files left out).",
)
@click.option(
    "--runtime-env",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Ray runtime environment YAML (default: cluster/runtime_env.yaml of the working dir).",
)
@click.option("--submission-id", help="The job's id (default: one Ray makes).")
@click.option("--no-wait", is_flag=True, help="Return once submitted; do not follow the log.")
@json_option
@click.argument("job")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def submit_command(
    address: str,
    working_dir: Path,
    runtime_env: Path | None,
    submission_id: str | None,
    no_wait: bool,
    as_json: bool,
    job: str,
    args: tuple[str, ...],
) -> None:
    """Run `synpref JOB ARGS` on the cluster: `python -m ray_jobs.JOB ARGS` as a Ray job.

    Its log follows on stderr until it ends (unless --no-wait); the exit status is 1 when the
    job did not succeed. Give the job a lake and tracking store every node reaches (s3:// and a
    tracking server: --config configs/cluster.yaml among ARGS).
    """
    from pipelines.core import submission

    started = time.monotonic()
    with user_errors():
        job_id = submission.submit(address, job, args, working_dir, runtime_env, submission_id)
    click.echo(f"[submit] {job_id} submitted to {address}", err=True)
    if not no_wait:
        asyncio.run(_stream(address, job_id))
    info = _wait_for_status(address, job_id, ENDED if not no_wait else None)
    status = str(info.status)
    text = f"job {job_id}: {status}" + (f" ({info.message})" if info.message else "")
    if not no_wait:
        text += f" after {time.monotonic() - started:.0f} s"
    emit(_as_dict(info), text, as_json)
    if not no_wait and status != "SUCCEEDED":
        raise click.exceptions.Exit(1)


async def _stream(address: str, job_id: str) -> None:
    from pipelines.core import submission

    async for chunk in submission.follow(address, job_id):
        click.echo(chunk, nl=False, err=True)


def _wait_for_status(address: str, job_id: str, statuses: set[str] | None) -> Any:
    """The job's details; with ``statuses``, once it has reached one of them (the log ends a
    moment before the status does)."""
    from pipelines.core import submission

    with user_errors():
        info = submission.details(address, job_id)
        while statuses and str(info.status) not in statuses:
            time.sleep(0.5)
            info = submission.details(address, job_id)
    return info


def _as_dict(info: Any) -> dict[str, Any]:
    return {
        "submission_id": info.submission_id,
        "status": str(info.status),
        "message": info.message,
        "entrypoint": info.entrypoint,
        "start_time": info.start_time,
        "end_time": info.end_time,
    }


@click.group("jobs")
def jobs_group() -> None:
    """The cluster's jobs: list them, see one's status or log, stop one."""


@jobs_group.command("list")
@address_option
@json_option
def list_command(address: str, as_json: bool) -> None:
    """Every job the cluster knows, newest first."""
    from pipelines.core import submission

    with user_errors():
        jobs = submission.client(address).list_jobs()
    jobs = sorted(jobs, key=lambda j: j.start_time or 0, reverse=True)
    lines = [f"{'submission id':<32}{'status':<11}entry point"]
    lines += [f"{j.submission_id or j.job_id:<32}{j.status!s:<11}{j.entrypoint}" for j in jobs]
    emit({"jobs": [_as_dict(j) for j in jobs]}, "\n".join(lines), as_json)


@jobs_group.command("status")
@address_option
@json_option
@click.argument("submission_id")
def status_command(address: str, as_json: bool, submission_id: str) -> None:
    """The status of job SUBMISSION_ID (and why, when it failed)."""
    info = _wait_for_status(address, submission_id, None)
    text = f"job {submission_id}: {info.status}" + (f" ({info.message})" if info.message else "")
    emit(_as_dict(info), text, as_json)


@jobs_group.command("logs")
@address_option
@click.option("--follow", is_flag=True, help="Go on printing until the job ends.")
@click.argument("submission_id")
def logs_command(address: str, follow: bool, submission_id: str) -> None:
    """The log of job SUBMISSION_ID."""
    from pipelines.core import submission

    if follow:
        asyncio.run(_stream(address, submission_id))
        return
    with user_errors():
        click.echo(submission.client(address).get_job_logs(submission_id), nl=False)


@jobs_group.command("stop")
@address_option
@click.argument("submission_id")
def stop_command(address: str, submission_id: str) -> None:
    """Stop job SUBMISSION_ID (SIGTERM to its driver, then SIGKILL after Ray's grace time)."""
    from pipelines.core import submission

    with user_errors():
        stopped = submission.client(address).stop_job(submission_id)
    click.echo(f"job {submission_id}: " + ("stopping" if stopped else "had already ended"))
