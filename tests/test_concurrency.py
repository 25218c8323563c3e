"""Jobs from separate processes writing one lake at the same time: two ingests of different
sources, a dedup and a scoring, each `python -m ray_jobs.<job>` as a user starts it, all on
the session's cluster. No commit is lost (every job ends, its committed versions are in the
history and its rows in the tables), no row is duplicated (every table's keys are unique), and
once dedup and scoring have run again over what the ingests added (incremental: they only do
what is missing), every table equals that of the same jobs run one after another."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml

from pipelines.core.lake import Lake
from pipelines.ingest.synthetic import CorpusSpec, write_corpus
from storage_schemas import table_spec
from tests.conftest import REPO, local_stores, synpref_json, table_rows

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _config(folder: Path, store: Path) -> Path:
    """``folder`` with a config of its lake and a copy of the empty MLflow ``store``."""
    folder.mkdir()
    shutil.copyfile(store, folder / "mlruns.db")
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(local_stores(folder)))
    return path


def _start(config: Path, job: str, *args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", f"ray_jobs.{job}", "--config", str(config), "--json"]
    command += ["--ray-address", ray.get_runtime_context().gcs_address, *args]
    return subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"SYNPREF_LOG_FILE": str(config.parent / f"{job}.log")},
    )


def _finish(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out)


def _run_here(config: Path, job: str, *args: str) -> dict:
    """The same job in this process (what is compared to the concurrent run needs no process
    of its own)."""
    return synpref_json(job, *args, "--config", str(config))


def test_concurrent_jobs_lose_and_duplicate_nothing(tmp_path, ray_cluster, empty_tracking_store):
    corpora = {
        source: write_corpus(CorpusSpec(pairs=1500, seed=seed), tmp_path / source, shards=2)
        for source, seed in (("web", 11), ("forum", 12), ("base", 13))
    }
    jobs = {
        "ingest-web": ("ingest", *map(str, corpora["web"]), "--source", "web"),
        "ingest-forum": ("ingest", *map(str, corpora["forum"]), "--source", "forum"),
        "dedup": ("dedup",),
        "score": ("score", "--model", "heuristic:length"),
    }
    together = _config(tmp_path / "together", empty_tracking_store)
    one_by_one = _config(tmp_path / "one_by_one", empty_tracking_store)
    for config in (together, one_by_one):  # what both lakes hold before
        _run_here(config, "ingest", *map(str, corpora["base"]), "--source", "base")

    running = {name: _start(together, *job) for name, job in jobs.items()}
    ended = {name: _finish(process) for name, process in running.items()}
    lake = Lake(str(together.parent / "lake"))
    for name in ("ingest-web", "ingest-forum"):
        summary = ended[name]
        assert summary["balanced"], f"{name}: every candidate accounted for"
        assert (
            lake.count("pairs", where=f"source = '{summary['source']}'")
            == (summary["pairs_inserted"])
        ), f"{name}: its committed rows are there"
    versions = {c["version"] for c in lake.history("pairs", 100)}
    assert {ended[n]["pairs_version"] for n in ("ingest-web", "ingest-forum")} <= versions
    for name in [t.name for t in lake.tables()]:
        keys = list(table_spec(name).keys)
        rows = lake.read(name, columns=keys)
        assert rows.group_by(keys).aggregate([]).num_rows == rows.num_rows, f"{name}: a key twice"

    for job in jobs.values():  # the same jobs, one after another
        _run_here(one_by_one, *job)
    _run_here(together, "dedup")  # then what the ingests added meanwhile
    _run_here(together, "score", "--model", "heuristic:length")
    assert table_rows(lake) == table_rows(Lake(str(one_by_one.parent / "lake")))
