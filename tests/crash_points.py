"""A job run as a user runs it and SIGKILLed at a chosen point (tests/test_crash_points.py):

    SYNPREF_CRASH_MARKER=FILE python -m tests.crash_points POINT ray_jobs.JOB [ARGS...]

POINT is one of

- ``stage``: while a Ray Data execution of the job runs, once one has run for half a second;
- ``before:N`` / ``after:N``: just before / just after the job's N-th Delta commit (a merge or
  an append); ``after:N`` of a job that commits several tables is a kill between two of them;
- ``inside:N``: in the N-th commit, once delta-rs has written a data file of it and before the
  commit's log entry exists (a watcher thread sees the file; it runs at real-time priority where
  the OS allows, since it races the commit).

The process writes the point it reached to FILE (a JSON object) and kills itself with SIGKILL:
no handler, no ``finally``, no atexit runs, as when a node dies or the OOM killer strikes. A job
that ends without reaching the point exits normally and writes nothing.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import sys
import threading
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


def data_files(table_uri: str) -> set[str]:
    """The Parquet files in a local table's folder and its partition folders."""
    found = set()
    for folder, subfolders, names in os.walk(table_uri.removeprefix("file://")):
        if "_delta_log" in subfolders:
            subfolders.remove("_delta_log")
        found.update(os.path.join(folder, name) for name in names if name.endswith(".parquet"))
    return found


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
            if self.where == "inside":
                self._watch(reached)
            result = commit(*args, **kwargs)
            # ``inside`` lands here only if the commit beat the watcher: say so.
            die(reached | {"point": "after"})
            return result

        return run

    def _watch(self, reached: dict[str, Any]) -> None:
        before = data_files(reached["table"])

        def watch() -> None:
            try:  # the commit follows its last data file within milliseconds
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
                reached["realtime"] = True
            except PermissionError:
                reached["realtime"] = False
            while not data_files(reached["table"]) - before:
                pass
            die(reached)

        threading.Thread(target=watch, daemon=True).start()


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
