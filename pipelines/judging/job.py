"""Pairwise LLM judging: both orders, K samples, a judgment cache, verdicts within and across
judges.

For each judge and pair, the pair is shown in both orders (AB: chosen as response A; BA: chosen
as response B), ``samples_per_order`` times each. One answer is one ``judgments`` row, keyed by
(pair, judge model, template hash, sampling-parameter hash, order, sample): a re-run, or a later
iteration with the same judge, judges only the rows that are missing.

A verdict is read from the answer in one of two ways (``JudgeConfig.verdict``):

- ``logprobs``: the answer is prefilled up to the choice (``{"winner": "``) and the
  probabilities of the choice tokens ``A``, ``B``, ``tie`` among the first token's top
  log-probabilities decide; ``p_chosen`` = P(chosen's letter) / (P(A) + P(B)).
- ``structured``: the model writes ``{"winner": "A" | "B" | "tie"}``, parsed from its text.

Answers that cannot be read are asked again (``max_retries``), then recorded as invalid with the
reason; nothing is guessed. Verdicts (``verdicts`` table) are derived from the judgments:

- per judge: each order's majority preference (chosen / rejected / tie); the same in both orders
  gives ``agree`` (chosen), ``disagree`` (the label should flip) or ``tie``; different ones give
  ``inconsistent`` (the verdict changed with the order); an order without a valid answer gives
  ``invalid``. Confidence: mean p_chosen for agree, 1 - that for disagree, the share of tie
  votes for tie, |p_chosen(AB) - p_chosen(BA)| for inconsistent;
- per panel, across judges (``aggregation.policy``): majority, unanimity or weight over half;
  a split is ``inconsistent``, fewer valid judges than ``min_judges`` is ``invalid``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import ray
from matplotlib.figure import Figure

from pipelines.attributes.job import annotator_key, valid_attributes
from pipelines.core import reporting
from pipelines.core.actor_pool import (
    REQUEST_BLOCK_CPUS,
    StageResult,
    check_cpus,
    missing_rows,
    run_in_process,
    run_stage,
    stage_pairs,
)
from pipelines.core.config import ActorPoolConfig, GoldConfig, JudgingConfig
from pipelines.core.errors import ConfigError
from pipelines.core.jobs import PairsSummary, TableVersion, versions
from pipelines.core.lake import Lake, pair_keys
from pipelines.core.selection import select_pair_keys
from pipelines.judging.actor import PairJudge, attach_attributes, request_rows
from pipelines.judging.identity import JudgeIdentity, PromptInputs, cache_predicate, digest
from pipelines.judging.quality import judge_quality
from pipelines.judging.verdicts import panel_key, verdict_rows
from pipelines.labels.sets import SetRef, flipped_keys, pinned, read_set
from pipelines.llm.retrieval import Embedder, NearestGold, build_index
from storage_schemas import JUDGE_ORDERS, JUDGMENTS, PAIRS, VERDICTS, VERDICTS_KNOWN

log = logging.getLogger(__name__)


@dataclass
class JudgeRun:
    """What one judge did in a run."""

    judge: str
    model: str
    template_hash: str
    params_hash: str
    requests: int
    cached: int
    judged: int
    invalid: int
    output_tokens: int
    seconds: float

    def sql(self) -> str:
        """This judge's rows in ``judgments``."""
        return cache_predicate(self.model, self.template_hash, self.params_hash)


@dataclass
class JudgeSummary(PairsSummary):
    job: ClassVar[str] = "judge"
    pairs_version: int
    selected: int
    judges: list[JudgeRun]
    judgments_version: int | None
    verdicts_version: int | None
    verdict_counts: dict[str, int]
    seconds: float
    quality: dict[str, dict[str, float]] = field(default_factory=dict)
    panel_key: str = ""
    """The ``judge_key`` of the panel's rows in ``verdicts``."""

    def text(self) -> str:
        lines = [f"judged {self.selected:,} selected pairs in {self.seconds:.1f}s"]
        for j in self.judges:
            lines.append(
                f"  {j.judge:<16} {j.judged:>8,} judgments new, {j.cached:>8,} cached, "
                f"{j.invalid:>6,} invalid ({j.model})"
            )
        counts = ", ".join(f"{k} {v:,}" for k, v in sorted(self.verdict_counts.items()))
        lines.append(f"  panel verdicts: {counts or 'none'}")
        for name, metrics in self.quality.items():
            lines.append(
                f"  {name:<16} agree {100 * metrics['agree_rate']:.1f}%, position flips "
                f"{100 * metrics['flip_rate']:.1f}%, ties {100 * metrics['tie_rate']:.1f}%, "
                f"invalid {100 * metrics['invalid_rate']:.1f}%"
            )
            lines += position_warning(name, metrics)
        return "\n".join(lines)

    def tables_written(self) -> list[TableVersion]:
        return versions((JUDGMENTS, self.judgments_version), (VERDICTS, self.verdicts_version))

    def tags(self) -> dict[str, str]:
        tags = {}
        for run in self.judges:
            tags[f"synpref.judge.{run.judge}.template_hash"] = run.template_hash
            tags[f"synpref.judge.{run.judge}.params_hash"] = run.params_hash
        return tags

    def metrics(self) -> dict[str, float]:
        metrics: dict[str, float] = {"pairs_selected": self.selected}
        for run in self.judges:
            rate = 1 / run.seconds if run.judged and run.seconds else 0.0
            metrics |= {
                f"{run.judge}.judgments_new": run.judged,
                f"{run.judge}.judgments_cached": run.cached,
                f"{run.judge}.judgments_invalid_new": run.invalid,
                f"{run.judge}.judgments_per_s": run.judged * rate,
                f"{run.judge}.output_tokens_per_s": run.output_tokens * rate,
            }
        for judge, quality in self.quality.items():
            metrics |= {f"{judge}.{k}": v for k, v in quality.items() if not np.isnan(v)}
        return metrics | {f"panel.{k}": v for k, v in self.verdict_counts.items()}

    def figures(self, lake: Lake) -> dict[str, Figure]:
        if not self.quality:
            return {}
        rates = {
            "agree": "agree_rate",
            "disagree": "disagree_rate",
            "tie": "tie_rate",
            "inconsistent": "flip_rate",
            "invalid": "invalid_verdict_rate",
        }
        shares = {
            name: {verdict: quality[rates[verdict]] for verdict in VERDICTS_KNOWN}
            for name, quality in self.quality.items()
        }
        p_chosen = {
            run.judge: lake.read(
                JUDGMENTS.name, columns=["p_chosen"], where=f"{run.sql()} AND valid"
            )["p_chosen"].to_numpy()
            for run in self.judges
        }
        return {
            "judge_verdicts.png": reporting.verdict_shares(shares),
            "judge_p_chosen.png": reporting.probability_histograms(p_chosen, "p(chosen wins)"),
        }


POSITION_BIAS_WARNING = 0.9
"""Share of judgments for the response shown first (or second) above which a judge is flagged."""


def position_warning(name: str, metrics: dict[str, float]) -> list[str]:
    """A warning when a judge picks the same position (A or B) nearly every time: it is not
    reading the responses (small models such as the default SmolLM2-135M answer "A" always)."""
    first = metrics.get("first_shown_wins_rate", float("nan"))
    if np.isnan(first) or metrics.get("pairs", 0) < 4:
        return []
    if max(first, 1 - first) < POSITION_BIAS_WARNING:
        return []
    letter = "A (the first response shown)" if first >= 0.5 else "B (the second response shown)"
    return [
        f"  WARNING: judge {name} chose {letter} in {100 * max(first, 1 - first):.0f}% of its "
        "judgments: it is not reading the responses. Use a stronger model (an OpenAI-compatible "
        "or vLLM server; see docs/judging.md, 'Real judges')."
    ]


def _wanted(selected: pa.Table, samples: int) -> pa.Table:
    n = selected.num_rows
    parts = [
        selected.append_column("ordering", pa.array([o] * n, pa.string())).append_column(
            "sample", pa.array([s] * n, pa.int32())
        )
        for o in JUDGE_ORDERS
        for s in range(samples)
    ]
    return pa.concat_tables(parts)


def judge_pairs(
    lake: Lake,
    config: JudgingConfig,
    run_id: str,
    where: str | None = None,
    limit: int | None = None,
    retry_rejected: bool = False,
) -> JudgeSummary:
    """Judge the selected pairs with every configured judge (only missing judgments, and
    requests the server rejected when ``retry_rejected``), then write their verdicts."""
    started = time.perf_counter()
    pairs_version = lake.version(PAIRS.name)
    identities = judge_identities(lake, config, pairs_version)
    selected = select_pair_keys(lake, pairs_version, where, limit)
    log.info(f"[judge] {selected.num_rows:,} pairs selected, {len(config.judges)} judges")
    attributes = _attributes_json(lake, config)
    index = None
    runs, judgments_version = [], None
    for identity in identities:
        judge = identity.judge
        wanted = _wanted(selected, judge.samples_per_order)
        missing = missing_rows(lake, JUDGMENTS, wanted, identity.sql(), retry_rejected)
        log.info(
            f"[judge] {judge.name}: {wanted.num_rows:,} judgments wanted, "
            f"{missing.num_rows:,} not cached"
        )
        judge_started = time.perf_counter()
        new = JUDGMENTS.schema.empty_table()
        if missing.num_rows:
            if judge.few_shot and index is None:
                gold = gold_pairs(lake, config.gold, pairs_version)
                index = build_index(
                    lake,
                    pairs_version,
                    gold.keys,
                    Embedder(config.gold.embedder),
                    _attribute_rows(attributes),
                    gold.flipped,
                )
            stage = _judge(
                lake, pairs_version, missing, identity, run_id, attributes, index, config
            )
            new, judgments_version = stage.rows, stage.version
        runs.append(
            JudgeRun(
                judge=judge.name,
                model=judge.model,
                template_hash=identity.template_hash,
                params_hash=identity.params_hash,
                requests=wanted.num_rows,
                cached=wanted.num_rows - missing.num_rows,
                judged=new.num_rows,
                invalid=int(pc.sum(pc.invert(new["valid"])).as_py() or 0),
                output_tokens=int(pc.sum(new["output_tokens"]).as_py() or 0),
                seconds=time.perf_counter() - judge_started,
            )
        )
        log.info(
            f"[judge] {judge.name}: {new.num_rows:,} judged in {runs[-1].seconds:.1f}s "
            f"({runs[-1].invalid:,} invalid)"
        )
    judgments = _judgments_of(lake, selected, identities)
    verdicts = verdict_rows(judgments, identities, config.aggregation, run_id)
    verdicts_version = None
    if verdicts.num_rows:
        result = lake.upsert(
            VERDICTS,
            verdicts,
            compare=("verdict", "confidence", "p_chosen", "votes", "invalid", "detail"),
        )
        if result.rows_inserted or result.rows_updated:
            verdicts_version = result.version
    panel = verdicts.filter(pc.equal(verdicts["level"], "panel"))
    counts = dict(Counter(panel["verdict"].to_pylist()))
    lengths = lake.read(
        PAIRS.name, pairs_version, ["source", "pair_id", "chosen_chars", "rejected_chars"], where
    )
    lengths = _of_pairs(lengths, selected)
    quality = judge_quality(_named_now(judgments, identities), verdicts, lengths)
    seconds = time.perf_counter() - started
    log.info(f"[judge] verdicts of {panel.num_rows:,} pairs written in {seconds:.1f}s")
    return JudgeSummary(
        pairs_version,
        selected.num_rows,
        runs,
        judgments_version,
        verdicts_version,
        counts,
        seconds,
        quality,
        panel_key(identities, config.aggregation),
    )


def judge_identities(lake: Lake, config: JudgingConfig, pairs_version: int) -> list[JudgeIdentity]:
    """The panel's identities, with what their prompts show: the gold set at ``pairs_version``
    and the annotator of the attributes. Two judges with one identity would share their
    judgments: refused."""
    uses_gold = any(j.few_shot for j in config.judges)
    uses_attributes = uses_gold or any(j.show_attributes for j in config.judges)
    gold = None
    if uses_gold:
        if not (config.gold.where or config.gold.set):
            raise ConfigError(
                "a judge with few_shot > 0 needs judging.gold.where or judging.gold.set (the "
                "gold pairs; the loop gives its own)"
            )
        pairs = gold_pairs(lake, config.gold, pairs_version)
        gold = digest(
            pairs.selection,
            config.gold.embedder,
            pairs.keys["pair_id"].to_pylist(),
            *([sorted(pairs.flipped)] if pairs.flipped else []),
        )
    annotator = config.annotator, config.annotator_template
    inputs = PromptInputs(gold, annotator_key(*annotator) if uses_attributes else None)
    identities = [JudgeIdentity.of(judge, inputs) for judge in config.judges]
    seen: dict[tuple[str, str, str], str] = {}
    for identity in identities:
        other = seen.setdefault(identity.cache_id, identity.judge.name)
        if other != identity.judge.name:
            raise ConfigError(
                f"judges {other} and {identity.judge.name} have the same model, template and "
                "sampling parameters: they would share their judgments; make them one judge"
            )
    return identities


@dataclass(frozen=True)
class GoldPairs:
    """The gold pairs of few-shot prompts: their keys, those shown flipped (relabelled by a
    human) and what selected them (the predicate, or the set at its version)."""

    keys: pa.Table
    flipped: frozenset[tuple[str, str]]
    selection: str | None


def gold_pairs(lake: Lake, gold: GoldConfig, pairs_version: int) -> GoldPairs:
    """The configured gold pairs at ``pairs_version`` (a set pinned at its latest version)."""
    if gold.set is None:
        return GoldPairs(select_pair_keys(lake, pairs_version, gold.where), frozenset(), gold.where)
    ref = pinned(lake, SetRef.parse(gold.set))
    members = read_set(lake, ref)
    flipped = flipped_keys(members)
    keys = zip(flipped["source"].to_pylist(), flipped["pair_id"].to_pylist(), strict=True)
    return GoldPairs(members.select(["source", "pair_id"]), frozenset(keys), str(ref))


RETRIEVAL_POOL = ActorPoolConfig(actors=1, num_cpus=0.5)
"""The actor that retrieves gold examples for few-shot judges (one embedding model)."""


def _judge(
    lake: Lake,
    pairs_version: int,
    missing: pa.Table,
    identity: JudgeIdentity,
    run_id: str,
    attributes: dict[tuple[str, str], str],
    index: Any,
    config: JudgingConfig,
) -> StageResult:
    judge = identity.judge
    name = f"judge {judge.name}"
    pairs = missing.group_by(["source", "pair_id"]).aggregate([]).select(["source", "pair_id"])
    columns = ["source", "pair_id", "history", "chosen", "rejected"]

    def merge(rows: pa.Table) -> int:
        # Failed requests of an earlier run are answered again: their rows are replaced.
        return lake.upsert(JUDGMENTS, rows).version

    if judge.in_process(missing.num_rows):
        requests = request_rows(lake.read_pairs(PAIRS.name, pairs_version, columns, pairs), missing)
        if judge.show_attributes:
            requests = attach_attributes(requests, attributes)
        if judge.few_shot:
            requests = NearestGold(index, config.gold.embedder, judge.few_shot)(requests)
        return run_in_process(
            name, requests, PairJudge, (identity, run_id), merge, missing.num_rows
        )
    pools = {name: judge}
    if judge.few_shot:
        pools["gold retrieval"] = RETRIEVAL_POOL
    check_cpus(pools)
    light = {"batch_format": "pyarrow", "num_cpus": REQUEST_BLOCK_CPUS}
    dataset = stage_pairs(lake, pairs_version, columns, pairs).map_batches(
        request_rows, fn_kwargs={"missing": missing}, **light
    )
    if judge.show_attributes:
        dataset = dataset.map_batches(attach_attributes, fn_kwargs={"values": attributes}, **light)
    if judge.few_shot:
        dataset = dataset.map_batches(
            NearestGold,
            fn_constructor_kwargs={
                "index": index,
                "embedder": config.gold.embedder,
                "k": judge.few_shot,
            },
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=RETRIEVAL_POOL.actors),
            num_cpus=RETRIEVAL_POOL.num_cpus,
        )
    return run_stage(
        name, dataset, PairJudge, (identity, run_id), judge, JUDGMENTS, merge, missing.num_rows
    )


def _attributes_json(lake: Lake, config: JudgingConfig) -> dict[tuple[str, str], str]:
    """JSON of the valid attributes of the annotator, by (source, pair_id), when a judge shows
    attributes or uses gold examples (which carry theirs)."""
    if not any(j.show_attributes or j.few_shot for j in config.judges):
        return {}
    rows = valid_attributes(lake, annotator_key(config.annotator, config.annotator_template))
    return {(r.pop("source"), r.pop("pair_id")): orjson.dumps(r).decode() for r in rows}


def _attribute_rows(values: dict[tuple[str, str], str]) -> dict[tuple[str, str], dict[str, Any]]:
    return {key: orjson.loads(text) for key, text in values.items()}


def _judgments_of(lake: Lake, selected: pa.Table, judges: Sequence[JudgeIdentity]) -> pa.Table:
    """The panel's judgments of the selected pairs (up to each judge's samples_per_order)."""
    if not lake.exists(JUDGMENTS.name) or not selected.num_rows:
        return JUDGMENTS.schema.empty_table()
    mine = " OR ".join(
        f"({identity.sql()} AND sample < {identity.judge.samples_per_order})" for identity in judges
    )
    rows = lake.read(JUDGMENTS.name, where=mine)
    return _of_pairs(rows, selected)


def _named_now(judgments: pa.Table, judges: Sequence[JudgeIdentity]) -> pa.Table:
    """Judgments labelled with the judges' current names: cached rows keep the name they were
    judged under, and a judge may have been renamed since."""
    names = {identity.cache_id: identity.judge.name for identity in judges}
    columns = ("model", "template_hash", "params_hash", "judge")
    rows = zip(*(judgments[c].to_pylist() for c in columns), strict=True)
    labels = [names.get((model, template, params), old) for model, template, params, old in rows]
    column = judgments.schema.get_field_index("judge")
    field = judgments.schema.field(column)
    return judgments.set_column(column, field, pa.array(labels, field.type))


def _of_pairs(table: pa.Table, selected: pa.Table) -> pa.Table:
    """The rows of ``table`` whose (source, pair_id) is in ``selected``."""
    return table.filter(pc.is_in(pair_keys(table), value_set=pair_keys(selected).combine_chunks()))
