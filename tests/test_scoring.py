"""Batch scoring of lake pairs into `rm_scores`: incremental, idempotent, same scores as the
model in process, and clear errors."""

import logging

import mlflow
import numpy as np
import pytest

from pipelines import jobs
from pipelines.rm.model import RewardModel, encode, pair_conversations, sigmoid
from tests.conftest import HH_HARMLESS

FEW = "pair_id < '0c'"  # about 1/20 of HH's pairs (ids are hex digests)
MORE = "pair_id < '18'"


def test_scoring_is_incremental_idempotent_and_matches_the_model(
    config, ingested, lake, ray_cluster, tiny_encoder_rm, caplog
):
    """A set scored on the actor pool, then the rest of a wider one in this process (a small
    set): every score is the model's own (a tiny encoder's; MiniLM's: test_journey.py and
    test_evaluation.py)."""
    caplog.set_level(logging.INFO, logger="pipelines")
    ingested(config, hh=HH_HARMLESS)
    config.scoring.max_length = 128
    config.scoring.on_driver_max = 0  # the actor pool
    first = jobs.score(config, tiny_encoder_rm, model_name="tiny-rm", where=FEW).as_dict()
    selected = lake.count("pairs", where=FEW)
    assert first["scored"] == first["selected"] == selected > 50
    assert lake.count("rm_scores") == selected
    assert "computed in this process" not in caplog.text

    again = jobs.score(config, tiny_encoder_rm, model_name="tiny-rm", where=FEW).as_dict()
    assert (again["scored"], again["already_scored"]) == (0, selected)
    assert again["rm_scores_version"] is None, "nothing new: no commit"

    config.scoring.on_driver_max = 1024
    wider = jobs.score(config, tiny_encoder_rm, model_name="tiny-rm", where=MORE).as_dict()
    assert "[score] a small set: computed in this process" in caplog.text
    assert wider["already_scored"] == selected
    assert lake.count("rm_scores") == wider["selected"] == selected + wider["scored"]

    rows = lake.read("rm_scores").sort_by("pair_id").to_pylist()
    assert {r["model_version"] for r in rows} == {first["model_version"]}
    r_c = np.array([r["r_chosen"] for r in rows])
    r_r = np.array([r["r_rejected"] for r in rows])
    assert np.allclose([r["p"] for r in rows], sigmoid(r_c - r_r))
    pairs = lake.read("pairs", where=MORE).sort_by("pair_id")
    direct = RewardModel(tiny_encoder_rm, max_length=128).score(
        pair_conversations(*(pairs[c].to_pylist() for c in ("history", "chosen", "rejected")))
    )
    assert [r["pair_id"] for r in rows] == pairs["pair_id"].to_pylist()
    assert np.allclose(np.concatenate([r_c, r_r]), direct.rewards, atol=1e-5)

    run = mlflow.get_run(first["run_id"])
    assert run.data.metrics["pairs_scored"] == selected
    assert run.data.tags["synpref.model_version"] == first["model_version"]
    assert "score_margins.png" in {
        a.path for a in mlflow.MlflowClient().list_artifacts(first["run_id"])
    }


def test_a_second_model_scores_the_same_pairs_separately(config, ingested, lake, ray_cluster):
    ingested(config, hh=HH_HARMLESS)
    result = jobs.score(config, "heuristic:length", where=FEW).as_dict()
    assert result["scored"] == lake.count("pairs", where=FEW)
    rows = lake.read("rm_scores", columns=["r_chosen", "model_name"]).to_pylist()
    assert {r["model_name"] for r in rows} == {"heuristic:length"}
    assert all(r["r_chosen"] >= 1 for r in rows), "the length of a non-empty response"


def test_bad_selection_is_a_clear_error(config, ingested, lake, ray_cluster):
    ingested(config, hh=HH_HARMLESS)
    with pytest.raises(ValueError, match="not a SQL predicate on pairs"):
        jobs.score(config, "heuristic:length", where="no_such_column = 1").as_dict()
    config.scoring.actors = 2  # 2 x 1 CPU on the 2-CPU test cluster: reads would starve
    with pytest.raises(ValueError, match="take 2 of 2 CPUs"):
        jobs.score(config, "heuristic:length").as_dict()


def test_the_length_read_is_the_smallest_limit_and_cuts_keep_special_tokens(encoder_rm):
    """MiniLM embeds 512 positions: asking for 4096 (the default) reads 512, never more."""
    model = RewardModel(encoder_rm, max_length=4096)
    assert model.max_length == 512
    assert RewardModel(encoder_rm, max_length=100).max_length == 100
    assert RewardModel(encoder_rm, max_length=None).max_length == 512

    tokenizer = model._tokenizer
    ids, full = encode(tokenizer, ["word " * 1000 + "final", "short"], 512)
    assert full[0] > 512 and len(ids[0]) == 512 and full[1] == len(ids[1]) < 10
    assert ids[0][0] == tokenizer.cls_token_id and ids[0][-1] == tokenizer.sep_token_id
    assert tokenizer.convert_ids_to_tokens(ids[0][-2]) == "final", "the end is kept"

    long = [
        {"role": "user", "content": "tell me more " * 800},
        {"role": "assistant", "content": "ok"},
    ]
    scores = model.score([long, long[-1:]])
    assert scores.truncated.tolist() == [True, False] and scores.tokens[0] == 512
