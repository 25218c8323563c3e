"""One way to run any job: an MLflow run (nested under the active run, so a loop iteration can
be a parent), the Ray connection, and the same record for every job.

A job's work returns a ``JobSummary``; the summary knows what the job read and wrote (Delta
tables at their versions, input files), its metrics, tags and plots. ``run_job`` logs all of
that the same way for every job and returns a ``JobResult``: the typed summary and where a
person finds the run and the Ray dashboard.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import mlflow

from pipelines.core.config import SynprefConfig
from pipelines.core.lake import Lake
from pipelines.core.ray_cluster import check_paths_outlive_the_job, connect
from pipelines.core.tracking import job_run, log_delta_table, log_input_file, run_location
from storage_schemas import PAIRS, TableSpec

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class TableVersion:
    """A Delta table of the lake at one version."""

    name: str
    version: int


@dataclass(frozen=True)
class InputFile:
    """A file a job read, with its content hash (and tags such as its format)."""

    path: str
    sha256: str
    tags: Mapping[str, str] = dataclasses.field(default_factory=dict)


class JobSummary:
    """What a job did. Subclasses are dataclasses; each overrides what it has."""

    job: ClassVar[str]
    """The job's name: the ``synpref.job`` tag and the prefix of its summary artifact."""

    def tables_read(self) -> list[TableVersion]:
        return []

    def tables_written(self) -> list[TableVersion]:
        """Tables the job changed (a table it left as it was is not an output)."""
        return []

    def input_files(self) -> list[InputFile]:
        return []

    def metrics(self) -> dict[str, float]:
        return {}

    def tags(self) -> dict[str, str]:
        return {}

    def figures(self, lake: Lake) -> dict[str, Figure]:
        """Plots by artifact path, drawn by ``pipelines.core.reporting``."""
        return {}

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def text(self) -> str:
        raise NotImplementedError


class PairsSummary(JobSummary):
    """A job over the lake's pairs at one version: it reads ``pairs`` at ``pairs_version``."""

    pairs_version: int

    def tables_read(self) -> list[TableVersion]:
        return [TableVersion(PAIRS.name, self.pairs_version)]


Summary = TypeVar("Summary", bound=JobSummary)


@dataclass(frozen=True)
class JobContext:
    """What a job's work gets: the config, the lake and its MLflow run id."""

    config: SynprefConfig
    lake: Lake
    run_id: str


@dataclass(frozen=True)
class JobResult(Generic[Summary]):
    """A finished job: its summary and where a person finds its run and the Ray dashboard."""

    summary: Summary
    run_id: str
    mlflow_run: str
    ray_dashboard: str | None

    def as_dict(self) -> dict[str, Any]:
        return self.summary.as_dict() | {
            "run_id": self.run_id,
            "mlflow_run": self.mlflow_run,
            "ray_dashboard": self.ray_dashboard,
        }

    def text(self) -> str:
        lines = [self.summary.text(), f"MLflow: {self.mlflow_run}"]
        if self.ray_dashboard:
            lines.append(f"Ray dashboard: {self.ray_dashboard}")
        return "\n".join(lines)


def run_job(
    config: SynprefConfig,
    job: str,
    work: Callable[[JobContext], Summary],
    params: Mapping[str, Any] | None = None,
    run_name: str | None = None,
    uses_ray: bool = True,
    resume_run_id: str | None = None,
) -> JobResult[Summary]:
    """Run ``work`` as the MLflow run of ``job`` (or in run ``resume_run_id`` again) and record
    its summary."""
    check_paths_outlive_the_job(config, job)
    lake = Lake(config.lake.root, config.lake.storage_options)
    dashboard = connect(config.ray) if uses_ray else None
    with job_run(config, job, params, run_name, resume_run_id) as run:
        summary = work(JobContext(config, lake, run.info.run_id))
        record(summary, lake)
    return JobResult(summary, run.info.run_id, run_location(run, config.tracking), dashboard)


def record(summary: JobSummary, lake: Lake) -> None:
    """Log a summary to the active run: tables, files, metrics, tags, the summary, plots.
    (A job's work logs anything else itself, inside the run: examples, per-item files.)"""
    for table in summary.tables_read():
        log_delta_table(lake, table.name, table.version, context="input")
    for table in summary.tables_written():
        log_delta_table(lake, table.name, table.version, context="output")
    for file in summary.input_files():
        log_input_file(file.path, file.sha256, **file.tags)
    if metrics := summary.metrics():
        mlflow.log_metrics(metrics)
    if tags := summary.tags():
        mlflow.set_tags(tags)
    mlflow.log_dict(summary.as_dict(), f"{summary.job}_summary.json")
    for path, figure in summary.figures(lake).items():
        mlflow.log_figure(figure, path)


def versions(*tables: tuple[TableSpec, int | None]) -> list[TableVersion]:
    """``TableVersion``s of the (table, version) pairs that have a version (``None``: the job
    did not read or change that table)."""
    return [TableVersion(spec.name, v) for spec, v in tables if v is not None]
