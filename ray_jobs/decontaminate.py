"""`synpref decontaminate`: flag corpus pairs that share n-grams with the benchmark sources."""

from __future__ import annotations

from ray_jobs.job import config_only_command, main

command = config_only_command(
    "decontaminate",
    "Flag corpus pairs sharing n-grams with benchmark prompts; write `contamination`.",
)

if __name__ == "__main__":
    main(command)
