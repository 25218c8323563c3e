"""Dedup throughput and quality: `synpref dedup` vs datatrove's MinHash dedup on the same texts.

    python benchmarks/dedup_bench.py --pairs 1000000        # needs the `bench` extra

The corpus is the ingest benchmark's (seeded synthetic pairs with planted exact repeats, 3%
near-duplicates with 3% of the words of every field edited, 1% label flips), ingested once into
a benchmark lake. Then, on the same machine in the same run:

- ``synpref``: the whole `synpref dedup` job from the lake (content keys, exact clusters, flips,
  MinHash-LSH signatures and clusters, all decision tables and the status table written),
  on a local Ray with 2 CPUs;
- ``datatrove``: its four-stage MinHash deduplication (signatures, buckets, clusters, filter)
  with the same shingles and LSH shape (word 3-grams, 25 bands x 4 rows, xxhash, 64-bit), on
  one text per pair (history, chosen and rejected joined) exported as jsonl, 2 workers.

Quality, for both, on the planted near-duplicate families (an original and its edited copies):
recall = families in which a member was flagged as a duplicate; precision = flagged pairs that
belong to a planted family (a flipped pair flagged as a duplicate counts against it). Peak
memory is the machine's used memory above the level before each run, sampled every 0.2 s.
Results go to ``benchmarks/out/dedup_bench.json``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import psutil
import ray

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest_bench import OUT, corpus, report, show_progress

from pipelines.core.config import DedupConfig, IngestConfig
from pipelines.core.lake import Lake
from pipelines.hygiene.dedup import dedup
from pipelines.ingest.job import IngestRequest, ingest
from storage_schemas import PAIRS

DECISION_TABLES = ("dedup_clusters", "conflicts", "curation_status", "minhash_signatures")


class PeakMemory:
    """Peak of the machine's used memory above its level at start (covers Ray's workers)."""

    def __enter__(self) -> PeakMemory:
        self.base = psutil.virtual_memory().used
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, psutil.virtual_memory().used)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def megabytes(self) -> float:
        return (self.peak - self.base) / 2**20


def benchmark_lake(pairs: int, shards: int) -> Lake:
    lake = Lake(str(OUT / f"dedup-lake-{pairs}"))
    if not lake.exists(PAIRS.name):
        request = IngestRequest([str(f) for f in corpus(pairs, shards)], source="bench")
        summary = ingest(request, lake, IngestConfig(), run_id="bench")
        print(f"ingested {summary.pairs_inserted:,} pairs in {summary.seconds:.0f}s")
    for table in DECISION_TABLES:
        shutil.rmtree(Path(lake.root) / table, ignore_errors=True)  # a full, not incremental, run
    return lake


def planted_families(lake: Lake) -> tuple[dict[str, int], set[str]]:
    """pair_id -> planted family (the original's id) for originals with near-duplicates and
    their near-duplicates; and the ids of the flipped pairs."""
    rows = lake.read(PAIRS.name, columns=["pair_id", "source_meta"]).to_pylist()
    truth = {r["pair_id"]: json.loads(r["source_meta"])["truth"] for r in rows}
    copied = {t["of"] for t in truth.values() if t["kind"] == "near_dup"}
    family = {
        pid: t["id"] if t["kind"] == "original" else t["of"]
        for pid, t in truth.items()
        if t["kind"] == "near_dup" or (t["kind"] == "original" and t["id"] in copied)
    }
    return family, {pid for pid, t in truth.items() if t["kind"] == "flip"}


def quality(flagged: set[str], family: dict[str, int], flips: set[str]) -> dict:
    families = set(family.values())
    detected = {family[pid] for pid in flagged if pid in family}
    return {
        "recall": len(detected) / len(families),
        "precision": len(flagged & family.keys()) / max(1, len(flagged)),
        "flagged": len(flagged),
        "flips_flagged": len(flagged & flips),
        "families": len(families),
    }


def run_synpref(lake: Lake) -> tuple[float, float, set[str], dict]:
    options = DedupConfig()
    with PeakMemory() as memory:
        started = time.perf_counter()
        summary = dedup(lake, options, run_id="bench")
        seconds = time.perf_counter() - started
    near = lake.read("dedup_clusters", where="method = 'near'").to_pylist()
    flagged = {r["pair_id"] for r in near if r["pair_id"] != r["representative_pair_id"]}
    stats = {
        "near_duplicates": summary.near_duplicates,
        "exact_duplicates": summary.exact_duplicates,
        "conflicts": summary.conflicts,
    }
    return seconds, memory.megabytes, flagged, stats


def export_for_datatrove(lake: Lake, folder: Path, shards: int) -> None:
    """One jsonl document per pair (the same texts synpref hashes), not timed."""
    if folder.exists():
        return
    folder.mkdir(parents=True)
    rows = lake.read(PAIRS.name, columns=["pair_id", "history", "chosen", "rejected"])
    with ExitStack() as stack:
        files = [
            stack.enter_context(open(folder / f"part-{i:03d}.jsonl", "w", encoding="utf-8"))
            for i in range(shards)
        ]
        for i, row in enumerate(rows.to_pylist()):
            text = "\n".join(
                [*(m["content"] for m in row["history"]), row["chosen"], row["rejected"]]
            )
            files[i % shards].write(json.dumps({"id": row["pair_id"], "text": text}) + "\n")


def run_datatrove(documents: Path, workdir: Path, shards: int) -> tuple[float, float, set[str]]:
    # datatrove 0.10.1 hands str to xxhash, whose 4.x API takes bytes: encode first (as synpref
    # does); patched before the executors fork their workers.
    import datatrove.utils.hashes.xxhash as datatrove_xxhash
    import xxhash
    from datatrove.executor.local import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    datatrove_xxhash.xxhash64 = lambda text: xxhash.xxh64_intdigest(text.encode())

    shutil.rmtree(workdir, ignore_errors=True)
    config = MinhashConfig(
        n_grams=3,
        num_buckets=25,
        hashes_per_bucket=4,
        hash_config=HashConfig(precision=64, hash_fc="xxhash"),
    )

    def stage(name: str, pipeline: list, tasks: int, workers: int = 2) -> LocalPipelineExecutor:
        logs = str(workdir / "logs" / name)
        return LocalPipelineExecutor(
            pipeline=pipeline, tasks=tasks, workers=workers, logging_dir=logs
        )

    signatures, buckets, remove = (str(workdir / d) for d in ("signatures", "buckets", "remove"))
    removed, kept = JsonlWriter(str(workdir / "removed")), JsonlWriter(str(workdir / "kept"))
    stages = [
        stage(
            "signatures",
            [JsonlReader(str(documents)), MinhashDedupSignature(signatures, config=config)],
            shards,
        ),
        stage(
            "buckets", [MinhashDedupBuckets(signatures, buckets, config=config)], config.num_buckets
        ),
        stage("clusters", [MinhashDedupCluster(buckets, remove, config=config)], 1, workers=1),
        stage(
            "filter",
            [
                JsonlReader(str(documents)),
                MinhashDedupFilter(remove, exclusion_writer=removed),
                kept,
            ],
            shards,
        ),
    ]
    with PeakMemory() as memory:
        started = time.perf_counter()
        for stage in stages:
            stage.run()
        seconds = time.perf_counter() - started
    flagged: set[str] = set()
    for path in (workdir / "removed").glob("*.jsonl.gz"):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            flagged.update(json.loads(line)["id"] for line in f)
    return seconds, memory.megabytes, flagged


def main() -> None:
    show_progress()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--skip-datatrove", action="store_true")
    args = parser.parse_args()

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    lake = benchmark_lake(args.pairs, args.shards)
    family, flips = planted_families(lake)
    pairs = lake.count(PAIRS.name)
    seconds, megabytes, flagged, stats = run_synpref(lake)
    ray.shutdown()
    results = {
        "synpref": {
            "seconds": seconds,
            "peak_mb": megabytes,
            **stats,
            **quality(flagged, family, flips),
        }
    }
    print("synpref:", results["synpref"])
    if not args.skip_datatrove:
        documents = OUT / f"dedup-docs-{args.pairs}"
        export_for_datatrove(lake, documents, args.shards)
        seconds, megabytes, flagged = run_datatrove(
            documents, OUT / f"datatrove-{args.pairs}", args.shards
        )
        results["datatrove"] = {
            "seconds": seconds,
            "peak_mb": megabytes,
            **quality(flagged, family, flips),
        }
        print("datatrove:", results["datatrove"])
    for result in results.values():
        result["pairs_per_s"] = pairs / result["seconds"]
    if "datatrove" in results:
        results["synpref"]["speedup_vs_datatrove"] = (
            results["synpref"]["pairs_per_s"] / results["datatrove"]["pairs_per_s"]
        )
    columns = {"seconds": ".1f", "pairs_per_s": ",.0f", "recall": ".3f", "precision": ".3f"}
    columns |= {"flips_flagged": ",", "peak_mb": ",.0f"}
    report("dedup_bench", {"pairs": pairs, "results": results}, columns)


if __name__ == "__main__":
    main()
