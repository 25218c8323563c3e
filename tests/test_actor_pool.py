"""The incremental actor-pool stage shared by judging, attributes and scoring, tested directly
(no LLM, no CLI): what counts as missing, the CPU guard, block-wise merges and a crash."""

import gc
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
import ray
from ray import cloudpickle

from pipelines.core.actor_pool import check_cpus, missing_rows, run_stage
from pipelines.core.config import ActorPoolConfig
from pipelines.core.errors import ResourceError
from storage_schemas import TableSpec

FIELDS = {"item": pa.int64(), "worker": pa.string(), "value": pa.int64()}
MERGE_WAIT_S = 120
# The stand-in actors below are defined here: Ray's workers get them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

OUTPUT = TableSpec(
    "stage_output",
    "a stage's output rows in a test",
    pa.schema(FIELDS | {"invalid_reason": pa.string()}),
    keys=("item", "worker"),
)


def rows(items, worker="w1", reasons=None):
    reasons = reasons or [None] * len(items)
    return pa.table(
        {
            "item": pa.array(items, pa.int64()),
            "worker": [worker] * len(items),
            "value": pa.array([i * 10 for i in items], pa.int64()),
            "invalid_reason": pa.array(reasons, pa.string()),
        },
        schema=OUTPUT.schema,
    )


def wanted(items, worker="w1"):
    return pa.table({"item": pa.array(items, pa.int64()), "worker": [worker] * len(items)})


def test_missing_rows_keeps_answers_and_asks_failed_requests_again(lake):
    assert missing_rows(lake, OUTPUT, wanted([1, 2]), "worker = 'w1'").num_rows == 2, "no table"
    reasons = [None, "unparseable: x", "request_failed: HTTP 500", "request_rejected: HTTP 400"]
    lake.insert_new(OUTPUT, rows([1, 2, 3, 4], reasons=reasons))
    lake.insert_new(OUTPUT, rows([5], worker="w2"))
    ask = wanted([1, 2, 3, 4, 5, 6])

    missing = missing_rows(lake, OUTPUT, ask, "worker = 'w1'")
    assert sorted(missing["item"].to_pylist()) == [3, 5, 6], "valid and unparseable are answers"
    again = missing_rows(lake, OUTPUT, ask, "worker = 'w1'", retry_rejected=True)
    assert sorted(again["item"].to_pylist()) == [3, 4, 5, 6]
    assert missing_rows(lake, OUTPUT, ask, "worker = 'w2'").num_rows == 6, "identity keys"


@pytest.mark.usefixtures("ray_cluster")
def test_cpu_guard_counts_every_pool():
    cpus = ray.cluster_resources()["CPU"]
    check_cpus({"judge": ActorPoolConfig(num_cpus=cpus / 2)})
    with pytest.raises(ResourceError, match=r"judge 1 x .*retrieval 1 x 0\.5"):
        check_cpus(
            {
                "judge": ActorPoolConfig(num_cpus=cpus - 0.5),
                "retrieval": ActorPoolConfig(num_cpus=0.5),
            }
        )


class Doubler:
    """A stand-in actor (the stage is what is tested): fails on item ``fail_on``, once the file
    ``merged`` exists (a block has been merged: on a loaded machine the crash could otherwise
    abort the stage before the driver merged any finished block)."""

    def __init__(self, fail_on: int | None, merged: Path) -> None:
        self.fail_on, self.merged = fail_on, merged

    def __call__(self, batch: pa.Table) -> pa.Table:
        items = batch["item"].to_pylist()
        if self.fail_on in items:
            deadline = time.monotonic() + MERGE_WAIT_S
            while not self.merged.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            raise RuntimeError(f"crash on item {self.fail_on}")
        return rows(items)


@pytest.mark.usefixtures("ray_cluster")
def test_blocks_are_merged_as_they_finish_and_a_crash_keeps_them(lake, tmp_path):
    pool = ActorPoolConfig(batch_size=10, num_cpus=0.5, merge_every_s=0)  # every block
    merges = []
    merged = tmp_path / "merged"

    def merge(new: pa.Table) -> int:
        merges.append(new.num_rows)
        version = lake.insert_new(OUTPUT, new).version
        merged.touch()
        return version

    def stage(todo: pa.Table, fail_on: int | None):
        dataset = ray.data.from_arrow(todo).repartition(len(todo) // 10)
        args = (fail_on, merged)
        return run_stage("test", dataset, Doubler, args, pool, OUTPUT, merge, len(todo))

    everything = wanted(list(range(60)))
    # Ray Data hands the actor's error on as a task error of the user's code.
    with pytest.raises(ray.exceptions.RayTaskError, match="RuntimeError: crash on item 55"):
        stage(everything, fail_on=55)
    # Ray Data lets a failed stage's actors go by dropping its references to them, but the
    # error's traceback holds some in a reference cycle: until the cycle collector runs they
    # keep their CPUs, and a later stage in this process can wait for CPUs forever.
    gc.collect()
    _wait_for_every_cpu()
    kept = lake.read(OUTPUT.name) if lake.exists(OUTPUT.name) else OUTPUT.schema.empty_table()
    assert kept.num_rows >= 10, "blocks finished before the crash were merged"
    assert 55 not in kept["item"].to_pylist()

    todo = missing_rows(lake, OUTPUT, everything, "worker = 'w1'")
    assert todo.num_rows == 60 - kept.num_rows
    result = stage(todo, fail_on=None)
    assert result.rows.num_rows == todo.num_rows and len(merges) > 2
    table = lake.read(OUTPUT.name)
    assert sorted(table["item"].to_pylist()) == list(range(60)), "nothing lost, nothing twice"
    assert result.version == lake.version(OUTPUT.name)


def _wait_for_every_cpu(seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, f"CPUs still held: {ray.available_resources()}"
        time.sleep(0.2)


@pytest.mark.usefixtures("ray_cluster")
def test_a_stage_that_loses_rows_fails_loudly(lake):
    class Dropper:
        def __call__(self, batch: pa.Table) -> pa.Table:
            return rows(batch["item"].to_pylist()[1:])

    dataset = ray.data.from_arrow(wanted(list(range(10))))
    with pytest.raises(RuntimeError, match="9 output rows for 10 requests"):
        run_stage(
            "test",
            dataset,
            Dropper,
            (),
            ActorPoolConfig(num_cpus=0.5),
            OUTPUT,
            lambda new: lake.insert_new(OUTPUT, new).version,
            10,
        )
