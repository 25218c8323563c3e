"""Stage 2 over D_wild, then the curated set and the final reward models.

Stage 2 scores D_wild with the best reward model (Stage 1's last, or per fold of D_wild one
retrained without that fold: ``loop.best_rm_folds``) and with a gold RM trained on D_gold
only, sends the pairs the best RM contradicts or is unsure of to the judges, and decides each
pair by the configured rule: keep it when its label agrees with the gold RM and with the
best RM or the judges; recycle it (chosen and rejected flipped) when the gold RM and (the best
RM or the judges) contradict it; discard it otherwise. The curated set is D_gold, D_silver and
what Stage 2 kept or recycled, each with the label it trains with and the event that explains
it; the final step trains on it and on every loop pair as labelled, and compares the two.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines import jobs
from pipelines.labels.events import LabelEvent, rebuild_labels, record_events
from pipelines.labels.sets import SetRef, read_set
from pipelines.loop.pools import KEYS, in_pool
from pipelines.loop.stage1 import current_pools, members
from pipelines.loop.steps import (
    LoopRun,
    judge,
    oriented,
    p_of,
    save_set,
    score,
    tag_step,
    train_rm,
    verdicts_of,
)
from storage_schemas import PAIRS, RM_SCORES, VERDICTS

log = logging.getLogger(__name__)

OUTCOMES = ("kept", "recycled", "discarded")
"""What Stage 2 does with a D_wild pair."""


def gold_set(run: LoopRun) -> dict[str, Any]:
    """D_gold at the end of Stage 1 (with the last iteration's answers)."""
    gold = in_pool(current_pools(run), "D_gold")
    return {"gold": save_set(run, "gold", members(gold)), "gold_pairs": gold.num_rows}


def gold_rm(run: LoopRun) -> dict[str, Any]:
    """The gold RM: trained on D_gold only, selected on a held-out share of it."""
    return train_rm(run, "s2/gold-rm", run.state.result("s2/sets")["gold"])


def wild_pairs(run: LoopRun) -> pa.Table:
    """D_wild with each pair's current label."""
    return in_pool(current_pools(run), "D_wild")


def fold_of(pairs: pa.Table, folds: int) -> np.ndarray:
    """Each pair's cross-fitting fold: its pair id (a hex digest) modulo ``folds``."""
    return np.array([int(p[-8:], 16) % folds for p in pairs["pair_id"].to_pylist()], np.int64)


def best_rm_without(run: LoopRun, fold: int) -> dict[str, Any]:
    """Stage 1's last RM retrained without D_wild's ``fold``, to score that fold."""
    loop = run.config.loop
    sets = run.state.result(f"s1/{loop.iterations}/sets")
    train = read_set(run.lake, SetRef.parse(sets["train"]))
    wild = wild_pairs(run)
    held_out = wild.filter(pa.array(fold_of(wild, loop.best_rm_folds) == fold)).select(KEYS)
    kept = train.join(held_out, KEYS, join_type="left anti").sort_by(
        [("pair_id", "ascending"), ("source", "ascending")]
    )
    if kept.num_rows == train.num_rows:
        log.warning(
            f"[loop] Stage 1's training set holds no pair of D_wild's fold {fold}: cross-fitting "
            "retrains the same RM (loop.best_rm_folds: 1 scores with Stage 1's RM at no cost)"
        )
    ref = save_set(run, f"best-without-fold{fold}", kept)
    step = f"s2/best-rm-{fold}"
    return train_rm(run, step, ref, sets["gold"]) | {"held_out": held_out.num_rows}


def _best_models(run: LoopRun) -> list[dict[str, Any]]:
    """The best RM of each fold (one fold: Stage 1's last RM)."""
    loop = run.config.loop
    if loop.best_rm_folds == 1:
        return [run.state.result(f"s1/{loop.iterations}/train")]
    return [run.state.result(f"s2/best-rm-{fold}") for fold in range(loop.best_rm_folds)]


def score_wild(run: LoopRun) -> dict[str, Any]:
    """D_wild scored by the best RM (each fold by its own when cross-fitted) and by the gold
    RM."""
    wild = wild_pairs(run)
    models = _best_models(run)
    folds = fold_of(wild, len(models))
    best = [
        score(run, "s2/score", model, wild.filter(pa.array(folds == fold)))
        for fold, model in enumerate(models)
    ]
    return {
        "best": best,
        "gold": score(run, "s2/score", run.state.result("s2/gold-rm"), wild),
        "wild_pairs": wild.num_rows,
    }


def _scored_best(run: LoopRun) -> list[dict[str, Any]]:
    """The best RM(s) D_wild was scored with, one per fold (a loop scored before
    cross-fitting existed committed one, not a list)."""
    best = run.state.result("s2/score")["best"]
    return best if isinstance(best, list) else [best]


def _probabilities(run: LoopRun, wild: pa.Table) -> pa.Table:
    """D_wild with ``p_best`` and ``p_gold``, each towards the pair's current label."""
    scored, best_models = run.state.result("s2/score"), _scored_best(run)
    folds = fold_of(wild, len(best_models))
    by_fold = [
        p_of(run, model, wild.filter(pa.array(folds == fold)))
        for fold, model in enumerate(best_models)
    ]
    best = oriented(pa.concat_tables(by_fold), wild).select([*KEYS, "label", "p_label"])
    gold = oriented(p_of(run, scored["gold"], wild), wild).select([*KEYS, "p_label"])
    both = best.rename_columns([*KEYS, "label", "p_best"]).join(
        gold.rename_columns([*KEYS, "p_gold"]), KEYS, join_type="inner"
    )
    return both.sort_by([("pair_id", "ascending"), ("source", "ascending")])


def judge_wild(run: LoopRun) -> dict[str, Any]:
    """The judges on the pairs the best RM contradicts or is unsure of (within the budget,
    the least sure first)."""
    loop = run.config.loop
    p = _probabilities(run, wild_pairs(run))
    p = p.append_column("doubt", pc.abs(pc.subtract(p["p_best"], 0.5)))
    doubtful = p.filter(
        pc.or_(pc.less_equal(p["p_best"], 0.5), pc.less_equal(p["doubt"], loop.uncertain_band))
    )
    doubtful = doubtful.sort_by(
        [("doubt", "ascending"), ("pair_id", "ascending"), ("source", "ascending")]
    )
    sent = doubtful.slice(0, loop.stage2_judge_budget).select(KEYS)
    log.info(
        f"[loop] s2/judge: {doubtful.num_rows:,} pairs the best RM contradicts or is unsure "
        f"of, {sent.num_rows:,} of them to the judges"
    )
    if sent.num_rows == 0:
        return {"panel_key": None, "sent": 0, "doubtful": doubtful.num_rows}
    gold = run.state.result("s2/sets")["gold"]
    return judge(run, "s2/judge", sent, gold) | {
        "sent": sent.num_rows,
        "doubtful": doubtful.num_rows,
    }


def decide(run: LoopRun) -> dict[str, Any]:
    """Every D_wild pair kept, recycled or discarded by the rule, as a label event."""
    loop = run.config.loop
    p = _probabilities(run, wild_pairs(run))
    panel = run.state.result("s2/judge")["panel_key"]
    verdicts = {}
    if panel is not None:
        rows = verdicts_of(run, panel, p.select(KEYS)).to_pylist()
        verdicts = {(v["source"], v["pair_id"]): v["verdict"] for v in rows}
    scored = run.state.result("s2/score")
    versions = {
        PAIRS.name: run.pairs_version,
        RM_SCORES.name: run.lake.version(RM_SCORES.name),
    } | ({VERDICTS.name: run.lake.version(VERDICTS.name)} if verdicts else {})
    best_models = _scored_best(run)
    folds = fold_of(p, len(best_models)).tolist()
    events, outcomes = [], Counter()
    for row, fold in zip(p.to_pylist(), folds, strict=True):
        verdict = verdicts.get((row["source"], row["pair_id"]))
        # The judges answer about the stored pair: agree means the stored label stands.
        judges_agree = verdict == ("agree" if row["label"] == "keep" else "disagree")
        judges_contradict = verdict == ("disagree" if row["label"] == "keep" else "agree")
        gold_agrees, best_agrees = row["p_gold"] > 0.5, row["p_best"] > 0.5
        if (gold_agrees or not loop.keep_needs_gold_rm) and (best_agrees or judges_agree):
            outcome, label, origin = "kept", row["label"], "rm-consistency"
        elif loop.recycle and not gold_agrees and (not best_agrees or judges_contradict):
            outcome, origin = "recycled", "recycled"
            label = "keep" if row["label"] == "flip" else "flip"
        else:
            outcome, label, origin = "discarded", "discard", "rm-consistency"
        outcomes[outcome] += 1
        events.append(
            LabelEvent(
                row["source"],
                row["pair_id"],
                label,
                origin,
                f"{loop.name}/stage2",
                f"{loop.name}/s2/decide",
                loop=loop.name,
                step="s2/decide",
                confidence=None,
                evidence={
                    "outcome": outcome,
                    "p_best": row["p_best"],
                    "p_gold": row["p_gold"],
                    "verdict": verdict,
                    "best_model": best_models[fold]["model_name"],
                    "gold_model": scored["gold"]["model_name"],
                    "label_before": row["label"],
                },
                read_versions=versions,
            )
        )
    record_events(run.lake, events, run.run_id)
    rebuild_labels(run.lake, loop.human_sources)
    log.info(
        f"[loop] stage 2: {outcomes['kept']:,} kept, {outcomes['recycled']:,} recycled, "
        f"{outcomes['discarded']:,} discarded of {p.num_rows:,} D_wild pairs"
    )
    return {"metrics": {f"stage2_{k}": float(outcomes[k]) for k in OUTCOMES}}


def curated_sets(run: LoopRun) -> dict[str, Any]:
    """The curated set (D_gold, D_silver, and D_wild as Stage 2 kept or recycled it) and, to
    compare with, every loop pair with its original label."""
    table = current_pools(run)
    wild = in_pool(table, "D_wild")
    wild = wild.filter(pc.is_in(wild["origin"], pa.array(["rm-consistency", "recycled"])))
    curated = pa.concat_tables([in_pool(table, "D_gold", "D_silver"), wild])
    everything = table.select(KEYS).append_column(
        "flipped", pa.array(np.zeros(table.num_rows, bool))
    )
    everything = everything.append_column(
        "origin", pa.array(["original"] * table.num_rows, pa.string())
    ).append_column("event_id", pa.nulls(table.num_rows, pa.string()))
    by_origin = Counter(curated["origin"].to_pylist())
    flipped = int(pc.sum(pc.equal(curated["label"], "flip")).as_py() or 0)
    log.info(
        f"[loop] curated set: {curated.num_rows:,} of {table.num_rows:,} pairs "
        f"({flipped:,} flipped): {dict(by_origin)}"
    )
    return {
        "curated": save_set(run, "curated", members(curated)),
        "all": save_set(run, "all", everything),
        "gold": save_set(run, "gold", members(in_pool(table, "D_gold"))),
        "metrics": {
            "curated_pairs": float(curated.num_rows),
            "curated_flipped": float(flipped),
            "loop_pairs": float(table.num_rows),
        }
        | {f"curated_from_{origin}": float(n) for origin, n in by_origin.items()},
    }


def train_final(run: LoopRun, which: str) -> dict[str, Any]:
    """The final RM on the curated set (registered) or, to compare, on every loop pair as it
    came; both selected on D_gold (which neither trains on)."""
    sets = run.state.result("final/sets")
    step = f"final/train-{which}"
    return train_rm(run, step, sets[which], sets["gold"], register=which == "curated")


def evaluate(run: LoopRun, which: str, benchmark: str, data: str) -> dict[str, Any]:
    """A final RM on one of the configured benchmarks."""
    model = run.state.result(f"final/train-{which}")
    result = jobs.evaluate(run.config, benchmark, data, model=model["model_folder"])
    tag_step(result.run_id, run.name, f"final/eval-{which}-{benchmark}")
    return {"benchmark_metrics": result.summary.metrics(), "run_id": result.run_id}
