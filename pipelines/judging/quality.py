"""Judge quality over the judged pairs: agreement with labels, position and length bias, cost."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.judging.verdicts import majority


def judge_quality(
    judgments: pa.Table, verdicts: pa.Table, lengths: pa.Table
) -> dict[str, dict[str, float]]:
    """Per judge, over the judged pairs: verdict rates against the pairs' labels (gold or
    original), accuracies, invalid answers, length bias, and cost (NaN where undefined).

    ``lengths``: (source, pair_id, chosen_chars, rejected_chars) of the pairs.
    """
    columns = ("source", "pair_id", "chosen_chars", "rejected_chars")
    chosen_longer = {
        (s, p): c > r
        for s, p, c, r in zip(*(lengths[k].to_pylist() for k in columns), strict=True)
        if c != r
    }
    quality: dict[str, dict[str, float]] = {}
    judge_rows = verdicts.filter(pc.equal(verdicts["level"], "judge"))
    for name in sorted(set(judge_rows["judge"].to_pylist())):
        mine = judge_rows.filter(pc.equal(judge_rows["judge"], name))
        rows = judgments.filter(pc.equal(judgments["judge"], name)).to_pylist()
        counts = Counter(mine["verdict"].to_pylist())
        n = max(mine.num_rows, 1)
        valid = [r for r in rows if r["valid"]]
        longer_won = [
            (r["preference"] == "chosen") == chosen_longer[(r["source"], r["pair_id"])]
            for r in valid
            if r["preference"] != "tie" and (r["source"], r["pair_id"]) in chosen_longer
        ]
        p_chosen = [p for p in mine["p_chosen"].to_pylist() if p is not None]
        first_shown = [
            (r["preference"] == "chosen") == (r["ordering"] == "AB")
            for r in valid
            if r["preference"] != "tie"
        ]
        quality[name] = {
            "pairs": float(mine.num_rows),
            "agree_rate": counts["agree"] / n,
            "disagree_rate": counts["disagree"] / n,
            "tie_rate": counts["tie"] / n,
            "flip_rate": counts["inconsistent"] / n,
            "invalid_verdict_rate": counts["invalid"] / n,
            "judgebench_accuracy": _judgebench_accuracy(valid, mine.num_rows),
            "debiased_accuracy": _mean([p > 0.5 for p in p_chosen]),
            "invalid_rate": (len(rows) - len(valid)) / max(len(rows), 1),
            "longer_wins_rate": _mean(longer_won),
            "first_shown_wins_rate": _mean(first_shown),
            "chosen_longer_rate": _mean(list(chosen_longer.values())),
            "prompt_tokens_per_judgment": _mean([r["prompt_tokens"] for r in rows]),
            "output_tokens_per_judgment": _mean([r["output_tokens"] for r in rows]),
            "seconds_per_judgment": _mean([r["seconds"] for r in rows]),
        }
    return quality


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def _judgebench_accuracy(valid: Sequence[dict[str, Any]], pairs: int) -> float:
    """JudgeBench's rule: a pair is right when its orders preferring chosen outnumber those
    preferring rejected (each order's majority over its samples; a tie counts for neither)."""
    by_order: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for r in valid:
        by_order[(r["source"], r["pair_id"], r["ordering"])].append(r["preference"])
    score: dict[tuple[str, str], int] = defaultdict(int)
    for (source, pair_id, _), prefs in by_order.items():
        pref = majority(prefs)
        score[(source, pair_id)] += {"chosen": 1, "rejected": -1, "tie": 0}[pref]
    return sum(s > 0 for s in score.values()) / max(pairs, 1)
