"""How far two label sources agree beyond chance: Cohen's kappa for two, Fleiss' kappa for more.

Human labels are only worth their cost if people agree with each other and we know how often
they overrule the original label or the LLM judges; these are the numbers a lead reads after
each review round. Kappa is 1 for perfect agreement, 0 at chance level and negative below it;
it is ``None`` where it is undefined (no items, or every answer in one category).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Agreement:
    """Agreement over ``items``: the observed share (``raw``; for several raters the mean
    share of agreeing rater pairs) and the chance-corrected ``kappa`` of ``method``."""

    method: str
    items: int
    raw: float | None
    kappa: float | None


def cohen(first: Sequence[str], second: Sequence[str], labels: Sequence[str]) -> Agreement:
    """Two raters' labels of the same items, item by item."""
    from sklearn.metrics import cohen_kappa_score

    if not first:
        return Agreement("cohen", 0, None, None)
    raw = sum(a == b for a, b in zip(first, second, strict=True)) / len(first)
    if len({*first, *second}) < 2:  # one category only: chance agreement is certain
        return Agreement("cohen", len(first), raw, None)
    kappa = float(cohen_kappa_score(first, second, labels=list(labels)))
    return Agreement("cohen", len(first), raw, kappa)


def fleiss(ratings: Sequence[Sequence[str]], labels: Sequence[str]) -> Agreement:
    """Each item's labels by its raters (any number from two up, not necessarily the same
    raters): Fleiss' kappa with the per-item agreement averaged over items."""
    rated = [r for r in ratings if len(r) >= 2]
    if not rated:
        return Agreement("fleiss", 0, None, None)
    per_item = []
    totals: Counter[str] = Counter()
    for item in rated:
        counts = Counter(item)
        totals.update(counts)
        n = len(item)
        per_item.append((sum(c * c for c in counts.values()) - n) / (n * (n - 1)))
    observed = sum(per_item) / len(per_item)
    shares = [totals[label] / sum(totals.values()) for label in labels]
    expected = sum(p * p for p in shares)
    kappa = None if expected == 1 else (observed - expected) / (1 - expected)
    return Agreement("fleiss", len(rated), observed, kappa)


def among_raters(answers: Mapping[Hashable, Mapping[str, str]], labels: Sequence[str]) -> Agreement:
    """Agreement between raters on the items several of them labelled (``answers``: item ->
    rater -> label): Cohen's kappa when those items have two raters in all, else Fleiss'."""
    shared = {item: by_rater for item, by_rater in answers.items() if len(by_rater) >= 2}
    raters = sorted({rater for by_rater in shared.values() for rater in by_rater})
    if len(raters) == 2:
        first, second = raters
        pairs = [(by_rater[first], by_rater[second]) for by_rater in shared.values()]
        return cohen([a for a, _ in pairs], [b for _, b in pairs], labels)
    return fleiss([list(by_rater.values()) for by_rater in shared.values()], labels)
