"""The job API: library functions of a config, each one MLflow run recorded the same way,
nested under the active run; no part of the library depends on the CLI (``ray_jobs``)."""

import subprocess
import sys

import mlflow
import pytest

from pipelines import jobs
from pipelines.core.tracking import ensure_experiment
from pipelines.hygiene.dedup import DedupSummary
from pipelines.ingest.job import IngestRequest, IngestSummary
from pipelines.ingest.synthetic import CorpusSpec, write_corpus
from tests.conftest import REPO


def test_the_library_imports_nothing_of_the_cli():
    code = (
        "import importlib, pkgutil, sys, pipelines\n"
        "for m in pkgutil.walk_packages(pipelines.__path__, 'pipelines.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] == 'ray_jobs'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.usefixtures("ray_cluster")
def test_jobs_nest_under_the_active_run_and_record_their_summaries(config, lake, tmp_path):
    files = write_corpus(CorpusSpec(pairs=100, seed=3), tmp_path / "corpus")
    mlflow.set_tracking_uri(config.tracking.uri)
    with mlflow.start_run(experiment_id=ensure_experiment(config.tracking)) as parent:
        ingested = jobs.ingest(config, IngestRequest(paths=[str(f) for f in files], source="s"))
        deduped = jobs.dedup(config)
    assert isinstance(ingested.summary, IngestSummary)
    assert isinstance(deduped.summary, DedupSummary)
    assert deduped.summary.pairs == ingested.summary.pairs_inserted

    client = mlflow.MlflowClient()
    tags = {r.run_id: client.get_run(r.run_id).data.tags for r in (ingested, deduped)}
    version = str(ingested.summary.pairs_version)
    assert tags[ingested.run_id]["synpref.output.pairs.version"] == version
    assert tags[deduped.run_id]["synpref.input.pairs.version"] == version
    for result in (ingested, deduped):
        assert tags[result.run_id]["mlflow.parentRunId"] == parent.info.run_id
        assert tags[result.run_id]["synpref.job"] == result.summary.job
        artifacts = {a.path for a in client.list_artifacts(result.run_id)}
        assert f"{result.summary.job}_summary.json" in artifacts
        assert result.as_dict()["run_id"] == result.run_id
        assert result.mlflow_run in result.text()
    metrics = client.get_run(deduped.run_id).data.metrics
    expected = deduped.summary.metrics()
    assert {name: metrics[name] for name in expected} == expected
    # The corpus plants 3 near-duplicates and 1 flip (its 2 exact repeats stop at ingest).
    assert deduped.summary.near_duplicates > 0 and deduped.summary.conflicts > 0, expected
