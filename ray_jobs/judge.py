"""`synpref judge`: LLM judges on lake pairs into `judgments` and `verdicts`, quality to MLflow."""

from __future__ import annotations

from ray_jobs.job import main, pair_selection_command

command = pair_selection_command(
    "judge",
    "Judge pairs with the configured LLM judges (both orders; only missing judgments) "
    "into `judgments`, and their verdicts into `verdicts`.",
    "Judge only this many of the selected pairs: those with the smallest pair_id (a "
    "fixed pseudo-random sample).",
)

if __name__ == "__main__":
    main(command)
