"""Where a command's CPU goes, by process title: runs COMMAND and samples every process's CPU
time every 2 s until it ends, then prints CPU-seconds per kind of process (a Ray worker names
itself after its task or actor, e.g. ``ray::RayTrainWorker``; daemons by their program).

    .venv/bin/python benchmarks/cpu_by_process.py -- .venv/bin/python -m pytest tests/test_loop.py

Processes that existed before COMMAND count from then only. A process that ends between two
samples loses its last 2 s, so short-lived ones are undercounted.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import time

import psutil

DAEMONS = (
    "gcs_server",
    "raylet",
    "dashboard.py",
    "log_monitor",
    "label-studio",
    "postgres",
    "mlflow",
    "openai_server",
    "moto",
)


def kind(command_line: str) -> str:
    """The process's kind: a Ray worker's title without arguments, a daemon's program, or the
    start of its command line."""
    if command_line.startswith("ray::"):
        return re.sub(r"\(.*", "", command_line.split()[0])[:60]
    if "default_worker.py" in command_line:
        return "ray worker (starting)"
    if "pytest" in command_line or "execnet" in command_line or "sys.stdin" in command_line:
        return "pytest"
    return next((d for d in DAEMONS if d in command_line), command_line[:60])


def sample(
    seen: dict[tuple[int, float], float], totals: collections.Counter[str], first: bool = False
) -> None:
    """Add each process's CPU time since the last sample to its kind; a process not seen
    before counts from its start, except at the ``first`` sample."""
    for process in psutil.process_iter(["pid", "create_time", "cmdline", "cpu_times"]):
        info = process.info
        if info["cpu_times"] is None:
            continue
        key, cpu = (info["pid"], info["create_time"]), sum(info["cpu_times"][:2])
        previous = seen.get(key, cpu if first else 0.0)
        totals[kind(" ".join(info["cmdline"] or []))] += cpu - previous
        seen[key] = cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="+", help="the command to run (after --)")
    parser.add_argument("--every", type=float, default=2.0, help="seconds between samples")
    args = parser.parse_args()
    seen: dict[tuple[int, float], float] = {}
    totals: collections.Counter[str] = collections.Counter()
    sample(seen, totals, first=True)  # what runs already counts from now
    started = time.monotonic()
    command = subprocess.Popen(args.command)
    while command.poll() is None:
        time.sleep(args.every)
        sample(seen, totals)
    wall = time.monotonic() - started
    total = sum(totals.values())
    print(f"{wall:.0f} s wall, {total:.0f} CPU-s ({total / wall:.2f} cores busy on average)")
    for name, seconds in totals.most_common(25):
        print(f"{seconds:8.1f}  {name}")
    raise SystemExit(command.returncode)


if __name__ == "__main__":
    main()
