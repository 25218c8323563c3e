"""The platform's jobs as library calls: each takes the config (and its own inputs), runs as one
MLflow run (nested under the active run, e.g. a loop iteration) and returns a typed
``JobResult``. The CLI (``ray_jobs``), the demo, the benchmarks and the tests all compose jobs
through these functions.

    from pipelines import jobs
    from pipelines.core.config import load_config

    config = load_config()
    jobs.ingest(config, IngestRequest(paths=["hh.jsonl.gz"], source="hh"))
    result = jobs.dedup(config)
    print(result.summary.exact_duplicates, result.mlflow_run)

Each function imports its step's modules when called, so that a job (and ``synpref --help``)
pays only for what it uses: scoring needs torch, ingest does not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from pipelines.core.config import JudgingConfig, SynprefConfig
from pipelines.core.jobs import JobContext, JobResult, Summary, run_job
from pipelines.core.lake import Lake

if TYPE_CHECKING:
    from pathlib import Path

    from pipelines.attributes.job import AnnotateSummary
    from pipelines.demo import DemoSummary
    from pipelines.hygiene.decontamination import DecontaminationSummary
    from pipelines.hygiene.dedup import DedupSummary
    from pipelines.ingest.job import IngestRequest, IngestSummary
    from pipelines.judging.job import JudgeSummary
    from pipelines.labels.review import ReviewPullSummary, ReviewPushSummary
    from pipelines.loop.driver import LoopSummary
    from pipelines.rm.evaluation import EvalSummary
    from pipelines.rm.scoring import ScoreSummary
    from pipelines.rm.training import TrainSummary


def ingest(config: SynprefConfig, request: IngestRequest) -> JobResult[IngestSummary]:
    """Preference files into ``pairs`` (bad rows into ``quarantine``, each with its reason)."""
    from dataclasses import asdict

    from pipelines.ingest.job import ingest as ingest_files
    from pipelines.ingest.job import log_quarantine_sample

    def work(ctx: JobContext) -> IngestSummary:
        summary = ingest_files(request, ctx.lake, config.ingest, ctx.run_id)
        log_quarantine_sample(ctx.lake, summary, config.ingest.quarantine_sample)
        return summary

    return run_job(config, "ingest", work, {"request": asdict(request)})


def dedup(config: SynprefConfig) -> JobResult[DedupSummary]:
    """Exact and near-duplicate clusters, prompt groups and label conflicts of all pairs."""
    from pipelines.hygiene.dedup import dedup as dedup_pairs

    return run_job(config, "dedup", lambda ctx: dedup_pairs(ctx.lake, config.dedup, ctx.run_id))


def decontaminate(config: SynprefConfig) -> JobResult[DecontaminationSummary]:
    """Corpus pairs that share n-grams with the lake's benchmark sources."""
    from pipelines.hygiene.decontamination import decontaminate as scan

    return run_job(
        config, "decontaminate", lambda ctx: scan(ctx.lake, config.decontamination, ctx.run_id)
    )


def annotate(
    config: SynprefConfig,
    where: str | None = None,
    limit: int | None = None,
    retry_rejected: bool = False,
) -> JobResult[AnnotateSummary]:
    """The attributes of the selected pairs that the annotator has not labelled."""
    from pipelines.attributes.job import annotate_pairs

    return _over_pairs(config, "annotate", annotate_pairs, where, limit, retry_rejected)


def judge(
    config: SynprefConfig,
    where: str | None = None,
    limit: int | None = None,
    retry_rejected: bool = False,
) -> JobResult[JudgeSummary]:
    """Judgments (both orders) of the selected pairs by every judge, and their verdicts.
    Requests a server rejected for good are asked again only with ``retry_rejected``."""
    from pipelines.judging.job import judge_pairs

    return _over_pairs(config, "judge", judge_pairs, where, limit, retry_rejected)


def _over_pairs(
    config: SynprefConfig,
    job: str,
    work: Callable[[Lake, JudgingConfig, str, str | None, int | None, bool], Summary],
    where: str | None,
    limit: int | None,
    retry_rejected: bool,
) -> JobResult[Summary]:
    """An LLM job (``config.judging``) over the pairs matching ``where``, up to ``limit``."""
    return run_job(
        config,
        job,
        lambda ctx: work(ctx.lake, config.judging, ctx.run_id, where, limit, retry_rejected),
        {"where": where, "limit": limit, "retry_rejected": retry_rejected},
    )


def score(
    config: SynprefConfig, model: str, model_name: str | None = None, where: str | None = None
) -> JobResult[ScoreSummary]:
    """Rewards of the selected pairs that ``model`` has not scored, into ``rm_scores``."""
    from pipelines.rm.scoring import score_pairs

    return run_job(
        config,
        "score",
        lambda ctx: score_pairs(ctx.lake, model, config.scoring, ctx.run_id, where, model_name),
        {"model": model, "model_name": model_name, "where": where},
    )


def train(config: SynprefConfig, name: str | None = None) -> JobResult[TrainSummary]:
    """A reward model on the configured selection (Ray Train), logged and registered. Re-using
    a name resumes that run; the default name is a fingerprint of the config and the data."""
    from pipelines.core.tracking import absolute_uri
    from pipelines.rm.training import default_run_name, register, train_reward_model

    training = config.training
    name = name or default_run_name(Lake(config.lake.root, config.lake.storage_options), training)
    tracking_uri = absolute_uri(config.tracking.uri)

    def work(ctx: JobContext) -> TrainSummary:
        trained = train_reward_model(ctx.lake, training, tracking_uri, ctx.run_id, name)
        return register(trained, training.register_as)

    return run_job(config, "train", work, {"run_name": name}, run_name=name)


def evaluate(
    config: SynprefConfig,
    benchmark: str,
    data: str,
    model: str | None = None,
    scores: str | None = None,
    mapping: dict[str, str] | None = None,
) -> JobResult[EvalSummary]:
    """A reward model (or a file of scores) on a benchmark, by the benchmark's own rules."""
    from pipelines.rm.evaluation import EvalDataError, evaluate_benchmark, load_items, log_items

    if (model is None) == (scores is None):
        raise EvalDataError("give exactly one of a reward model and a scores file")
    items = load_items(benchmark, data, mapping)  # bad data fails before a run is opened

    def work(ctx: JobContext) -> EvalSummary:
        summary = evaluate_benchmark(
            benchmark, data, items, model, scores, config.scoring, config.lake.storage_options
        )
        log_items(summary.result)
        return summary

    params = {"benchmark": benchmark, "data": data, "model": model, "scores": scores}
    return run_job(config, "eval", work, params | {"mapping": mapping}, uses_ray=model is not None)


def loop(config: SynprefConfig, resume: bool = False) -> JobResult[LoopSummary]:
    """The human-AI loop (``config.loop``): Stage 1 iterations, Stage 2, the curated set and
    the final reward models, each step committed as it finishes. Run again (or ``resume``) to
    go on from the first step not committed; a loop waiting for people returns ``waiting``."""
    from pipelines.loop.driver import run_loop

    return run_loop(config, resume)


def demo(config: SynprefConfig) -> JobResult[DemoSummary]:
    """The main job on the embedded defaults: a synthetic corpus and the real datasets found
    beside the checkout, ingested, deduplicated and decontaminated, as child runs."""
    from pipelines.demo import run_demo

    return run_job(config, "demo", run_demo)


def review_push(
    config: SynprefConfig,
    where: str | None = None,
    limit: int | None = None,
    to_file: Path | None = None,
) -> JobResult[ReviewPushSummary]:
    """The selected pairs as pairwise tasks of the Label Studio project ``review.project``
    (pairs already there are skipped), or as Label Studio's JSON import file ``to_file``."""
    from pipelines.core.selection import select_pair_keys
    from pipelines.labels.review import push_pairs
    from storage_schemas import PAIRS

    def work(ctx: JobContext) -> ReviewPushSummary:
        keys = select_pair_keys(ctx.lake, ctx.lake.version(PAIRS.name), where, limit)
        return push_pairs(ctx.lake, config.review, keys, ctx.run_id, to_file=to_file)

    params = {"where": where, "limit": limit, "to_file": str(to_file) if to_file else None}
    return run_job(config, "review_push", work, params, uses_ray=False)


def review_pull(
    config: SynprefConfig, from_file: Path | None = None
) -> JobResult[ReviewPullSummary]:
    """The review project's answers (or those of a Label Studio JSON export file) as human
    label events, the rebuilt ``labels``, and the reviewers' agreement."""
    from pipelines.labels.review import pull_annotations

    params = {"from_file": str(from_file) if from_file else None}
    return run_job(
        config,
        "review_pull",
        lambda ctx: pull_annotations(ctx.lake, config, ctx.run_id, from_file),
        params,
        uses_ray=False,
    )
