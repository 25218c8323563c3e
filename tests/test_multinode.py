"""A worker node lost in the middle of ingest, dedup and scoring, on a multi-node cluster of
this machine (tests/multinode_faults.py, run as a driver of its own): each job completes, or
fails clearly and its re-run completes, and its tables equal those of an undisturbed run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def test_a_worker_node_lost_mid_job_loses_and_duplicates_nothing(encoder_rm, tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "multinode_faults.py"), str(tmp_path), encoder_rm],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1100,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    outcomes = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(outcomes) == {"ingest", "dedup", "score"}
    for job, outcome in outcomes.items():
        assert outcome["removed_while_running"], f"{job} ended before the node went: {outcomes}"
        assert outcome["equal"], f"{job}: tables differ from the undisturbed run: {outcomes}"
