"""A run's checkpoints in Ray Train's local mode (``training.workers: 0``).

Local mode runs the training function in the job's own process and keeps no checkpoint: its
``ray.train.report`` holds the last one in memory, ``get_checkpoint`` returns nothing and the
result lists no best checkpoints. This keeps them as Ray Train's controller would, so a local
run resumes, selects its best model and prunes old checkpoints like a distributed one: a folder
per report under the run's folder, written whole before it counts, with the metrics reported.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.train import Checkpoint

METRICS_FILE = "metrics.json"
PREFIX = "checkpoint_"


@dataclass(frozen=True)
class LocalCheckpoints:
    """Checkpoints under ``folder`` (``storage_path/name``); ``keep`` of them ranked by the
    metric ``score`` (higher is better, the later wins a tie) survive besides the latest, as
    ``ray.train.CheckpointConfig(num_to_keep, checkpoint_score_attribute)`` has it."""

    folder: Path
    keep: int
    score: str

    @contextlib.contextmanager
    def new(self, metrics: dict[str, Any]) -> Iterator[Path]:
        """An empty folder to write the next checkpoint into; it counts once the block ends."""
        indices = [int(f.name.removeprefix(PREFIX)) for f in self._folders()]
        name = f"{PREFIX}{max(indices, default=0) + 1:06d}"
        partial = self.folder / f".{name}.partial"
        shutil.rmtree(partial, ignore_errors=True)  # left by a crash mid-write
        partial.mkdir(parents=True)
        yield partial
        (partial / METRICS_FILE).write_text(json.dumps(metrics))
        partial.rename(self.folder / name)
        self._prune()

    def reported(self) -> list[tuple[Checkpoint, dict[str, Any]]]:
        """Every kept checkpoint with its metrics, in report order."""
        return [
            (Checkpoint.from_directory(f), json.loads((f / METRICS_FILE).read_text()))
            for f in self._folders()
        ]

    def latest(self) -> Checkpoint | None:
        folders = self._folders()
        return Checkpoint.from_directory(folders[-1]) if folders else None

    def _folders(self) -> list[Path]:
        if not self.folder.exists():
            return []
        return sorted(f for f in self.folder.glob(f"{PREFIX}*") if f.is_dir())

    def _prune(self) -> None:
        reported = self.reported()
        ranked = sorted(
            range(len(reported)),
            key=lambda i: (reported[i][1].get(self.score, -math.inf), i),
        )
        for index in set(ranked[: -self.keep]) - {len(reported) - 1}:
            shutil.rmtree(reported[index][0].path)
