"""Shared fixtures: one local Ray per test session; a fresh lake and MLflow store per test."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from pipelines.config import SynprefConfig, load_config
from pipelines.lake import Lake

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
HH_HARMLESS = SHARED_DATA / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
RM_BENCH = SHARED_DATA / "RM-Bench" / "data"
JUDGEBENCH = (
    SHARED_DATA
    / "JudgeBench"
    / "data"
    / ("dataset=judgebench,response_model=gpt-4o-2024-05-13.jsonl")
)


def shared_data(path: Path) -> Path:
    """``path`` under ../shared/data, or skip the test with the reason."""
    if not path.exists():
        pytest.skip(f"real test data not found at {path} (../shared/data is absent)")
    return path


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session (2 cores here: never one per test)."""
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SynprefConfig:
    """The embedded defaults, with the lake and the MLflow store under ``tmp_path``."""
    monkeypatch.chdir(tmp_path)
    return load_config(
        None,
        {
            "lake": {"root": str(tmp_path / "lake")},
            "tracking": {
                "uri": f"sqlite:///{tmp_path / 'mlruns.db'}",
                "artifact_location": str(tmp_path / "mlartifacts"),
            },
        },
    )


@pytest.fixture
def lake(config: SynprefConfig) -> Lake:
    return Lake(config.lake.root, config.lake.storage_options)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API (moto's server) on the loopback, in its own process.

    It cannot run as a thread of the test process: deltalake holds the GIL while it waits for
    the server's answer.
    """
    import shutil
    import socket
    import subprocess
    import sys
    import time

    import boto3

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    executable = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    server = subprocess.Popen(
        [executable, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                server.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.1)
    endpoint = f"http://127.0.0.1:{port}"
    options = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",
    }
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    yield client, options
    server.terminate()
    server.wait(timeout=10)
