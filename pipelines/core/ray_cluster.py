"""Connecting a job to Ray: a local cluster by default, any cluster by configuration."""

from __future__ import annotations

import os

import ray

from pipelines.core.config import RayConfig


def connect(config: RayConfig) -> str | None:
    """Join the configured cluster (or start a local one); return the dashboard URL, if any.

    Inside ``ray job submit`` the job is already attached (``RAY_ADDRESS`` is set), so
    ``address=None`` joins that cluster instead of starting a new one. Calling it again in the
    same process (the demo runs several jobs) reuses the connection.
    """
    local = config.address is None and "RAY_ADDRESS" not in os.environ
    context = ray.init(
        address=config.address,
        num_cpus=config.num_cpus if local and not ray.is_initialized() else None,
        ignore_reinit_error=True,
        log_to_driver=False,
        configure_logging=False,
    )
    url = context.dashboard_url
    return f"http://{url}" if url and "://" not in url else url or None
