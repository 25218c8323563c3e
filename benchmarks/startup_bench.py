"""What a small training pays before it learns: the same tiny `synpref train` run several
times on one local Ray cluster.

    python benchmarks/startup_bench.py --runs 3
    python benchmarks/startup_bench.py --runs 3 --workers 0   # local mode
    # Ray Train's own defaults instead of the platform's for a local cluster:
    RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=1 RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=2 \
        python benchmarks/startup_bench.py --runs 3

Each run trains MiniLM on about 90 HH-RLHF pairs (../shared/data) at 32 tokens for 6 steps and
validates on about 80, one worker with 1.5 CPUs (``--workers 0``: Ray Train's local mode, in
this process with as many threads, as the loop's tests do): the learning itself
takes a few seconds, the rest is the job's fixed cost (selection, Ray Train's controller,
worker group and data actors, imports, the model, checkpoint, MLflow). The first run also pays
the cluster's cold caches; the later ones are what every further training of a loop pays.
Results go to ``benchmarks/out/startup_bench.json``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import psutil
from ingest_bench import HH, job_bench_config, report

from pipelines import jobs
from pipelines.core.ray_cluster import LOCAL_CLUSTER_ENV
from pipelines.ingest.job import IngestRequest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--workers", type=int, default=1, help="Ray Train workers; 0: local mode, in this process"
    )
    args = parser.parse_args()
    training = {
        "workers": args.workers,
        "cpus_per_worker": 1.5,
        "max_length": 32,
        "global_batch": 16,
        "validate_every": 1000,
        "checkpoint_every": 1000,
        "register_as": None,
        "data": {"where": "pair_id < '08'", "validation_where": "pair_id >= 'f8'"},
    }
    config = job_bench_config("startup_bench", training=training)
    config = config.model_copy(
        update={
            "training": config.training.model_copy(
                update={"storage_path": str(Path(config.lake.root).parent / "checkpoints")}
            )
        }
    )
    jobs.ingest(config, IngestRequest([str(HH)], source="hh"))
    results = {}
    for run in range(args.runs):
        started, cpu = time.perf_counter(), machine_cpu_seconds()
        summary = jobs.train(config, f"startup-{run}").summary
        results[f"train {run}"] = {
            "seconds": time.perf_counter() - started,
            "cpu_seconds": machine_cpu_seconds() - cpu,
            "pairs": summary.train_pairs,
            "steps": summary.steps,
        }
    settings = {key: os.environ[key] for key in LOCAL_CLUSTER_ENV} | {"workers": args.workers}
    report(
        "startup_bench",
        {"settings": settings, "results": results},
        {"seconds": ".1f", "cpu_seconds": ".1f", "pairs": "d", "steps": "d"},
    )


def machine_cpu_seconds() -> float:
    """CPU time the whole machine has spent working (every process, Ray's too): on a quiet
    machine, what a job costs the cores, which is what a CPU-bound test suite pays."""
    times = psutil.cpu_times()
    return times.user + times.nice + times.system + times.irq + times.softirq


if __name__ == "__main__":
    main()
