"""`synpref submit` and `synpref jobs` against a real Ray head started for this module
(`ray start --head` on free ports with its own temp dir, stopped by its processes' ids, never
`ray stop`, which would stop the session's cluster too): ingest, dedup, score and judge run as
Ray jobs with this checkout as their working directory, each pair ingested, scored and judged
once; a job that fails ends FAILED with the reason in its log; a running job stops; a bad job name,
runtime environment or address is a clear error before anything is sent."""

from __future__ import annotations

import gzip
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from pipelines.core.lake import Lake
from pipelines.core.ray_cluster import LOCAL_CLUSTER_ENV
from tests.conftest import (
    HH_HARMLESS,
    REPO,
    free_port,
    local_stores,
    scripted_judge,
    shared_data,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


TOKEN = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
"""Ray's token authentication, on as Ray turns it on for a new cluster, with a token of its
own that `synpref` is given as a user is (Ray's RAY_AUTH_TOKEN)."""


@pytest.fixture(scope="module")
def ray_head():
    """The dashboard URL of a Ray head of its own (2 CPUs), whose drivers find this venv's
    ``python`` first on their PATH, as a cluster image's would be."""
    temp = Path(tempfile.mkdtemp(prefix="synpref-head-", dir="/tmp"))  # short: socket paths
    dashboard = free_port()
    ports = {
        "--port": free_port(),
        "--dashboard-port": dashboard,
        "--ray-client-server-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--metrics-export-port": free_port(),
        "--runtime-env-agent-port": free_port(),
    }
    venv = Path(sys.executable).parent
    env = os.environ | LOCAL_CLUSTER_ENV | TOKEN | {"PATH": f"{venv}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    start = [str(venv / "ray"), "start", "--head", "--num-cpus=2", f"--temp-dir={temp}"]
    start += ["--dashboard-host=127.0.0.1", "--include-dashboard=true", "--disable-usage-stats"]
    start += [f"{flag}={port}" for flag, port in ports.items()]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=120)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 60
        bearer = {"Authorization": f"Bearer {TOKEN['RAY_AUTH_TOKEN']}"}
        while httpx.get(f"{url}/api/version", headers=bearer, timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "the head's dashboard did not answer"
            time.sleep(1)
        yield url
    finally:
        _stop_processes_of(temp)
        shutil.rmtree(temp, ignore_errors=True)


def _stop_processes_of(temp: Path) -> None:
    """Terminate every process of the head (its command line names its temp dir) and their
    children; kill what is left after 5 s (the GCS and raylet do not always end on SIGTERM)."""
    roots = [
        p
        for p in psutil.process_iter(["cmdline"])
        if str(temp) in " ".join(p.info["cmdline"] or [])
    ]
    processes = {p for root in roots for p in [root, *root.children(recursive=True)]}
    for process in processes:
        process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=5)
    for process in alive:
        process.kill()


@pytest.fixture(scope="module")
def job_config(tmp_path_factory, scripted_server_url) -> Path:
    """60 HH pairs and a config every submitted job reads: absolute lake and MLflow paths,
    the scripted judge without few-shot examples."""
    folder = tmp_path_factory.mktemp("submitted")
    with gzip.open(shared_data(HH_HARMLESS), "rt") as hh:
        lines = hh.read().splitlines()[:60]
    (folder / "hh.jsonl").write_text("\n".join(lines) + "\n")
    config = {
        **local_stores(folder),
        "judging": {"judges": [scripted_judge(scripted_server_url).model_dump()]},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


def synpref(*args: str) -> subprocess.CompletedProcess:
    """The `synpref` command, as a user runs it from the checkout."""
    command = [sys.executable, "-m", "ray_jobs.cli", *args]
    env = os.environ | TOKEN
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def submitted(url: str, *job: str) -> dict:
    """Submit and follow a job to its end; its summary."""
    result = synpref("--json", "submit", "--address", url, *job)
    summary = json.loads(result.stdout)
    assert result.returncode == (0 if summary["status"] == "SUCCEEDED" else 1), result.stderr
    return summary | {"log": result.stderr}


def test_jobs_submitted_to_a_cluster_write_the_lake_and_report_their_end(ray_head, job_config):
    config = str(job_config / "config.yaml")
    ingest = submitted(
        ray_head, "ingest", "--config", config, str(job_config / "hh.jsonl"), "--source", "hh"
    )
    assert ingest["status"] == "SUCCEEDED", ingest["log"][-3000:]
    assert ingest["entrypoint"].startswith("python -m ray_jobs.ingest --config")
    assert "[ingest]" in ingest["log"], "the job's progress lines follow on stderr"
    for job in (
        ["dedup", "--config", config],
        ["score", "--config", config, "--model", "heuristic:length"],
        ["judge", "--config", config],
    ):
        summary = submitted(ray_head, *job)
        assert summary["status"] == "SUCCEEDED", summary["log"][-3000:]

    lake = Lake(str(job_config / "lake"))
    pairs = lake.count("pairs")
    assert pairs + lake.count("quarantine") == 60
    assert lake.count("rm_scores") == pairs, "every pair scored once"
    judged = lake.read("judgments", columns=["pair_id", "ordering"]).to_pylist()
    assert len({(j["pair_id"], j["ordering"]) for j in judged}) == len(judged) == 2 * pairs
    assert lake.count("verdicts", where="level = 'judge'") == pairs, "one verdict a pair"

    listed = json.loads(synpref("--json", "jobs", "list", "--address", ray_head).stdout)
    ids = {j["submission_id"]: j["status"] for j in listed["jobs"]}
    assert list(ids.values()).count("SUCCEEDED") >= 4


def test_a_failing_job_ends_failed_with_its_reason_in_the_log(ray_head, job_config):
    # A relative lake would be written into the copy of the working directory Ray replaces.
    failed = submitted(
        ray_head, "dedup", "--config", str(job_config / "config.yaml"), "--lake", "lake"
    )
    assert failed["status"] == "FAILED"
    assert "lake.root = lake would be lost" in failed["log"]
    status = json.loads(
        synpref("--json", "jobs", "status", "--address", ray_head, failed["submission_id"]).stdout
    )
    assert status["status"] == "FAILED" and "exit code 1" in status["message"]
    logs = synpref("jobs", "logs", "--address", ray_head, failed["submission_id"]).stdout
    assert "lake.root = lake would be lost" in logs


def test_a_running_job_stops(ray_head, job_config):
    result = synpref(
        "--json",
        "submit",
        "--address",
        ray_head,
        "--no-wait",
        "demo",
        "--config",
        str(job_config / "config.yaml"),
    )
    assert result.returncode == 0, result.stderr
    job_id = json.loads(result.stdout)["submission_id"]
    stopped = synpref("jobs", "stop", "--address", ray_head, job_id)
    assert stopped.returncode == 0 and "stopping" in stopped.stdout, stopped.stderr
    deadline = time.monotonic() + 120
    while (
        status := json.loads(
            synpref("--json", "jobs", "status", "--address", ray_head, job_id).stdout
        )["status"]
    ) != "STOPPED":
        assert time.monotonic() < deadline, status
        time.sleep(1)


def test_unknown_jobs_and_clusters_are_clear_errors(tmp_path):
    unknown = synpref("submit", "--address", "http://127.0.0.1:9", "scores", "--model", "m")
    assert unknown.returncode == 1 and "no job 'scores' to submit" in unknown.stderr
    nobody = synpref("submit", "--address", f"http://127.0.0.1:{free_port()}", "dedup")
    assert nobody.returncode == 1 and "no Ray dashboard answers at" in nobody.stderr
    env = tmp_path / "env.yaml"
    for text, reason in (
        ("env_var: {A: b}\n", "unknown fields ['env_var']"),
        ("pip: 5\n", "must be of type str or List[str]"),
        ("- a list\n", "must be a mapping"),
    ):
        env.write_text(text)
        bad = synpref("submit", "--runtime-env", str(env), "dedup")
        assert bad.returncode == 1 and reason in bad.stderr, bad.stderr
