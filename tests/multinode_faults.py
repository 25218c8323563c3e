"""A worker node removed in the middle of a job, on a multi-node cluster of this machine
(``ray.cluster_utils.Cluster``: a head with no CPUs and three 1-CPU workers with small object
stores). Run by tests/test_multinode.py as a process of its own, since a driver joins one
cluster only: ``python tests/multinode_faults.py WORK_DIR MODEL_FOLDER``.

For ingest, dedup and scoring: the job runs once undisturbed into one lake, then into a second
lake while a worker node is removed (its processes killed) part way through; if the disturbed
job fails, it is run again. Prints, as JSON, per job: whether the node went while the job was
running, whether the job completed despite it (or the error it failed with), and whether the
second lake's tables equal the first's (run ids and times left out).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from ray.cluster_utils import Cluster

from pipelines import jobs
from pipelines.core.config import SynprefConfig, load_config
from pipelines.core.lake import Lake
from pipelines.ingest.job import IngestRequest
from pipelines.ingest.synthetic import CorpusSpec, write_corpus

WORKER = {"num_cpus": 1, "object_store_memory": 100 * 2**20}
TABLES = {
    "ingest": ["pairs", "quarantine"],
    "dedup": ["dedup_clusters", "conflicts", "curation_status"],
    "score": ["rm_scores"],
}
VOLATILE = ("run_id", "_at", "seconds")
"""Columns that name a run or a time: they differ between two runs of the same job."""


def snapshot(lake: Lake, tables: list[str]) -> dict[str, list[tuple]]:
    """Each table's rows, sorted, without run ids and times; floats rounded."""
    found = {}
    for name in tables:
        table = lake.read(name)
        columns = [c for c in table.column_names if not any(v in c for v in VOLATILE)]
        rows = [
            tuple(round(v, 5) if isinstance(v, float) else json.dumps(v, default=str) for v in r)
            for r in zip(*(table[c].to_pylist() for c in columns), strict=True)
        ]
        found[name] = sorted(rows)
    return found


def disturbed(cluster: Cluster, job: Callable[[], Any]) -> dict[str, Any]:
    """Run ``job`` and remove a worker node once every worker CPU is busy with it (its Ray
    stage is under way on every node); then put a node back."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            job()
            outcome["completed"] = True
        except Exception as exc:  # the job's failure is the result being measured
            outcome["completed"], outcome["error"] = False, f"{type(exc).__name__}: {exc}"[:2000]

    thread = threading.Thread(target=run)
    thread.start()
    while thread.is_alive() and ray.available_resources().get("CPU", 0) >= 1:
        time.sleep(0.05)
    outcome["removed_while_running"] = thread.is_alive()
    cluster.remove_node(next(iter(cluster.worker_nodes)), allow_graceful=False)
    thread.join()
    cluster.add_node(**WORKER)
    cluster.wait_for_nodes()
    if not outcome["completed"]:
        job()  # a clear failure is allowed; the re-run must then complete
    return outcome


def config(work: Path, name: str) -> SynprefConfig:
    folder = work / name
    return load_config(
        None,
        {
            "lake": {"root": str(folder / "lake")},
            "tracking": {
                "uri": f"sqlite:///{folder / 'mlruns.db'}",
                "artifact_location": str(folder / "mlartifacts"),
            },
            "scoring": {"actors": 2, "num_cpus": 1, "max_length": 64},
        },
    )


def main(work: Path, model: str) -> None:
    files = write_corpus(CorpusSpec(pairs=6000, seed=3), work / "corpus", shards=6)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(3):
        cluster.add_node(**WORKER)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    request = IngestRequest(paths=[str(f) for f in files], source="web")
    steps: dict[str, Callable[[SynprefConfig], Any]] = {
        "ingest": lambda c: jobs.ingest(c, request),
        "dedup": jobs.dedup,
        "score": lambda c: jobs.score(c, model, "rm", where="pair_id < '30'"),
    }
    calm, rough = config(work, "undisturbed"), config(work, "disturbed")
    results = {}
    for name, step in steps.items():
        started = time.monotonic()
        step(calm)
        seconds = time.monotonic() - started
        outcome = disturbed(cluster, lambda s=step: s(rough))
        equal = snapshot(Lake(calm.lake.root), TABLES[name]) == snapshot(
            Lake(rough.lake.root), TABLES[name]
        )
        results[name] = outcome | {"equal": equal, "undisturbed_seconds": round(seconds, 1)}
        print(f"[multinode] {name}: {results[name]}", file=sys.stderr, flush=True)
    print(json.dumps(results))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
