"""What Ray Train's controller and dataset manager unpickle: the workers' entry point, their
setup and the data config.

They live apart from the training loop because every actor that unpickles a function or class
imports its module: the training module (torch, transformers, MLflow) cost the controller five
seconds of CPU before the first step, on a machine where the workers were loading the model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import ray.data
import ray.train
from ray.data import ExecutionOptions
from ray.data.dataset import MaterializedDataset

from pipelines.core.config import TrainingConfig
from pipelines.rm.local_checkpoints import LocalCheckpoints


@dataclass(frozen=True)
class WorkerSetup:
    """Everything a training worker needs besides its data shards (sent by the driver)."""

    training: TrainingConfig
    total_steps: int
    tracking_uri: str
    run_id: str
    has_validation: bool
    local_checkpoints: LocalCheckpoints | None = None
    """Where the run keeps its checkpoints in Ray Train's local mode (``workers: 0``)."""


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``."""
    from pipelines.rm.training import train_worker

    train_worker(config["setup"])


class EveryRowDataConfig(ray.train.DataConfig):
    """Ray Train's split, but uneven: ``equal=True`` would drop up to ``workers - 1`` rows.
    A materialized set (one the driver tokenised, the validation set) is split by its blocks
    up front, in order, without the coordinator actor a streaming split starts."""

    def configure(
        self,
        datasets: dict[str, ray.data.Dataset],
        world_size: int,
        worker_handles: Any,
        worker_node_ids: Any,
        **kwargs: Any,
    ) -> list[dict[str, Any]]:
        output: list[dict[str, Any]] = [{} for _ in range(world_size)]
        for name, dataset in datasets.items():
            if isinstance(dataset, MaterializedDataset):
                splits = [part.iterator() for part in dataset.split(world_size)]
            else:
                dataset = in_read_order(dataset, self._resolve_execution_options(name))
                splits = dataset.streaming_split(world_size, equal=False)
            for rank, split in enumerate(splits):
                output[rank][name] = split
        return output


def in_read_order(dataset: ray.data.Dataset, options: ExecutionOptions) -> ray.data.Dataset:
    """``dataset`` yielding its blocks in read order: one worker then sees the same rows in the
    same order in every run (several workers get blocks as they ask for them)."""
    dataset = dataset.copy(dataset)
    options = copy.copy(options)
    options.preserve_order = True
    dataset.context.execution_options = options
    return dataset
