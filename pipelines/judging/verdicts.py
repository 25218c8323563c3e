"""Verdicts from judgments: per judge across both orders, and per panel across judges."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.core.config import AggregationConfig
from pipelines.judging.identity import JudgeIdentity, digest
from storage_schemas import JUDGE_ORDERS, VERDICTS


@dataclass(frozen=True)
class Verdict:
    verdict: str
    confidence: float
    p_chosen: float | None
    votes: int
    invalid: int
    detail: str


_LABEL = {"chosen": "agree", "rejected": "disagree", "tie": "tie"}


def majority(prefs: Sequence[str]) -> str:
    """The most frequent preference; ``split`` when the top two are as frequent (the samples
    disagree: that is not the judge calling a tie)."""
    counts = Counter(prefs).most_common()
    if len(counts) > 1 and counts[0][1] == counts[1][1]:
        return "split"
    return counts[0][0]


def judge_verdict(judgments: Sequence[dict[str, Any]]) -> Verdict:
    """One judge's verdict on one pair from its judgments (both orders, all samples)."""
    valid = [j for j in judgments if j["valid"]]
    invalid = len(judgments) - len(valid)
    by_order = {o: [j for j in valid if j["ordering"] == o] for o in JUDGE_ORDERS}
    empty = [o for o, js in by_order.items() if not js]
    if empty:
        return _invalid(len(valid), invalid, f"no valid judgment in order {', '.join(empty)}")
    order_prefs = {o: majority([j["preference"] for j in js]) for o, js in by_order.items()}
    p_order = {o: float(np.mean([j["p_chosen"] for j in js])) for o, js in by_order.items()}
    p_chosen = float(np.mean([j["p_chosen"] for j in valid]))
    detail = f"AB: {order_prefs['AB']}, BA: {order_prefs['BA']}"
    if "split" in order_prefs.values() or order_prefs["AB"] != order_prefs["BA"]:
        return Verdict(
            "inconsistent",
            abs(p_order["AB"] - p_order["BA"]),
            p_chosen,
            len(valid),
            invalid,
            detail,
        )
    verdict = _LABEL[order_prefs["AB"]]
    confidence = {
        "agree": p_chosen,
        "disagree": 1 - p_chosen,
        "tie": sum(j["preference"] == "tie" for j in valid) / len(valid),
    }[verdict]
    return Verdict(verdict, confidence, p_chosen, len(valid), invalid, detail)


def _invalid(votes: int, invalid: int, reason: str) -> Verdict:
    return Verdict("invalid", 0.0, None, votes, invalid, reason)


def panel_verdict(
    verdicts: Sequence[tuple[Verdict, float]], policy: str, min_judges: int
) -> Verdict:
    """The verdict across judges ((verdict, weight) each) under ``policy``."""
    valid = [(v, w) for v, w in verdicts if v.verdict != "invalid"]
    invalid = len(verdicts) - len(valid)
    if len(valid) < min_judges:
        reason = f"{len(valid)} valid judge verdicts < min_judges {min_judges}"
        return _invalid(len(valid), invalid, reason)
    weight = defaultdict(float)
    for v, w in valid:
        weight[v.verdict] += w if policy == "weighted" else 1.0
    ranked = sorted(weight.items(), key=lambda kv: -kv[1])
    total = sum(weight.values())
    detail = ", ".join(f"{name} {value:g}" for name, value in ranked)
    top, top_weight = ranked[0]
    decided = {
        "majority": len(ranked) == 1 or ranked[1][1] < top_weight,
        "unanimity": len(ranked) == 1,
        "weighted": top_weight > total / 2,
    }[policy]
    ps = [(v.p_chosen, w) for v, w in valid if v.p_chosen is not None]
    p_chosen = float(np.average([p for p, _ in ps], weights=[w for _, w in ps])) if ps else None
    if not decided:
        return Verdict(
            "inconsistent",
            1 - top_weight / total,
            p_chosen,
            len(valid),
            invalid,
            f"judges split: {detail}",
        )
    support = [(v.confidence, w) for v, w in valid if v.verdict == top]
    confidence = float(np.average([c for c, _ in support], weights=[w for _, w in support]))
    return Verdict(top, confidence * top_weight / total, p_chosen, len(valid), invalid, detail)


def panel_key(judges: Sequence[JudgeIdentity], aggregation: AggregationConfig) -> str:
    keys = sorted(identity.key for identity in judges)
    return digest(aggregation.policy, aggregation.min_judges, keys)


def verdict_rows(
    judgments: pa.Table,
    judges: Sequence[JudgeIdentity],
    aggregation: AggregationConfig,
    run_id: str,
) -> pa.Table:
    """``verdicts`` rows (one per judge and one per panel) for every pair in ``judgments``
    (the rows of the panel's judges, up to their ``samples_per_order``)."""
    identities = {i.cache_id: i for i in judges}
    grouped: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    columns = [
        "source",
        "pair_id",
        "model",
        "template_hash",
        "params_hash",
        "ordering",
        "sample",
        "valid",
        "preference",
        "p_chosen",
    ]
    for row in judgments.select(columns).to_pylist():
        identity = identities.get((row["model"], row["template_hash"], row["params_hash"]))
        if identity is not None and row["sample"] < identity.judge.samples_per_order:
            grouped[(row["source"], row["pair_id"])][identity.key].append(row)
    now, panel = datetime.now(UTC), panel_key(judges, aggregation)
    name = f"panel:{aggregation.policy}"
    out = []
    for (source, pair_id), per_judge in sorted(grouped.items()):
        decided = []
        for identity in identities.values():
            verdict = judge_verdict(per_judge.get(identity.key, []))
            decided.append((verdict, identity.judge.weight))
            out.append(
                _verdict_row(
                    source,
                    pair_id,
                    identity.key,
                    "judge",
                    identity.judge.name,
                    verdict,
                    run_id,
                    now,
                )
            )
        verdict = panel_verdict(decided, aggregation.policy, aggregation.min_judges)
        out.append(_verdict_row(source, pair_id, panel, "panel", name, verdict, run_id, now))
    return pa.Table.from_pylist(out, schema=VERDICTS.schema)


def _verdict_row(
    source: str,
    pair_id: str,
    key: str,
    level: str,
    judge: str,
    verdict: Verdict,
    run_id: str,
    now: datetime,
) -> dict[str, Any]:
    return {
        "source": source,
        "pair_id": pair_id,
        "judge_key": key,
        "level": level,
        "judge": judge,
        "verdict": verdict.verdict,
        "confidence": min(max(verdict.confidence, 0.0), 1.0),
        "p_chosen": verdict.p_chosen,
        "votes": verdict.votes,
        "invalid": verdict.invalid,
        "detail": verdict.detail,
        "verdict_run_id": run_id,
        "decided_at": now,
    }
