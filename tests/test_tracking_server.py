"""MLflow as it runs in production: a tracking server (`mlflow server`) on PostgreSQL, with its
artifacts on S3 (moto's server) served through it. Ingest, a training that registers its model,
and an evaluation log through HTTP; their runs, inputs, artifacts and registered model read back
the same as the same jobs logged to sqlite, and the registered model loads from S3 through the
server and scores as trained.

PostgreSQL is Debian's (`.ci/run` installs it when missing); `initdb` refuses root, so as root
the server runs as the `postgres` user (`runuser`), on the loopback, in a temp dir."""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import mlflow
import pandas as pd
import psycopg
import pytest

from pipelines import jobs
from pipelines.core.config import SynprefConfig, load_config
from pipelines.ingest.job import IngestRequest
from pipelines.rm.model import RewardModel
from tests.conftest import HH_HARMLESS, RM_BENCH, first_items, free_port, shared_data

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _postgres_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        reason = "PostgreSQL is not installed (Debian's postgresql; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return found[-1].parent


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """The URI of a database ``mlflow`` on a PostgreSQL server of its own."""
    bin_dir = _postgres_bin()
    folder = Path(tempfile.mkdtemp(prefix="synpref-pg-"))
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(folder, "postgres")
    data, port = folder / "data", free_port()

    def pg(*command: str) -> None:
        subprocess.run([*as_postgres, *command], check=True, capture_output=True, timeout=120)

    pg(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync")
    options = f"-h 127.0.0.1 -p {port} -k {folder} -F"
    pg(
        str(bin_dir / "pg_ctl"),
        "start",
        "-w",
        "-D",
        str(data),
        "-l",
        f"{folder}/log",
        "-o",
        options,
    )
    try:
        with psycopg.connect(
            host="127.0.0.1", port=port, user="postgres", autocommit=True
        ) as connection:
            connection.execute("CREATE DATABASE mlflow")
        yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
    finally:
        pg(str(bin_dir / "pg_ctl"), "stop", "-m", "fast", "-w", "-D", str(data))
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def tracking_server(postgres, s3_endpoint, tmp_path_factory) -> Iterator[str]:
    """`mlflow server` on ``postgres`` with artifacts in s3://mlflow/artifacts, proxied."""
    client, options = s3_endpoint
    client.create_bucket(Bucket="mlflow")
    port = free_port()
    env = os.environ | {
        "AWS_ACCESS_KEY_ID": options["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": options["AWS_SECRET_ACCESS_KEY"],
        "AWS_DEFAULT_REGION": options["AWS_REGION"],
        "MLFLOW_S3_ENDPOINT_URL": options["AWS_ENDPOINT_URL"],
        # As in production (docs/operations.md): no server-side job runner, 8 processes fewer.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    log = tmp_path_factory.mktemp("mlflow-server") / "server.log"
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--workers", "1", "--backend-store-uri", postgres]
    command += ["--artifacts-destination", "s3://mlflow/artifacts"]
    with log.open("w") as out:
        server = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def _config(folder: Path, tracking: dict, workers: int, backbone: str) -> SynprefConfig:
    return load_config(
        None,
        {
            "lake": {"root": str(folder / "lake")},
            "tracking": tracking,
            "training": {
                "backbone": backbone,
                "workers": workers,
                "cpus_per_worker": 1.5,
                "max_length": 32,
                "global_batch": 16,
                "storage_path": str(folder / "checkpoints"),
                "data": {"where": "pair_id < '40'", "validation_where": "pair_id >= 'c0'"},
            },
        },
    )


def _run_jobs(config: SynprefConfig, hh: Path, rmbench: Path) -> tuple[dict[str, str], str]:
    """Ingest, train (registered) and evaluate: the run id of each, and the trained model."""
    ingest = jobs.ingest(config, IngestRequest(paths=[str(hh)], source="hh"))
    trained = jobs.train(config, "server-rm")
    folder = trained.summary.model_folder
    evaluated = jobs.evaluate(config, "rmbench", str(rmbench), model=folder)
    return {"ingest": ingest.run_id, "train": trained.run_id, "eval": evaluated.run_id}, folder


def _artifacts(client: mlflow.MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def _record(tracking_uri: str, runs: dict[str, str]) -> dict[str, dict]:
    """What a lead reads of each run: its name (its time left out), status, param and metric
    names, synpref tags, dataset inputs, artifacts; and the registered versions with their
    tags."""
    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient()
    record = {}
    for job, run_id in runs.items():
        run = client.get_run(run_id)
        record[job] = {
            "name": re.sub(r"-\d{8}-\d{6}$", "-TIME", run.info.run_name),  # job-YYYYMMDD-HHMMSS
            "status": run.info.status,
            "params": sorted(run.data.params),
            "metrics": sorted(run.data.metrics),
            "tags": sorted(t for t in run.data.tags if t.startswith("synpref.")),
            "inputs": sorted(d.dataset.name for d in run.inputs.dataset_inputs),
            "artifacts": sorted(_artifacts(client, run_id)),
        }
    versions = client.search_model_versions("name = 'synpref-reward-model'")
    record["registered"] = {"versions": len(versions), "tags": sorted(versions[0].tags)}
    return record


def test_jobs_log_to_a_tracking_server_as_they_do_to_sqlite(
    tracking_server, s3_endpoint, ray_cluster, tmp_path, monkeypatch, tiny_encoder_rm
):
    with gzip.open(shared_data(HH_HARMLESS), "rt") as source:
        hh_lines = source.read().splitlines()[:400]
    hh = tmp_path / "hh.jsonl"
    hh.write_text("\n".join(hh_lines) + "\n")
    rmbench = first_items(shared_data(RM_BENCH / "chat_filtered.json"), tmp_path / "rmb", 10)

    # A Ray Train worker logs its steps to the server over HTTP; the sqlite run trains in
    # local mode (workers 0), whose run must read back the same too. A tiny encoder: what is
    # tested is what MLflow records, not what the model learns.
    served = _config(tmp_path / "server", {"uri": tracking_server}, 1, tiny_encoder_rm)
    server_runs, trained = _run_jobs(served, hh, rmbench)
    sqlite_uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    sqlite = {"uri": sqlite_uri, "artifact_location": str(tmp_path / "art")}
    local = _config(tmp_path / "sqlite", sqlite, 0, tiny_encoder_rm)
    sqlite_runs, _ = _run_jobs(local, hh, rmbench)

    on_server, on_sqlite = _record(tracking_server, server_runs), _record(sqlite_uri, sqlite_runs)
    assert on_server == on_sqlite
    assert on_server["train"]["status"] == "FINISHED"
    assert "training_curves.png" in on_server["train"]["artifacts"]
    assert on_server["train"]["inputs"] and on_server["registered"]["versions"] == 1

    # The registered model comes back from S3 through the server and scores as trained.
    mlflow.set_tracking_uri(tracking_server)
    monkeypatch.chdir(tmp_path)
    version = mlflow.MlflowClient().search_model_versions("name = 'synpref-reward-model'")[0]
    model = mlflow.pyfunc.load_model(f"models:/synpref-reward-model/{version.version}")
    conversation = [
        {"role": "user", "content": "Is the sun a star?"},
        {"role": "assistant", "content": "Yes, a G-type main-sequence star."},
    ]
    rewards = model.predict(pd.DataFrame({"messages": [conversation]}))
    assert rewards == pytest.approx(RewardModel(trained).score([conversation]).rewards, abs=1e-6)
    s3, _ = s3_endpoint
    stored = s3.list_objects_v2(Bucket="mlflow", Prefix="artifacts/")
    assert stored["KeyCount"] > 0, "the artifacts live in S3, not on the server's disk"
