"""Benchmark decontamination: corpus pairs that share an n-gram with a benchmark's text.

Every source ingested as a benchmark (RM-Bench, JudgeBench, RewardBench-style files with
``--benchmark``) contributes its prompts (the user turns of its histories) and, optionally,
its responses. A corpus pair is contaminated when its history, its chosen or its rejected
response contains one of their n-grams (13 words by default, as in the paper's last revision;
5 to 13 allowed). A benchmark text shorter than n words, but at least ``min_tokens`` long, is
matched as a whole wherever it occurs. A shorter benchmark prompt (any user turn of a
multi-turn benchmark) matches only a history turn that is exactly that prompt, and only when it
has at least ``min_turn_tokens`` words: "how can I rob a casino" as a whole turn is evidence,
"thank you" is not.

Tokens are the words (``\\w+``) of the NFC-normalised, case-folded text. The index of benchmark
n-grams is built once on the driver and shared with the Ray Data actors that scan the corpus.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipelines.core.config import DecontaminationConfig
from pipelines.core.jobs import PairsSummary, TableVersion, versions
from pipelines.core.lake import Lake
from pipelines.core.text import tokens
from pipelines.hygiene.curation_status import rebuild_status
from storage_schemas import CONTAMINATION, CURATION_STATUS, PAIRS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchmarkIndex:
    """Benchmark n-grams -> (benchmark source, benchmark pair_id, benchmark field)."""

    grams: dict[str, tuple[str, str, str]]
    lengths: tuple[int, ...]
    first_tokens: frozenset[str]
    prompts: dict[str, tuple[str, str, str]]
    """Whole benchmark prompts (normalised words joined by spaces), matched against whole turns."""

    @classmethod
    def build(cls, benchmark: pa.Table, options: DecontaminationConfig) -> BenchmarkIndex:
        """From ``pairs`` rows of benchmark sources; the first pair (by source, pair_id) that
        holds an n-gram is its evidence, so the index does not depend on row order."""
        grams: dict[str, tuple[str, str, str]] = {}
        prompts: dict[str, tuple[str, str, str]] = {}
        rows = benchmark.sort_by([("source", "ascending"), ("pair_id", "ascending")]).to_pylist()
        for row in rows:
            texts = [("prompt", m["content"]) for m in row["history"] if m["role"] == "user"]
            if options.include_responses:
                texts += [("response", row["chosen"]), ("response", row["rejected"])]
            for field, text in texts:
                words = tokens(text)
                evidence = (row["source"], row["pair_id"], field)
                if field == "prompt" and len(words) >= options.min_turn_tokens:
                    prompts.setdefault(" ".join(words), evidence)
                for gram in _benchmark_grams(words, options):
                    grams.setdefault(gram, evidence)
        lengths = tuple(sorted({g.count(" ") + 1 for g in grams}, reverse=True))
        return cls(grams, lengths, frozenset(g.split(" ", 1)[0] for g in grams), prompts)


def _benchmark_grams(words: list[str], options: DecontaminationConfig) -> Iterator[str]:
    if len(words) >= options.n:
        for i in range(len(words) - options.n + 1):
            yield " ".join(words[i : i + options.n])
    elif len(words) >= options.min_tokens:
        yield " ".join(words)


def find_contamination(batch: pa.Table, index: BenchmarkIndex, run_id: str) -> pa.Table:
    """``contamination`` rows for the corpus pairs of ``batch`` (benchmark rows are skipped)."""
    hits: dict[tuple[str, str, str, str, str], tuple[str, str]] = {}
    for row in batch.to_pylist():
        if row["source_kind"] == "benchmark":
            continue
        fields = [("history", m["content"]) for m in row["history"]]
        fields += [("chosen", row["chosen"]), ("rejected", row["rejected"])]
        for field, text in fields:
            words = tokens(text)
            whole = " ".join(words)
            found = (
                [(whole, index.prompts[whole])]
                if field == "history" and whole in index.prompts
                else []
            )
            found += [(gram, index.grams[gram]) for gram in _matches(words, index)]
            for gram, (source, pair_id, benchmark_field) in found:
                key = (row["source"], row["pair_id"], field, source, pair_id)
                hits.setdefault(key, (benchmark_field, gram))
    now = datetime.now(UTC)
    return pa.Table.from_pylist(
        [
            {
                "source": key[0],
                "pair_id": key[1],
                "field": key[2],
                "benchmark_source": key[3],
                "benchmark_pair_id": key[4],
                "benchmark_field": benchmark_field,
                "ngram": gram,
                "n": gram.count(" ") + 1,
                "decontamination_run_id": run_id,
                "decided_at": now,
            }
            for key, (benchmark_field, gram) in sorted(hits.items())
        ],
        schema=CONTAMINATION.schema,
    )


def _matches(words: list[str], index: BenchmarkIndex) -> Iterator[str]:
    for n in index.lengths:
        for i in range(len(words) - n + 1):
            if words[i] in index.first_tokens:
                gram = " ".join(words[i : i + n])
                if gram in index.grams:
                    yield gram


class ContaminationFinder:
    """Ray Data actor: holds the benchmark index once and scans batches of pairs."""

    def __init__(self, index: BenchmarkIndex, run_id: str) -> None:
        self.index = index
        self.run_id = run_id

    def __call__(self, batch: pa.Table) -> pa.Table:
        return find_contamination(batch, self.index, self.run_id)


EVIDENCE_SHOWN = 10
"""Contaminated pairs whose evidence the summary shows."""


def _evidence(hits: pa.Table) -> list[dict[str, str]]:
    """The first hit of each of the first ``EVIDENCE_SHOWN`` contaminated pairs (sorted)."""
    columns = ["source", "pair_id", "field", "benchmark_source", "benchmark_field", "ngram"]
    shown: dict[tuple[str, str], dict[str, str]] = {}
    for row in hits.select(columns).sort_by([(c, "ascending") for c in columns]).to_pylist():
        if len(shown) == EVIDENCE_SHOWN and (row["source"], row["pair_id"]) not in shown:
            break
        shown.setdefault((row["source"], row["pair_id"]), row)
    return list(shown.values())


@dataclass
class DecontaminationSummary(PairsSummary):
    job: ClassVar[str] = "decontaminate"
    pairs_version: int
    benchmarks: dict[str, int]
    """Benchmark source -> pairs indexed."""
    ngrams_indexed: int
    corpus_pairs: int
    contaminated_pairs: dict[str, int]
    """Corpus source -> contaminated pairs."""
    by_benchmark: dict[str, int]
    """Benchmark source -> contaminated corpus pairs."""
    contamination_version: int | None
    status_version: int | None
    """New ``curation_status`` version, or None when no verdict changed."""
    by_source: dict[str, dict[str, int]]
    evidence: list[dict[str, str]]
    """One hit per contaminated pair, the first ``EVIDENCE_SHOWN`` pairs: what matched where."""
    seconds: float

    def text(self) -> str:
        lines = [
            f"decontamination of pairs v{self.pairs_version} against "
            + (
                ", ".join(f"{b} ({n:,} pairs)" for b, n in sorted(self.benchmarks.items()))
                or "no benchmark sources"
            ),
            f"  {self.ngrams_indexed:,} benchmark n-grams, "
            f"{self.corpus_pairs:,} corpus pairs scanned",
        ]
        for source, n in sorted(self.contaminated_pairs.items()):
            lines.append(f"  {source:<24} {n:,} contaminated")
        for benchmark, n in sorted(self.by_benchmark.items()):
            lines.append(f"  from {benchmark:<19} {n:,} pairs")
        if not self.contaminated_pairs:
            lines.append("  no contaminated pairs")
        total = sum(self.contaminated_pairs.values())
        if self.evidence:
            lines.append(
                f"  evidence ({len(self.evidence)} of {total:,} pairs; all in the contamination "
                "table):"
            )
        for hit in self.evidence:
            text = hit["ngram"] if len(hit["ngram"]) <= 70 else hit["ngram"][:67] + "..."
            lines.append(
                f"    {hit['source']} {hit['pair_id'][:10]} {hit['field']} <- "
                f'{hit["benchmark_source"]} {hit["benchmark_field"]}: "{text}"'
            )
        lines.append(f"  took {self.seconds:.1f}s")
        return "\n".join(lines)

    def tables_written(self) -> list[TableVersion]:
        return versions(
            (CONTAMINATION, self.contamination_version), (CURATION_STATUS, self.status_version)
        )

    def metrics(self) -> dict[str, float]:
        return {
            "ngrams_indexed": self.ngrams_indexed,
            "corpus_pairs": self.corpus_pairs,
            **{f"contaminated.{s}": n for s, n in self.contaminated_pairs.items()},
            **{f"contaminated_by.{b}": n for b, n in self.by_benchmark.items()},
        }


def decontaminate(
    lake: Lake,
    options: DecontaminationConfig,
    run_id: str,
) -> DecontaminationSummary:
    """Scan every corpus pair against every benchmark source; write ``contamination``."""
    started = time.perf_counter()
    version = lake.version(PAIRS.name)
    columns = ["source", "source_kind", "pair_id", "history", "chosen", "rejected"]
    benchmark = lake.read(PAIRS.name, version, columns, where="source_kind = 'benchmark'")
    index = BenchmarkIndex.build(benchmark, options)
    log.info(
        f"[decontaminate] {len(index.grams):,} n-grams from {benchmark.num_rows:,} benchmark pairs"
    )
    corpus = lake.dataset(PAIRS.name, version, columns, pc.field("source_kind") == "corpus")
    found = corpus.map_batches(
        ContaminationFinder,
        fn_constructor_kwargs={"index": index, "run_id": run_id},
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(
            min_size=1, max_size=max(1, int(ray.cluster_resources().get("CPU", 1)))
        ),
    )
    parts = [t for t in ray.get(found.to_arrow_refs()) if t.num_rows]
    hits = pa.concat_tables(parts) if parts else CONTAMINATION.schema.empty_table()
    result = lake.replace_decisions(CONTAMINATION, hits, compare=("benchmark_field", "ngram", "n"))
    corpus_keys = lake.read(PAIRS.name, version, ["source", "pair_id"], "source_kind = 'corpus'")
    status = rebuild_status(lake, corpus_keys, run_id)
    contaminated = {
        (r["source"], r["pair_id"]) for r in hits.select(["source", "pair_id"]).to_pylist()
    }
    by_benchmark = {(r["benchmark_source"], r["source"], r["pair_id"]) for r in hits.to_pylist()}
    return DecontaminationSummary(
        pairs_version=version,
        benchmarks=dict(Counter(benchmark["source"].to_pylist())),
        ngrams_indexed=len(index.grams),
        corpus_pairs=lake.count(PAIRS.name, version, where="source_kind = 'corpus'"),
        contaminated_pairs=dict(Counter(source for source, _ in contaminated)),
        by_benchmark=dict(Counter(b for b, _, _ in by_benchmark)),
        contamination_version=result.version,
        status_version=status.version,
        by_source=status.counts,
        evidence=_evidence(hits),
        seconds=time.perf_counter() - started,
    )
