"""Jobs on a Ray cluster through Ray's Job Submission API (the dashboard's HTTP endpoint):
the same ``python -m ray_jobs.<job>`` entry points KubeRay's RayJobs run, with a working
directory shipped to the cluster and the runtime environment of ``cluster/runtime_env.yaml``.
"""

from __future__ import annotations

import shlex
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from pipelines.core.errors import ConfigError

if TYPE_CHECKING:
    from ray.job_submission import JobDetails, JobSubmissionClient

ENTRY_POINTS = {
    "ingest": "ingest",
    "dedup": "dedup",
    "decontaminate": "decontaminate",
    "annotate": "annotate",
    "judge": "judge",
    "score": "score",
    "train": "train",
    "eval": "evaluate",
    "loop": "loop",
    "review": "review",
    "labels": "labels",
    "demo": "demo",
}
"""The jobs a cluster runs (a `synpref` command -> its module in ``ray_jobs``)."""

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
RUNTIME_ENV = Path("cluster") / "runtime_env.yaml"


def entrypoint(job: str, args: Sequence[str]) -> str:
    """The command the cluster runs for ``synpref JOB ARGS``."""
    if job not in ENTRY_POINTS:
        raise ConfigError(f"no job {job!r} to submit; jobs: {', '.join(sorted(ENTRY_POINTS))}")
    return shlex.join(["python", "-m", f"ray_jobs.{ENTRY_POINTS[job]}", *args])


def runtime_env(working_dir: Path, env_file: Path | None = None) -> dict[str, Any]:
    """``env_file`` (default: ``cluster/runtime_env.yaml`` of ``working_dir``, if there) with
    ``working_dir`` as the job's working directory; checked by Ray's own ``RuntimeEnv``."""
    from ray.runtime_env import RuntimeEnv

    if not working_dir.is_dir():
        raise ConfigError(f"working directory {working_dir} does not exist")
    path = env_file or working_dir / RUNTIME_ENV
    env: dict[str, Any] = {}
    if env_file is not None or path.is_file():
        try:
            env = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"runtime environment {path}: {exc}") from None
    if not isinstance(env, dict):
        raise ConfigError(f"runtime environment {path} must be a mapping, got {env!r}")
    unknown = sorted(set(env) - set(RuntimeEnv.known_fields))
    if unknown:  # Ray takes them for plugins; here they are typos
        raise ConfigError(
            f"runtime environment {path}: unknown fields {unknown}; Ray's fields: "
            f"{sorted(k for k in RuntimeEnv.known_fields if not k.startswith('_'))}"
        )
    env["working_dir"] = str(working_dir.resolve())
    try:
        RuntimeEnv(**env)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"runtime environment {path}: {exc}") from None
    return env


def client(address: str) -> JobSubmissionClient:
    """A client of the cluster whose dashboard is at ``address``."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"no Ray dashboard answers at {address}: {exc}") from None


def submit(
    address: str,
    job: str,
    args: Sequence[str],
    working_dir: Path,
    env_file: Path | None = None,
    submission_id: str | None = None,
) -> str:
    """Submit ``synpref JOB ARGS`` to the cluster; returns the submission id."""
    command = entrypoint(job, args)
    env = runtime_env(working_dir, env_file)
    return client(address).submit_job(
        entrypoint=command, runtime_env=env, submission_id=submission_id
    )


def details(address: str, submission_id: str) -> JobDetails:
    """Status, message, entry point and times of one job."""
    try:
        return client(address).get_job_info(submission_id)
    except RuntimeError as exc:
        raise ConfigError(f"job {submission_id}: {exc}") from None


async def follow(address: str, submission_id: str) -> AsyncIterator[str]:
    """The job's log as it is written, until the job ends."""
    async for chunk in client(address).tail_job_logs(submission_id):
        yield chunk
