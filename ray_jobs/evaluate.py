"""`synpref eval BENCHMARK --data PATH (--model M | --scores FILE)`: a reward model on a
benchmark with the benchmark's own rules; results, per-item scores and plots go to MLflow."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click
import mlflow
import numpy as np
from matplotlib.figure import Figure

from pipelines.core.config import SynprefConfig
from pipelines.core.ray_cluster import connect
from pipelines.core.tracking import job_run, log_input_file
from pipelines.ingest.formats import FormatError, parse_mapping
from pipelines.ingest.record_files import file_sha256, filesystem_for, find_record_files
from pipelines.rm.evaluation import (
    BENCHMARKS,
    EVAL_MAPPING_TARGETS,
    EvalDataError,
    EvalResult,
    conversations,
    evaluate,
    file_scores,
    load_items,
    model_scores,
)
from pipelines.rm.model import model_version
from pipelines.rm.registry import registered_as
from pipelines.rm.scoring import score_conversations
from ray_jobs.job import (
    configure_logging,
    emit_job_result,
    global_options,
    job_result,
    json_option,
    progress,
    resolve_config,
)


def run_eval(
    config: SynprefConfig,
    benchmark: str,
    data: str,
    model: str | None = None,
    scores: str | None = None,
    report: Callable[[str], None] = progress,
    mapping: dict[str, str] | None = None,
) -> dict[str, Any]:
    if (model is None) == (scores is None):
        raise EvalDataError("give exactly one of --model and --scores")
    items = load_items(benchmark, data, mapping)
    report(f"[eval] {benchmark}: {len(items):,} items from {data}")
    params = {
        "benchmark": benchmark,
        "data": data,
        "model": model,
        "scores": scores,
        "mapping": mapping,
    }
    dashboard = None
    with job_run(config, "eval", params) as run:
        for path in [data] + ([scores] if scores else []):
            fs = filesystem_for(path, config.lake.storage_options)
            for file in find_record_files([path], fs):
                log_input_file(file.path, file_sha256(file.path, fs))
        metrics: dict[str, float] = {}
        if model is not None:
            dashboard = connect(config.ray)
            fingerprint = model_version(model)
            mlflow.set_tag("synpref.model_version", fingerprint)
            registered = registered_as(fingerprint)
            if registered:
                mlflow.set_tag("synpref.registered_model", registered)
                report(f"[eval] {model} is {registered}")
            scored = score_conversations(conversations(items), model, config.scoring, report)
            item_scores = model_scores(items, scored.rewards)
            metrics |= {
                "scoring.conversations_per_s": scored.per_second,
                "scoring.tokens": scored.tokens,
                "scoring.truncated": scored.truncated,
            }
        else:
            item_scores = file_scores(items, scores or "")
        result = evaluate(benchmark, items, item_scores)
        log_result(result, metrics)
    summary = {"benchmark": benchmark, "items": len(items), "metrics": result.metrics}
    summary["categories"] = result.categories
    return job_result(summary, result.text(), run, config.tracking, dashboard)


def log_result(result: EvalResult, extra_metrics: dict[str, float]) -> None:
    """Metrics, the per-category table, per-item scores (a reusable ``--scores`` file) and
    plots of the score distributions and of accuracy by category."""
    mlflow.log_metrics({_metric_name(k): v for k, v in result.metrics.items()} | extra_metrics)
    columns = {key: [row[key] for row in result.categories] for key in result.categories[0]}
    mlflow.log_table(columns, "eval/categories.json")
    lines = [
        json.dumps({"id": item_id, "chosen": s.chosen, "rejected": s.rejected})
        for item_id, s in result.scores.items()
    ]
    mlflow.log_text("\n".join(lines) + "\n", "eval/scores.jsonl")
    mlflow.log_figure(_score_distributions(result), "eval/score_distributions.png")
    mlflow.log_figure(_category_accuracy(result), "eval/accuracy_by_category.png")


def _metric_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)


def _score_distributions(result: EvalResult) -> Figure:
    chosen = np.array([v for s in result.scores.values() for v in s.chosen])
    rejected = np.array([v for s in result.scores.values() for v in s.rejected])
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    bins = np.histogram_bin_edges(np.concatenate([chosen, rejected]), bins=40)
    axes.hist(chosen, bins=bins, alpha=0.6, label=f"chosen ({len(chosen):,})")
    axes.hist(rejected, bins=bins, alpha=0.6, label=f"rejected ({len(rejected):,})")
    axes.set(xlabel="reward", ylabel="responses", title=f"{result.benchmark}: scores")
    axes.legend()
    figure.tight_layout()
    return figure


def _category_accuracy(result: EvalResult) -> Figure:
    key = "accuracy" if "accuracy" in result.categories[0] else "average"
    names = [row["category"] for row in result.categories]
    figure = Figure(figsize=(max(4, 0.6 * len(names) + 2), 4))
    axes = figure.subplots()
    axes.bar(names, [row[key] for row in result.categories])
    axes.set(ylabel=f"{key} (%)", ylim=(0, 100), title=f"{result.benchmark}: {key} by category")
    axes.tick_params(axis="x", labelrotation=45)
    figure.tight_layout()
    return figure


@click.command("eval")
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
@global_options
@json_option
@click.pass_context
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
    config = resolve_config(ctx, **options)
    try:
        fields = parse_mapping(list(mapping), EVAL_MAPPING_TARGETS) if mapping else None
        result = run_eval(config, benchmark, data, model, scores, mapping=fields)
    except (EvalDataError, FormatError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    emit_job_result(result, as_json)


if __name__ == "__main__":
    configure_logging()
    command()
