"""Stage 1: grow the gold (human) and silver (LLM) sets, guided by where the reward model errs.

Per iteration: the sets of the moment (``sets``), a reward model trained on D_silver and the
seed set and selected on D_gold (``train``), its p on every gold pair (``score-gold``), the D_un
pairs most similar to the gold pairs it gets wrong or is unsure of (``retrieve``), a budget of
them for people (``review``, then ``await-review``), every one for the judges (``judge``), and
the judges' verdicts as silver labels on the rest (``label``). Before the first iteration,
``s1/0`` sends a seed sample of D_un to people: the first D_gold.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.attributes.job import annotator_key, valid_attributes
from pipelines.core.errors import ConfigError, SelectionError
from pipelines.core.lake import pair_keys
from pipelines.core.selection import select_pair_keys
from pipelines.core.sql import all_of, literal
from pipelines.core.text import prompt_text
from pipelines.labels.events import LabelEvent, rebuild_labels, record_events
from pipelines.labels.sets import SetRef, read_set
from pipelines.llm.retrieval import Embedder
from pipelines.loop.annotators import awaited, request_review
from pipelines.loop.pools import (
    KEYS,
    composition,
    in_pool,
    loop_pairs,
    pools,
    review_order,
)
from pipelines.loop.state import LoopPaused
from pipelines.loop.steps import (
    LoopRun,
    judge,
    oriented,
    p_of,
    retrieval_k,
    save_set,
    score,
    train_rm,
    verdicts_of,
)
from storage_schemas import PAIRS, RETRIEVALS, VERDICTS

log = logging.getLogger(__name__)

VERDICT_LABELS = {"agree": "keep", "disagree": "flip"}
"""A panel verdict as a label; any other verdict (tie, inconsistent, invalid) is ``unsure``."""


def current_pools(run: LoopRun) -> pa.Table:
    """Every loop pair with its label and pool now."""
    return pools(
        run.lake, run.config.loop, loop_pairs(run.lake, run.config.loop, run.pairs_version)
    )


def key_list(keys: pa.Table) -> list[list[str]]:
    return [
        list(k) for k in zip(keys["source"].to_pylist(), keys["pair_id"].to_pylist(), strict=True)
    ]


def key_table(keys: list[list[str]]) -> pa.Table:
    return pa.table(
        {"source": [k[0] for k in keys], "pair_id": [k[1] for k in keys]},
        pa.schema([pa.field("source", pa.string()), pa.field("pair_id", pa.string())]),
    )


def seed_review(run: LoopRun) -> dict[str, Any]:
    """The first D_gold: ``loop.seed_gold`` pairs of D_un, the easiest to verify first."""
    unverified = in_pool(current_pools(run), "D_un")
    if unverified.num_rows == 0:
        raise SelectionError(
            f"Stage 1 has no unverified pairs: loop.human_sources {run.config.loop.human_sources} "
            "holds none of the loop's pairs"
        )
    chosen = review_order(run.lake, run.config.judging, unverified)
    return _review(run, 0, chosen.slice(0, run.config.loop.seed_gold))


def _review(run: LoopRun, iteration: int, keys: pa.Table) -> dict[str, Any]:
    step = f"s1/{iteration}/review"
    sent = request_review(
        run.config, run.lake, keys, iteration, step, run.run_id, run.pairs_version
    )
    log.info(f"[loop] {step}: {keys.num_rows:,} pairs sent to {sent['annotator']}")
    return sent | {"keys": key_list(keys)}


def await_review(run: LoopRun, iteration: int) -> dict[str, Any]:
    """Go on once every pair sent to people is answered; else pause the loop. With Label
    Studio, the answers given so far are pulled first (a skipped task is answered, without a
    label), and the loop waits while the iteration has open tasks."""
    sent = key_table(run.state.result(f"s1/{iteration}/review")["keys"])
    if run.config.loop.annotator == "label-studio":
        from pipelines.labels.review import open_tasks, pull_annotations

        pull_annotations(run.lake, run.config, run.run_id)
        waiting = open_tasks(run.config.review, run.name, iteration)
    else:
        waiting = awaited(run.lake, run.name, sent).num_rows
    if waiting:
        review = run.config.review
        raise LoopPaused(
            f"waiting for people: {waiting:,} of the {sent.num_rows:,} review tasks of "
            f"iteration {iteration} are open in Label Studio project '{review.project}' at "
            f"{review.url}. When they are answered: `synpref loop resume` (it pulls the "
            "answers itself; `synpref review pull` reports the agreement any time)."
        )
    written = rebuild_labels(run.lake, run.config.loop.human_sources)
    answered = sent.num_rows - awaited(run.lake, run.name, sent).num_rows
    return {"answered": answered, "labels_version": written.version}


def members(table: pa.Table) -> pa.Table:
    """Set members of pool rows: each with its label as trained and the event behind it."""
    return pa.table(
        {
            "source": table["source"],
            "pair_id": table["pair_id"],
            "flipped": pc.equal(table["label"], "flip"),
            "origin": table["origin"],
            "event_id": table["event_id"],
        }
    )


def iteration_sets(run: LoopRun, iteration: int) -> dict[str, Any]:
    """D_gold, and D_silver plus the seed set (without gold pairs): the sets the iteration's
    reward model is selected and trained on."""
    loop = run.config.loop
    table = current_pools(run)
    gold = in_pool(table, "D_gold")
    if gold.num_rows == 0:
        raise SelectionError(
            "no gold pairs: people decided none of the pairs sent to them (all 'can't decide')"
        )
    train = in_pool(table, "D_silver")
    if loop.seed_set:
        seed = select_pair_keys(
            run.lake, run.pairs_version, all_of("source_kind = 'corpus'", loop.seed_set)
        )
        seeded = in_pool(table, "D_un", "D_wild").join(seed, KEYS, join_type="inner")
        train = pa.concat_tables([train, seeded.select(train.column_names)])
    if train.num_rows == 0:
        raise ConfigError(
            "the Stage 1 reward model has nothing to train on: D_silver is empty before the "
            "judges' first labels; set loop.seed_set (pairs trained with their original labels)"
        )
    gold_ref = save_set(run, "gold", members(gold))
    train_ref = save_set(run, "train", members(train))
    counts = composition(table)
    log.info(
        f"[loop] iteration {iteration}: {gold.num_rows:,} gold, {counts['D_silver']:,} silver, "
        f"{train.num_rows:,} training pairs ({gold_ref}, {train_ref})"
    )
    return {
        "gold": gold_ref,
        "train": train_ref,
        "gold_pairs": gold.num_rows,
        "train_pairs": train.num_rows,
        "pools": counts,
    }


def train(run: LoopRun, iteration: int) -> dict[str, Any]:
    sets = run.state.result(f"s1/{iteration}/sets")
    return train_rm(run, f"s1/{iteration}/train", sets["train"], sets["gold"])


def gold_p(run: LoopRun, gold_ref: str, scored: dict[str, Any]) -> pa.Table:
    """The model's p on each gold pair, towards the pair's human label (``p_label``)."""
    gold = read_set(run.lake, SetRef.parse(gold_ref))
    labels = gold.append_column(
        "label", pc.if_else(gold["flipped"], pa.scalar("flip"), pa.scalar("keep"))
    )
    return oriented(p_of(run, scored, gold), labels)


def score_gold(run: LoopRun, iteration: int) -> dict[str, Any]:
    """The iteration's model on D_gold: p = σ(r_w - r_l) towards the human label."""
    sets = run.state.result(f"s1/{iteration}/sets")
    gold = read_set(run.lake, SetRef.parse(sets["gold"]))
    step = f"s1/{iteration}/score-gold"
    scored = score(run, step, run.state.result(f"s1/{iteration}/train"), gold)
    p = gold_p(run, sets["gold"], scored)["p_label"].to_numpy()
    accuracy = float(np.mean(p > 0.5))
    log.info(f"[loop] iteration {iteration}: the model is right on {accuracy:.1%} of D_gold")
    return scored | {"gold_accuracy": accuracy, "gold_wrong": int(np.sum(p <= 0.5))}


def retrieve(run: LoopRun, iteration: int) -> dict[str, Any]:
    """For each gold pair, its k most similar D_un pairs (history and attributes embedded);
    k = max_k where the model is wrong (p <= 0.5), else ceil(max_k (1 - p))."""
    loop = run.config.loop
    sets = run.state.result(f"s1/{iteration}/sets")
    gold = gold_p(run, sets["gold"], run.state.result(f"s1/{iteration}/score-gold"))
    unverified = in_pool(current_pools(run), "D_un").select(KEYS)
    embed = Embedder(run.config.judging.gold.embedder)
    texts = _retrieval_texts(run, pa.concat_tables([gold.select(KEYS), unverified]))
    gold_keys, un_keys = key_list(gold), key_list(unverified)
    un_vectors = embed([texts[tuple(k)] for k in un_keys]) if un_keys else np.empty((0, 0))
    gold_vectors = embed([texts[tuple(k)] for k in gold_keys])
    rows = []
    for position, (key, p) in enumerate(zip(gold_keys, gold["p_label"].to_pylist(), strict=True)):
        k = min(retrieval_k(p, loop.max_k), len(un_keys))
        if k == 0:
            continue
        similarity = un_vectors @ gold_vectors[position]
        for rank, j in enumerate(np.argsort(-similarity, kind="stable")[:k]):
            rows.append(
                {
                    "loop": run.name,
                    "iteration": iteration,
                    "gold_source": key[0],
                    "gold_pair_id": key[1],
                    "source": un_keys[j][0],
                    "pair_id": un_keys[j][1],
                    "rank": rank,
                    "similarity": float(similarity[j]),
                    "gold_p": float(p),
                    "k": k,
                }
            )
    written = run.lake.insert_new(RETRIEVALS, pa.Table.from_pylist(rows, RETRIEVALS.schema))
    retrieved = {(r["source"], r["pair_id"]) for r in rows}
    log.info(
        f"[loop] iteration {iteration}: {len(retrieved):,} D_un pairs retrieved for "
        f"{gold.num_rows:,} gold pairs ({len(rows):,} before dedup)"
    )
    return {
        "retrieved": len(retrieved),
        "retrieval_edges": len(rows),
        "unverified": len(un_keys),
        "retrievals_version": written.version,
    }


def _retrieval_texts(run: LoopRun, keys: pa.Table) -> dict[tuple[str, str], str]:
    """What retrieval embeds per pair: the history, then the task category and guideline when
    the annotator labelled the pair (the paper's history + attributes)."""
    judging = run.config.judging
    key = annotator_key(judging.annotator, judging.annotator_template)
    attributes = {(a["source"], a["pair_id"]): a for a in valid_attributes(run.lake, key)}
    rows = run.lake.read(PAIRS.name, run.pairs_version, [*KEYS, "history"])
    wanted = pair_keys(keys).combine_chunks()
    rows = rows.filter(pc.is_in(pair_keys(rows), value_set=wanted)).to_pylist()
    texts = {}
    for row in rows:
        text = prompt_text(row["history"])
        found = attributes.get((row["source"], row["pair_id"]))
        if found:
            text += f"\ntask: {found['task_category']}\nguideline: {found['guideline']}"
        texts[(row["source"], row["pair_id"])] = text
    return texts


def retrieved_keys(run: LoopRun, iteration: int) -> pa.Table:
    """The distinct pairs retrieved in ``iteration``, closest (lowest rank) first."""
    where = f"loop = {literal(run.name)} AND iteration = {iteration}"
    edges = run.lake.read(RETRIEVALS.name, columns=[*KEYS, "rank"], where=where)
    best = edges.group_by(KEYS).aggregate([("rank", "min")])
    return best.sort_by(
        [("rank_min", "ascending"), ("pair_id", "ascending"), ("source", "ascending")]
    ).select(KEYS)


def review(run: LoopRun, iteration: int) -> dict[str, Any]:
    """``loop.human_budget`` of the retrieved pairs to people, the easiest to verify first."""
    retrieved = retrieved_keys(run, iteration)
    ordered = review_order(run.lake, run.config.judging, retrieved)
    return _review(run, iteration, ordered.slice(0, run.config.loop.human_budget))


def judge_retrieved(run: LoopRun, iteration: int) -> dict[str, Any]:
    """The judges on every retrieved pair: the ones people verify measure the judges. Nothing
    retrieved (D_un used up): no judging, and the iteration labels nothing."""
    retrieved = retrieved_keys(run, iteration)
    if retrieved.num_rows == 0:
        log.info(f"[loop] iteration {iteration}: nothing retrieved, nothing to judge")
        return {"panel_key": None}
    gold = run.state.result(f"s1/{iteration}/sets")["gold"]
    return judge(run, f"s1/{iteration}/judge", retrieved, gold)


def label(run: LoopRun, iteration: int) -> dict[str, Any]:
    """The judges' verdicts as silver labels of the retrieved pairs people did not get, the
    judges' agreement with people on those they did, and the iteration's numbers."""
    loop = run.config.loop
    panel = run.state.result(f"s1/{iteration}/judge")["panel_key"]
    retrieved = retrieved_keys(run, iteration)
    human = key_table(run.state.result(f"s1/{iteration}/review")["keys"])
    to_label = retrieved.join(human, KEYS, join_type="left anti")
    step = f"s1/{iteration}/label"
    versions = {PAIRS.name: run.pairs_version}
    verdicts = pa.table({})
    if panel is not None:
        verdicts = verdicts_of(run, panel, to_label)
        versions[VERDICTS.name] = run.lake.version(VERDICTS.name)
    events = [
        LabelEvent(
            v["source"],
            v["pair_id"],
            VERDICT_LABELS.get(v["verdict"], "unsure"),
            "llm-judge",
            f"panel:{panel}",
            f"{loop.name}/{step}",
            loop=loop.name,
            iteration=iteration,
            step=step,
            confidence=v["confidence"],
            evidence={"verdict": v["verdict"], "p_chosen": v["p_chosen"], "detail": v["detail"]},
            read_versions=versions,
        )
        for v in verdicts.to_pylist()
    ]
    record_events(run.lake, events, run.run_id)
    rebuild_labels(run.lake, loop.human_sources)
    table = current_pools(run)
    agreement, compared = _judge_human_agreement(run, panel, human, table)
    silver_new = sum(1 for e in events if e.label in ("keep", "flip"))
    metrics = {
        "gold_pairs": composition(table)["D_gold"],
        "silver_pairs": composition(table)["D_silver"],
        "gold_accuracy": run.state.result(f"s1/{iteration}/score-gold")["gold_accuracy"],
        "retrieved": retrieved.num_rows,
        "sent_to_people": human.num_rows,
        "sent_to_judges": retrieved.num_rows,
        "silver_new": silver_new,
        "unsure_new": len(events) - silver_new,
        "judge_human_pairs": compared,
    } | ({"judge_human_agreement": agreement} if compared else {})
    metrics |= {f"pool_{pool}": n for pool, n in composition(table).items()}
    log.info(
        f"[loop] iteration {iteration}: {silver_new:,} new silver labels, "
        f"{metrics['gold_pairs']:,} gold and {metrics['silver_pairs']:,} silver pairs"
    )
    return {"metrics": metrics}


def _judge_human_agreement(
    run: LoopRun, panel: str | None, human: pa.Table, table: pa.Table
) -> tuple[float, int]:
    """Share of the pairs both people and judges decided (keep or flip) on which they agree."""
    if panel is None:
        return 0.0, 0
    verdicts = verdicts_of(run, panel, human)
    decided = verdicts.join(table.select([*KEYS, "label", "origin"]), KEYS, join_type="inner")
    rows = [
        (VERDICT_LABELS[r["verdict"]], r["label"])
        for r in decided.to_pylist()
        if r["verdict"] in VERDICT_LABELS
        and r["origin"] == "human"
        and r["label"] in ("keep", "flip")
    ]
    if not rows:
        return 0.0, 0
    return sum(judged == labelled for judged, labelled in rows) / len(rows), len(rows)
