"""The benchmarks ``synpref eval`` knows, and the fields a benchmark layout can map (a module
of its own so that the CLI can list them without importing the evaluation code)."""

from __future__ import annotations

from pipelines.ingest.formats import MAPPING_TARGETS

BENCHMARKS = ("rewardbench", "bestofn", "rmbench", "judgebench")
EVAL_MAPPING_TARGETS = (*MAPPING_TARGETS, "id", "category")
"""Field-mapping targets for benchmark layouts: ingest's, plus the item id and category."""
