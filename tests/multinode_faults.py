"""A worker node lost in the middle of a job, on a multi-node cluster of this machine
(``ray.cluster_utils.Cluster``: a head with no CPUs and two, then three, 1-CPU workers with
small object stores). Run by tests/test_multinode.py as a process of its own, since a driver
joins one cluster only:

    python -m tests.multinode_faults WORK_DIR MODEL_FOLDER JUDGE_URL

Each job (ingest, dedup, scoring with a real model, judging on the scripted server) runs once
undisturbed into one lake, on two worker nodes: the layout a node loss leaves, where a pool's
two 0.5-CPU actors hold half of each node's CPU (one per node, by a custom resource) and a
whole-CPU task could never be scheduled (such a task hung a judge job once). A third node
joins; then each job runs into a second lake while a worker node is removed with its processes
killed (no graceful drain) part way through the job's Ray stage; the job goes on with the two
nodes left (a fresh node joins only after it, as KubeRay's autoscaler would replace the pod,
for the next job). A job that fails is run again. Writes to WORK_DIR/outcomes.json (stdout
carries Ray's own lines too), per job: whether the node went while the job's stage ran, whether
the job completed despite it (or the error it failed with), and whether the second lake's
tables equal the first's (run ids, times and versions left out).
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import ray
from ray._common.utils import reset_ray_address
from ray._private.state import available_resources_per_node
from ray.cluster_utils import Cluster
from ray.data._internal.execution.execution_callback import ExecutionCallback
from ray.data._internal.execution.operators.actor_pool_map_operator import ActorPoolMapOperator

from pipelines import jobs
from pipelines.core.config import SynprefConfig, load_config
from pipelines.core.lake import Lake
from pipelines.ingest.job import IngestRequest
from pipelines.ingest.synthetic import CorpusSpec, write_corpus
from tests.conftest import local_stores, scripted_judge, table_rows

WORKER = {"num_cpus": 1, "object_store_memory": 100 * 2**20, "resources": {"pool_slot": 1}}
"""A worker node. ``pool_slot``: the undisturbed runs' pools ask one per actor, so their two
actors take half of each node's CPU (Ray would sometimes put both on one node)."""
# The GCS declares a silent node dead after 3 missed health checks 1 s apart (Ray's defaults:
# 5 checks 3 s apart, 15 s); tasks and objects of the lost node wait for that verdict. What
# is tested (retries, restarts, merges) does not depend on how soon it comes.
FAILURE_DETECTION = {
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 2000,
    "health_check_failure_threshold": 3,
}


class NodeLoss(ExecutionCallback):
    """Removes a worker node on which a task or actor of the disturbed job holds a CPU, as soon
    as the job's Ray stage runs: its actor pool has a task in flight or, in a job without one,
    a task is running."""

    cluster: ClassVar[Cluster]
    armed: ClassVar[threading.Event] = threading.Event()
    removed: ClassVar[dict[str, Any]] = {}

    def before_execution_starts(self, executor: Any) -> None:
        self.started = time.monotonic()

    def on_execution_step(self, executor: Any) -> None:
        pools = [op for op in executor._topology if isinstance(op, ActorPoolMapOperator)]
        running = sum(op.num_active_tasks() for op in pools or executor._topology)
        if not (self.armed.is_set() and running):
            return
        free = available_resources_per_node()
        # A node whose every CPU is taken has no "CPU" entry at all.
        busy = [n for n in self.cluster.worker_nodes if free.get(n.node_id, {}).get("CPU", 0) < 1]
        if not busy:  # the resource view lags the scheduler: look again at the next step
            return
        self.armed.clear()
        self.cluster.remove_node(busy[0], allow_graceful=False)
        seconds = round(time.monotonic() - self.started, 1)
        NodeLoss.removed = {"running_tasks": running, "seconds_in": seconds}


STEP_SECONDS = 300
"""Each job alone takes 3-10 s here, 3x that in the suite: one still running after this has
hung, and the driver ends with every thread's stack instead of waiting for the test's timeout."""


@contextlib.contextmanager
def deadline(what: str) -> Iterator[None]:
    """Say what runs now; if it outlasts ``STEP_SECONDS``, print every thread's stack, take
    the cluster down and end this process."""
    print(f"[multinode] {what}", file=sys.stderr, flush=True)
    timer = threading.Timer(STEP_SECONDS, _hung, (what,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _hung(what: str) -> None:
    print(f"[multinode] {what}: hung for {STEP_SECONDS} s", file=sys.stderr, flush=True)
    faulthandler.dump_traceback(all_threads=True)
    # The cluster's processes end with this one, but not the address file Ray keeps for the
    # last cluster started: it would send the next plain ray.init() on this machine to a dead
    # head. Removed as Cluster.shutdown removes it (which refuses while this driver is on it).
    reset_ray_address()
    os._exit(1)


def disturbed(job: Callable[[], Any]) -> dict[str, Any]:
    """Run ``job`` with a node lost in the middle of its Ray stage, on the nodes left (its
    actor pools fit on two nodes); run it again if it failed. Then a new node joins (in this
    thread: Ray's node start-up sets a signal handler)."""
    NodeLoss.removed = {}
    NodeLoss.armed.set()
    outcome: dict[str, Any] = {}
    try:
        job()
        outcome["completed"] = True
    except Exception as exc:  # the job's failure is the result being measured
        outcome["completed"], outcome["error"] = False, f"{type(exc).__name__}: {exc}"[:2000]
    NodeLoss.armed.clear()
    outcome["removed_while_running"] = bool(NodeLoss.removed)
    outcome |= NodeLoss.removed
    if NodeLoss.removed:
        NodeLoss.cluster.add_node(**WORKER)
    NodeLoss.cluster.wait_for_nodes()
    if not outcome["completed"]:
        job()  # a clear failure is allowed; the re-run must then complete
    return outcome


def config(work: Path, name: str, judge_url: str, one_actor_per_node: bool) -> SynprefConfig:
    """Two 0.5-CPU actors per pool; ``one_actor_per_node`` for the undisturbed runs only (an
    actor restarted after a node loss must fit beside the other on the nodes left)."""
    folder = work / name
    # on_driver_max 0: the actor pool (what a node loss disturbs) works even on these small sets.
    pool = {"actors": 2, "num_cpus": 0.5, "on_driver_max": 0}
    pool["resources"] = {"pool_slot": 1} if one_actor_per_node else {}
    judge = scripted_judge(judge_url, batch_size=8, **pool)
    return load_config(
        None,
        {
            **local_stores(folder),
            "scoring": pool | {"max_length": 64, "batch_size": 32},
            "judging": {"judges": [judge.model_dump(mode="json")]},
        },
    )


def main(work: Path, model: str, judge_url: str) -> None:
    files = write_corpus(CorpusSpec(pairs=3000, seed=3), work / "corpus", shards=3)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "_system_config": FAILURE_DETECTION},
    )
    for _ in range(2):
        cluster.add_node(**WORKER)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # Read by the driver at each execution (a class in the DataContext would be pickled with
    # every task).
    os.environ["RAY_DATA_EXECUTION_CALLBACKS"] = "tests.multinode_faults.NodeLoss"
    NodeLoss.cluster = cluster
    request = IngestRequest(paths=[str(f) for f in files], source="web")
    steps: dict[str, Callable[[SynprefConfig], Any]] = {
        "ingest": lambda c: jobs.ingest(c, request),
        "dedup": jobs.dedup,
        "score": lambda c: jobs.score(c, model, "rm", where="pair_id < '08'"),
        "judge": lambda c: jobs.judge(c, where="pair_id < '04'"),
    }
    calm = config(work, "undisturbed", judge_url, one_actor_per_node=True)
    rough = config(work, "disturbed", judge_url, one_actor_per_node=False)
    expected, seconds = {}, {}
    for name, step in steps.items():
        started = time.monotonic()
        with deadline(f"{name} on two nodes"):
            step(calm)
        seconds[name] = round(time.monotonic() - started, 1)
        expected[name] = table_rows(Lake(calm.lake.root))
    cluster.add_node(**WORKER)
    cluster.wait_for_nodes()
    results = {}
    for name, step in steps.items():
        with deadline(f"{name}, a node lost"):
            outcome = disturbed(lambda s=step: s(rough))
        equal = table_rows(Lake(rough.lake.root)) == expected[name]
        results[name] = outcome | {"equal": equal, "undisturbed_seconds": seconds[name]}
        print(f"[multinode] {name}: {results[name]}", file=sys.stderr, flush=True)
    (work / "outcomes.json").write_text(json.dumps(results))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    # The callback is imported by its module name: run that module's main, not this copy's.
    from tests.multinode_faults import main as run

    run(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
