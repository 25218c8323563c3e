"""`synpref score --model M`: score lake pairs with a reward model into `rm_scores`."""

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
from pipelines.rm.scoring import score_pairs
from ray_jobs.job import (
    configure_logging,
    emit_job_result,
    global_options,
    job_result,
    json_option,
    progress,
    resolve_config,
)
from storage_schemas import PAIRS, RM_SCORES


def run_score(
    config: SynprefConfig,
    model: str,
    model_name: str | None = None,
    where: str | None = None,
    report: Callable[[str], None] = progress,
) -> dict[str, Any]:
    lake = Lake(config.lake.root, config.lake.storage_options)
    dashboard = connect(config.ray)
    params = {"model": model, "model_name": model_name, "where": where}
    with job_run(config, "score", params) as run:
        run_id = run.info.run_id
        summary = score_pairs(lake, model, config.scoring, run_id, where, model_name, report)
        mlflow.set_tag("synpref.model_version", summary.model_version)
        log_delta_table(lake, PAIRS.name, summary.pairs_version, context="input")
        if summary.rm_scores_version is not None:
            log_delta_table(lake, RM_SCORES.name, summary.rm_scores_version, context="output")
        mlflow.log_metrics(
            {
                "pairs_selected": summary.selected,
                "pairs_scored": summary.scored,
                "pairs_already_scored": summary.already_scored,
                "pairs_truncated": summary.truncated,
                "tokens": summary.tokens,
                "pairs_per_s": summary.scored / summary.seconds if summary.seconds else 0.0,
            }
            | ({"chosen_wins": summary.accuracy} if summary.accuracy is not None else {})
        )
        margins = _margins(lake, run_id)
        if len(margins):
            mlflow.log_figure(_margin_plot(margins), "score_margins.png")
    return job_result(asdict(summary), summary.text(), run, config.tracking, dashboard)


def _margins(lake: Lake, run_id: str) -> np.ndarray:
    """r_chosen - r_rejected of the pairs this run scored."""
    if not lake.exists(RM_SCORES.name):
        return np.empty(0)
    rows = lake.read(
        RM_SCORES.name, columns=["r_chosen", "r_rejected"], where=f"score_run_id = '{run_id}'"
    )
    return rows["r_chosen"].to_numpy() - rows["r_rejected"].to_numpy()


def _margin_plot(margins: np.ndarray) -> Figure:
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    axes.hist(margins, bins=50)
    axes.axvline(0, color="black", linewidth=1)
    axes.set(
        xlabel="r_chosen - r_rejected",
        ylabel="pairs",
        title=f"{len(margins):,} pairs, {100 * np.mean(margins > 0):.1f}% chosen wins",
    )
    figure.tight_layout()
    return figure


@click.command("score")
@click.option("--model", required=True, help="Reward model: HF id or folder, or heuristic:length.")
@click.option("--model-name", help="Name in rm_scores (default: the --model value).")
@click.option("--where", help="SQL predicate selecting pairs, e.g. \"source = 'hh'\".")
@global_options
@json_option
@click.pass_context
def command(
    ctx: click.Context,
    model: str,
    model_name: str | None,
    where: str | None,
    as_json: bool,
    **options: Any,
) -> None:
    """Score pairs with a reward model (only those it has not scored) into `rm_scores`."""
    config = resolve_config(ctx, **options)
    try:
        result = run_score(config, model, model_name, where)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    emit_job_result(result, as_json)


if __name__ == "__main__":
    configure_logging()
    command()
