"""Reward-model evaluation, with each benchmark's own rules.

Every benchmark is read into ``EvalItem``s (a prompt, the chosen and the rejected responses, a
category) and scored either by a model (``RewardModel``) or from a file of precomputed scores;
then its own metric applies:

- ``rewardbench`` (RewardBench v1): an item is right when the chosen score is strictly greater
  (a constant scorer gets 0); sections are the official subset groups, each the example-count
  weighted mean of its subsets (math-prm counted as 984 examples, as RewardBench does, to weigh
  as much as the code subsets); the score is the mean of the sections.
- ``bestofn`` (RewardBench 2 / RMB best-of-N): right when the best chosen beats every rejected
  response; accuracy per subset, their mean and the sample-weighted mean.
- ``rmbench`` (RM-Bench): per item a 3x3 matrix of chosen style i beating rejected style j;
  hard = mean above the diagonal (plainer chosen vs more styled rejected), normal = the
  diagonal, easy = below; per domain (chat, code, math, safety) and pooled.
- ``judgebench`` (JudgeBench): the official two-order rule: a verdict per order, "A>B" only
  when A scores strictly higher (so a tie counts for B), the swapped order's verdict flipped
  back; a pair is right when the verdicts agreeing with the label outnumber those against it.
  Sample-weighted accuracy and the mean over its four categories.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import mlflow
import numpy as np
from matplotlib.figure import Figure

from pipelines.core import reporting
from pipelines.core.config import ScoringConfig
from pipelines.core.errors import SynprefError
from pipelines.core.jobs import InputFile, JobSummary
from pipelines.core.lake import Lake
from pipelines.ingest.formats import (
    Message,
    Reject,
    parse_json,
    parse_messages,
    require_content,
    resolve_path,
)
from pipelines.ingest.record_files import (
    file_records,
    file_sha256,
    filesystem_for,
    find_record_files,
)
from pipelines.rm.benchmarks import BENCHMARKS
from pipelines.rm.model import model_version, scored_conversation
from pipelines.rm.registry import registered_as
from pipelines.rm.scoring import score_conversations

log = logging.getLogger(__name__)


REWARDBENCH_SECTIONS = {
    "Chat": [
        "alpacaeval-easy",
        "alpacaeval-length",
        "alpacaeval-hard",
        "mt-bench-easy",
        "mt-bench-med",
    ],
    "Chat Hard": [
        "mt-bench-hard",
        "llmbar-natural",
        "llmbar-adver-neighbor",
        "llmbar-adver-GPTInst",
        "llmbar-adver-GPTOut",
        "llmbar-adver-manual",
    ],
    "Safety": [
        "refusals-dangerous",
        "refusals-offensive",
        "xstest-should-refuse",
        "xstest-should-respond",
        "donotanswer",
    ],
    "Reasoning": ["math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"],
}
REWARDBENCH_WEIGHTS = {"math-prm": 984}
"""Subset weights that differ from the example count (RewardBench's upweighting of math-prm)."""


class EvalDataError(SynprefError):
    """A benchmark or scores file that cannot be evaluated; the message names file and record."""


@dataclass(frozen=True)
class EvalItem:
    id: str
    category: str
    prompt: list[Message]
    chosen: list[str]
    rejected: list[str]
    label: str = ""
    """JudgeBench: "A>B" when the chosen response was shown as A, "B>A" when as B."""

    def conversations(self) -> list[list[Message]]:
        """What a reward model scores: the prompt with each chosen, then each rejected response."""
        return [scored_conversation(self.prompt, r) for r in (*self.chosen, *self.rejected)]


@dataclass
class ItemScores:
    chosen: list[float]
    rejected: list[float]
    judgments: list[str] | None = None
    """JudgeBench verdicts as published (order A/B, then swapped), when a file gave them."""


@dataclass
class EvalResult:
    benchmark: str
    metrics: dict[str, float]
    categories: list[dict[str, Any]]
    scores: dict[str, ItemScores] = field(repr=False)

    def text(self) -> str:
        lines = [f"{self.benchmark}: {len(self.scores):,} items"]
        lines += [f"  {name:<28} {value:8.2f}" for name, value in self.metrics.items()]
        return "\n".join(lines)


@dataclass
class EvalSummary(JobSummary):
    """A benchmark evaluation: the result, the files read and the model (or scores file)."""

    job: ClassVar[str] = "eval"
    result: EvalResult
    files: list[InputFile]
    model_version: str | None = None
    registered_model: str | None = None
    scoring: dict[str, float] = field(default_factory=dict)
    """Throughput of the model's scoring (none for a scores file)."""

    def text(self) -> str:
        return self.result.text()

    def as_dict(self) -> dict[str, Any]:
        return {
            "benchmark": self.result.benchmark,
            "items": len(self.result.scores),
            "metrics": self.result.metrics,
            "categories": self.result.categories,
        }

    def input_files(self) -> list[InputFile]:
        return self.files

    def tags(self) -> dict[str, str]:
        tags = {"synpref.model_version": self.model_version} if self.model_version else {}
        return tags | (
            {"synpref.registered_model": self.registered_model} if self.registered_model else {}
        )

    def metrics(self) -> dict[str, float]:
        return {_metric_name(k): v for k, v in self.result.metrics.items()} | self.scoring

    def figures(self, lake: Lake) -> dict[str, Figure]:
        result = self.result
        chosen = np.array([v for s in result.scores.values() for v in s.chosen])
        rejected = np.array([v for s in result.scores.values() for v in s.rejected])
        key = "accuracy" if "accuracy" in result.categories[0] else "average"
        by_category = {row["category"]: row[key] for row in result.categories}
        return {
            "eval/score_distributions.png": reporting.score_distributions(
                chosen, rejected, f"{result.benchmark}: scores"
            ),
            "eval/accuracy_by_category.png": reporting.category_bars(
                by_category, f"{key} (%)", f"{result.benchmark}: {key} by category"
            ),
        }


def evaluate_benchmark(
    benchmark: str,
    data: str,
    items: Sequence[EvalItem],
    model: str | None,
    scores: str | None,
    scoring: ScoringConfig,
    storage_options: dict[str, str],
) -> EvalSummary:
    """Score ``items`` with ``model`` (on Ray) or read their ``scores`` file, then evaluate."""
    log.info(f"[eval] {benchmark}: {len(items):,} items from {data}")
    files = [
        InputFile(file.path, file_sha256(file.path, fs))
        for path in [data] + ([scores] if scores else [])
        for fs in [filesystem_for(path, storage_options)]
        for file in find_record_files([path], fs)
    ]
    if model is None:
        return EvalSummary(evaluate(benchmark, items, file_scores(items, scores or "")), files)
    fingerprint = model_version(model)
    registered = registered_as(fingerprint)
    if registered:
        log.info(f"[eval] {model} is {registered}")
    scored = score_conversations(conversations(items), model, scoring)
    result = evaluate(benchmark, items, model_scores(items, scored.rewards))
    throughput = {
        "scoring.conversations_per_s": scored.per_second,
        "scoring.tokens": scored.tokens,
        "scoring.truncated": scored.truncated,
    }
    return EvalSummary(result, files, fingerprint, registered, throughput)


def log_items(result: EvalResult) -> None:
    """The per-category table and the per-item scores (a reusable scores file) to the run."""
    columns = {key: [row[key] for row in result.categories] for key in result.categories[0]}
    mlflow.log_table(columns, "eval/categories.json")
    lines = [
        json.dumps({"id": item_id, "chosen": s.chosen, "rejected": s.rejected})
        for item_id, s in result.scores.items()
    ]
    mlflow.log_text("\n".join(lines) + "\n", "eval/scores.jsonl")


def _metric_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)


# ---------------------------------------------------------------------------- reading data


def _records(path: str) -> Iterator[tuple[str, dict[str, Any], str]]:
    """(where, record, file) for every record of the files under ``path`` (jsonl, json,
    parquet); ``where`` names the file and the record for error messages."""
    fs = filesystem_for(path)
    for file in find_record_files([path], fs):
        for position, text, error in file_records(file.path, fs):
            where = f"{file.path} record {position}"
            if error:
                raise EvalDataError(f"{where}: {error}")
            try:
                record = parse_json(text)
            except ValueError as exc:
                raise EvalDataError(f"{where}: malformed JSON ({exc})") from None
            if not isinstance(record, dict):
                raise EvalDataError(f"{where}: expected a JSON object")
            yield where, record, file.path


def _field(record: dict[str, Any], key: str, where: str) -> Any:
    if record.get(key) is None:
        raise EvalDataError(f"{where}: '{key}' is missing or null")
    return record[key]


def _responses(value: Any, name: str, where: str) -> list[str]:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise EvalDataError(f"{where}: '{name}' is an empty list")
    try:
        return [require_content(v, f"{name}[{i}]") for i, v in enumerate(values)]
    except Reject as exc:
        raise EvalDataError(f"{where}: {exc.detail}") from None


def _prompt(value: Any, where: str, name: str = "prompt") -> list[Message]:
    """A prompt given as text or messages (``history``: messages only)."""
    try:
        return parse_messages(value, name, string_role="user" if name == "prompt" else None)
    except Reject as exc:
        raise EvalDataError(f"{where}: {exc.detail}") from None


def load_mapped(path: str, mapping: dict[str, str]) -> list[EvalItem]:
    """Any benchmark layout through field paths, as ingest maps them (``chosen=bon_best.answer``,
    ``rejected=loser_list[*].answer``); ``id`` and ``category`` are optional targets."""
    prompt_target = "history" if "history" in mapping else "prompt"
    if prompt_target not in mapping:
        raise EvalDataError("a benchmark field mapping needs prompt=... or history=...")
    items = []
    for where, record, _ in _records(path):
        try:
            values = {target: resolve_path(record, p) for target, p in mapping.items()}
        except Reject as exc:
            raise EvalDataError(f"{where}: {exc.detail}") from None
        items.append(
            EvalItem(
                id=str(values.get("id", where)),
                category=str(values.get("category") or "all"),
                prompt=_prompt(values[prompt_target], where, prompt_target),
                chosen=_responses(values["chosen"], mapping["chosen"], where),
                rejected=_responses(values["rejected"], mapping["rejected"], where),
            )
        )
    return _unique(items)


def _as_benchmark_item(benchmark: str, item: EvalItem) -> EvalItem:
    """A mapped item checked against its benchmark's shape (JudgeBench: chosen shown as A)."""
    shape = (len(item.chosen), len(item.rejected))
    if benchmark == "rmbench" and shape != (3, 3):
        raise EvalDataError(f"item {item.id!r}: RM-Bench items have 3 chosen and 3 rejected")
    if benchmark == "judgebench":
        if shape != (1, 1):
            raise EvalDataError(f"item {item.id!r}: JudgeBench items have one response each")
        return replace(item, label="A>B")
    return item


def load_pairwise(path: str) -> list[EvalItem]:
    """RewardBench v1/v2-style records: prompt (text or messages), chosen and rejected (a text
    or a list of texts), subset, id."""
    items = []
    for where, record, _ in _records(path):
        items.append(
            EvalItem(
                id=str(record.get("id", where)),
                category=str(record.get("subset") or "all"),
                prompt=_prompt(_field(record, "prompt", where), where),
                chosen=_responses(_field(record, "chosen", where), "chosen", where),
                rejected=_responses(_field(record, "rejected", where), "rejected", where),
            )
        )
    return _unique(items)


def load_rmbench(path: str) -> list[EvalItem]:
    """RM-Bench files (``chat_filtered.json``...): 3 chosen and 3 rejected styled responses
    (concise, detailed plain, detailed markdown); the domain is the file name's first word."""
    items = []
    for where, record, file in _records(path):
        domain = re.split(r"[-_.]", Path(file).name)[0]
        chosen = _responses(_field(record, "chosen", where), "chosen", where)
        rejected = _responses(_field(record, "rejected", where), "rejected", where)
        if len(chosen) != 3 or len(rejected) != 3:
            raise EvalDataError(f"{where}: RM-Bench items have 3 chosen and 3 rejected responses")
        items.append(
            EvalItem(
                id=f"{domain}-{_field(record, 'id', where)}",
                category=domain,
                prompt=_prompt(_field(record, "prompt", where), where),
                chosen=chosen,
                rejected=rejected,
            )
        )
    return _unique(items)


def judgebench_category(source: str) -> str:
    """JudgeBench's four categories from a pair's source."""
    if source.startswith("mmlu-pro"):
        return "knowledge"
    if source.startswith("livecodebench"):
        return "coding"
    return {"livebench-reasoning": "reasoning", "livebench-math": "math"}.get(source, source)


def load_judgebench(path: str) -> list[EvalItem]:
    """JudgeBench pairs: question, response_A, response_B, label ("A>B" or "B>A"), source."""
    items = []
    for where, record, _ in _records(path):
        label = _field(record, "label", where)
        if label not in ("A>B", "B>A"):
            raise EvalDataError(f"{where}: label must be 'A>B' or 'B>A', got {label!r}")
        a = _responses(_field(record, "response_A", where), "response_A", where)
        b = _responses(_field(record, "response_B", where), "response_B", where)
        chosen, rejected = (a, b) if label == "A>B" else (b, a)
        items.append(
            EvalItem(
                id=str(_field(record, "pair_id", where)),
                category=judgebench_category(str(record.get("source", ""))),
                prompt=_prompt(_field(record, "question", where), where),
                chosen=chosen,
                rejected=rejected,
                label=label,
            )
        )
    return _unique(items)


def _unique(items: list[EvalItem]) -> list[EvalItem]:
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise EvalDataError(f"item id {item.id!r} appears more than once")
        seen.add(item.id)
    if not items:
        raise EvalDataError("no items to evaluate")
    return items


LOADERS: dict[str, Callable[[str], list[EvalItem]]] = {
    "rewardbench": load_pairwise,
    "bestofn": load_pairwise,
    "rmbench": load_rmbench,
    "judgebench": load_judgebench,
}


# ---------------------------------------------------------------------------- scores


def conversations(items: Sequence[EvalItem]) -> list[list[Message]]:
    """Every conversation to score, item by item (chosen responses first)."""
    return [c for item in items for c in item.conversations()]


def model_scores(items: Sequence[EvalItem], rewards: Sequence[float]) -> dict[str, ItemScores]:
    """Per-item scores from the rewards of ``conversations(items)``, in the same order."""
    flat = list(map(float, rewards))
    if len(flat) != sum(len(i.chosen) + len(i.rejected) for i in items):
        raise EvalDataError(f"{len(flat)} rewards do not match the items' responses")
    result, start = {}, 0
    for item in items:
        n = len(item.chosen)
        end = start + n + len(item.rejected)
        result[item.id] = ItemScores(chosen=flat[start : start + n], rejected=flat[start + n : end])
        start = end
    return result


def file_scores(items: Sequence[EvalItem], path: str) -> dict[str, ItemScores]:
    """Scores from a file: JSONL records ``{"id", "chosen": [..], "rejected": [..]}`` (numbers
    or lists of numbers in the items' order), or JudgeBench's published output format (records
    with ``pair_id`` and ``judgments``, whose verdicts are used as published)."""
    by_id = {item.id: item for item in items}
    result: dict[str, ItemScores] = {}
    for where, record, _ in _records(path):
        if "judgments" in record:
            key = str(_field(record, "pair_id", where))
            scores = _judgebench_scores(record, by_id.get(key), where)
        else:
            key = str(_field(record, "id", where))
            scores = ItemScores(
                chosen=_numbers(_field(record, "chosen", where), "chosen", where),
                rejected=_numbers(_field(record, "rejected", where), "rejected", where),
            )
        item = by_id.get(key)
        if item is None:
            raise EvalDataError(f"{where}: id {key!r} is not an item of the benchmark data")
        if (len(scores.chosen), len(scores.rejected)) != (len(item.chosen), len(item.rejected)):
            raise EvalDataError(
                f"{where}: {len(scores.chosen)} chosen and {len(scores.rejected)} rejected scores"
                f" for an item with {len(item.chosen)} and {len(item.rejected)} responses"
            )
        if key in result:
            raise EvalDataError(f"{where}: id {key!r} is scored more than once")
        result[key] = scores
    missing = by_id.keys() - result.keys()
    if missing:
        raise EvalDataError(
            f"{path}: no scores for {len(missing)} of {len(by_id)} items, e.g. {min(missing)!r}"
        )
    return result


def _numbers(value: Any, name: str, where: str) -> list[float]:
    values = value if isinstance(value, list) else [value]
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int | float)]
    if bad or any(np.isnan(values)):
        raise EvalDataError(f"{where}: '{name}' must hold numbers, got {value!r}")
    return [float(v) for v in values]


def _judgebench_scores(record: dict, item: EvalItem | None, where: str) -> ItemScores:
    judgments = _field(record, "judgments", where)
    if not isinstance(judgments, list) or not judgments:
        raise EvalDataError(f"{where}: 'judgments' must be a non-empty list")
    try:
        decisions = [j["decision"] for j in judgments]
        a, b = judgments[0]["judgment"]["scores"]
    except (KeyError, TypeError, ValueError):
        raise EvalDataError(
            f"{where}: each judgment needs a 'decision' and the first a judgment.scores [A, B]"
        ) from None
    label = item.label if item else record.get("label")
    chosen, rejected = (a, b) if label == "A>B" else (b, a)
    return ItemScores(chosen=[float(chosen)], rejected=[float(rejected)], judgments=decisions)


# ---------------------------------------------------------------------------- metrics


def _beats_all(scores: ItemScores) -> bool:
    return max(scores.chosen) > max(scores.rejected)


def _by_category(
    items: Sequence[EvalItem], correct: dict[str, float]
) -> dict[str, tuple[int, float]]:
    groups: dict[str, list[float]] = defaultdict(list)
    for item in items:
        groups[item.category].append(correct[item.id])
    return {c: (len(v), 100 * float(np.mean(v))) for c, v in sorted(groups.items())}


def _category_rows(categories: dict[str, tuple[int, float]]) -> list[dict[str, Any]]:
    return [{"category": c, "items": n, "accuracy": acc} for c, (n, acc) in categories.items()]


def rewardbench_metrics(items: Sequence[EvalItem], scores: dict[str, ItemScores]) -> EvalResult:
    correct = {i.id: float(_beats_all(scores[i.id])) for i in items}
    subsets = _by_category(items, correct)
    section_of = {s: name for name, members in REWARDBENCH_SECTIONS.items() for s in members}
    sections: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for subset, (n, accuracy) in subsets.items():
        weight = REWARDBENCH_WEIGHTS.get(subset, n)
        sections[section_of.get(subset, subset)].append((accuracy, weight))
    section_scores = {
        name: sum(a * w for a, w in parts) / sum(w for _, w in parts)
        for name, parts in sections.items()
    }
    metrics = {"score": float(np.mean(list(section_scores.values())))}
    metrics |= {f"section.{name}": value for name, value in section_scores.items()}
    metrics["accuracy"] = 100 * float(np.mean(list(correct.values())))
    return EvalResult("rewardbench", metrics, _category_rows(subsets), scores)


def bestofn_metrics(items: Sequence[EvalItem], scores: dict[str, ItemScores]) -> EvalResult:
    correct = {i.id: float(_beats_all(scores[i.id])) for i in items}
    subsets = _by_category(items, correct)
    metrics = {
        "accuracy": 100 * float(np.mean(list(correct.values()))),
        "subset_mean": float(np.mean([acc for _, acc in subsets.values()])),
    }
    return EvalResult("bestofn", metrics, _category_rows(subsets), scores)


def _style_matrix(scores: ItemScores) -> np.ndarray:
    return (np.array(scores.chosen)[:, None] > np.array(scores.rejected)[None, :]).astype(float)


def _difficulty(matrix: np.ndarray) -> dict[str, float]:
    upper = matrix[np.triu_indices(3, k=1)]
    lower = matrix[np.tril_indices(3, k=-1)]
    return {
        "easy": 100 * float(lower.mean()),
        "normal": 100 * float(np.diag(matrix).mean()),
        "hard": 100 * float(upper.mean()),
        "average": 100 * float(matrix.mean()),
    }


def rmbench_metrics(items: Sequence[EvalItem], scores: dict[str, ItemScores]) -> EvalResult:
    matrices = {i.id: _style_matrix(scores[i.id]) for i in items}
    domains: dict[str, list[np.ndarray]] = defaultdict(list)
    for item in items:
        domains[item.category].append(matrices[item.id])
    rows = []
    for domain, members in sorted(domains.items()):
        rows.append({"category": domain, "items": len(members)} | _difficulty(np.mean(members, 0)))
    pooled = _difficulty(np.mean(list(matrices.values()), axis=0))
    metrics = {**pooled, "domain_mean": float(np.mean([r["average"] for r in rows]))}
    metrics |= {f"domain.{r['category']}": r["average"] for r in rows}
    return EvalResult("rmbench", metrics, rows, scores)


def judgebench_verdicts(a: float, b: float) -> list[str]:
    """A reward model's verdicts in both orders, as JudgeBench's reward-model judge gives them."""
    return ["A>B" if a > b else "B>A", "A>B" if b > a else "B>A"]


def _flip(verdict: str) -> str:
    return {"A>B": "B>A", "B>A": "A>B"}.get(verdict, verdict)


def judgebench_correct(label: str, verdicts: Sequence[str]) -> bool:
    """JudgeBench's rule: the first verdict, and the second (swapped order) flipped back, each
    count +1 when they match the label and -1 when they contradict it."""
    votes = [verdicts[0], *(_flip(v) for v in verdicts[1:2])]
    return sum((v == label) - (v == _flip(label)) for v in votes) > 0


def judgebench_metrics(items: Sequence[EvalItem], scores: dict[str, ItemScores]) -> EvalResult:
    correct = {}
    for item in items:
        s = scores[item.id]
        verdicts = s.judgments
        if verdicts is None:
            win, lose = s.chosen[0], s.rejected[0]
            verdicts = judgebench_verdicts(*((win, lose) if item.label == "A>B" else (lose, win)))
        correct[item.id] = float(judgebench_correct(item.label, verdicts))
    categories = _by_category(items, correct)
    metrics = {
        "accuracy": 100 * float(np.mean(list(correct.values()))),
        "category_mean": float(np.mean([acc for _, acc in categories.values()])),
    }
    metrics |= {f"category.{c}": acc for c, (_, acc) in categories.items()}
    return EvalResult("judgebench", metrics, _category_rows(categories), scores)


METRICS: dict[str, Callable[[Sequence[EvalItem], dict[str, ItemScores]], EvalResult]] = {
    "rewardbench": rewardbench_metrics,
    "bestofn": bestofn_metrics,
    "rmbench": rmbench_metrics,
    "judgebench": judgebench_metrics,
}


def load_items(benchmark: str, data: str, mapping: dict[str, str] | None = None) -> list[EvalItem]:
    """The items of ``data`` in the benchmark's own layout, or in any layout through
    ``mapping`` (target -> field path, see ``load_mapped``)."""
    if benchmark not in BENCHMARKS:
        raise EvalDataError(f"unknown benchmark {benchmark!r}; expected one of {BENCHMARKS}")
    if mapping is None:
        return LOADERS[benchmark](data)
    return [_as_benchmark_item(benchmark, item) for item in load_mapped(data, mapping)]


def evaluate(
    benchmark: str, items: Sequence[EvalItem], scores: dict[str, ItemScores]
) -> EvalResult:
    return METRICS[benchmark](items, scores)
