"""`synpref annotate`: the attributes 5-tuple of lake pairs, written by an LLM, validated."""

from __future__ import annotations

from ray_jobs.job import main, pair_selection_command

command = pair_selection_command(
    "annotate",
    "Label pairs with their attributes (task category, objectivity, controversiality, "
    "desired attributes, guideline) into `attributes`; only pairs this annotator has "
    "not labelled.",
    "Annotate only this many selected pairs (smallest pair_id first).",
)

if __name__ == "__main__":
    main(command)
