"""Every plot a job logs to MLflow, drawn from plain numbers (no job types here), so that one
module holds the look of the platform's reports."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure


def cluster_sizes(sizes: Mapping[str, Mapping[int, int]]) -> Figure:
    """Duplicate clusters by size, one bar group per method (exact, near)."""
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    all_sizes = sorted({size for counts in sizes.values() for size in counts})
    width = 0.8 / max(1, len(sizes))
    for offset, (method, counts) in enumerate(sorted(sizes.items())):
        xs = [i + offset * width for i in range(len(all_sizes))]
        axes.bar(xs, [counts.get(size, 0) for size in all_sizes], width, label=method)
    axes.set_xticks([i + width * (len(sizes) - 1) / 2 for i in range(len(all_sizes))])
    axes.set_xticklabels([str(size) for size in all_sizes])
    axes.set(xlabel="pairs in the cluster", ylabel="clusters", title="Duplicate cluster sizes")
    axes.set_yscale("log")
    axes.legend()
    figure.tight_layout()
    return figure


def verdict_shares(shares: Mapping[str, Mapping[str, float]]) -> Figure:
    """Verdict shares per judge (stacked bars): agreement, flips, ties, invalid at a glance."""
    figure = Figure(figsize=(7, 1.5 + 0.5 * len(shares)))
    axes = figure.subplots()
    names = list(shares)
    left = np.zeros(len(names))
    for verdict in next(iter(shares.values()), {}):
        values = np.array([shares[n][verdict] for n in names])
        axes.barh(names, values, left=left, label=verdict)
        left += values
    axes.set(xlabel="share of judged pairs", xlim=(0, 1), title="judge verdicts vs labels")
    axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    return figure


def probability_histograms(values: Mapping[str, np.ndarray], xlabel: str) -> Figure:
    """One histogram over [0, 1] per series (e.g. each judge's p_chosen)."""
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    for name, series in values.items():
        axes.hist(series, bins=20, range=(0, 1), alpha=0.6, label=name)
    axes.set(xlabel=xlabel, ylabel="judgments", title="judge probabilities")
    axes.legend(fontsize="small")
    figure.tight_layout()
    return figure


def margins(values: np.ndarray) -> Figure:
    """r_chosen - r_rejected of scored pairs, with the share the chosen response wins."""
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    axes.hist(values, bins=50)
    axes.axvline(0, color="black", linewidth=1)
    axes.set(
        xlabel="r_chosen - r_rejected",
        ylabel="pairs",
        title=f"{len(values):,} pairs, {100 * np.mean(values > 0):.1f}% chosen wins",
    )
    figure.tight_layout()
    return figure


def training_curves(curves: Mapping[str, Sequence[tuple[int, float]]]) -> Figure:
    """Loss and accuracy per step (training and validation), as (step, value) points."""
    figure = Figure(figsize=(10, 4))
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    for key, points in curves.items():
        axes = loss_axes if key.endswith("loss") else accuracy_axes
        axes.plot([s for s, _ in points], [v for _, v in points], label=key)
    loss_axes.set(xlabel="step", ylabel="loss", title="Bradley-Terry loss")
    accuracy_axes.set(xlabel="step", ylabel="accuracy", title="chosen ranked above rejected")
    for axes in (loss_axes, accuracy_axes):
        axes.legend()
    figure.tight_layout()
    return figure


def score_distributions(chosen: np.ndarray, rejected: np.ndarray, title: str) -> Figure:
    """Rewards of chosen and rejected responses, overlaid on the same bins."""
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    bins = np.histogram_bin_edges(np.concatenate([chosen, rejected]), bins=40)
    axes.hist(chosen, bins=bins, alpha=0.6, label=f"chosen ({len(chosen):,})")
    axes.hist(rejected, bins=bins, alpha=0.6, label=f"rejected ({len(rejected):,})")
    axes.set(xlabel="reward", ylabel="responses", title=title)
    axes.legend()
    figure.tight_layout()
    return figure


def category_bars(values: Mapping[str, float], ylabel: str, title: str) -> Figure:
    """One bar per category, on a 0-100 scale."""
    figure = Figure(figsize=(max(4, 0.6 * len(values) + 2), 4))
    axes = figure.subplots()
    axes.bar(list(values), list(values.values()))
    axes.set(ylabel=ylabel, ylim=(0, 100), title=title)
    axes.tick_params(axis="x", labelrotation=45)
    figure.tight_layout()
    return figure


def loop_iterations(iterations: Sequence[Mapping[str, float]]) -> Figure:
    """The loop across Stage 1 iterations: the gold and silver sets growing (left), and the
    RM's accuracy on gold with the judges' agreement with people (right)."""
    figure = Figure(figsize=(10, 4))
    sizes, rates = figure.subplots(1, 2)
    xs = list(range(1, len(iterations) + 1))
    for key, name in (("gold_pairs", "D_gold"), ("silver_pairs", "D_silver")):
        sizes.plot(xs, [m.get(key, 0) for m in iterations], marker="o", label=name)
    sizes.set(xlabel="iteration", ylabel="pairs", title="verified pairs")
    sizes.legend()
    for key, name in (
        ("gold_accuracy", "RM accuracy on D_gold"),
        ("judge_human_agreement", "judges agree with people"),
    ):
        values = [m.get(key, np.nan) for m in iterations]
        rates.plot(xs, values, marker="o", label=name)
    rates.set(xlabel="iteration", ylim=(0, 1), title="quality")
    rates.legend()
    for axes in (sizes, rates):
        axes.set_xticks(xs)
    figure.tight_layout()
    return figure


def curated_composition(by_origin: Mapping[str, float]) -> Figure:
    """The curated set's pairs by the origin of their label."""
    figure = Figure(figsize=(6, 3))
    axes = figure.subplots()
    names = sorted(by_origin)
    axes.barh(names, [by_origin[n] for n in names])
    axes.set(xlabel="pairs", title="curated set by label origin")
    figure.tight_layout()
    return figure


def interval_bars(
    groups: Mapping[str, Mapping[str, tuple[float, float, float]]], ylabel: str
) -> Figure:
    """Bars of (mean, low, high) with the interval as error bars: one panel per group (a
    backbone), one bar per condition."""
    figure = Figure(figsize=(5 * len(groups), 4))
    panels = figure.subplots(1, len(groups), squeeze=False)[0]
    for axes, (group, bars) in zip(panels, groups.items(), strict=True):
        names = list(bars)
        means = np.array([bars[n][0] for n in names])
        lows = np.array([bars[n][1] for n in names])
        highs = np.array([bars[n][2] for n in names])
        errors = np.nan_to_num(np.vstack([means - lows, highs - means]))
        axes.bar(names, means, yerr=errors, capsize=4)
        axes.set(ylabel=ylabel, title=group, ylim=(max(0.0, means.min() - 0.1), 1))
    figure.tight_layout()
    return figure


def roc_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float], float]]) -> Figure:
    """ROC curves (false-positive rate, true-positive rate, AUROC) against the diagonal."""
    figure = Figure(figsize=(5, 5))
    axes = figure.subplots()
    for name, (fpr, tpr, auroc) in curves.items():
        axes.plot(fpr, tpr, label=f"{name} (AUROC {auroc:.2f})")
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey")
    axes.set(xlabel="false-positive rate", ylabel="true-positive rate", title="flip detection")
    axes.legend(fontsize="small")
    figure.tight_layout()
    return figure
