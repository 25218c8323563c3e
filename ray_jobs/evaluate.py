"""`synpref eval BENCHMARK --data PATH (--model M | --scores FILE)`: a reward model on a
benchmark with the benchmark's own rules; results, per-item scores and plots go to MLflow."""

from __future__ import annotations

from typing import Any

import click

from pipelines.rm.benchmarks import BENCHMARKS, EVAL_MAPPING_TARGETS
from ray_jobs.job import (
    emit_result,
    job_command,
    main,
    resolve_config,
    user_errors,
)


@job_command("eval")
@click.argument("benchmark", type=click.Choice(BENCHMARKS))
@click.option("--data", required=True, help="Benchmark file or folder (jsonl, json, parquet).")
@click.option("--model", help="Reward model: HF id or folder, or heuristic:length.")
@click.option("--scores", help="Precomputed scores (jsonl; JudgeBench's output format too).")
@click.option(
    "--map",
    "mapping",
    multiple=True,
    metavar="TARGET=FIELD.PATH",
    help="Field paths for other layouts, as for ingest: prompt|history|chosen|rejected|id|category"
    "=a.b[0].c; a[*].c takes every element (repeat).",
)
def command(
    ctx: click.Context,
    benchmark: str,
    data: str,
    model: str | None,
    scores: str | None,
    mapping: tuple[str, ...],
    as_json: bool,
    **options: Any,
) -> None:
    """Evaluate a reward model (or a scores file) on BENCHMARK with its own rules."""
    from pipelines import jobs
    from pipelines.ingest.formats import parse_mapping

    config = resolve_config(ctx, **options)
    with user_errors():
        fields = parse_mapping(list(mapping), EVAL_MAPPING_TARGETS) if mapping else None
        result = jobs.evaluate(config, benchmark, data, model, scores, fields)
    emit_result(result, as_json)


if __name__ == "__main__":
    main(command)
