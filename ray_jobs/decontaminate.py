"""`synpref decontaminate`: flag corpus pairs that share n-grams with the benchmark sources."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import click
import mlflow

from pipelines.core.config import SynprefConfig
from pipelines.core.lake import Lake
from pipelines.core.ray_cluster import connect
from pipelines.core.tracking import job_run, log_delta_table
from pipelines.hygiene.decontamination import decontaminate
from ray_jobs.job import (
    configure_logging,
    emit_job_result,
    global_options,
    job_result,
    json_option,
    progress,
    resolve_config,
)
from storage_schemas import CONTAMINATION, CURATION_STATUS, PAIRS


def run_decontaminate(
    config: SynprefConfig, report: Callable[[str], None] = progress
) -> dict[str, Any]:
    lake = Lake(config.lake.root, config.lake.storage_options)
    dashboard = connect(config.ray)
    with job_run(config, "decontaminate") as run:
        summary = decontaminate(lake, config.decontamination, run.info.run_id, report)
        log_delta_table(lake, PAIRS.name, summary.pairs_version, context="input")
        for spec, version in (
            (CONTAMINATION, summary.contamination_version),
            (CURATION_STATUS, summary.status_version),
        ):
            if version is not None:
                log_delta_table(lake, spec.name, version, context="output")
        mlflow.log_metrics(
            {
                "ngrams_indexed": summary.ngrams_indexed,
                "corpus_pairs": summary.corpus_pairs,
                **{f"contaminated.{s}": n for s, n in summary.contaminated_pairs.items()},
                **{f"contaminated_by.{b}": n for b, n in summary.by_benchmark.items()},
            }
        )
        mlflow.log_dict(asdict(summary), "decontamination_report.json")
    return job_result(asdict(summary), summary.text(), run, config.tracking, dashboard)


@click.command("decontaminate")
@global_options
@json_option
@click.pass_context
def command(ctx: click.Context, as_json: bool, **options: Any) -> None:
    """Flag corpus pairs sharing n-grams with benchmark prompts; write `contamination`."""
    result = run_decontaminate(resolve_config(ctx, **options))
    emit_job_result(result, as_json)


if __name__ == "__main__":
    configure_logging()
    command()
