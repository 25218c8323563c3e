"""What a loop has done: one ``loop_state`` row per committed step, with what it produced.

A step's result (a JSON object: Delta versions, models, run ids, counts) is committed when the
step has finished writing; a resumed loop skips committed steps and reads their results, so a
killed driver loses only the step in flight, whose own writes are idempotent.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from pipelines.core.errors import SynprefError
from pipelines.core.lake import Lake
from pipelines.core.sql import literal
from storage_schemas import LOOP_STATE


class LoopPaused(SynprefError):
    """The loop waits for people (open review tasks); ``synpref loop resume`` goes on."""


class LoopState:
    """The committed steps of loop ``loop``, in the order they committed."""

    def __init__(self, lake: Lake, loop: str) -> None:
        self.lake, self.loop = lake, loop
        rows = []
        if lake.exists(LOOP_STATE.name):
            rows = lake.read(LOOP_STATE.name, where=f"loop = {literal(loop)}").to_pylist()
        rows.sort(key=lambda r: r["position"])
        self.results: dict[str, dict[str, Any]] = {r["step"]: json.loads(r["result"]) for r in rows}

    def done(self, step: str) -> bool:
        return step in self.results

    def result(self, step: str) -> dict[str, Any]:
        return self.results[step]

    def commit(self, step: str, result: dict[str, Any], run_id: str | None) -> None:
        """Record ``step`` as done (a step committed twice keeps its first result)."""
        row = {
            "loop": self.loop,
            "step": step,
            "position": len(self.results),
            "result": json.dumps(result, sort_keys=True, allow_nan=False),
            "run_id": run_id,
            "committed_at": datetime.now(UTC),
        }
        self.lake.insert_new(LOOP_STATE, pa.Table.from_pylist([row], LOOP_STATE.schema))
        self.results[step] = result
