"""No secret leaks: jobs run with S3 credentials in the lake's storage options and a judge
whose API key is in the environment and whose URL holds a user and password; then every
MLflow param, tag and artifact, every log line (the driver's and the Ray workers') and every
lake table is searched for the secret values. The judge server demands the key and echoes
what it was sent (the Basic header the URL's credentials make), as some servers do."""

from __future__ import annotations

import base64
import json
import logging
import os
import time
from pathlib import Path

import httpx
import mlflow
import pytest
import ray

from pipelines import jobs
from pipelines.core.lake import Lake
from pipelines.ingest.job import IngestRequest
from pipelines.ingest.synthetic import CorpusSpec, write_corpus
from tests.conftest import JUDGE_KEY_ENV, scripted_judge

pytestmark = pytest.mark.slow

S3_SECRET = "s3-secret-5e1f0c9a"
PASSWORD = "url-pass-93ac"


def test_no_secret_reaches_mlflow_logs_or_tables(
    config, s3_endpoint, scripted_server_url, ray_cluster, tmp_path, caplog
):
    client, options = s3_endpoint
    client.create_bucket(Bucket="lake-secrets")
    api_key = os.environ[JUDGE_KEY_ENV]  # the session's workers have it (conftest)
    config.lake.root = "s3://lake-secrets/lake"
    config.lake.storage_options = options | {"AWS_SECRET_ACCESS_KEY": S3_SECRET}
    url = scripted_server_url.replace("://", f"://judge:{PASSWORD}@")
    config.judging.judges = [
        scripted_judge(
            url, name="scripted", api_key_env=JUDGE_KEY_ENV, max_retries=0, http_retries=0
        )
    ]
    started = time.time()
    caplog.set_level(logging.INFO)
    corpus = write_corpus(CorpusSpec(pairs=20, seed=3), tmp_path / "corpus")
    jobs.ingest(config, IngestRequest(paths=[str(p) for p in corpus], source="c"))
    httpx.post(f"{scripted_server_url}/auth", json={"api_key": api_key})
    try:
        judged = jobs.judge(config, limit=4).summary
    finally:
        httpx.post(f"{scripted_server_url}/auth", json={"api_key": None})
    assert judged.judges[0].invalid == judged.judges[0].judged == 4 * 2, "every request refused"

    secrets = [S3_SECRET, api_key, PASSWORD, base64.b64encode(f"judge:{PASSWORD}".encode())]
    found = {
        "mlflow": _mlflow_text(config.tracking.uri, tmp_path / "artifacts"),
        "driver log": caplog.text,
        "ray logs": _ray_logs_since(started),
        "lake": _lake_text(Lake(config.lake.root, config.lake.storage_options)),
    }
    judgments = Lake(config.lake.root, config.lake.storage_options).read("judgments")
    assert any("401" in (r or "") for r in judgments["invalid_reason"].to_pylist())
    for where, text in found.items():
        assert text, f"nothing read from {where}"
        for secret in secrets:
            value = secret.decode() if isinstance(secret, bytes) else secret
            assert value not in text, f"{value!r} in {where}"


def _mlflow_text(uri: str, folder: Path) -> str:
    """Every run's params, tags, metric names and artifacts, as text."""
    mlflow.set_tracking_uri(uri)
    parts = []
    for run in mlflow.search_runs(search_all_experiments=True, output_format="list"):
        parts.append(json.dumps([run.data.params, run.data.tags, sorted(run.data.metrics)]))
        local = mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, dst_path=str(folder / run.info.run_id)
        )
        for path in Path(local).rglob("*"):
            if path.is_file():
                parts.append(path.read_bytes().decode("utf-8", errors="replace"))
    return "\n".join(parts)


def _ray_logs_since(started: float) -> str:
    """The Ray session's log files written since ``started`` (the workers' and actors')."""
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    return "\n".join(
        path.read_text(errors="replace")
        for path in logs.rglob("*")
        if path.is_file() and path.stat().st_mtime >= started
    )


def _lake_text(lake: Lake) -> str:
    return "\n".join(
        json.dumps(lake.read(table.name).to_pylist(), default=str) for table in lake.tables()
    )
