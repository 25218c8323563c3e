"""Ingest throughput: `synpref ingest` on Ray Data vs plain single-process writes of the same rows.

    python benchmarks/ingest_bench.py --pairs 1000000 --cpus 1 2

Three measurements on the same generated corpus (jsonl.gz shards, planted duplicates, flips and
bad rows), each into a fresh Delta table:

- ``ray``: the real ingest path (read -> normalise/validate in Ray Data -> stage -> idempotent
  merge), once per ``--cpus`` value so the parallel speed-up is visible, and once more on the
  most CPUs with ``ingest.columnar`` off (every record converted one by one, as before the
  columnar fast path);
- ``plain_pipeline``: the same reading and normalisation code (columnar) in one process, then one
  ``write_deltalake`` append of the kept pairs (what a simple script does; no idempotency);
- ``plain_write``: only the ``write_deltalake`` append of the already-normalised pair rows (the
  I/O floor).

Ratios are throughputs relative to ``plain_pipeline`` (the same work without Ray) and to
``plain_write``. Results go to ``benchmarks/out/ingest_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray
from deltalake import write_deltalake

from pipelines.core.config import IngestConfig, SynprefConfig, load_config
from pipelines.core.lake import Lake
from pipelines.core.ray_cluster import set_local_cluster_env
from pipelines.ingest.formats import Limits
from pipelines.ingest.job import IngestRequest, detect_file_format, ingest, normalise_batch
from pipelines.ingest.record_files import read_records, records_table
from pipelines.ingest.synthetic import CorpusSpec, write_corpus
from storage_schemas import PAIRS

OUT = Path(__file__).resolve().parent / "out"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
"""The workplace's real data (../shared/data beside the clone)."""
HH = SHARED / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"


def report(name: str, summary: dict, columns: dict[str, str] | None = None) -> None:
    """Write ``OUT/<name>.json`` and print it: as a table of ``summary["results"]`` (one row
    per run; ``columns`` maps each result key to its format spec) or, without columns, whole."""
    OUT.mkdir(exist_ok=True)  # a fresh clone has none
    (OUT / f"{name}.json").write_text(json.dumps(summary, indent=2))
    if columns is None:
        print(json.dumps(summary, indent=2))
        return
    widths = {key: max(len(key), 10) + 1 for key in columns}
    print("\n" + f"{'run':<16}" + "".join(f"{k:>{widths[k]}}" for k in columns))
    for name, row in summary["results"].items():
        cells = (f"{format(row[k], spec):>{widths[k]}}" for k, spec in columns.items())
        print(f"{name:<16}" + "".join(cells))


def show_progress() -> None:
    """The jobs' progress lines (``pipelines`` loggers at INFO) on stderr, as bare messages."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("pipelines").setLevel(logging.INFO)


def job_bench_config(name: str, **sections: dict[str, Any]) -> SynprefConfig:
    """What a job benchmark starts from: an empty ``OUT/name`` holding its own lake and sqlite
    MLflow store (plus ``sections`` of config), and a local 2-CPU Ray (the platform's settings for
    one machine) without progress bars."""
    show_progress()
    work = OUT / name
    shutil.rmtree(work, ignore_errors=True)
    tracking = {"uri": f"sqlite:///{work / 'mlruns.db'}", "artifact_location": str(work / "art")}
    config = load_config(
        None, {"lake": {"root": str(work / "lake")}, "tracking": tracking} | sections
    )
    set_local_cluster_env()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return config


def corpus(pairs: int, shards: int) -> list[Path]:
    """The benchmark corpus, generated once and reused (it is seeded)."""
    folder = OUT / f"corpus-{pairs}"
    files = sorted(folder.glob("*.jsonl.gz"))
    if len(files) != shards:
        shutil.rmtree(folder, ignore_errors=True)
        started = time.perf_counter()
        files = write_corpus(CorpusSpec(pairs=pairs, seed=0), folder, shards=shards)
        print(f"generated {pairs:,} pairs in {time.perf_counter() - started:.0f}s -> {folder}")
    return files


def run_ray(files: list[Path], cpus: int, workdir: Path, columnar: bool = True) -> dict:
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        lake = Lake(str(workdir / f"lake-ray-{cpus}-{'columnar' if columnar else 'per-record'}"))
        started = time.perf_counter()
        summary = ingest(
            IngestRequest(paths=[str(f) for f in files], source="bench"),
            lake,
            IngestConfig(columnar=columnar),
            run_id="bench",
        )
        seconds = time.perf_counter() - started
    finally:
        ray.shutdown()
    assert summary.balanced
    return {"seconds": seconds, "pairs": summary.pairs_inserted, "candidates": summary.candidates}


def run_plain(files: list[Path], workdir: Path) -> tuple[dict, dict]:
    """Single process: the same reading and normalisation, then one append of the pairs."""
    fs = pafs.LocalFileSystem()
    started = time.perf_counter()
    formats = {str(f): detect_file_format(str(f), fs) for f in files}
    staged = []
    for f in files:
        with fs.open_input_stream(str(f), compression=None) as stream:  # read_records gunzips
            raw = records_table(str(f), list(read_records(stream, str(f))))
        staged.append(
            normalise_batch(
                raw,
                source="bench",
                source_kind="corpus",
                formats=formats,
                limits=Limits(),
                run_id="bench",
            )
        )
    rows = pa.concat_tables(staged)
    pairs = (
        rows.filter(pc.equal(rows["kind"], "pair")).select(PAIRS.schema.names).cast(PAIRS.schema)
    )
    normalise_seconds = time.perf_counter() - started
    write_deltalake(
        str(workdir / "lake-plain-pipeline"), pairs, mode="append", partition_by=["source"]
    )
    pipeline_seconds = time.perf_counter() - started

    started = time.perf_counter()
    write_deltalake(
        str(workdir / "lake-plain-write"), pairs, mode="append", partition_by=["source"]
    )
    write_seconds = time.perf_counter() - started
    candidates = rows.num_rows
    return (
        {
            "seconds": pipeline_seconds,
            "normalise_seconds": normalise_seconds,
            "pairs": pairs.num_rows,
            "candidates": candidates,
        },
        {"seconds": write_seconds, "pairs": pairs.num_rows, "candidates": candidates},
    )


def main() -> None:
    show_progress()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    files = corpus(args.pairs, args.shards)
    mlflow.set_tracking_uri(f"sqlite:///{OUT / 'ingest-bench-mlruns.db'}")  # ingest asks it
    size_mb = sum(f.stat().st_size for f in files) / 1e6
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        workdir = Path(tmp)
        for cpus in args.cpus:
            results[f"ray_{cpus}cpu"] = run_ray(files, cpus, workdir)
            print(f"ray {cpus} cpu: {results[f'ray_{cpus}cpu']}")
        most = max(args.cpus)
        results[f"ray_{most}cpu_per_record"] = run_ray(files, most, workdir, columnar=False)
        print(f"ray {most} cpu, per record: {results[f'ray_{most}cpu_per_record']}")
        results["plain_pipeline"], results["plain_write"] = run_plain(files, workdir)
        print(f"plain: {results['plain_pipeline']} / {results['plain_write']}")
    for result in results.values():
        result["pairs_per_s"] = result["candidates"] / result["seconds"]
    base, floor = results["plain_pipeline"]["pairs_per_s"], results["plain_write"]["pairs_per_s"]
    for result in results.values():
        result["ratio_to_plain_pipeline"] = result["pairs_per_s"] / base
        result["ratio_to_plain_write"] = result["pairs_per_s"] / floor
    summary = {"pairs": args.pairs, "shards": args.shards, "corpus_mb": size_mb, "results": results}
    columns = {"seconds": ".1f", "pairs_per_s": ",.0f"}
    columns |= dict.fromkeys(["ratio_to_plain_pipeline", "ratio_to_plain_write"], ".2f")
    report("ingest_bench", summary, columns)


if __name__ == "__main__":
    main()
