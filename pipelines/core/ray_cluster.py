"""Connecting a job to Ray: a local cluster by default, any cluster by configuration."""

from __future__ import annotations

import os
from pathlib import Path

import ray

from pipelines.core.config import RayConfig, SynprefConfig
from pipelines.core.errors import ConfigError

SUBMITTED_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray's job supervisor in the driver of a submitted job (Ray's constant of that name)."""

LOCAL_CLUSTER_ENV = {
    # One machine is not preempted, and Ray Train's preemption watcher is one more process per
    # training; its controller looks at the workers every 2 s by default, so a run is seen
    # finished up to 2 s late. Both cost a small training on 2 cores about 4 s of 30
    # (docs/performance.md: Job start-up).
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # torch's OpenMP threads spin on a core while they wait for work. Here the training,
    # Ray Data and model actors share the cores, and a spinning thread holds one that its
    # neighbour needs: two 2-thread MiniLM trainings side by side stepped at 590-711
    # tokens/s each spinning, 1,419-1,533 passive; alone passive costs about 10%
    # (benchmarks/thread_wait_bench.py, docs/performance.md).
    "OMP_WAIT_POLICY": "PASSIVE",
    # Ray keeps as many idle workers as it has CPUs *available*: while a training or an actor
    # pool holds them all, none, so each idle worker is killed after 1 s and the job's next
    # Ray Data stage starts new ones, each importing Ray and our code again (1-4 s of CPU).
    # Eight are kept instead, for the job's life (a worker belongs to its job): the data tests
    # 132 -> 81 CPU-s, 41 -> 17 worker processes (docs/performance.md: The test suite).
    "RAY_num_workers_soft_limit": "8",
}


def set_local_cluster_env() -> None:
    """Settings for a cluster of this machine alone, set before it starts so that all of its
    processes inherit them; a value the user set wins."""
    for key, value in LOCAL_CLUSTER_ENV.items():
        os.environ.setdefault(key, value)


def connect(config: RayConfig) -> str | None:
    """Join the configured cluster (or start a local one); return the dashboard URL, if any.

    Inside ``ray job submit`` the job is already attached (``RAY_ADDRESS`` is set), so
    ``address=None`` joins that cluster instead of starting a new one. Calling it again in the
    same process (the demo runs several jobs) reuses the connection.
    """
    local = config.address is None and "RAY_ADDRESS" not in os.environ
    if local and not ray.is_initialized():
        set_local_cluster_env()
    context = ray.init(
        address=config.address,
        num_cpus=config.num_cpus if local and not ray.is_initialized() else None,
        ignore_reinit_error=True,
        log_to_driver=False,
        configure_logging=False,
    )
    url = context.dashboard_url
    return f"http://{url}" if url and "://" not in url else url or None


def check_paths_outlive_the_job(config: SynprefConfig, job: str) -> None:
    """A submitted job runs in a copy of its working directory that Ray replaces at the next
    submission: a relative lake, sqlite store or checkpoint folder would be written there and
    lost. Refused with the fields to set (``s3://`` or an absolute shared path)."""
    if SUBMITTED_JOB_ENV not in os.environ:
        return
    paths = {"lake.root": config.lake.root}
    if config.tracking.uri.startswith("sqlite:"):
        paths["tracking.uri"] = config.tracking.uri.removeprefix("sqlite:///")
        paths["tracking.artifact_location"] = config.tracking.artifact_location
    if job in ("train", "loop"):
        paths["training.storage_path"] = config.training.storage_path
    relative = [
        f"{key} = {path}"
        for key, path in paths.items()
        if "://" not in path and not Path(path).is_absolute()
    ]
    if relative:
        raise ConfigError(
            f"a submitted {job} job runs in a copy of the working directory that Ray replaces: "
            f"{'; '.join(relative)} would be lost with it. Use s3:// or an absolute path on "
            "storage every node shares (configs/cluster.yaml, or --lake/--tracking-uri)."
        )
