"""The main job on the embedded defaults (``synpref demo``): a seeded synthetic corpus (with
planted duplicates, flips, contamination and bad rows) and the real datasets found beside the
checkout (HH-RLHF, RM-Bench, JudgeBench) are ingested, deduplicated and decontaminated, then a
short human-AI loop runs on them (``demo.loop``) with a simulated annotator. Every step is a
child run of the demo's MLflow run."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pipelines import jobs
from pipelines.core.config import SynprefConfig
from pipelines.core.jobs import JobContext, JobResult, JobSummary
from pipelines.core.lake import TableInfo
from pipelines.ingest.job import IngestRequest
from pipelines.ingest.synthetic import CorpusSpec, benchmark_prompts, write_corpus

log = logging.getLogger(__name__)

DEMO_SOURCE = "synthetic-demo"
DEMO_HUMAN_SOURCE = "synthetic-human"
"""Without the configured human-labelled sources (HH beside the checkout), the first of the
synthetic corpus's ``DEMO_SHARDS`` files plays one, so that Stage 2 still has D_wild pairs and
the final models a curated set besides D_gold to train on."""
DEMO_SHARDS = 4


@dataclass
class DemoSummary(JobSummary):
    job: ClassVar[str] = "demo"
    lake: str
    steps: list[JobResult[Any]]
    """The child jobs in order: ingests, dedup, decontamination, the loop."""
    skipped_inputs: list[str]
    tables: list[TableInfo]

    def as_dict(self) -> dict[str, Any]:
        return {
            "lake": self.lake,
            "steps": [step.as_dict() for step in self.steps],
            "skipped_inputs": self.skipped_inputs,
            "tables": [dataclasses.asdict(t) for t in self.tables],
        }

    def text(self) -> str:
        lines = [step.summary.text() for step in self.steps]
        lines += [f"skipped (not found): {_shown(p)}" for p in self.skipped_inputs]
        lines += ["", f"lake {self.lake}:", f"  {'table':<20}{'version':>8}{'rows':>14}"]
        lines += [f"  {t.name:<20}{t.version:>8}{t.rows:>14,}" for t in self.tables]
        lines += ["", "Where to look:", *WHERE_TO_LOOK]
        return "\n".join(lines)


WHERE_TO_LOOK = [
    "  MLflow: mlflow ui --backend-store-uri sqlite:///mlruns.db  (the demo run; its loop run has "
    "a child per iteration)",
    "  tables: synpref tables | synpref loop status | synpref labels explain PAIR_ID",
    "  the curated set: the `curated_sets` table, set demo/curated; train on it with "
    "synpref train --set demo/curated",
    "  with people instead of the simulated annotator: loop.annotator: label-studio "
    "(docs/loop.md, docs/review.md)",
]


def run_demo(ctx: JobContext) -> DemoSummary:
    config = ctx.config
    demo = config.demo
    found = {n: [p for p in paths if Path(p).exists()] for n, paths in demo.extra_inputs.items()}
    found = {name: paths for name, paths in found.items() if paths}
    skipped = [p for paths in demo.extra_inputs.values() for p in paths if not Path(p).exists()]
    prompts = _first_benchmark_prompts(found.get("rm-bench", []))
    spec = CorpusSpec(pairs=demo.pairs, seed=demo.seed, contamination_rate=0.01 if prompts else 0)
    files = [str(f) for f in write_corpus(spec, demo.workdir, DEMO_SHARDS, prompts)]
    log.info(f"[demo] generated {demo.pairs:,} synthetic pairs (+ planted rows) in {demo.workdir}")
    humans_here = bool(set(config.loop.human_sources) & found.keys())
    synthetic = (
        {DEMO_SOURCE: files}
        if humans_here
        else {DEMO_HUMAN_SOURCE: files[:1], DEMO_SOURCE: files[1:]}
    )
    sources = synthetic | found
    steps: list[JobResult[Any]] = [
        jobs.ingest(config, IngestRequest(paths=paths, source=source))
        for source, paths in sources.items()
    ]
    steps += [jobs.dedup(config), jobs.decontaminate(config)]
    if demo.loop:
        steps.append(jobs.loop(_loop_config(config, humans_here)))
    return DemoSummary(config.lake.root, steps, skipped, ctx.lake.tables())


def _loop_config(config: SynprefConfig, humans_here: bool) -> SynprefConfig:
    """The loop as configured, with a quarter of the synthetic corpus as the human-labelled
    source when none of the configured ones is here, only the benchmarks whose data is here,
    and reward models of ``demo.max_length`` tokens."""
    loop = config.loop
    if not humans_here:
        log.info(
            f"[demo] no {loop.human_sources} data: {DEMO_HUMAN_SOURCE} (a quarter of the "
            f"synthetic corpus) plays the human-labelled source, {DEMO_SOURCE} is D_wild"
        )
        seed_set = f"source = '{DEMO_HUMAN_SOURCE}'"
        loop = loop.model_copy(update={"human_sources": [DEMO_HUMAN_SOURCE], "seed_set": seed_set})
    present = {name: path for name, path in loop.benchmarks.items() if Path(path).exists()}
    for name in loop.benchmarks.keys() - present.keys():
        log.info(f"[demo] benchmark {name}: {loop.benchmarks[name]} not found, left out")
    training = config.training.model_copy(update={"max_length": config.demo.max_length})
    scoring = config.scoring.model_copy(update={"max_length": config.demo.max_length})
    update = {"loop": loop.model_copy(update={"benchmarks": present})}
    return config.model_copy(update=update | {"training": training, "scoring": scoring})


def _shown(path: str) -> str:
    """A relative path with the folder it was looked for from (configs/local.yaml's datasets
    are found from a checkout's folder only)."""
    return path if Path(path).is_absolute() else f"{path} (from {Path.cwd()})"


def _first_benchmark_prompts(paths: list[str]) -> list[str]:
    for path in paths:
        files = sorted(Path(path).glob("*.json")) if Path(path).is_dir() else [Path(path)]
        if files:
            return benchmark_prompts(files[0])
    return []
