"""The watcher of ``inside:N`` crash points (tests/crash_points.py), a process of its own:

    python -m tests.crash_watcher TABLE_DIR VERSION JOB_PID MARKER REACHED_JSON

It lists the files of a local Delta table, says ``ready`` on stdout, and SIGKILLs the job as soon
as a file appears that was not there: delta-rs has started writing the merge's data. Only then
does it look at the log: no entry for VERSION + 1 means the kill landed inside the merge. It
writes what it found to MARKER. A process of its own, not a thread of the job: a thread must
first take the job's GIL, which the job's other threads (Ray's) may hold for the interpreter's
switch interval (5 ms), and such a thread missed a judge merge in CI. It runs at real-time
priority where the OS allows.

Standard library only, so that it starts in a few tens of milliseconds.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path


def table_files(table_dir: str) -> set[str]:
    """Every file of the table outside its log, staged uploads (``name#1``) included."""
    found = set()
    for folder, subfolders, names in os.walk(table_dir):
        if "_delta_log" in subfolders:
            subfolders.remove("_delta_log")
        found.update(os.path.join(folder, name) for name in names)
    return found


def main() -> None:
    table_dir, version, job_pid, marker, reached_json = sys.argv[1:]
    reached = json.loads(reached_json)
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        reached["realtime"] = True
    except PermissionError:
        reached["realtime"] = False
    before = table_files(table_dir)
    print("ready", flush=True)
    while not table_files(table_dir) - before:
        pass
    os.kill(int(job_pid), signal.SIGKILL)
    entry = Path(table_dir, "_delta_log", f"{int(version) + 1:020}.json")
    reached["point"] = "after" if entry.exists() else "inside"
    Path(marker).write_text(json.dumps(reached))


if __name__ == "__main__":
    main()
