"""MLflow tracking shared by every job: one run per job, inputs and outputs recorded exactly.

A run records the config (secrets masked) as params, each input file with its content hash and
each Delta table it read or wrote at its version (``mlflow.data`` with ``DeltaDatasetSource``),
so a lead can see what a curation iteration consumed and produced and time-travel to it.
"""

from __future__ import annotations

import json
import logging
import socket
import traceback
import warnings
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
import psutil
from filelock import FileLock
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.delta_dataset_source import DeltaDatasetSource
from mlflow.data.meta_dataset import MetaDataset

from pipelines.core.config import (
    SECRET_NAME,
    SynprefConfig,
    TrackingConfig,
    masked,
    without_url_credentials,
)
from pipelines.core.lake import Lake
from pipelines.core.sql import literal
from storage_schemas import SCHEMA_VERSION

log = logging.getLogger(__name__)

MAX_PARAM_CHARS = 6000
MAX_ERROR_TAG_CHARS = 4000


def ensure_experiment(tracking: TrackingConfig) -> str:
    """The id of the configured experiment, created if missing (with the configured artifact
    location for a local store; a tracking server's own otherwise).

    A new sqlite store is created under a file lock: two jobs starting at once would otherwise
    both run MLflow's schema migrations and can leave the store unusable."""
    mlflow.set_tracking_uri(tracking.uri)
    with _store_lock(tracking.uri):
        experiment = mlflow.get_experiment_by_name(tracking.experiment)
        if experiment is not None:
            return experiment.experiment_id
        # A tracking server keeps artifacts where it is configured to (its proxied store): a
        # location given here would send every client's artifacts to its own disk.
        location = None if is_tracking_server(tracking.uri) else tracking.artifact_location
        if location is not None and "://" not in location:
            location = Path(location).resolve().as_uri()
        try:
            return mlflow.create_experiment(tracking.experiment, artifact_location=location)
        except mlflow.exceptions.MlflowException:  # another process created it meanwhile
            experiment = mlflow.get_experiment_by_name(tracking.experiment)
            if experiment is None:
                raise
            return experiment.experiment_id


def is_tracking_server(uri: str) -> bool:
    """An MLflow server (HTTP), as opposed to a store this process writes itself."""
    return uri.split("://", 1)[0] in ("http", "https", "databricks")


def _store_lock(uri: str) -> AbstractContextManager[Any]:
    """A file lock beside a sqlite store (other stores serialise their own setup)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return nullcontext()
    return FileLock(f"{uri.removeprefix(prefix)}.lock", timeout=300)


@contextmanager
def job_run(
    config: SynprefConfig,
    job: str,
    params: Mapping[str, Any] | None = None,
    run_name: str | None = None,
    resume_run_id: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run for one job; nested under the active run when there is one (the loop).
    With ``resume_run_id``, that run is reopened (a resumed loop) and its params stand.

    ``run_name`` defaults to the job and the time. A job that fails ends its run as FAILED
    with the error as the ``synpref.error`` tag and the traceback as ``error.txt``."""
    experiment_id = ensure_experiment(config.tracking)
    nested = mlflow.active_run() is not None
    if not nested:
        close_dead_runs(experiment_id, reopening=resume_run_id)
    with mlflow.start_run(
        run_id=resume_run_id,
        experiment_id=experiment_id,
        run_name=None if resume_run_id else run_name or f"{job}-{datetime.now(UTC):%Y%m%d-%H%M%S}",
        nested=nested,
        tags={"synpref.job": job, "synpref.schema_version": str(SCHEMA_VERSION), **_process()},
    ) as run:
        try:
            if resume_run_id is None:
                flat = flatten({"config": config.model_dump(), **(params or {})})
                mlflow.log_params({k: _param_value(k, v) for k, v in flat.items()})
            yield run
        except BaseException as exc:
            _record_error(exc)
            raise


def _process() -> dict[str, str]:
    """Which process runs a job: its host, pid and the pid's start time (pids are reused)."""
    process = psutil.Process()
    return {
        "synpref.host": socket.gethostname(),
        "synpref.pid": str(process.pid),
        "synpref.pid_started": str(process.create_time()),
    }


def close_dead_runs(experiment_id: str, reopening: str | None = None) -> None:
    """Mark KILLED the runs of this host left RUNNING by a process that is gone (SIGKILL, out
    of memory, a power cut): nothing else would ever end them. Runs of other hosts are left
    alone, since their processes cannot be seen from here, and so is the run being reopened
    (a resumed loop)."""
    client = mlflow.MlflowClient()
    host = socket.gethostname()
    running = f"attributes.status = 'RUNNING' and tags.synpref.host = {literal(host)}"
    for run in client.search_runs([experiment_id], running, max_results=1000):
        pid, started = run.data.tags.get("synpref.pid"), run.data.tags.get("synpref.pid_started")
        if pid is None or run.info.run_id == reopening or _alive(int(pid), started):
            continue
        reason = f"its process (pid {pid} on {host}) ended without ending it"
        client.set_tag(run.info.run_id, "synpref.error", f"killed: {reason}")
        client.set_terminated(run.info.run_id, "KILLED")
        log.warning(f"[tracking] run {run.info.run_name} marked KILLED: {reason}")


def _alive(pid: int, started: str | None) -> bool:
    try:
        return str(psutil.Process(pid).create_time()) == started
    except psutil.Error:
        return False


def _record_error(exc: BaseException) -> None:
    """The error of a failed job on its run (URL credentials masked, nothing else)."""
    with suppress(Exception):
        message = without_url_credentials(f"{type(exc).__name__}: {exc}")
        mlflow.set_tag("synpref.error", message[:MAX_ERROR_TAG_CHARS])
        trace = "".join(traceback.format_exception(exc))
        mlflow.log_text(without_url_credentials(trace), "error.txt")


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = value
    return flat


def _param_value(key: str, value: Any) -> str:
    if SECRET_NAME.search(key.rsplit(".", 1)[-1]):
        return "***"
    value = masked(value)  # lists of sections (judges) hold secrets and URLs too
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."


def log_input_file(path: str, sha256: str, context: str = "input", **tags: str) -> None:
    """Record an input file with its content hash as an MLflow dataset input."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mlflow warns about resolving generic paths
        source = resolve_dataset_source(path)
    dataset = MetaDataset(source=source, name=Path(path).name, digest=sha256[:36])
    mlflow.log_input(dataset, context=context, tags=tags or None)


def log_delta_table(lake: Lake, name: str, version: int, context: str) -> None:
    """Record a Delta table at a version as an input (``context="input"``) or output of the run."""
    dataset = MetaDataset(
        source=DeltaDatasetSource(path=lake.uri(name), delta_table_version=version),
        name=name,
        digest=f"v{version}",
    )
    mlflow.log_input(dataset, context=context)
    mlflow.set_tag(f"synpref.{context}.{name}.version", str(version))


def absolute_uri(uri: str) -> str:
    """``uri`` usable from any process: a relative sqlite path is made absolute (Ray workers do
    not share the driver's working directory)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri.startswith(prefix + "/"):
        return uri
    return prefix + str(Path(uri.removeprefix(prefix)).resolve())


def run_location(run: mlflow.ActiveRun, tracking: TrackingConfig) -> str:
    """Where a person finds the run: its URL on a server, or the `mlflow ui` command for sqlite."""
    info = run.info
    if tracking.uri.startswith(("http://", "https://")):
        return f"{tracking.uri.rstrip('/')}/#/experiments/{info.experiment_id}/runs/{info.run_id}"
    return (
        f"run {info.run_id} in experiment '{tracking.experiment}' "
        f"(view: mlflow ui --backend-store-uri {tracking.uri})"
    )
