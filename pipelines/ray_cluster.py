"""Connecting a job to Ray: a local cluster by default, any cluster by configuration."""

from __future__ import annotations

import logging
import os

import ray

from pipelines.config import RayConfig

log = logging.getLogger(__name__)


def connect(config: RayConfig) -> str | None:
    """Join the configured cluster (or start a local one) and return the dashboard URL, if any.

    Inside ``ray job submit`` the job is already attached (``RAY_ADDRESS`` is set), so
    ``address=None`` joins that cluster instead of starting a new one.
    """
    if not ray.is_initialized():
        local = config.address is None and "RAY_ADDRESS" not in os.environ
        context = ray.init(
            address=config.address,
            num_cpus=config.num_cpus if local else None,
            log_to_driver=False,
            configure_logging=False,
        )
        url = context.dashboard_url
    else:
        url = (
            ray.get_runtime_context().get_dashboard_url()
            if hasattr(ray.get_runtime_context(), "get_dashboard_url")
            else None
        )
    # Ray Data prints progress bars; keep its verbose per-operator logs out of the summary.
    ray.data.DataContext.get_current().enable_progress_bars = True
    return f"http://{url}" if url and not url.startswith("http") else url
