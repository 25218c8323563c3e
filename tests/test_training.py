"""Reward-model training on Ray Train: losses by hand, length grouping, the selection and its bad
inputs, a GGUF decoder that registers a model scoring exactly as trained, and a killed worker
(2 epochs, drop policy) that costs at most one checkpoint interval and no pair trained twice in
an epoch. The encoder on the defaults, its registry and its resume: test_journey.py."""

import contextlib
import dataclasses
import math
import signal
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import psutil
import pyarrow as pa
import pytest
import ray
import torch
from deltalake import write_deltalake

from pipelines import jobs
from pipelines.core.actor_pool import in_blocks_of
from pipelines.core.batching import length_batches
from pipelines.core.config import ConfigError, load_config
from pipelines.core.errors import SelectionError
from pipelines.core.model_paths import dequantized
from pipelines.rm import data
from pipelines.rm import training as training_module
from pipelines.rm.data import row_keys, tokenized_pairs, training_selection
from pipelines.rm.losses import pairwise_loss
from pipelines.rm.model import (
    RewardModel,
    hf_source,
    load_backbone,
    scored_conversation,
    without_dropout,
)
from pipelines.rm.training import OPTIMIZER_FILE, SEEN_FILE, TrainState, length_grouped_steps
from tests.conftest import HH_HARMLESS, smollm2_gguf

FEW = "pair_id < '10'"  # about 1/16 of HH's 2,312 pairs (ids are hex digests)


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_losses_match_hand_computed_values():
    chosen, rejected = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.0, 1.0])
    per_pair = [_softplus(-1.0), math.log(2), _softplus(2.0)]  # -log sigmoid(r_w - r_l)
    assert pairwise_loss(chosen, rejected).item() == pytest.approx(sum(per_pair) / 3, rel=1e-6)
    assert pairwise_loss(chosen, rejected, "log_exp").item() == pytest.approx(sum(per_pair) / 3)

    margin = torch.tensor([0.5, 0.0, 0.0])
    with_margin = [_softplus(-0.5), per_pair[1], per_pair[2]]
    assert pairwise_loss(chosen, rejected, margin=margin).item() == pytest.approx(
        sum(with_margin) / 3, rel=1e-6
    )
    weights = torch.tensor([2.0, 1.0, 1.0])
    weighted = (2 * per_pair[0] + per_pair[1] + per_pair[2]) / 4
    assert pairwise_loss(chosen, rejected, weights=weights).item() == pytest.approx(weighted)
    centred = [
        p + 0.1 * (c + r) ** 2 for p, c, r in zip(per_pair, [2, 0, -1], [1, 0, 1], strict=True)
    ]
    assert pairwise_loss(chosen, rejected, centering=0.1).item() == pytest.approx(sum(centred) / 3)
    # A micro-batch's share of a global batch of total weight 10:
    assert pairwise_loss(chosen, rejected, normaliser=10.0).item() == pytest.approx(
        sum(per_pair) / 10
    )
    low = pairwise_loss(chosen.bfloat16(), rejected.bfloat16())
    assert low.dtype == torch.float32
    big = pairwise_loss(torch.tensor([-200.0]), torch.tensor([200.0]))
    assert big.item() == pytest.approx(400.0)  # stable: no overflow to inf

    with pytest.raises(ValueError, match="unknown loss"):
        pairwise_loss(chosen, rejected, "hinge")
    with pytest.raises(ValueError, match="no margin"):
        pairwise_loss(chosen, rejected, "log_exp", margin=margin)


def test_length_grouping_cuts_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 2000, 512)
    grouped = length_batches(lengths, 8192)
    arrival = length_batches(lengths, 8192, group_by_length=False)
    for batches in (grouped, arrival):
        assert sorted(np.concatenate(batches).tolist()) == list(range(512))
        assert all(len(b) * lengths[b].max() <= 8192 or len(b) == 1 for b in batches)

    def padding(batches):
        padded = sum(len(b) * lengths[b].max() for b in batches)
        return 1 - lengths.sum() / padded

    assert padding(grouped) < 0.05 < 0.3 < padding(arrival)


def test_workers_get_steps_of_similar_length_and_every_row_once():
    rng = np.random.default_rng(0)

    def windows(rows: int) -> list[pa.Table]:
        """One worker's shard: windows of 8 steps of 4 pairs, random lengths."""
        lengths = rng.integers(10, 1000, rows)
        keys = np.arange(rows)
        return [
            pa.table({"row_key": keys[at : at + 32], "length": lengths[at : at + 32]})
            for at in range(0, rows, 32)
        ]

    first, second = windows(96), windows(90)  # shards of uneven size: a short last window
    steps = [list(length_grouped_steps(w, 4, (0, 0))) for w in (first, second)]
    for worker, shard in zip(steps, (first, second), strict=True):
        assert sorted(np.concatenate([s["row_key"].to_numpy() for s in worker]).tolist()) == (
            sorted(np.concatenate([w["row_key"].to_numpy() for w in shard]).tolist())
        )
        assert all(s.num_rows <= 4 for s in worker)
    # Same seed, same window index: the workers' steps are of the same length quantile.
    means = [[np.mean(s["length"].to_numpy()) for s in worker[:16]] for worker in steps]
    assert np.corrcoef(*means)[0, 1] > 0.9
    assert [s["length"][0].as_py() for s in steps[0][:8]] != sorted(
        s["length"][0].as_py() for s in steps[0][:8]
    ), "steps are taken in a random order, not from short to long"
    # The rows' arrival order does not matter: ties in length are broken by content.
    tied = pa.table({"row_key": np.arange(32), "length": np.repeat([10, 20], 16)})
    shuffled = tied.take(rng.permutation(32))
    again = list(length_grouped_steps([shuffled], 4, (0, 0)))
    assert [s["row_key"].to_pylist() for s in again] == [
        s["row_key"].to_pylist() for s in length_grouped_steps([tied], 4, (0, 0))
    ]


@pytest.mark.usefixtures("ray_cluster")
def test_training_blocks_hold_one_local_batch_each_whatever_the_input_blocks():
    """Every worker brings a full local batch to every step: blocks of exactly that size, even
    where input blocks end mid-batch (the journey once saw steps of 17 and 22 pairs of 32)."""
    uneven = ray.data.range(100).repartition(7)
    sizes = [
        b.num_rows
        for b in in_blocks_of(uneven, 16, 0.25).iter_batches(
            batch_size=None, batch_format="pyarrow"
        )
    ]
    assert sorted(sizes) == [4] + [16] * 6, "one short block: the end of the data"


def test_training_without_dropout_is_deterministic(encoder_rm):
    model = load_backbone(encoder_rm)
    model.train()
    inputs = {"input_ids": torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])}
    with torch.no_grad():
        assert model(**inputs).logits.item() != model(**inputs).logits.item(), "dropout is on"
        without_dropout(model)
        assert model(**inputs).logits.item() == model(**inputs).logits.item()


@pytest.fixture
def hh_lake(config, lake, ingested):
    ingested(config, hh=HH_HARMLESS)
    return lake


def test_selection_holds_out_validation_and_rejects_bad_inputs(config, hh_lake):
    data = config.training.data
    data.where = FEW
    data.validation_fraction = 0.25
    first, again = training_selection(hh_lake, data), training_selection(hh_lake, data)
    assert first.train.equals(again.train) and first.validation.equals(again.validation)
    selected = hh_lake.count("pairs", where=FEW)
    assert first.train.num_rows + first.validation.num_rows == selected
    assert 0.1 < first.validation.num_rows / selected < 0.4

    data.validation_where = "pair_id < '02'"
    gold = training_selection(hh_lake, data)
    gold_ids = set(gold.validation["pair_id"].to_pylist())
    assert gold_ids and not gold_ids & set(gold.train["pair_id"].to_pylist())

    data.validation_where = None
    for option, value, message in [
        ("where", "no_such_column = 1", "not a SQL predicate on pairs"),
        ("where", "pair_id < '00'", "selection is empty"),
        ("table", "no_such_table", "does not exist"),
        ("curated_only", True, "needs the curation_status table"),
        ("validation_where", FEW, r"selection is empty .*: all \d+ selected pairs validate"),
    ]:
        bad = data.model_copy(update={option: value})
        with pytest.raises(ValueError, match=message):
            training_selection(hh_lake, bad)


def _train_config(config, backbone: str, tmp_path: Path):
    training = config.training
    training.backbone = backbone
    training.data.where = FEW
    training.data.validation_fraction = 0.25
    training.max_length = 128
    training.global_batch = 16
    training.micro_batch_tokens = 2048
    training.learning_rate = 1e-3
    training.storage_path = str(tmp_path / "checkpoints")
    training.register_as = "hh-test-rm"
    return training


def _validation_conversations(lake, training):
    keys = training_selection(lake, training.data).validation
    wanted = set(zip(keys["source"].to_pylist(), keys["pair_id"].to_pylist(), strict=True))
    pairs = [p for p in lake.read("pairs").to_pylist() if (p["source"], p["pair_id"]) in wanted]
    chosen = [scored_conversation(p["history"], p["chosen"]) for p in pairs]
    rejected = [scored_conversation(p["history"], p["rejected"]) for p in pairs]
    return chosen, rejected


def test_a_small_set_tokenised_by_the_driver_equals_the_actor_pipeline(
    config, hh_lake, encoder_rm, tmp_path, monkeypatch
):
    """Sets up to TOKENIZE_ON_DRIVER pairs skip the tokenizer actors and the streaming split:
    the same rows (flips swapped, long pairs truncated), in blocks of a worker's share of a
    step, the same blocks in every run."""
    training = _train_config(config, encoder_rm, tmp_path)
    training.max_length = 64
    plain = training_selection(hh_lake, training.data)
    flips = plain.train.slice(0, 5)
    selection = dataclasses.replace(plain, flipped=flips)

    def tokenized(selection) -> list[pa.Table]:
        dataset = tokenized_pairs(hh_lake, selection, selection.train, training, 16)
        return list(dataset.iter_batches(batch_size=None, batch_format="pyarrow"))

    weighted = training.model_copy(deep=True)
    weighted.data.weight_column = "no_such_column"
    with pytest.raises(
        SelectionError, match=r"table pairs has no column\(s\) \['no_such_column'\]"
    ):
        tokenized_pairs(hh_lake, plain, plain.train, weighted, 16)
    here = tokenized(selection)
    assert [b.num_rows for b in here[:-1]] == [16] * (len(here) - 1) and here[-1].num_rows <= 16
    assert [b.to_pydict() for b in tokenized(selection)] == [b.to_pydict() for b in here]
    unflipped = pa.concat_tables(tokenized(plain)).sort_by("row_key").to_pydict()
    monkeypatch.setattr(data, "TOKENIZE_ON_DRIVER", 0)
    streamed = pa.concat_tables(tokenized(selection)).sort_by("row_key")
    assert pa.concat_tables(here).sort_by("row_key").equals(streamed)
    rows = streamed.to_pydict()
    assert sum(rows["truncated"]) > 0
    swapped = set(row_keys(flips["source"], flips["pair_id"]).tolist())
    for i, key in enumerate(rows["row_key"]):
        sides = (rows["chosen_ids"][i], rows["rejected_ids"][i])
        as_stored = (unflipped["chosen_ids"][i], unflipped["rejected_ids"][i])
        assert sides == (as_stored[::-1] if key in swapped else as_stored)


def test_null_nan_or_negative_weights_of_selected_pairs_are_refused_before_training(
    config, hh_lake, encoder_rm, tmp_path
):
    """Weights and margins come from any numeric column of the training table: a selected
    pair's bad value is a ``SelectionError`` naming the option, the count and a pair; the same
    value on a pair outside the selection does not matter."""
    training = _train_config(config, encoder_rm, tmp_path)
    pairs = hh_lake.read("pairs", columns=["source", "pair_id", "history", "chosen", "rejected"])
    pairs = pairs.sort_by("pair_id")
    n = pairs.num_rows
    weights = [1.0] * n
    weights[0], weights[1], weights[-1] = None, float("nan"), -2.0  # ids '00..', then 'ff..'
    table = pairs.append_column("weight", pa.array(weights, pa.float64()))
    table = table.append_column("margin", pa.array([None] + [0.5] * (n - 1), pa.float32()))
    table = table.append_column("label", pa.array(["x"] * n))
    write_deltalake(hh_lake.uri("weighted"), table)
    training.data.table, training.data.validation_fraction = "weighted", 0.0

    def check(where: str, **columns: str) -> None:
        data_config = training.data.model_copy(update={"where": where, **columns})
        selection = training_selection(hh_lake, data_config)
        tokenized_pairs(
            hh_lake, selection, selection.train, training.model_copy(update={"data": data_config})
        )

    with pytest.raises(
        SelectionError,
        match=r"weight_column 'weight': 2 selected pair\(s\) of "
        r"weighted v0 are null or NaN or negative there \(e\.g\. hh/",
    ):
        check(FEW, weight_column="weight")
    with pytest.raises(SelectionError, match=r"1 selected pair\(s\) .* negative there"):
        check("pair_id > 'f0'", weight_column="weight")
    with pytest.raises(SelectionError, match=r"margin_column 'margin': 1 selected .* null or NaN"):
        check(FEW, margin_column="margin")
    with pytest.raises(SelectionError, match="margin_column 'label' is string, not a number"):
        check(FEW, margin_column="label")
    check("pair_id > '02' AND pair_id < '04'", weight_column="weight", margin_column="margin")


def test_bad_backbone_is_a_clear_error(config, hh_lake, tmp_path):
    _train_config(config, str(tmp_path / "no-model-here"), tmp_path)
    with pytest.raises(ValueError, match="cannot be loaded"):
        jobs.train(config, name="bad").as_dict()


def _kill_a_worker_after_first_checkpoint(storage: Path, done: threading.Event) -> list[int]:
    """SIGKILL one Ray Train worker (a descendant of this test process: this session's Ray)
    once the controller has registered a checkpoint (it then writes its snapshot file)."""
    while not done.is_set():
        if list(storage.glob("*/checkpoint_manager_snapshot.json")):
            for process in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if process.cmdline()[:1] == ["ray::RayTrainWorker"]:
                        process.send_signal(signal.SIGKILL)
                        return [process.pid]
        time.sleep(0.2)
    return []


@pytest.mark.slow
def test_killed_worker_resumes_from_checkpoint_without_training_a_pair_twice_an_epoch(
    config, hh_lake, decoder_rm, tmp_path, monkeypatch
):
    # The path of large sets: tokenizer actors, and the streaming split among 2 workers.
    monkeypatch.setattr(data, "TOKENIZE_ON_DRIVER", 0)
    training = _train_config(config, decoder_rm, tmp_path)
    training.data.where = "pair_id < '10'"  # about 140 of HH's pairs: many small steps
    training.global_batch = 8
    training.epochs = 2  # the position in the data restarts with each epoch
    training.truncation = "drop"  # pairs over 128 tokens are left out, counted, never trained
    training.select = "last"  # the final checkpoint holds the last epoch's position
    training.checkpoint_every = training.validate_every = 5
    training.register_as = None
    storage = Path(training.storage_path)
    done = threading.Event()
    killed: list[int] = []
    killer = threading.Thread(
        target=lambda: killed.extend(_kill_a_worker_after_first_checkpoint(storage, done))
    )
    killer.start()
    try:
        result = jobs.train(config, name="hh-killed").as_dict()
    finally:
        done.set()
        killer.join()
    assert killed, "a worker was killed mid-run"
    restored = mlflow.MlflowClient().get_metric_history(result["run_id"], "restored_from_step")
    assert restored and restored[0].value % 5 == 0, "restarted from a checkpoint"
    trained, dropped = result["pairs_trained"], result["pairs_dropped"]
    assert dropped > 0 and result["pairs_truncated"] == 0
    assert trained + dropped == 2 * result["train_pairs"], "every pair once an epoch"
    assert result["registered_version"] is None and result["model_uri"].startswith("models:/m-")

    state = TrainState.load(Path(result["checkpoint"]))
    seen = np.load(Path(result["checkpoint"]) / SEEN_FILE)
    keys = training_selection(hh_lake, training.data).train
    assert len(seen) == len(np.unique(seen)) == keys.num_rows
    assert set(seen.tolist()) == set(row_keys(keys["source"], keys["pair_id"]).tolist())
    assert state.pairs == trained and state.epoch == 2
    run = mlflow.get_run(result["run_id"])
    assert run.data.metrics["tokens_trained"] > trained * 2 * 16, "both sides of every pair"

    # The final checkpoint keeps the model only: asking that run for more epochs is an error,
    # which the driver raises before it starts Ray Train.
    assert not (Path(result["checkpoint"]) / OPTIMIZER_FILE).exists()
    training.epochs = 3
    with pytest.raises(ConfigError, match="finished after 2 epoch.*train under a new name"):
        jobs.train(config, name="hh-killed")


@pytest.mark.slow
def test_smollm2_backbone_from_gguf_trains_and_registers(config, hh_lake, tmp_path):
    gguf = smollm2_gguf()
    training = _train_config(config, str(gguf.parent), tmp_path)
    training.backbone_kwargs = {"gguf_file": gguf.name}
    training.data.where = "pair_id < '03'"
    training.max_length = 64
    training.global_batch = 8
    training.learning_rate = 1e-5
    # Local mode, two threads: a decoder in Ray Train's workers is the killed-worker test's.
    training.workers, training.cpus_per_worker = 0, 1.5
    result = jobs.train(config, name="hh-smollm2").as_dict()
    assert result["pairs_trained"] == result["train_pairs"] > 0
    # The trainer loaded the folder the GGUF was dequantized into once, not the GGUF.
    assert hf_source(str(gguf.parent), {"gguf_file": gguf.name}) == (dequantized(gguf), {})
    hub = ("org/model-GGUF", {"gguf_file": "model.Q4.gguf"})
    assert hf_source(*hub) == hub, "a hub GGUF is left to transformers"
    assert np.isfinite(result["selected_metrics"]["val_loss"])

    chosen, rejected = _validation_conversations(hh_lake, training)
    registered = mlflow.pyfunc.load_model(result["model_uri"])
    rewards = registered.predict(pd.DataFrame({"messages": chosen + rejected}))
    direct = RewardModel(result["model_folder"], max_length=64).score(chosen + rejected)
    assert rewards == pytest.approx(direct.rewards, abs=1e-5)
    accuracy = np.mean(rewards[: len(chosen)] > rewards[len(chosen) :])
    assert accuracy == pytest.approx(result["selected_metrics"]["val_accuracy"])


def test_fsdp_without_gpus_is_a_config_error():
    with pytest.raises(ConfigError, match="fsdp needs use_gpu"):
        load_config(None, {"training": {"strategy": "fsdp"}})
    for local in ({"use_gpu": True}, {"storage_path": "s3://bucket/checkpoints"}):
        with pytest.raises(ConfigError, match="workers 0 trains in the job's process"):
            load_config(None, {"training": {"workers": 0} | local})


def test_local_mode_trains_what_one_worker_trains_keeps_checkpoints_alike_and_resumes(
    config, hh_lake, tiny_encoder_rm, tmp_path, monkeypatch
):
    """``workers: 0`` (Ray Train's local mode, in this process) gives the model one Ray Train
    worker with as many threads gives; its checkpoints are kept and pruned alike; a run that
    failed mid-way resumes from its last checkpoint, and a finished one trains nothing. (A
    tiny encoder: MiniLM on the defaults is test_journey.py's.)"""
    training = _train_config(config, tiny_encoder_rm, tmp_path)
    training.data.where = "pair_id < '04'"  # about 35 pairs: 4 steps of 8
    training.max_length, training.global_batch = 64, 8
    training.checkpoint_every = training.validate_every = 2
    training.keep_checkpoints, training.register_as = 1, None
    training.workers, training.cpus_per_worker = 1, 1.5
    on_ray = jobs.train(config, name="one-worker").summary
    training.workers = 0
    here = jobs.train(config, name="local").summary
    assert here.steps == on_ray.steps >= 4 and here.selected_step == on_ray.selected_step
    learned = [
        {k: v for k, v in s.selected_metrics.items() if not k.endswith("_per_s")}
        for s in (on_ray, here)
    ]
    assert learned[1] == pytest.approx(learned[0], abs=1e-4), "all but the speed"
    chosen, rejected = _validation_conversations(hh_lake, training)
    scores = [
        RewardModel(s.model_folder, max_length=64).score(chosen + rejected).rewards
        for s in (on_ray, here)
    ]
    assert scores[0] == pytest.approx(scores[1], abs=1e-4)
    storage = Path(training.storage_path)
    kept = [
        sum(f.is_dir() for f in (storage / n).glob("checkpoint_*")) for n in ("one-worker", "local")
    ]
    assert kept[0] == kept[1] <= 2, "the best and the latest"

    again = jobs.train(config, name="local").summary
    assert again.checkpoint == here.checkpoint and again.pairs_trained == here.pairs_trained
    assert "loss" not in mlflow.get_run(again.run_id).data.metrics, "nothing trained again"

    # A run that fails after its third step resumes from the checkpoint of its second.
    real_step = training_module._Worker.train_step
    steps = []

    def failing_step(self, rows, weight_total):
        steps.append(1)
        if len(steps) == 3:
            raise RuntimeError("injected failure")
        return real_step(self, rows, weight_total)

    monkeypatch.setattr(training_module._Worker, "train_step", failing_step)
    with pytest.raises(RuntimeError, match="injected failure"):
        jobs.train(config, name="failing")
    assert len(list((storage / "failing").glob("checkpoint_*"))) == 1
    resumed = jobs.train(config, name="failing").summary
    history = mlflow.MlflowClient().get_metric_history(resumed.run_id, "restored_from_step")
    assert [m.value for m in history] == [2]
    assert resumed.pairs_trained == resumed.train_pairs == here.train_pairs, "each pair once"
    assert resumed.steps == here.steps
