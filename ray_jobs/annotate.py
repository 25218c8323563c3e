"""`synpref annotate`: the attributes 5-tuple of lake pairs, written by an LLM, validated."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import click
import mlflow

from pipelines.attributes.job import annotate_pairs
from pipelines.core.config import SynprefConfig
from pipelines.core.lake import Lake
from pipelines.core.ray_cluster import connect
from pipelines.core.tracking import job_run, log_delta_table
from pipelines.judging.job import select_pairs
from ray_jobs.job import (
    configure_logging,
    emit_job_result,
    global_options,
    job_result,
    json_option,
    progress,
    resolve_config,
)
from storage_schemas import ATTRIBUTES, PAIRS


def run_annotate(
    config: SynprefConfig,
    where: str | None = None,
    limit: int | None = None,
    report: Callable[[str], None] = progress,
) -> dict[str, Any]:
    lake = Lake(config.lake.root, config.lake.storage_options)
    dashboard = connect(config.ray)
    judging = config.judging
    with job_run(config, "annotate", {"where": where, "limit": limit}) as run:
        version = lake.version(PAIRS.name)
        selected = select_pairs(lake, version, where, limit)
        summary = annotate_pairs(
            lake,
            judging.annotator,
            judging.annotator_template,
            run.info.run_id,
            selected,
            version,
            report,
        )
        mlflow.set_tag("synpref.annotator_key", summary.annotator_key)
        log_delta_table(lake, PAIRS.name, version, context="input")
        if summary.attributes_version is not None:
            log_delta_table(lake, ATTRIBUTES.name, summary.attributes_version, context="output")
        mlflow.log_metrics(
            {
                "pairs_selected": summary.selected,
                "pairs_annotated": summary.annotated,
                "pairs_cached": summary.cached,
                "annotations_invalid": summary.invalid,
                "invalid_rate": summary.invalid / summary.annotated if summary.annotated else 0.0,
                "output_tokens": summary.output_tokens,
            }
        )
    return job_result(asdict(summary), summary.text(), run, config.tracking, dashboard)


@click.command("annotate")
@click.option("--where", help="SQL predicate selecting pairs, e.g. \"source = 'hh'\".")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    help="Annotate only this many selected pairs (smallest pair_id first).",
)
@global_options
@json_option
@click.pass_context
def command(
    ctx: click.Context, where: str | None, limit: int | None, as_json: bool, **options: Any
) -> None:
    """Label pairs with their attributes (task category, objectivity, controversiality, desired
    attributes, guideline) into `attributes`; only pairs this annotator has not labelled."""
    config = resolve_config(ctx, **options)
    try:
        result = run_annotate(config, where, limit)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    emit_job_result(result, as_json)


if __name__ == "__main__":
    configure_logging()
    command()
