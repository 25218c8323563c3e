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

import hashlib
import json
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import ray
from deltalake.exceptions import DeltaError

from pipelines.attributes.job import annotator_key, attributes_text, valid_attributes
from pipelines.core.config import JudgeConfig, JudgingConfig
from pipelines.core.lake import Lake, pair_keys
from pipelines.core.text import prompt_text
from pipelines.llm.backends import (
    Answer,
    Generation,
    Message,
    Sampling,
    answer_with_retries,
    load_backend,
)
from pipelines.llm.retrieval import Embedder, NearestGold, build_index
from storage_schemas import JUDGE_ORDERS, JUDGMENTS, PAIRS, VERDICTS

PREFILL = '{"winner": "'


@dataclass(frozen=True)
class Template:
    """A versioned pairwise prompt. Changing any text makes a new hash, so a new cache entry."""

    version: str
    system: str
    user: str
    """With ``{examples}``, ``{conversation}``, ``{response_a}``, ``{response_b}``,
    ``{attributes}``."""
    example: str
    """One few-shot example, with ``{conversation}``, ``{response_a}``, ``{response_b}``,
    ``{attributes}``, ``{winner}``."""


TEMPLATES = {
    "pairwise-v1": Template(
        version="pairwise-v1",
        system=(
            "You are an impartial judge of AI assistant responses. Compare two responses to the "
            "same conversation and decide which one is better: more helpful, correct, honest "
            "and harmless. Do not let the order, the length or the style of the responses "
            "influence you."
        ),
        user=(
            "{examples}[Conversation]\n{conversation}\n\n[Response A]\n{response_a}\n\n"
            "[Response B]\n{response_b}\n\n{attributes}"
            'Which response is better? Answer with only a JSON object: {{"winner": "A"}}, '
            '{{"winner": "B"}} or {{"winner": "tie"}}.'
        ),
        example=(
            "[Example]\n[Conversation]\n{conversation}\n\n[Response A]\n{response_a}\n\n"
            '[Response B]\n{response_b}\n\n{attributes}Verdict: {{"winner": "{winner}"}}\n\n'
        ),
    ),
}


def _digest(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def template_for(judge: JudgeConfig) -> Template:
    try:
        return TEMPLATES[judge.template]
    except KeyError:
        raise ValueError(
            f"judge {judge.name}: unknown template {judge.template!r}; known: "
            + ", ".join(sorted(TEMPLATES))
        ) from None


@dataclass(frozen=True)
class JudgeIdentity:
    """What a judgment depends on, hashed: the cache key of a judge (the name is only a label)."""

    judge: JudgeConfig
    template: Template
    template_hash: str
    params_hash: str

    @classmethod
    def of(cls, judge: JudgeConfig) -> JudgeIdentity:
        template = template_for(judge)
        shape = {"few_shot": judge.few_shot, "show_attributes": judge.show_attributes}
        params = {
            "verdict": judge.verdict,
            "temperature": judge.temperature,
            "top_p": judge.top_p,
            "max_tokens": 1 if judge.verdict == "logprobs" else judge.max_tokens,
            "seed": judge.seed,
            # A prompt over the limit is recorded invalid: raising it must judge those again.
            "max_prompt_tokens": judge.max_prompt_tokens,
        }
        return cls(judge, template, _digest(template, shape), _digest(params))

    @property
    def cache_id(self) -> tuple[str, str, str]:
        """What identifies this judge's rows in ``judgments``."""
        return (self.judge.model, self.template_hash, self.params_hash)

    @property
    def key(self) -> str:
        """The judge's key in ``verdicts``: its identity and its number of samples."""
        return _digest(
            self.judge.model, self.template_hash, self.params_hash, self.judge.samples_per_order
        )

    def sql(self) -> str:
        return (
            f"model = '{_sql(self.judge.model)}' AND template_hash = '{self.template_hash}' "
            f"AND params_hash = '{self.params_hash}'"
        )

    def sampling(self, sample: int) -> Sampling:
        judge = self.judge
        logprobs = judge.verdict == "logprobs"
        return Sampling(
            temperature=judge.temperature,
            top_p=judge.top_p,
            max_tokens=1 if logprobs else judge.max_tokens,
            seed=judge.seed + sample,
            logprobs=logprobs,
        )


# ------------------------------------------------------------------------ prompts and parsing


def conversation_text(history: Sequence[Message]) -> str:
    return prompt_text(history) or "(empty)"


def _shown(ordering: str, chosen: str, rejected: str) -> tuple[str, str]:
    return (chosen, rejected) if ordering == "AB" else (rejected, chosen)


def _example_text(template: Template, example: dict[str, Any]) -> str:
    """A gold pair as a solved example; which side is A is fixed by its pair_id (no position
    pattern for the judge to copy)."""
    ordering = JUDGE_ORDERS[int(example["pair_id"][-1], 16) % 2]
    a, b = _shown(ordering, example["chosen"], example["rejected"])
    return template.example.format(
        conversation=conversation_text(example["history"]),
        response_a=a,
        response_b=b,
        attributes=attributes_text(example.get("attributes")),
        winner="A" if ordering == "AB" else "B",
    )


def judge_prompt(
    identity: JudgeIdentity,
    history: Sequence[Message],
    chosen: str,
    rejected: str,
    ordering: str,
    examples: Sequence[dict[str, Any]] = (),
    attributes: dict[str, Any] | None = None,
) -> list[Message]:
    """The chat messages asking ``identity``'s judge about one pair in one order."""
    template = identity.template
    a, b = _shown(ordering, chosen, rejected)
    user = template.user.format(
        examples="".join(_example_text(template, e) for e in examples),
        conversation=conversation_text(history),
        response_a=a,
        response_b=b,
        attributes=attributes_text(attributes),
    )
    messages = [{"role": "system", "content": template.system}, {"role": "user", "content": user}]
    if identity.judge.verdict == "logprobs":
        messages.append({"role": "assistant", "content": PREFILL})
    return messages


@dataclass(frozen=True)
class Choice:
    winner: str
    """``A``, ``B`` or ``tie`` (positions as shown)."""
    p_a: float | None
    """P(A) / (P(A) + P(B)) from the choice tokens, when read from log-probabilities."""


_WINNERS = {"a": "A", "b": "B", "tie": "tie"}
_JSON_OBJECT = re.compile(r"\{[^{}]*\}")


def parse_structured(generation: Generation) -> Choice:
    """The first ``{"winner": ...}`` object in the answer, or ``ValueError`` with the reason."""
    for match in _JSON_OBJECT.finditer(generation.text):
        try:
            value = json.loads(match.group())
        except ValueError:
            continue
        if isinstance(value, dict) and "winner" in value:
            winner = _WINNERS.get(str(value["winner"]).strip().lower())
            if winner is None:
                raise ValueError(
                    f'unparseable: winner must be "A", "B" or "tie", got {value["winner"]!r}'
                )
            return Choice(winner, None)
    raise ValueError('unparseable: no {"winner": ...} JSON object in the answer')


def parse_logprobs(generation: Generation) -> Choice:
    """The choice from the first token's probabilities of ``A``, ``B`` and ``tie``."""
    if not generation.first_logprobs:
        raise ValueError("no_logprobs: the backend returned no log-probabilities")
    mass = dict.fromkeys(("A", "B", "tie"), 0.0)
    for token, logprob in generation.first_logprobs.items():
        if token.strip() in mass:
            mass[token.strip()] += float(np.exp(logprob))
    if mass["A"] + mass["B"] == 0:
        raise ValueError(
            "choice_tokens_missing: neither A nor B among the first token's top "
            f"log-probabilities (answer {generation.text!r})"
        )
    return Choice(max(mass, key=mass.__getitem__), mass["A"] / (mass["A"] + mass["B"]))


def preference(ordering: str, choice: Choice) -> tuple[str, float]:
    """(chosen / rejected / tie, p_chosen) of a choice made in ``ordering``."""
    if choice.winner == "tie":
        pref = "tie"
    else:
        pref = "chosen" if (choice.winner == "A") == (ordering == "AB") else "rejected"
    if choice.p_a is not None:
        return pref, choice.p_a if ordering == "AB" else 1 - choice.p_a
    return pref, {"chosen": 1.0, "rejected": 0.0, "tie": 0.5}[pref]


# ------------------------------------------------------------------------ the judge actor


class PairJudge:
    """Ray Data actor: one backend (engine or client) per actor; request rows -> judgments."""

    def __init__(self, judge: JudgeConfig, run_id: str) -> None:
        self.identity = JudgeIdentity.of(judge)
        self.backend = load_backend(judge)
        self.run_id = run_id
        self.parse = parse_logprobs if judge.verdict == "logprobs" else parse_structured

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.perf_counter()
        rows = batch.to_pylist()
        answers: list[Answer | None] = [None] * len(rows)
        by_sample: dict[int, list[int]] = defaultdict(list)
        for i, row in enumerate(rows):
            by_sample[row["sample"]].append(i)
        for sample, members in by_sample.items():
            prompts = [self._prompt(rows[i]) for i in members]
            sampled = answer_with_retries(
                self.backend,
                prompts,
                self.identity.sampling(sample),
                self.parse,
                self.identity.judge.max_retries,
            )
            for i, answer in zip(members, sampled, strict=True):
                answers[i] = answer
        seconds = (time.perf_counter() - started) / max(len(rows), 1)
        return judgment_rows(self.identity, rows, answers, seconds, self.run_id)

    def _prompt(self, row: dict[str, Any]) -> list[Message]:
        examples = orjson.loads(row["example_rows"]) if row.get("example_rows") else []
        attributes = orjson.loads(row["attributes"]) if row.get("attributes") else None
        return judge_prompt(
            self.identity,
            row["history"],
            row["chosen"],
            row["rejected"],
            row["ordering"],
            examples,
            attributes,
        )


def judgment_rows(
    identity: JudgeIdentity,
    requests: Sequence[dict[str, Any]],
    answers: Sequence[Answer | None],
    seconds: float,
    run_id: str,
) -> pa.Table:
    """``judgments`` rows for answered requests (source, pair_id, ordering, sample, examples)."""
    now = datetime.now(UTC)
    out = []
    for request, answer in zip(requests, answers, strict=True):
        assert answer is not None
        pref, p_chosen = (None, None)
        if answer.error is None:
            pref, p_chosen = preference(request["ordering"], answer.value)
        out.append(
            {
                "source": request["source"],
                "pair_id": request["pair_id"],
                "model": identity.judge.model,
                "template_hash": identity.template_hash,
                "params_hash": identity.params_hash,
                "ordering": request["ordering"],
                "sample": request["sample"],
                "judge": identity.judge.name,
                "template": identity.template.version,
                "valid": answer.error is None,
                "invalid_reason": answer.error,
                "winner": answer.value.winner if answer.error is None else None,
                "preference": pref,
                "p_chosen": p_chosen,
                "output": answer.text,
                "examples": request.get("examples") or [],
                "attempts": answer.attempts,
                "prompt_tokens": answer.prompt_tokens,
                "output_tokens": answer.output_tokens,
                "seconds": seconds,
                "judge_run_id": run_id,
                "judged_at": now,
            }
        )
    return pa.Table.from_pylist(out, schema=JUDGMENTS.schema)


def _requests(batch: pa.Table, missing: pa.Table) -> pa.Table:
    """One row per missing (ordering, sample) of each pair of ``batch``."""
    keys = batch.select(["source", "pair_id"]).append_column(
        "row", pa.array(np.arange(batch.num_rows), pa.int64())
    )
    wanted = keys.join(missing, ["source", "pair_id"], join_type="inner")
    rows = batch.take(wanted["row"])
    return rows.append_column("ordering", wanted["ordering"]).append_column(
        "sample", wanted["sample"]
    )


def _attach(batch: pa.Table, values: dict[tuple[str, str], str]) -> pa.Table:
    """Add the ``attributes`` column (JSON of the pair's valid attributes, or null)."""
    keys = zip(batch["source"].to_pylist(), batch["pair_id"].to_pylist(), strict=True)
    return batch.append_column("attributes", pa.array([values.get(k) for k in keys], pa.string()))


# ------------------------------------------------------------------------ verdicts


@dataclass(frozen=True)
class Verdict:
    verdict: str
    confidence: float
    p_chosen: float | None
    votes: int
    invalid: int
    detail: str


_LABEL = {"chosen": "agree", "rejected": "disagree", "tie": "tie"}


def _majority(prefs: Sequence[str]) -> str:
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
        return Verdict(
            "invalid",
            0.0,
            None,
            len(valid),
            invalid,
            f"no valid judgment in order {', '.join(empty)}",
        )
    order_prefs = {o: _majority([j["preference"] for j in js]) for o, js in by_order.items()}
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


def panel_verdict(
    verdicts: Sequence[tuple[Verdict, float]], policy: str, min_judges: int
) -> Verdict:
    """The verdict across judges ((verdict, weight) each) under ``policy``."""
    valid = [(v, w) for v, w in verdicts if v.verdict != "invalid"]
    invalid = len(verdicts) - len(valid)
    if len(valid) < min_judges:
        return Verdict(
            "invalid",
            0.0,
            None,
            len(valid),
            invalid,
            f"{len(valid)} valid judge verdicts < min_judges {min_judges}",
        )
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


def panel_key(config: JudgingConfig) -> str:
    identities = sorted(JudgeIdentity.of(j).key for j in config.judges)
    return _digest(config.aggregation.policy, config.aggregation.min_judges, identities)


def verdict_rows(judgments: pa.Table, config: JudgingConfig, run_id: str) -> pa.Table:
    """``verdicts`` rows (one per judge and one per panel) for every pair in ``judgments``
    (the rows of the configured judges, up to their ``samples_per_order``)."""
    identities = {i.cache_id: i for i in map(JudgeIdentity.of, config.judges)}
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
    now, panel = datetime.now(UTC), panel_key(config)
    name = f"panel:{config.aggregation.policy}"
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
        verdict = panel_verdict(decided, config.aggregation.policy, config.aggregation.min_judges)
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


# ------------------------------------------------------------------------ the job


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


@dataclass
class Judging:
    pairs_version: int
    selected: int
    judges: list[JudgeRun]
    judgments_version: int | None
    verdicts_version: int | None
    verdict_counts: dict[str, int]
    seconds: float
    quality: dict[str, dict[str, float]] = field(default_factory=dict)

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


def select_pairs(lake: Lake, version: int, where: str | None, limit: int | None) -> pa.Table:
    """(source, pair_id) of the pairs matching ``where``; with ``limit``, the ``limit`` pairs with
    the smallest pair_id (a fixed pseudo-random sample: ids are content hashes)."""
    try:
        selected = lake.read(PAIRS.name, version, ["source", "pair_id"], where)
    except DeltaError as exc:
        raise ValueError(f"--where {where!r} is not a SQL predicate on pairs: {exc}") from None
    selected = selected.sort_by([("pair_id", "ascending"), ("source", "ascending")])
    return selected.slice(0, limit) if limit is not None else selected


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


def cached_keys(lake: Lake, identity: JudgeIdentity) -> pa.Table:
    """(source, pair_id, ordering, sample) this judge already answered (failed requests, which
    a later run should try again, excepted)."""
    empty = pa.table(
        {
            "source": pa.array([], pa.string()),
            "pair_id": pa.array([], pa.string()),
            "ordering": pa.array([], pa.string()),
            "sample": pa.array([], pa.int32()),
        }
    )
    if not lake.exists(JUDGMENTS.name):
        return empty
    where = (
        f"{identity.sql()} AND (invalid_reason IS NULL "
        "OR invalid_reason NOT LIKE 'request_failed%')"
    )
    return lake.read(JUDGMENTS.name, columns=list(empty.column_names), where=where)


def judge_pairs(
    lake: Lake,
    config: JudgingConfig,
    run_id: str,
    where: str | None = None,
    limit: int | None = None,
    progress: Callable[[str], None] = print,
) -> Judging:
    """Judge the selected pairs with every configured judge (only missing judgments), then
    write the verdicts of those pairs."""
    started = time.perf_counter()
    seen: dict[tuple[str, str, str], str] = {}
    for identity in map(JudgeIdentity.of, config.judges):
        other = seen.setdefault(identity.cache_id, identity.judge.name)
        if other != identity.judge.name:
            raise ValueError(
                f"judges {other} and {identity.judge.name} have the same model, template and "
                "sampling parameters: they would share their judgments; make them one judge"
            )
    pairs_version = lake.version(PAIRS.name)
    selected = select_pairs(lake, pairs_version, where, limit)
    progress(f"[judge] {selected.num_rows:,} pairs selected, {len(config.judges)} judges")
    attributes = _attributes_json(lake, config)
    index = None
    runs, written = [], []
    for judge in config.judges:
        identity = JudgeIdentity.of(judge)
        wanted = _wanted(selected, judge.samples_per_order)
        missing = wanted.join(
            cached_keys(lake, identity),
            ["source", "pair_id", "ordering", "sample"],
            join_type="left anti",
        )
        progress(
            f"[judge] {judge.name}: {wanted.num_rows:,} judgments wanted, "
            f"{missing.num_rows:,} not cached"
        )
        judge_started = time.perf_counter()
        new = JUDGMENTS.schema.empty_table()
        if missing.num_rows:
            if judge.few_shot and index is None:
                index = build_index(
                    lake,
                    config.gold.where or "",
                    Embedder(config.gold.embedder),
                    _attribute_rows(attributes),
                )
            new = _judge(lake, pairs_version, missing, judge, run_id, attributes, index, config)
            written.append(new)
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
        progress(
            f"[judge] {judge.name}: {new.num_rows:,} judged in {runs[-1].seconds:.1f}s "
            f"({runs[-1].invalid:,} invalid)"
        )
    judgments_version = None
    if written:
        # Failed requests of an earlier run are answered again: their rows are replaced.
        result = lake.upsert(JUDGMENTS, pa.concat_tables(written))
        judgments_version = result.version
    judgments = _judgments_of(lake, selected, config)
    verdicts = verdict_rows(judgments, config, run_id)
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
    quality = judge_quality(_named_now(judgments, config.judges), verdicts, lengths)
    seconds = time.perf_counter() - started
    progress(f"[judge] verdicts of {panel.num_rows:,} pairs written in {seconds:.1f}s")
    return Judging(
        pairs_version,
        selected.num_rows,
        runs,
        judgments_version,
        verdicts_version,
        counts,
        seconds,
        quality,
    )


def _judge(
    lake: Lake,
    pairs_version: int,
    missing: pa.Table,
    judge: JudgeConfig,
    run_id: str,
    attributes: dict[tuple[str, str], str],
    index: Any,
    config: JudgingConfig,
) -> pa.Table:
    cpus = ray.cluster_resources().get("CPU", 0)
    if judge.actors * judge.num_cpus >= cpus:
        raise ValueError(
            f"judge {judge.name}: actors x num_cpus = {judge.actors * judge.num_cpus:g} takes "
            f"all {cpus:g} CPUs: Ray Data could never schedule the reads of pairs. Use fewer "
            "actors or a fractional num_cpus (e.g. 0.5)."
        )
    pairs = missing.group_by(["source", "pair_id"]).aggregate([]).select(["source", "pair_id"])
    dataset = lake.dataset(
        PAIRS.name,
        pairs_version,
        ["source", "pair_id", "history", "chosen", "rejected"],
        keys=pairs,
    ).map_batches(_requests, batch_format="pyarrow", fn_kwargs={"missing": missing})
    if judge.show_attributes:
        dataset = dataset.map_batches(
            _attach, batch_format="pyarrow", fn_kwargs={"values": attributes}
        )
    if judge.few_shot:
        dataset = dataset.map_batches(
            NearestGold,
            fn_constructor_kwargs={
                "index": index,
                "embedder": config.gold.embedder,
                "k": judge.few_shot,
            },
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=0.5,
        )
    judged = dataset.map_batches(
        PairJudge,
        fn_constructor_args=(judge, run_id),
        batch_format="pyarrow",
        batch_size=judge.batch_size,
        compute=ray.data.ActorPoolStrategy(size=judge.actors),
        num_cpus=judge.num_cpus,
        num_gpus=judge.num_gpus or None,
    )
    parts = [t for t in ray.get(judged.to_arrow_refs()) if t.num_rows]
    new = pa.concat_tables(parts) if parts else JUDGMENTS.schema.empty_table()
    if new.num_rows != missing.num_rows:
        raise RuntimeError(
            f"judge {judge.name}: {new.num_rows} judgments for {missing.num_rows} requests"
        )
    return new


def _attributes_json(lake: Lake, config: JudgingConfig) -> dict[tuple[str, str], str]:
    """JSON of the valid attributes of the annotator, by (source, pair_id), when a judge shows
    attributes or uses gold examples (which carry theirs)."""
    if not any(j.show_attributes or j.few_shot for j in config.judges):
        return {}
    rows = valid_attributes(lake, annotator_key(config.annotator, config.annotator_template))
    return {(r.pop("source"), r.pop("pair_id")): orjson.dumps(r).decode() for r in rows}


def _attribute_rows(values: dict[tuple[str, str], str]) -> dict[tuple[str, str], dict[str, Any]]:
    return {key: orjson.loads(text) for key, text in values.items()}


def _judgments_of(lake: Lake, selected: pa.Table, config: JudgingConfig) -> pa.Table:
    """The configured judges' judgments of the selected pairs (up to their samples_per_order)."""
    if not lake.exists(JUDGMENTS.name) or not selected.num_rows:
        return JUDGMENTS.schema.empty_table()
    mine = " OR ".join(
        f"({identity.sql()} AND sample < {identity.judge.samples_per_order})"
        for identity in map(JudgeIdentity.of, config.judges)
    )
    rows = lake.read(JUDGMENTS.name, where=mine)
    return _of_pairs(rows, selected)


def _named_now(judgments: pa.Table, judges: Sequence[JudgeConfig]) -> pa.Table:
    """Judgments labelled with the judges' current names: cached rows keep the name they were
    judged under, and a judge may have been renamed since."""
    names = {JudgeIdentity.of(j).cache_id: j.name for j in judges}
    columns = ("model", "template_hash", "params_hash", "judge")
    rows = zip(*(judgments[c].to_pylist() for c in columns), strict=True)
    labels = [names.get((model, template, params), old) for model, template, params, old in rows]
    column = judgments.schema.get_field_index("judge")
    return judgments.set_column(column, judgments.schema.field(column), pa.array(labels))


def _of_pairs(table: pa.Table, selected: pa.Table) -> pa.Table:
    """The rows of ``table`` whose (source, pair_id) is in ``selected``."""
    return table.filter(pc.is_in(pair_keys(table), value_set=pair_keys(selected).combine_chunks()))


def _sql(value: str) -> str:
    return value.replace("'", "''")


# ------------------------------------------------------------------------ quality


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
        pref = _majority(prefs)
        score[(source, pair_id)] += {"chosen": 1, "rejected": -1, "tie": 0}[pref]
    return sum(s > 0 for s in score.values()) / max(pairs, 1)
