"""`synpref judge`: LLM judges on lake pairs into `judgments` and `verdicts`, quality to MLflow."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import click
import mlflow
import numpy as np
from matplotlib.figure import Figure

from pipelines.core.config import SynprefConfig
from pipelines.core.lake import Lake
from pipelines.core.ray_cluster import connect
from pipelines.core.tracking import job_run, log_delta_table
from pipelines.judging.job import JudgeIdentity, Judging, judge_pairs
from ray_jobs.job import (
    configure_logging,
    emit_job_result,
    global_options,
    job_result,
    json_option,
    progress,
    resolve_config,
)
from storage_schemas import JUDGMENTS, PAIRS, VERDICTS, VERDICTS_KNOWN


def run_judge(
    config: SynprefConfig,
    where: str | None = None,
    limit: int | None = None,
    report: Callable[[str], None] = progress,
) -> dict[str, Any]:
    lake = Lake(config.lake.root, config.lake.storage_options)
    dashboard = connect(config.ray)
    with job_run(config, "judge", {"where": where, "limit": limit}) as run:
        summary = judge_pairs(lake, config.judging, run.info.run_id, where, limit, report)
        for judge in config.judging.judges:
            identity = JudgeIdentity.of(judge)
            mlflow.set_tag(f"synpref.judge.{judge.name}.template_hash", identity.template_hash)
            mlflow.set_tag(f"synpref.judge.{judge.name}.params_hash", identity.params_hash)
        log_delta_table(lake, PAIRS.name, summary.pairs_version, context="input")
        for table, version in (
            (JUDGMENTS.name, summary.judgments_version),
            (VERDICTS.name, summary.verdicts_version),
        ):
            if version is not None:
                log_delta_table(lake, table, version, context="output")
        mlflow.log_metrics(_metrics(summary))
        if summary.quality:
            mlflow.log_figure(_verdict_plot(summary), "judge_verdicts.png")
            mlflow.log_figure(_p_chosen_plot(lake, config), "judge_p_chosen.png")
    return job_result(asdict(summary), summary.text(), run, config.tracking, dashboard)


def _metrics(summary: Judging) -> dict[str, float]:
    metrics: dict[str, float] = {"pairs_selected": summary.selected}
    for run in summary.judges:
        metrics |= {
            f"{run.judge}.judgments_new": run.judged,
            f"{run.judge}.judgments_cached": run.cached,
            f"{run.judge}.judgments_invalid_new": run.invalid,
            f"{run.judge}.judgments_per_s": run.judged / run.seconds if run.judged else 0.0,
            f"{run.judge}.output_tokens_per_s": run.output_tokens / run.seconds
            if run.judged
            else 0.0,
        }
    for judge, quality in summary.quality.items():
        metrics |= {f"{judge}.{k}": v for k, v in quality.items() if not np.isnan(v)}
    metrics |= {f"panel.{k}": v for k, v in summary.verdict_counts.items()}
    return metrics


def _verdict_plot(summary: Judging) -> Figure:
    """Verdict shares per judge (stacked bars): agreement, flips, ties, invalid at a glance."""
    figure = Figure(figsize=(7, 1.5 + 0.5 * len(summary.quality)))
    axes = figure.subplots()
    names = list(summary.quality)
    left = np.zeros(len(names))
    rates = {
        "agree": "agree_rate",
        "disagree": "disagree_rate",
        "tie": "tie_rate",
        "inconsistent": "flip_rate",
        "invalid": "invalid_verdict_rate",
    }
    for verdict in VERDICTS_KNOWN:
        shares = np.array([summary.quality[n][rates[verdict]] for n in names])
        axes.barh(names, shares, left=left, label=verdict)
        left += shares
    axes.set(xlabel="share of judged pairs", xlim=(0, 1), title="judge verdicts vs labels")
    axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    return figure


def _p_chosen_plot(lake: Lake, config: SynprefConfig) -> Figure:
    """p_chosen of each judge's valid judgments (1/0/0.5 votes for structured verdicts)."""
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    for judge in config.judging.judges:
        rows = lake.read(
            JUDGMENTS.name,
            columns=["p_chosen"],
            where=f"{JudgeIdentity.of(judge).sql()} AND valid",
        )
        axes.hist(rows["p_chosen"].to_numpy(), bins=20, range=(0, 1), alpha=0.6, label=judge.name)
    axes.set(xlabel="p(chosen wins)", ylabel="judgments", title="judge probabilities")
    axes.legend(fontsize="small")
    figure.tight_layout()
    return figure


@click.command("judge")
@click.option("--where", help="SQL predicate selecting pairs, e.g. \"source = 'hh'\".")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    help="Judge only this many of the selected pairs: those with the smallest pair_id (a fixed "
    "pseudo-random sample).",
)
@global_options
@json_option
@click.pass_context
def command(
    ctx: click.Context, where: str | None, limit: int | None, as_json: bool, **options: Any
) -> None:
    """Judge pairs with the configured LLM judges (both orders; only missing judgments) into
    `judgments`, and their verdicts into `verdicts`."""
    config = resolve_config(ctx, **options)
    try:
        result = run_judge(config, where, limit)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    emit_job_result(result, as_json)


if __name__ == "__main__":
    configure_logging()
    command()
