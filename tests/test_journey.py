"""A new user's journey on the defaults, as the README tells it: ingest HH pairs, train a reward
model (registered, scoring as trained; a re-run resumes the finished run), score, evaluate on
JudgeBench and RM-Bench, serve it and query it with a conversation longer than the model reads,
stop the server. Only the lake, the tracking URI and the selections are given: every other value
is the default a user gets (the lesson of a round whose tests all set a small max_length and so
never ran the defaults). The README's run trains on 1,500 pairs and evaluates on the whole
benchmarks (its numbers are measured by hand); this one trains on 500 and evaluates on the first
items of each benchmark file, so that it costs less than half of that on every CI run."""

import os
import signal
import subprocess
import sys

import httpx
import mlflow
import pandas as pd
import pytest
import ray
from ray import serve

from pipelines.core.lake import Lake
from pipelines.rm.model import RewardModel
from tests.conftest import (
    HH_HARMLESS,
    JUDGEBENCH,
    REPO,
    RM_BENCH,
    first_items,
    free_port,
    shared_data,
    store_flags,
    synpref_json,
    wait_until_up,
)

TRAIN = "pair_id < '38'"  # about 500 of HH's 2,303 pairs (ids are hex digests)
GOLD = "pair_id >= 'e8'"  # about 200 others


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_journey_from_raw_pairs_to_a_served_reward_model(config, ray_cluster, tmp_path):
    def synpref(*args: str) -> dict:
        return synpref_json(*store_flags(config), *args)

    synpref("ingest", str(shared_data(HH_HARMLESS)), "--source", "hh")
    trained = synpref("train", "--name", "journey", "--where", TRAIN, "--validation-where", GOLD)
    lake = Lake(config.lake.root)
    assert trained["train_pairs"] == lake.count("pairs", where=TRAIN) > 450
    assert trained["validation_pairs"] == lake.count("pairs", where=GOLD) > 180
    assert trained["max_length"] == 512, "MiniLM reads 512 tokens, whatever 4096 asks"
    assert trained["pairs_truncated"] > 0, "HH has conversations over 512 tokens: cut, not a crash"
    # It learns: 0.566 and 0.671 here (on 1,500 pairs, the README's 62%); the length heuristic
    # gets 0.45, a model that learned nothing a loss of ln 2 = 0.693.
    accuracy = trained["selected_metrics"]["val_accuracy"]
    assert accuracy > 0.53, f"validation accuracy {accuracy:.3f}"
    assert trained["selected_metrics"]["val_loss"] < 0.685
    run = mlflow.get_run(trained["run_id"])
    assert run.info.run_name == "journey"
    assert run.data.params["config.training.micro_batch_tokens"] != "***"
    batches = mlflow.MlflowClient().get_metric_history(trained["run_id"], "batch_pairs")
    global_batch = config.training.global_batch
    full = [m.value for m in batches].count(global_batch)
    assert full >= len(batches) - 2, "every worker contributes to every step but the last"
    assert trained["pairs_trained"] == trained["train_pairs"]
    assert run.data.tags["synpref.input.pairs.version"] == str(trained["table_version"])
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(trained["run_id"])}
    assert "training_curves.png" in artifacts
    _registered_model_scores_as_trained(trained)

    # Re-running the same name resumes the finished run: nothing trained, nothing registered.
    again = synpref("train", "--name", "journey", "--where", TRAIN, "--validation-where", GOLD)
    assert again["registered_version"] == trained["registered_version"]
    assert again["checkpoint"] == trained["checkpoint"]
    assert "loss" not in mlflow.get_run(again["run_id"]).data.metrics

    folder = trained["model_folder"]
    scored = synpref("score", "--model", folder, "--where", GOLD)
    assert scored["accuracy"] == pytest.approx(accuracy), "scoring reads what training read"

    judgebench_sample = first_items(shared_data(JUDGEBENCH), tmp_path / "judgebench", 30)
    judgebench = synpref("eval", "judgebench", "--data", str(judgebench_sample), "--model", folder)
    assert judgebench["items"] == 30 and 0 < judgebench["metrics"]["accuracy"] < 100
    tags = mlflow.get_run(judgebench["run_id"]).data.tags
    assert (
        tags["synpref.registered_model"]
        == f"models:/synpref-reward-model/{trained['registered_version']}"
    )
    chat = first_items(shared_data(RM_BENCH) / "chat_filtered.json", tmp_path / "rmbench", 15)
    rmbench = synpref("eval", "rmbench", "--data", str(chat), "--model", folder)
    assert rmbench["items"] == 15

    _serve_query_and_stop(folder, tmp_path)


def _registered_model_scores_as_trained(trained: dict) -> None:
    """The registered pyfunc model and the checkpoint folder give the same rewards, normalised
    by the validation statistics training saved."""
    registered = mlflow.pyfunc.load_model(trained["model_uri"])
    conversations = [
        [{"role": "user", "content": "How do I bake bread?"}, {"role": "assistant", "content": a}]
        for a in ("Mix flour, water, yeast and salt, knead, rise, bake at 230 C.", "No.")
    ]
    rewards = registered.predict(pd.DataFrame({"messages": conversations}))
    direct = RewardModel(trained["model_folder"])
    assert rewards == pytest.approx(direct.score(conversations).rewards, abs=1e-6)
    metrics = trained["selected_metrics"]
    assert direct.reward_mean == pytest.approx(metrics["val_reward_mean"])
    assert direct.reward_std == pytest.approx(metrics["val_reward_std"])


def _serve_query_and_stop(folder: str, tmp_path) -> None:
    """`synpref serve` in its own process on the session's cluster, as a user runs it; a long
    conversation is cut, not a 500; SIGTERM stops it cleanly."""
    port = free_port()
    errors = tmp_path / "serve.err"
    with errors.open("w") as stderr:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ray_jobs.serve",
                "--model",
                f"rm={folder}",
                "--ray-address",
                ray.get_runtime_context().gcs_address,
            ],
            cwd=REPO,
            env={
                **os.environ,
                "SYNPREF_SERVING__PORT": str(port),
                "SYNPREF_LOG_FILE": str(tmp_path / "serve.log"),
            },
            stderr=stderr,
            text=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(
            f"{url}/healthz",
            server,
            300,
            lambda: f"free: {ray.available_resources()}\n{errors.read_text()[-3000:]}",
        )
        history = [{"role": "user", "content": "Tell me everything about Paris. " * 600}]
        body = {
            "pairs": [{"prompt": history, "chosen": "Paris is the capital.", "rejected": "No."}]
        }
        reply = httpx.post(f"{url}/v1/score", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        assert reply.json()["pairs"][0]["chosen"]["truncated"]
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=120)
        finally:
            serve.shutdown()  # whatever happened, the session's cluster is left without Serve
    log = errors.read_text()
    assert server.returncode == 0, log[-3000:]
    assert "[serve] stopped" in log and "Aborted" not in log
