"""`synpref dedup`: pair-aware exact dedup and label-conflict detection over the lake's pairs."""

from __future__ import annotations

from ray_jobs.job import config_only_command, main

command = config_only_command(
    "dedup",
    "Find exact duplicate pairs and label conflicts (flips); write the decision tables.",
)

if __name__ == "__main__":
    main(command)
