"""A seeded synthetic preference corpus with known defects, for the demo and for benchmarks.

Realistic in shape (multi-turn conversations, long responses, Zipf-distributed words), with
controllable rates of exact duplicates, near-duplicates (a few words edited in every field),
label flips, pairs contaminated with benchmark prompts, and bad rows of every quarantine reason.
Every record carries its ground truth in ``truth`` (ingest keeps it in ``source_meta``), so dedup
and decontamination can be scored for recall and precision. It supplements, never replaces, the
real data in tests.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.ingest.formats import Limits, Pair, convert, detect_format

BAD_ROW_KINDS = (
    "malformed_json",
    "missing_field",
    "empty_content",
    "identical_responses",
    "final_turn_not_assistant",
    "invalid_role",
)


@dataclass(frozen=True)
class CorpusSpec:
    """How many rows of each kind; rates are fractions of ``pairs`` (the original pairs)."""

    pairs: int = 10_000
    seed: int = 0
    exact_duplicate_rate: float = 0.02
    near_duplicate_rate: float = 0.03
    flip_rate: float = 0.01
    contamination_rate: float = 0.0
    bad_row_rate: float = 0.01
    near_duplicate_edit_rate: float = 0.03
    """Fraction of words replaced in each field of a near-duplicate."""
    max_user_turns: int = 3
    vocabulary: int = 20_000


class CorpusGenerator:
    """Generates records (``messages`` format plus ``truth``) for a ``CorpusSpec``."""

    def __init__(self, spec: CorpusSpec, benchmark_prompts: list[str] | None = None) -> None:
        if spec.contamination_rate and not benchmark_prompts:
            raise ValueError("contamination_rate > 0 needs benchmark prompts")
        self.spec = spec
        self.rng = np.random.default_rng(spec.seed)
        self.words = _vocabulary(self.rng, spec.vocabulary)
        weights = 1 / np.arange(1, spec.vocabulary + 1)  # Zipf: word frequency ~ 1 / rank
        self.word_cdf = np.cumsum(weights) / weights.sum()
        self.benchmark_prompts = benchmark_prompts or []

    def records(self) -> Iterator[dict[str, Any] | str]:
        """Originals first, then planted rows in a seeded shuffle; a ``str`` is a raw bad line."""
        spec = self.spec
        originals = [self._conversation_pair() for _ in range(spec.pairs)]
        for i, pair in enumerate(originals):
            yield _record(pair, {"kind": "original", "id": i})
        planted: list[dict[str, Any] | str] = []
        for kind, rate in (
            ("exact_dup", spec.exact_duplicate_rate),
            ("near_dup", spec.near_duplicate_rate),
            ("flip", spec.flip_rate),
        ):
            for of in self.rng.choice(spec.pairs, size=round(rate * spec.pairs), replace=False):
                pair = originals[int(of)]
                if kind == "near_dup":
                    pair = self._edited(pair)
                elif kind == "flip":
                    pair = (pair[0], pair[2], pair[1])
                planted.append(_record(pair, {"kind": kind, "of": int(of)}))
        for _ in range(round(spec.contamination_rate * spec.pairs)):
            k = int(self.rng.integers(len(self.benchmark_prompts)))
            history, chosen, rejected = self._conversation_pair()
            history = [{"role": "user", "content": self.benchmark_prompts[k]}, *history[1:]]
            planted.append(
                _record((history, chosen, rejected), {"kind": "contaminated", "prompt": k})
            )
        for i in range(round(spec.bad_row_rate * spec.pairs)):
            planted.append(self._bad_row(BAD_ROW_KINDS[i % len(BAD_ROW_KINDS)]))
        for j in self.rng.permutation(len(planted)):
            yield planted[int(j)]

    def _text(self, low: int, high: int) -> str:
        n = int(self.rng.integers(low, high))
        ranks = np.searchsorted(self.word_cdf, self.rng.random(n)).clip(max=len(self.words) - 1)
        words = [self.words[i] for i in ranks.tolist()]
        return " ".join(" ".join(words[i : i + 12]).capitalize() + "." for i in range(0, n, 12))

    def _conversation_pair(self) -> tuple[list[dict[str, str]], str, str]:
        history: list[dict[str, str]] = []
        for turn in range(int(self.rng.integers(1, self.spec.max_user_turns + 1))):
            if turn:
                history.append({"role": "assistant", "content": self._text(20, 80)})
            history.append({"role": "user", "content": self._text(8, 40)})
        return history, self._text(30, 160), self._text(30, 160)

    def _edit(self, text: str) -> str:
        words = text.split(" ")
        n = max(1, round(self.spec.near_duplicate_edit_rate * len(words)))
        for i in self.rng.choice(len(words), size=min(n, len(words)), replace=False):
            words[int(i)] = self.words[int(self.rng.integers(len(self.words)))]
        return " ".join(words)

    def _edited(self, pair: tuple[list[dict[str, str]], str, str]) -> tuple[Any, str, str]:
        history, chosen, rejected = pair
        history = [m | {"content": self._edit(m["content"])} for m in history]
        return history, self._edit(chosen), self._edit(rejected)

    def _bad_row(self, kind: str) -> dict[str, Any] | str:
        history, chosen, rejected = self._conversation_pair()
        truth = {"kind": f"bad:{kind}"}
        if kind == "malformed_json":
            return json.dumps(_record((history, chosen, rejected), truth))[:-7]
        record = _record((history, chosen, rejected), truth)
        if kind == "missing_field":
            del record["rejected"]
        elif kind == "empty_content":
            record["chosen"][-1]["content"] = "  "
        elif kind == "identical_responses":
            record["rejected"][-1]["content"] = record["chosen"][-1]["content"]
        elif kind == "final_turn_not_assistant":
            record["chosen"][-1]["role"] = record["rejected"][-1]["role"] = "user"
        elif kind == "invalid_role":
            record["chosen"][0]["role"] = record["rejected"][0]["role"] = "narrator"
        return record


def _record(pair: tuple[list[dict[str, str]], str, str], truth: dict[str, Any]) -> dict[str, Any]:
    history, chosen, rejected = pair
    return {
        "chosen": [*history, {"role": "assistant", "content": chosen}],
        "rejected": [*history, {"role": "assistant", "content": rejected}],
        "truth": truth,
    }


def _vocabulary(rng: np.random.Generator, size: int) -> list[str]:
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    words: set[str] = set()
    while len(words) < size:
        n = int(rng.integers(1, 4))
        words.add("".join(syllables[int(i)] for i in rng.integers(len(syllables), size=n)))
    return sorted(words)


def write_corpus(
    spec: CorpusSpec,
    out_dir: str | Path,
    shards: int = 1,
    benchmark_prompts: list[str] | None = None,
) -> list[Path]:
    """Write the corpus as ``shards`` jsonl.gz files (round-robin); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"synthetic-{spec.seed}-{i:04d}.jsonl.gz" for i in range(shards)]
    with ExitStack() as stack:
        files = [
            stack.enter_context(gzip.open(p, "wt", encoding="utf-8", compresslevel=1))
            for p in paths
        ]
        for i, record in enumerate(CorpusGenerator(spec, benchmark_prompts).records()):
            line = record if isinstance(record, str) else json.dumps(record, ensure_ascii=False)
            files[i % shards].write(line + "\n")
    return paths


def benchmark_prompts(path: str | Path) -> list[str]:
    """The distinct first user prompts of a benchmark file (any format ingest detects)."""
    text = Path(path).read_text(encoding="utf-8")
    records = (
        json.loads(text)
        if text.lstrip().startswith("[")
        else [json.loads(line) for line in text.splitlines() if line.strip()]
    )
    prompts: dict[str, None] = {}
    for record in records:
        fmt = detect_format(record)
        for item in convert(record, fmt, Limits()) if fmt else []:
            if isinstance(item, Pair) and item.history:
                prompts[item.history[0]["content"]] = None
    return list(prompts)
