"""`synpref demo`: the platform's main job on the embedded defaults (see pipelines/demo.py)."""

from __future__ import annotations

from ray_jobs.job import config_only_command, main

command = config_only_command(
    "demo",
    "Run the main job on the embedded defaults: generate, ingest, dedup, decontaminate, then "
    "a short loop with a simulated annotator.",
)

if __name__ == "__main__":
    main(command)
