"""`synpref ingest PATH... --source NAME`: preference files into the lake, tracked in MLflow.

    ray job submit --working-dir . -- python -m ray_jobs.ingest --config configs/cluster.yaml \\
        s3://raw/skywork/ --source skywork-80k
"""

from __future__ import annotations

from typing import Any

import click

from pipelines.ingest.formats import FORMATS
from ray_jobs.job import (
    emit_result,
    job_command,
    main,
    resolve_config,
    user_errors,
)


@job_command("ingest")
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
    from pipelines import jobs
    from pipelines.ingest.formats import parse_mapping
    from pipelines.ingest.job import IngestRequest

    config = resolve_config(ctx, **options)
    with user_errors():
        request = IngestRequest(
            paths=list(paths),
            source=source,
            format="mapping" if mapping and not fmt else fmt,
            mapping=parse_mapping(list(mapping)) if mapping else None,
            benchmark=benchmark,
        )
        result = jobs.ingest(config, request)
    emit_result(result, as_json)


if __name__ == "__main__":
    main(command)
