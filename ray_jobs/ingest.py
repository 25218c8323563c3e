"""`synpref ingest PATH... --source NAME`: preference files into the lake, tracked in MLflow.

    ray job submit --working-dir . -- python -m ray_jobs.ingest --config configs/cluster.yaml \\
        s3://raw/skywork/ --source skywork-80k
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import click
import mlflow

from pipelines.core.config import SynprefConfig
from pipelines.core.lake import Lake
from pipelines.core.ray_cluster import connect
from pipelines.core.tracking import job_run, log_delta_table, log_input_file
from pipelines.ingest.formats import FORMATS, FormatError, parse_mapping
from pipelines.ingest.job import IngestRequest, IngestSummary, ingest
from ray_jobs.job import (
    configure_logging,
    emit_job_result,
    global_options,
    job_result,
    json_option,
    progress,
    resolve_config,
)
from storage_schemas import PAIRS, QUARANTINE


def run_ingest(
    config: SynprefConfig, request: IngestRequest, report: Callable[[str], None] = progress
) -> dict[str, Any]:
    """Ingest as one MLflow run; returns the summary with where to find the run and dashboard."""
    lake = Lake(config.lake.root, config.lake.storage_options)
    dashboard = connect(config.ray)
    with job_run(config, "ingest", {"request": asdict(request)}) as run:
        summary = ingest(request, lake, config.ingest, run.info.run_id, report)
        _track(summary, lake, config.ingest.quarantine_sample)
    return job_result(summary.as_dict(), summary.text(), run, config.tracking, dashboard)


def _track(summary: IngestSummary, lake: Lake, sample_size: int) -> None:
    for item in summary.inputs:
        log_input_file(item.path, item.sha256, format=item.format, size=str(item.size))
    for spec, version in ((PAIRS, summary.pairs_version), (QUARANTINE, summary.quarantine_version)):
        log_delta_table(lake, spec.name, version, context="output")
    mlflow.log_metrics(
        {
            "records_read": summary.records_read,
            "candidates": summary.candidates,
            "pairs_inserted": summary.pairs_inserted,
            "pairs_already_present": summary.pairs_already_present,
            "quarantined_inserted": summary.quarantined_inserted,
            "quarantined_already_present": summary.quarantined_already_present,
            "seconds": summary.seconds,
            **{f"quarantine.{r}": n for r, n in summary.quarantine_reasons.items()},
        }
    )
    mlflow.log_dict(summary.as_dict(), "ingest_summary.json")
    if sample_size and summary.quarantined:
        sample = lake.read(QUARANTINE.name, where=f"source = '{summary.source}'", limit=sample_size)
        mlflow.log_table(
            sample.drop_columns(["quarantined_at"]).to_pandas(), "quarantine_sample.json"
        )


@click.command("ingest")
@click.argument("paths", nargs=-1, required=True)
@click.option("--source", required=True, help="Source name (a partition of the pairs table).")
@click.option(
    "--format", "fmt", type=click.Choice(FORMATS), help="Record format (default: detect per file)."
)
@click.option(
    "--map",
    "mapping",
    multiple=True,
    metavar="TARGET=FIELD.PATH",
    help="Field paths for other layouts: history|prompt|chosen|rejected=a.b[0].c (repeat).",
)
@click.option("--benchmark", is_flag=True, help="Tag the source as a benchmark.")
@global_options
@json_option
@click.pass_context
def command(
    ctx: click.Context,
    paths: tuple[str, ...],
    source: str,
    fmt: str | None,
    mapping: tuple[str, ...],
    benchmark: bool,
    as_json: bool,
    **options: Any,
) -> None:
    """Ingest preference files (jsonl, jsonl.gz, json, parquet; local or s3://) into the lake."""
    config = resolve_config(ctx, **options)
    try:
        request = IngestRequest(
            paths=list(paths),
            source=source,
            format="mapping" if mapping and not fmt else fmt,
            mapping=parse_mapping(list(mapping)) if mapping else None,
            benchmark=benchmark,
        )
        result = run_ingest(config, request)
    except (FormatError, FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    emit_job_result(result, as_json)


if __name__ == "__main__":
    configure_logging()
    command()
