"""The `synpref` CLI as a person and a script use it: summaries, --json, clear errors."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from ray_jobs.cli import cli
from tests.conftest import HH_HARMLESS, REPO, shared_data

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_help_lists_the_commands():
    out = subprocess.run(
        [sys.executable, "-m", "ray_jobs.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout
    commands = ("ingest", "tables", "history", "demo", "generate", "dedup", "decontaminate")
    for command in (*commands, "score", "serve", "eval", "train", "judge", "annotate", "config"):
        assert command in out


def test_ingest_tables_and_history_with_json_summaries(run):
    path = shared_data(HH_HARMLESS)
    summary = json.loads(run("ingest", str(path), "--source", "hh", "--json").stdout)
    assert summary["records_read"] == 2312 and summary["balanced"]
    assert summary["mlflow_run"] and "quarantine_reasons" in summary

    text = run("ingest", str(path), "--source", "hh").stdout
    assert "0 new, 2,303 already present" in text and "MLflow:" in text

    tables = json.loads(run("tables", "--json").stdout)["tables"]
    assert {t["name"]: t["rows"] for t in tables} == {"pairs": 2303, "quarantine": 9}
    assert "pairs" in run("tables").stdout

    history = json.loads(run("history", "pairs", "--json").stdout)["commits"]
    assert [c["operation"] for c in history][-1] == "CREATE TABLE"
    assert "MERGE" in run("history", "pairs").stdout


def test_json_stdout_holds_the_summary_only_whatever_else_is_printed():
    """Ray relays its workers' and raylet's lines to the driver's stdout while a job runs
    (the journey once failed on a raylet warning there): with --json they go to stderr."""
    from ray_jobs.job import emit, job_command

    @job_command("noisy")
    def noisy(ctx, as_json, **options):
        print("(raylet) WARNING: 8 PYTHON worker processes have been started")
        emit({"rows": 1}, "1 row", as_json)

    cli.add_command(noisy)
    try:
        for args in (["noisy", "--json"], ["--json", "noisy"]):
            result = CliRunner().invoke(cli, args, catch_exceptions=False)
            assert json.loads(result.stdout) == {"rows": 1}
            assert "raylet" in result.stderr
        plain = CliRunner().invoke(cli, ["noisy"], catch_exceptions=False).stdout
        assert "raylet" in plain and "1 row" in plain
    finally:
        cli.commands.pop("noisy")


def test_usage_errors_are_clear(run, config, tmp_path):
    result = run("history", "nope", expect=1)
    assert "unknown table 'nope'" in result.output
    result = run("history", "pairs", expect=1)
    assert "does not exist" in result.output
    (tmp_path / "odd.jsonl").write_text('{"text": 1}\n')
    result = run("ingest", str(tmp_path / "odd.jsonl"), "--source", "odd", expect=1)
    assert "cannot detect the format" in result.output
    result = run(
        "ingest", str(tmp_path / "odd.jsonl"), "--source", "odd", "--map", "chosen", expect=1
    )
    assert "TARGET=FIELD.PATH" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("ingest:\n  max_chars: -1\n")
    result = run("--config", str(bad), "tables", expect=1)
    assert "config key 'ingest.max_chars'" in result.output


def test_generate_writes_a_corpus_with_ground_truth(run, tmp_path):
    out = json.loads(
        run("generate", str(tmp_path / "g"), "--pairs", "100", "--shards", "2", "--json").stdout
    )
    assert len(out["files"]) == 2
    assert out["kinds"]["original"] == 100 and out["kinds"]["exact_dup"] == 2


def test_demo_runs_the_main_job(run, config, monkeypatch, tmp_path):
    monkeypatch.setenv("SYNPREF_DEMO__PAIRS", "200")
    # The demo's loop cut to its seed review and curated set (test_loop.py runs the whole
    # loop; the README's `make demo` runs this one whole, docs/performance.md says how long).
    monkeypatch.setenv("SYNPREF_LOOP__ITERATIONS", "0")
    monkeypatch.setenv("SYNPREF_LOOP__STAGE2", "false")
    monkeypatch.setenv("SYNPREF_LOOP__FINAL", "false")
    monkeypatch.setenv("SYNPREF_TRAINING__STORAGE_PATH", str(tmp_path / "checkpoints"))
    monkeypatch.setenv("SYNPREF_DEMO__WORKDIR", str(tmp_path / "demo"))
    # A newcomer's machine without ../shared: the configured HH is not found.
    monkeypatch.setenv(
        "SYNPREF_DEMO__EXTRA_INPUTS", json.dumps({"hh-rlhf-harmless": ["/nonexistent/x.jsonl"]})
    )
    text = run("demo").stdout
    assert "lake " in text and "MLflow:" in text
    assert "skipped (not found): /nonexistent/x.jsonl" in text
    assert "the annotator is SIMULATED" in text and "curated set demo/curated@" in text
    result = json.loads(run("demo", "--json").stdout)
    *ingests, dedup, decontamination, loop = result["steps"]
    assert loop["status"] == "finished" and loop["steps_run"] == [], "the loop is done"
    # A quarter of the synthetic corpus played the human-labelled source, the rest is D_wild.
    assert loop["pools"]["D_gold"] > 0 and loop["pools"]["D_wild"] > 0
    sources = {i["source"]: i for i in ingests}
    assert set(sources) == {"synthetic-human", "synthetic-demo"}
    assert sources["synthetic-demo"]["pairs_inserted"] == 0, "a second demo adds nothing"
    assert all(i["balanced"] for i in ingests)
    assert all(step["run_id"] for step in result["steps"]), "every step is an MLflow run"
    assert dedup["conflicts"] >= 2 and dedup["near_duplicates"] >= 5
    assert set(dedup["written"].values()) == {None}, "the second demo changes no decision"
    assert decontamination["status_version"] is None


def test_the_job_module_runs_as_a_ray_job_against_a_running_cluster(config, tmp_path):
    """`python -m ray_jobs.ingest` in its own process, joining the session's cluster by address
    (what `ray job submit -- python -m ray_jobs.ingest ...` does on a real cluster)."""
    import ray

    from pipelines.ingest.synthetic import CorpusSpec, write_corpus

    (corpus,) = write_corpus(CorpusSpec(pairs=40, seed=5), tmp_path / "c")
    address = ray.get_runtime_context().gcs_address
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "ray_jobs.ingest",
            str(corpus),
            "--source",
            "job",
            "--lake",
            config.lake.root,
            "--tracking-uri",
            config.tracking.uri,
            "--ray-address",
            address,
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    summary = json.loads(completed.stdout)
    assert summary["balanced"] and summary["pairs_inserted"] > 40
    assert "[ingest] job:" in completed.stderr, "progress lines go to stderr"
