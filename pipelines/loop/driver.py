"""The loop's driver: its plan of steps, run or resumed, each committed as it finishes.

MLflow shows the loop as one parent run, a child per part (the seed review, each Stage 1
iteration, Stage 2, the final models) and a grandchild per step: a job's own run (train,
score, judge, eval) or a run of the step's work (sets, retrieval, review, labels). The parent
carries the per-iteration numbers as metric histories (step = iteration) and the plots.
A killed driver resumes at the first step not committed; its orphaned runs are marked KILLED.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import mlflow
from mlflow.entities import Metric
from pydantic import ValidationError

from pipelines.core import reporting
from pipelines.core.config import LoopConfig, SynprefConfig, recipe
from pipelines.core.errors import ConfigError, SelectionError
from pipelines.core.jobs import JobContext, JobResult, JobSummary, TableVersion, run_job
from pipelines.core.lake import Lake
from pipelines.loop import stage1, stage2
from pipelines.loop.pools import composition
from pipelines.loop.state import LoopPaused, LoopState
from pipelines.loop.steps import LoopRun
from storage_schemas import CURATED_SETS, LABELS, PAIRS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

Work = Callable[[LoopRun], dict[str, Any]]


@dataclass(frozen=True)
class Step:
    """One committed unit of the loop. ``part`` is its MLflow child run; a ``job`` step's
    work runs jobs, whose runs are the step's runs."""

    name: str
    part: str
    work: Work
    job: bool = False


PART_NAMES = {"s1/0": "stage 1: seed review", "s2": "stage 2", "final": "final models"}


def plan(loop: LoopConfig) -> list[Step]:
    """Every step of the loop, in order."""
    steps = [
        Step("s1/0/review", "s1/0", stage1.seed_review),
        Step("s1/0/await-review", "s1/0", partial(stage1.await_review, iteration=0)),
    ]
    for i in range(1, loop.iterations + 1):
        part = f"s1/{i}"
        steps += [
            Step(f"{part}/sets", part, partial(stage1.iteration_sets, iteration=i)),
            Step(f"{part}/train", part, partial(stage1.train, iteration=i), job=True),
            Step(f"{part}/score-gold", part, partial(stage1.score_gold, iteration=i), job=True),
            Step(f"{part}/retrieve", part, partial(stage1.retrieve, iteration=i)),
            Step(f"{part}/review", part, partial(stage1.review, iteration=i)),
            Step(f"{part}/await-review", part, partial(stage1.await_review, iteration=i)),
            Step(f"{part}/judge", part, partial(stage1.judge_retrieved, iteration=i), job=True),
            Step(f"{part}/label", part, partial(stage1.label, iteration=i)),
        ]
    if loop.stage2:
        steps += [
            Step("s2/sets", "s2", stage2.gold_set),
            Step("s2/gold-rm", "s2", stage2.gold_rm, job=True),
        ]
        if loop.best_rm_folds > 1:
            for fold in range(loop.best_rm_folds):
                train = partial(stage2.best_rm_without, fold=fold)
                steps.append(Step(f"s2/best-rm-{fold}", "s2", train, job=True))
        steps += [
            Step("s2/score", "s2", stage2.score_wild, job=True),
            Step("s2/judge", "s2", stage2.judge_wild, job=True),
            Step("s2/decide", "s2", stage2.decide),
        ]
    steps.append(Step("final/sets", "final", stage2.curated_sets))
    if loop.final:
        for which in ("curated", "all"):
            train = partial(stage2.train_final, which=which)
            steps.append(Step(f"final/train-{which}", "final", train, job=True))
            for benchmark, data in sorted(loop.benchmarks.items()):
                evaluate = partial(stage2.evaluate, which=which, benchmark=benchmark, data=data)
                steps.append(Step(f"final/eval-{which}-{benchmark}", "final", evaluate, job=True))
    return steps


@dataclass
class LoopSummary(JobSummary):
    """Where a loop stands: its steps, the numbers of each iteration, and its curated set."""

    job: ClassVar[str] = "loop"
    loop: str
    status: str
    """``finished``, or ``waiting`` for people (``waiting_for`` says what)."""
    steps_done: int
    steps_total: int
    steps_run: list[str]
    annotator: str
    pools: dict[str, int]
    iterations: list[dict[str, float]] = field(default_factory=list)
    stage2: dict[str, float] = field(default_factory=dict)
    curated_set: str | None = None
    curated: dict[str, float] = field(default_factory=dict)
    final: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per final model (``curated``, ``all``): gold accuracy and benchmark metrics."""
    waiting_for: str | None = None
    labels_version: int | None = None
    curated_sets_version: int | None = None

    def text(self) -> str:
        lines = [
            f"loop {self.loop}: {self.status}, {self.steps_done} of {self.steps_total} steps "
            f"done ({len(self.steps_run)} in this run); annotator: {self.annotator}"
        ]
        if self.annotator == "simulated":
            lines.append(
                "  the annotator is SIMULATED (answers from the corpus's ground truth); with "
                "people: loop.annotator: label-studio (docs/loop.md)"
            )
        if self.waiting_for:
            lines.append(f"  {self.waiting_for}")
        for i, metrics in enumerate(self.iterations, 1):
            agreement = metrics.get("judge_human_agreement")
            lines.append(
                f"  iteration {i}: gold {metrics['gold_pairs']:,.0f}, silver "
                f"{metrics['silver_pairs']:,.0f}, RM on gold {metrics['gold_accuracy']:.1%}, "
                f"retrieved {metrics['retrieved']:,.0f}"
                + (f", judges agree with people {agreement:.1%}" if agreement is not None else "")
            )
        if self.stage2:
            lines.append(
                "  stage 2: "
                + ", ".join(f"{k.removeprefix('stage2_')} {v:,.0f}" for k, v in self.stage2.items())
            )
        pools = ", ".join(f"{k} {v:,}" for k, v in self.pools.items())
        lines.append(f"  pools: {pools}")
        if self.curated_set:
            lines.append(
                f"  curated set {self.curated_set}: {self.curated.get('curated_pairs', 0):,.0f} "
                f"pairs ({self.curated.get('curated_flipped', 0):,.0f} flipped); train on it: "
                f"synpref train --set {self.curated_set}"
            )
        for which, metrics in self.final.items():
            shown = ", ".join(f"{k} {v:.3f}" for k, v in sorted(metrics.items()))
            lines.append(f"  RM on {which}: {shown}")
        return "\n".join(lines)

    def tables_written(self) -> list[TableVersion]:
        tables = [
            (LABELS.name, self.labels_version),
            (CURATED_SETS.name, self.curated_sets_version),
        ]
        return [TableVersion(name, v) for name, v in tables if v is not None]

    def metrics(self) -> dict[str, float]:
        metrics = {f"pool_{pool}": float(n) for pool, n in self.pools.items()}
        metrics |= self.stage2 | self.curated
        for which, values in self.final.items():
            metrics |= {f"final_{which}.{k}": v for k, v in values.items()}
        return metrics

    def tags(self) -> dict[str, str]:
        return {"synpref.loop": self.loop, "synpref.loop.status": self.status}

    def figures(self, lake: Lake) -> dict[str, Figure]:
        figures = {}
        if self.iterations:
            figures["loop/iterations.png"] = reporting.loop_iterations(self.iterations)
        composition_by = {
            k.removeprefix("curated_from_"): v
            for k, v in self.curated.items()
            if k.startswith("curated_from_")
        }
        if composition_by:
            figures["loop/curated_set.png"] = reporting.curated_composition(composition_by)
        return figures


def run_loop(config: SynprefConfig, resume: bool = False) -> JobResult[LoopSummary]:
    """Run the loop's steps not committed yet; ``resume`` insists that it has started."""
    loop = config.loop
    lake = Lake(config.lake.root, config.lake.storage_options)
    state = LoopState(lake, loop.name)
    started = state.results.get("start")
    if resume and started is None:
        raise SelectionError(f"loop {loop.name!r} has not started: `synpref loop run` starts it")
    missing = {name: data for name, data in loop.benchmarks.items() if not Path(data).exists()}
    if missing and loop.final:
        raise ConfigError(f"loop.benchmarks: data not found: {missing}")
    if started is not None:
        _check_unchanged(started, config)
    return run_job(
        config,
        "loop",
        partial(_run, state=state),
        {"loop_steps": len(plan(loop))},
        run_name=loop.name,
        resume_run_id=started["run_id"] if started else None,
    )


RECIPE_SECTIONS = ("loop", "training", "scoring", "judging")
"""The config sections whose recipe (``config.recipe``) a loop's committed steps assume."""


def _recipe(config: SynprefConfig) -> dict[str, dict[str, Any]]:
    recipes = {name: recipe(getattr(config, name)) for name in RECIPE_SECTIONS}
    del recipes["training"]["data"]  # each training step sets its own
    return recipes


def _check_unchanged(started: dict[str, Any], config: SynprefConfig) -> None:
    """A loop resumes with the recipe it started with (its committed steps assume it); the
    operational fields (resources, endpoints) may change. A key added to the config since the
    loop started stands at its default; a loop started before recipes were recorded has only
    its ``loop`` section checked."""
    recorded = started.get("recipe") or {"loop": started["loop"]}
    try:
        then = config.model_copy(
            update={
                name: type(getattr(config, name)).model_validate(values)
                for name, values in recorded.items()
            }
        )
    except ValidationError as exc:
        raise ConfigError(
            f"loop {config.loop.name!r} started with a config this version cannot read ({exc}): "
            "give the loop a new loop.name"
        ) from None
    now, before = _flat(_recipe(config)), _flat(_recipe(then))
    changed = sorted(k for k in now.keys() | before.keys() if now.get(k) != before.get(k))
    if changed:
        raise ConfigError(
            f"loop {config.loop.name!r} started with other values of {', '.join(changed)}: "
            "resume it with the same config (operational fields such as training.workers may "
            "change), or give the changed loop a new loop.name"
        )


def _flat(values: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts and lists as one level of dotted keys (list items by index)."""
    if isinstance(values, dict):
        items = values.items()
    elif isinstance(values, list) and any(isinstance(v, dict) for v in values):
        items = ((str(i), v) for i, v in enumerate(values))
    else:
        return {prefix: values}
    return {
        k: v
        for key, value in items
        for k, v in _flat(value, f"{prefix}.{key}" if prefix else key).items()
    }


def _run(ctx: JobContext, state: LoopState) -> LoopSummary:
    config, lake, loop = ctx.config, ctx.lake, ctx.config.loop
    if not state.done("start"):
        start = {"run_id": ctx.run_id, "pairs_version": lake.version(PAIRS.name)}
        state.commit("start", start | {"recipe": _recipe(config)}, ctx.run_id)
    else:
        _close_orphans(ctx.run_id)
    run = LoopRun(config, lake, state, ctx.run_id, state.result("start")["pairs_version"])
    if loop.annotator == "simulated":
        log.info(
            "[loop] the annotator is SIMULATED: it answers from the corpus's ground truth "
            f"(loop.simulated_flips: {loop.simulated_flips!r}). With people: set "
            "loop.annotator: label-studio and see docs/loop.md"
        )
    steps = plan(loop)
    ran: list[str] = []
    waiting = None
    try:
        for part, part_steps in groupby(steps, key=lambda s: s.part):
            todo = [s for s in part_steps if not state.done(s.name)]
            if todo:
                with _part_run(run, part):
                    for step in todo:
                        _run_step(run, step)
                        ran.append(step.name)
    except LoopPaused as paused:
        waiting = str(paused)
        log.info(f"[loop] paused: {waiting}")
    return _summary(run, steps, ran, waiting)


@contextmanager
def _part_run(run: LoopRun, part: str) -> Iterator[None]:
    """The MLflow child run of a part of the loop, reopened when the loop resumes in it. A
    pause leaves it finished with the tag ``synpref.loop.status: waiting``."""
    key = f"{part}/run"
    run_id = run.state.result(key)["run_id"] if run.state.done(key) else None
    name = PART_NAMES.get(part, f"iteration {part.removeprefix('s1/')}")
    tags = {"synpref.loop": run.name, "synpref.loop.part": part}
    with mlflow.start_run(
        run_id=run_id, experiment_id=_experiment(), run_name=name, nested=True, tags=tags
    ) as active:
        if run_id is None:
            run.state.commit(key, {"run_id": active.info.run_id}, run.run_id)
        try:
            yield
            mlflow.set_tag("synpref.loop.status", "finished")
        except LoopPaused:
            mlflow.set_tag("synpref.loop.status", "waiting")
            raise


def _run_step(run: LoopRun, step: Step) -> None:
    """Run one step (in a run of its own unless its jobs make them), log its numbers on its
    part's run (and the iteration's on the loop's run) and commit it."""
    log.info(f"[loop] {step.name}")
    started = time.perf_counter()
    if step.job:
        result = step.work(run)
    else:
        tags = {"synpref.loop": run.name, "synpref.loop.step": step.name}
        with mlflow.start_run(
            experiment_id=_experiment(), run_name=step.name, nested=True, tags=tags
        ):
            result = step.work(run)
            _log_numbers(result)
    result["seconds"] = round(time.perf_counter() - started, 3)
    log.info(f"[loop] {step.name} committed after {result['seconds']:.0f}s")
    leaf = step.name.rsplit("/", 1)[-1]
    _log_numbers(result, prefix=f"{leaf}.")
    metrics = result.get("metrics", {})
    if metrics and step.part.startswith("s1/") and step.part != "s1/0":
        iteration = int(step.part.removeprefix("s1/"))
        mlflow.MlflowClient().log_batch(
            run.run_id, metrics=[Metric(k, float(v), 0, iteration) for k, v in metrics.items()]
        )
    run.state.commit(step.name, result, mlflow.active_run().info.run_id)


def _experiment() -> str:
    """The active run's experiment: a nested run goes to the default one unless told."""
    return mlflow.active_run().info.experiment_id


def _log_numbers(result: dict[str, Any], prefix: str = "") -> None:
    """The numbers of a step's result (and its ``metrics``) on the active run."""
    numbers = {
        f"{prefix}{k}": float(v)
        for k, v in result.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    numbers |= {k: float(v) for k, v in result.get("metrics", {}).items()}
    if numbers:
        mlflow.log_metrics(numbers)


def _close_orphans(parent: str) -> None:
    """Runs under ``parent`` left RUNNING by a killed driver are marked KILLED."""
    client = mlflow.MlflowClient()
    experiment = client.get_run(parent).info.experiment_id
    pending = [parent]
    while pending:
        filter_string = f"tags.mlflow.parentRunId = '{pending.pop()}'"
        for child in client.search_runs([experiment], filter_string):
            pending.append(child.info.run_id)
            if child.info.status == "RUNNING":
                client.set_tag(child.info.run_id, "synpref.error", "the loop driver was killed")
                client.set_terminated(child.info.run_id, "KILLED")


def _summary(run: LoopRun, steps: list[Step], ran: list[str], waiting: str | None) -> LoopSummary:
    state, loop = run.state, run.config.loop
    iterations = [
        state.result(f"s1/{i}/label")["metrics"]
        for i in range(1, loop.iterations + 1)
        if state.done(f"s1/{i}/label")
    ]
    final = {}
    for which in ("curated", "all"):
        if state.done(f"final/train-{which}"):
            trained = state.result(f"final/train-{which}")
            values = {"gold_accuracy": trained["val_accuracy"]}
            for benchmark in sorted(loop.benchmarks):
                step = f"final/eval-{which}-{benchmark}"
                if state.done(step):
                    metrics = state.result(step)["benchmark_metrics"]
                    values |= {
                        f"{benchmark}.{k}": v
                        for k, v in metrics.items()
                        if not k.startswith("scoring.")  # throughput, not quality
                    }
            final[which] = values
    sets = state.results.get("final/sets", {})
    lake = run.lake
    return LoopSummary(
        loop=loop.name,
        status="waiting" if waiting else "finished",
        steps_done=sum(state.done(s.name) for s in steps),
        steps_total=len(steps),
        steps_run=ran,
        annotator=loop.annotator,
        pools=composition(stage1.current_pools(run)),
        iterations=iterations,
        stage2=state.results.get("s2/decide", {}).get("metrics", {}),
        curated_set=sets.get("curated"),
        curated=sets.get("metrics", {}),
        final=final,
        waiting_for=waiting,
        labels_version=lake.version(LABELS.name) if lake.exists(LABELS.name) else None,
        curated_sets_version=(
            lake.version(CURATED_SETS.name) if lake.exists(CURATED_SETS.name) else None
        ),
    )


@dataclass(frozen=True)
class LoopStatus:
    """Where a loop stands without running it: steps done, the next one, the pools, and what
    it waits for."""

    loop: str
    started: bool
    steps_done: int
    steps_total: int
    next_step: str | None
    pools: dict[str, int]
    open_tasks: int | None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def text(self) -> str:
        if not self.started:
            return f"loop {self.loop}: not started (`synpref loop run` starts it)"
        lines = [
            f"loop {self.loop}: {self.steps_done} of {self.steps_total} steps done; next: "
            f"{self.next_step or 'nothing (finished)'}",
            "  pools: " + ", ".join(f"{k} {v:,}" for k, v in self.pools.items()),
        ]
        if self.open_tasks is not None:
            lines.append(f"  {self.open_tasks:,} review tasks open in Label Studio")
        return "\n".join(lines)


def loop_status(config: SynprefConfig) -> LoopStatus:
    """The status of ``config.loop.name`` from its committed steps (and Label Studio's open
    tasks when it waits for people there)."""
    loop = config.loop
    lake = Lake(config.lake.root, config.lake.storage_options)
    state = LoopState(lake, loop.name)
    steps = plan(loop)
    if not state.done("start"):
        return LoopStatus(loop.name, False, 0, len(steps), steps[0].name, {}, None)
    start = state.result("start")
    run = LoopRun(config, lake, state, start["run_id"], start["pairs_version"])
    upcoming = next((s.name for s in steps if not state.done(s.name)), None)
    open_tasks = None
    if upcoming and upcoming.endswith("await-review") and loop.annotator == "label-studio":
        from pipelines.labels.review import open_tasks as count_open

        open_tasks = count_open(config.review, loop.name, int(upcoming.split("/")[1]))
    return LoopStatus(
        loop.name,
        True,
        sum(state.done(s.name) for s in steps),
        len(steps),
        upcoming,
        composition(stage1.current_pools(run)),
        open_tasks,
    )
