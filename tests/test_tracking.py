"""MLflow tracking shared by every job: a new sqlite store survives jobs starting at once,
failed runs say why, and only secrets are masked in the logged config."""

import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from pipelines.core.config import JudgeConfig, load_config
from pipelines.core.tracking import _param_value, ensure_experiment, job_run
from pipelines.rm.registry import log_reward_model
from tests.conftest import REPO

START_A_JOB = """
import sys
from pipelines.core.config import JudgeConfig, load_config
from pipelines.core.tracking import job_run

root = sys.argv[1]
config = load_config(None, {
    "lake": {"root": root + "/lake"},
    "tracking": {"uri": f"sqlite:///{root}/mlruns.db", "artifact_location": root + "/art"},
})
with job_run(config, "race", run_name=sys.argv[2]) as run:
    print(run.info.run_id)
"""


def test_two_jobs_started_at_once_on_a_new_sqlite_store_both_succeed(tmp_path: Path):
    jobs = [
        subprocess.Popen(
            [sys.executable, "-c", START_A_JOB, str(tmp_path), f"job-{i}"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [job.communicate(timeout=300) for job in jobs]
    for job, (_, err) in zip(jobs, outputs, strict=True):
        assert job.returncode == 0, err[-2000:]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    (experiment,) = [e for e in client.search_experiments() if e.name == "synpref"]
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["job-0", "job-1"]


def test_a_failed_job_records_its_error_on_the_run(config):
    with pytest.raises(ValueError, match="the lake is on fire"), job_run(config, "doomed") as run:
        raise ValueError("the lake is on fire")
    finished = mlflow.get_run(run.info.run_id)
    assert finished.info.status == "FAILED"
    assert finished.data.tags["synpref.error"] == "ValueError: the lake is on fire"
    trace = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/error.txt")
    assert "Traceback" in trace and "the lake is on fire" in trace


def _killed_job(tmp_path: Path, name: str) -> str:
    """The run id of a job whose process was SIGKILLed while its run was open."""
    script = START_A_JOB.replace(
        "print(run.info.run_id)", "print(run.info.run_id, flush=True)\n    time.sleep(600)"
    )
    job = subprocess.Popen(
        [sys.executable, "-c", "import time\n" + script, str(tmp_path), name],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    run_id = job.stdout.readline().strip()
    job.kill()
    job.wait()
    return run_id


def test_a_run_whose_process_was_killed_is_marked_killed_by_the_next_job(tmp_path: Path):
    killed, reopened = _killed_job(tmp_path, "killed"), _killed_job(tmp_path, "resumed")
    config = load_config(
        None,
        {
            "lake": {"root": str(tmp_path / "lake")},
            "tracking": {"uri": f"sqlite:///{tmp_path}/mlruns.db", "artifact_location": "art"},
        },
    )
    mlflow.set_tracking_uri(config.tracking.uri)
    run = mlflow.get_run(killed)  # ended by the next job's start: the second killed one
    assert run.info.status == "KILLED"
    assert run.data.tags["synpref.error"].startswith("killed: its process (pid")
    assert mlflow.get_run(reopened).info.status == "RUNNING", "nothing ended it yet"
    with job_run(config, "resumed", resume_run_id=reopened) as alive:  # as a resumed loop
        with job_run(config, "nested"):
            pass
        assert mlflow.get_run(alive.info.run_id).info.status == "RUNNING", "a live run stays"
    run = mlflow.get_run(reopened)
    assert run.info.status == "FINISHED" and "synpref.error" not in run.data.tags


@pytest.mark.parametrize(
    ("key", "masked"),
    [
        ("config.lake.storage_options.AWS_SECRET_ACCESS_KEY", True),
        ("config.lake.storage_options.AWS_SESSION_TOKEN", True),
        ("config.lake.storage_options.AZURE_STORAGE_ACCOUNT_KEY", True),
        ("config.lake.storage_options.GOOGLE_SERVICE_ACCOUNT_KEY", True),
        ("config.lake.storage_options.password", True),
        ("config.scoring.batch_tokens", False),
        ("config.training.micro_batch_tokens", False),
        ("config.decontamination.min_tokens", False),
        ("config.judging.judges.max_tokens", False),
        ("config.judging.annotator.api_key_env", False),
    ],
)
def test_only_secret_names_are_masked(key, masked):
    assert (_param_value(key, "value") == "***") is masked


def test_url_credentials_are_masked_in_params_and_errors(config):
    url = "http://judge:s3cr3t@judges.internal:8000/v1"
    config.judging.judges = [JudgeConfig(name="j", backend="openai", base_url=url, model="m")]
    with pytest.raises(ValueError), job_run(config, "params") as run:
        raise ValueError(f"cannot reach {url}")
    recorded = mlflow.get_run(run.info.run_id).data
    assert "://***@judges.internal" in recorded.params["config.judging.judges"]
    assert (
        recorded.tags["synpref.error"]
        == "ValueError: cannot reach http://***@judges.internal:8000/v1"
    )
    trace = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/error.txt")
    assert "s3cr3t" not in trace + str(recorded.params) + str(recorded.tags)


def test_params_keep_hyperparameters_readable(config):
    config = load_config(
        None, {"lake": {"root": config.lake.root}, "tracking": config.tracking.model_dump()}
    )
    with job_run(config, "params") as run:
        pass
    params = mlflow.get_run(run.info.run_id).data.params
    assert params["config.training.micro_batch_tokens"] == str(config.training.micro_batch_tokens)
    assert params["config.scoring.batch_tokens"] == str(config.scoring.batch_tokens)


def test_a_logged_reward_model_ships_the_library_it_loads_with(config, encoder_rm):
    """The pyfunc model imports ``pipelines.rm``: the logged model carries the package, so it
    loads where synpref is not installed (a serving image, a colleague's notebook)."""
    with mlflow.start_run(experiment_id=ensure_experiment(config.tracking)):
        info, version = log_reward_model(encoder_rm, None, {})
    assert version is None
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    shipped = {p.relative_to(local / "code").as_posix() for p in (local / "code").rglob("*.py")}
    assert {
        "pipelines/rm/registry.py",
        "pipelines/rm/model.py",
        "pipelines/core/text.py",
    } <= shipped
    loaded = mlflow.pyfunc.load_model(info.model_uri)
    with pytest.raises(ValueError, match="reward model input needs a 'messages' column"):
        loaded.predict(pd.DataFrame({"text": ["How do I bake bread?"]}))
