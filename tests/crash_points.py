"""A job run as a user runs it and SIGKILLed at a chosen point (tests/test_crash_points.py):

    SYNPREF_CRASH_MARKER=FILE python -m tests.crash_points POINT ray_jobs.JOB [ARGS...]

POINT is one of

- ``stage``: while a Ray Data execution of the job runs, once one has run for half a second;
- ``before:N`` / ``after:N``: just before / just after the job's N-th Delta commit (a merge or
  an append); ``after:N`` of a job that commits several tables is a kill between two of them;
- ``inside:N``: in the N-th commit, once delta-rs has started writing its data files and before
  the commit's log entry exists (tests/crash_watcher.py, a process of its own blocked on
  inotify, at real-time priority where the OS allows, is told of the first new file and kills
  the job; it races the commit and reports where it landed).

The process writes the point it reached to FILE (a JSON object) and kills itself with SIGKILL:
no handler, no ``finally``, no atexit runs, as when a node dies or the OOM killer strikes. A job
that ends without reaching the point exits normally and writes nothing.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import deltalake
from deltalake.table import TableMerger
from ray.data._internal.execution.execution_callback import ExecutionCallback

MARKER_ENV = "SYNPREF_CRASH_MARKER"
STAGE_KILL_AFTER_S = 0.5


def die(reached: dict[str, Any]) -> None:
    Path(os.environ[MARKER_ENV]).write_text(json.dumps(reached))
    os.kill(os.getpid(), signal.SIGKILL)


class CommitKiller:
    """Counts the job's Delta commits and kills the process at the wanted one."""

    def __init__(self, where: str, commit: int) -> None:
        self.where, self.commit = where, commit
        self.count = 0

    def wrap(self, commit: Callable[..., Any], table: Callable[..., tuple[str, int]]) -> Callable:
        """``commit`` counted; ``table`` tells the URI and version of the table it commits to."""

        def run(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            if self.count != self.commit:
                return commit(*args, **kwargs)
            uri, version = table(*args)
            reached = {"point": self.where, "commit": self.count, "table": uri, "version": version}
            if self.where == "before":
                die(reached)
            watcher = self._watch(reached) if self.where == "inside" else None
            result = commit(*args, **kwargs)
            if watcher is not None:  # the commit beat the watcher: say so
                watcher.kill()
                watcher.wait()
            die(reached | {"point": "after"})
            return result

        return run

    def _watch(self, reached: dict[str, Any]) -> subprocess.Popen:
        """Starts tests/crash_watcher.py on the table and waits until it has listed its files."""
        watcher = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.crash_watcher",
                reached["table"].removeprefix("file://"),
                str(reached["version"]),
                str(os.getpid()),
                os.environ[MARKER_ENV],
                json.dumps(reached),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert watcher.stdout.readline() == "ready\n", "the crash watcher did not start"
        return watcher


class KillDuringStage(ExecutionCallback):
    """A Ray Data execution callback (``RAY_DATA_EXECUTION_CALLBACKS``, read by the driver)
    that kills the driver half a second into an execution."""

    def before_execution_starts(self, executor: Any) -> None:
        self.started = time.monotonic()

    def on_execution_step(self, executor: Any) -> None:
        if time.monotonic() - self.started > STAGE_KILL_AFTER_S:
            die({"point": "stage"})


def main() -> None:
    point, module, *args = sys.argv[1:]
    if point == "stage":
        os.environ["RAY_DATA_EXECUTION_CALLBACKS"] = "tests.crash_points.KillDuringStage"
    else:
        where, commit = point.split(":")
        killer = CommitKiller(where, int(commit))
        TableMerger.execute = killer.wrap(
            TableMerger.execute, lambda merger: (merger._table.table_uri(), merger._table.version())
        )
        import pipelines.core.lake as lake_module

        lake_module.write_deltalake = killer.wrap(
            deltalake.write_deltalake, lambda table, *_: (table.table_uri, table.version())
        )
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
