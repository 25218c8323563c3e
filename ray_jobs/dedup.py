"""`synpref dedup`: pair-aware exact dedup and label-conflict detection over the lake's pairs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import click
import mlflow
from matplotlib.figure import Figure

from pipelines.core.config import SynprefConfig
from pipelines.core.lake import Lake
from pipelines.core.ray_cluster import connect
from pipelines.core.tracking import job_run, log_delta_table
from pipelines.hygiene.dedup import DedupOptions, DedupSummary, dedup
from pipelines.hygiene.near_dedup import MinHashOptions
from pipelines.hygiene.prompt_groups import PromptGroupOptions
from ray_jobs.job import (
    configure_logging,
    emit_job_result,
    global_options,
    job_result,
    json_option,
    progress,
    resolve_config,
)
from storage_schemas import PAIRS


def run_dedup(config: SynprefConfig, report: Callable[[str], None] = progress) -> dict[str, Any]:
    lake = Lake(config.lake.root, config.lake.storage_options)
    minhash, prompts = config.dedup.minhash, config.dedup.prompt_groups
    options = DedupOptions(
        casefold=config.dedup.casefold,
        conflict_policy=config.dedup.conflict_policy,
        source_priority=tuple(config.dedup.source_priority),
        minhash=MinHashOptions(minhash.ngram, minhash.bands, minhash.rows, minhash.threshold)
        if minhash.enabled
        else None,
        prompt_groups=PromptGroupOptions(prompts.model, prompts.threshold)
        if prompts.enabled
        else None,
    )
    dashboard = connect(config.ray)
    with job_run(config, "dedup") as run:
        summary = dedup(lake, options, run.info.run_id, report)
        _track(summary, lake)
    return job_result(asdict(summary), summary.text(), run, config.tracking, dashboard)


def _track(summary: DedupSummary, lake: Lake) -> None:
    log_delta_table(lake, PAIRS.name, summary.pairs_version, context="input")
    for table, version in summary.written.items():
        if version is not None:
            log_delta_table(lake, table, version, context="output")
    mlflow.log_metrics(
        {
            "pairs": summary.pairs,
            "exact_clusters": summary.exact_clusters,
            "exact_duplicates": summary.exact_duplicates,
            "near_clusters": summary.near_clusters,
            "near_duplicates": summary.near_duplicates,
            "prompt_groups": summary.prompt_groups,
            "conflicts": summary.conflicts,
            "conflict_pairs_overruled": summary.conflict_pairs_overruled,
            "conflict_pairs_unresolved": summary.conflict_pairs_unresolved,
            **{
                f"status.{source}.{status}": n
                for source, counts in summary.by_source.items()
                for status, n in counts.items()
            },
        }
    )
    mlflow.log_dict(asdict(summary), "dedup_summary.json")
    if any(summary.cluster_sizes.values()):
        mlflow.log_figure(_cluster_size_plot(summary.cluster_sizes), "cluster_sizes.png")


def _cluster_size_plot(sizes: dict[str, dict[int, int]]) -> Figure:
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    all_sizes = sorted({size for counts in sizes.values() for size in counts})
    width = 0.8 / max(1, len(sizes))
    for offset, (method, counts) in enumerate(sorted(sizes.items())):
        xs = [i + offset * width for i in range(len(all_sizes))]
        axes.bar(xs, [counts.get(size, 0) for size in all_sizes], width, label=method)
    axes.set_xticks([i + width * (len(sizes) - 1) / 2 for i in range(len(all_sizes))])
    axes.set_xticklabels([str(size) for size in all_sizes])
    axes.set_xlabel("pairs in the cluster")
    axes.set_ylabel("clusters")
    axes.set_yscale("log")
    axes.set_title("Duplicate cluster sizes")
    axes.legend()
    figure.tight_layout()
    return figure


@click.command("dedup")
@global_options
@json_option
@click.pass_context
def command(ctx: click.Context, as_json: bool, **options: Any) -> None:
    """Find exact duplicate pairs and label conflicts (flips); write the decision tables."""
    result = run_dedup(resolve_config(ctx, **options))
    emit_job_result(result, as_json)


if __name__ == "__main__":
    configure_logging()
    command()
