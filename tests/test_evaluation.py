"""Reward-model evaluation: each benchmark's own rules, golden numbers, bad inputs, the job."""

import dataclasses
import json

import mlflow
import numpy as np
import pytest

from pipelines import jobs
from pipelines.rm.evaluation import (
    EvalDataError,
    EvalItem,
    ItemScores,
    bestofn_metrics,
    conversations,
    evaluate,
    file_scores,
    judgebench_correct,
    judgebench_metrics,
    judgebench_verdicts,
    load_items,
    model_scores,
    rewardbench_metrics,
)
from pipelines.rm.model import RewardModel
from tests.conftest import JUDGEBENCH, RM_BENCH, shared_data, store_flags, synpref_json

JUDGEBENCH_OUTPUTS = {  # the official sample-weighted accuracies of the committed outputs
    "Skywork_Skywork-Reward-Gemma-2-27B": 64.3,
    "Skywork_Skywork-Reward-Llama-3.1-8B": 62.3,
    "internlm_internlm2-20b-reward": 63.4,
    "internlm_internlm2-7b-reward": 59.4,
    "Ray2333_GRM-Gemma-2B-rewardmodel-ft": 59.4,
}


@pytest.mark.parametrize(("judge", "official"), JUDGEBENCH_OUTPUTS.items())
def test_judgebench_outputs_reproduce_the_official_accuracies(judge, official):
    data = shared_data(JUDGEBENCH)
    outputs = data.parent.parent / "outputs"
    scores = next(outputs.glob(f"*judge_model={judge}.jsonl"))
    items = load_items("judgebench", str(data))
    result = evaluate("judgebench", items, file_scores(items, str(scores)))
    assert round(result.metrics["accuracy"], 1) == official
    assert {r["category"] for r in result.categories} == {
        "knowledge",
        "reasoning",
        "math",
        "coding",
    }
    means = [r["accuracy"] for r in result.categories]
    assert result.metrics["category_mean"] == pytest.approx(np.mean(means))


def test_judgebench_rule_a_tie_counts_for_b_in_each_order():
    assert judgebench_verdicts(2.0, 1.0) == ["A>B", "B>A"]  # consistent: A wins both orders
    assert judgebench_verdicts(1.0, 1.0) == ["B>A", "B>A"]  # a tie: B in each order
    assert judgebench_correct("A>B", ["A>B", "B>A"])
    assert not judgebench_correct("B>A", judgebench_verdicts(1.0, 1.0)), "one vote each way"
    assert judgebench_correct("B>A", ["B>A", "B>A"]) is False
    assert judgebench_correct("A>B", ["A>B"]), "a single-order judge"


def item(id_, category="all", chosen=("good",), rejected=("bad",)):
    return EvalItem(id_, category, [{"role": "user", "content": "q"}], list(chosen), list(rejected))


def test_rewardbench_strict_accuracy_and_section_weighting():
    items = [item(f"m{i}", "math-prm") for i in range(2)] + [item("c", "hep-cpp")]
    items += [item("a", "alpacaeval-easy")]
    scores = {
        "m0": ItemScores([1.0], [0.0]),
        "m1": ItemScores([0.0], [0.0]),  # a tie is wrong
        "c": ItemScores([1.0], [0.5]),
        "a": ItemScores([0.0], [1.0]),
    }
    result = rewardbench_metrics(items, scores)
    # Reasoning: math-prm 50% weighted as 984 examples, hep-cpp 100% weighted by its 1 example
    reasoning = (50 * 984 + 100 * 1) / 985
    assert result.metrics["section.Reasoning"] == pytest.approx(reasoning)
    assert result.metrics["section.Chat"] == 0
    assert result.metrics["score"] == pytest.approx((reasoning + 0) / 2)
    constant = {k: ItemScores([1.0], [1.0]) for k in scores}
    assert rewardbench_metrics(items, constant).metrics["score"] == 0


def test_judgebench_accuracy_per_category_by_hand():
    """Sample-weighted accuracy over all items, each category's own, and their plain mean.
    A tie is a vote each way (B in both orders), so wrong whichever response is better."""
    jb = [
        (item("k1", "knowledge"), "A>B", ItemScores([2.0], [1.0])),  # right
        (item("k2", "knowledge"), "B>A", ItemScores([3.0], [0.0])),  # right
        (item("k3", "knowledge"), "A>B", ItemScores([0.0], [1.0])),  # wrong
        (item("m1", "math"), "B>A", ItemScores([2.0], [1.0])),  # right, the better shown as B
        (item("c1", "coding"), "B>A", ItemScores([1.0], [1.0])),  # a tie: wrong
        (item("c2", "coding"), "A>B", None),  # published verdicts, B in both orders: wrong
    ]
    items = [dataclasses.replace(i, label=label) for i, label, _ in jb]
    scores = {i.id: s or ItemScores([0.0], [0.0], ["B>A", "B>A"]) for i, _, s in jb}
    result = judgebench_metrics(items, scores)
    assert result.categories == [
        {"category": "coding", "items": 2, "accuracy": 0.0},
        {"category": "knowledge", "items": 3, "accuracy": pytest.approx(200 / 3)},
        {"category": "math", "items": 1, "accuracy": 100.0},
    ]
    assert result.metrics["accuracy"] == pytest.approx(300 / 6)
    assert result.metrics["category_mean"] == pytest.approx((0 + 200 / 3 + 100) / 3)
    assert result.metrics["category.knowledge"] == pytest.approx(200 / 3)


def test_best_of_n_needs_the_best_to_beat_every_loser():
    items = [item("x", rejected=("r1", "r2", "r3")), item("y", rejected=("r1", "r2", "r3"))]
    scores = {"x": ItemScores([2.0], [1.0, 1.9, 0.0]), "y": ItemScores([2.0], [1.0, 2.5, 0.0])}
    result = bestofn_metrics(items, scores)
    assert result.metrics["accuracy"] == 50


def test_model_scores_split_back_per_item_in_order():
    items = [item("x", chosen=("a", "b"), rejected=("c",)), item("y")]
    assert len(conversations(items)) == 5
    scores = model_scores(items, [1, 2, 3, 4, 5])
    assert (scores["x"].chosen, scores["x"].rejected, scores["y"].rejected) == ([1, 2], [3], [5])
    with pytest.raises(EvalDataError, match="do not match"):
        model_scores(items, [1, 2])


@pytest.mark.parametrize(
    ("records", "message"),
    [
        (['{"id": 1, "prompt": "q", "chosen": "a"'], "record 0: malformed JSON"),
        (['{"id": 1, "prompt": "q", "chosen": "a"}'], "record 0: 'rejected' is missing"),
        (['{"id": 1, "prompt": "q", "chosen": "a", "rejected": 3}'], "must be a string"),
        (['{"id": 1, "prompt": "q", "chosen": [], "rejected": "b"}'], "empty list"),
        (
            ['{"id": 1, "prompt": "q", "chosen": "a", "rejected": "b"}'] * 2,
            "appears more than once",
        ),
        (["[1, 2]"], "expected a JSON object"),
        ([], "no items to evaluate"),
    ],
)
def test_bad_benchmark_records_name_file_and_record(tmp_path, records, message):
    path = tmp_path / "bench.jsonl"
    path.write_text("\n".join(records) + "\n")
    with pytest.raises(EvalDataError, match=message):
        load_items("rewardbench", str(path))


def test_an_unknown_benchmark_and_a_bad_judgebench_label_are_named(tmp_path):
    path = tmp_path / "judgebench.jsonl"
    record = {"pair_id": "p1", "question": "q", "response_A": "a", "response_B": "b"}
    path.write_text(json.dumps(record | {"label": "A=B"}) + "\n")
    with pytest.raises(EvalDataError, match="record 0: label must be 'A>B' or 'B>A', got 'A=B'"):
        load_items("judgebench", str(path))
    with pytest.raises(EvalDataError, match="unknown benchmark 'rmbnech'; expected one of"):
        load_items("rmbnech", str(path))


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"id": "1", "chosen": 1.0, "rejected": 0.5}'], "no scores for 1 of 2 items"),
        (['{"id": "9", "chosen": 1.0, "rejected": 0.5}'], "'9' is not an item"),
        (['{"id": "1", "chosen": [1.0, 2.0], "rejected": 0.5}'], "2 chosen and 1 rejected"),
        (['{"id": "1", "chosen": "high", "rejected": 0.5}'], "must hold numbers"),
        (['{"id": "1", "chosen": 1, "rejected": 0}'] * 2, "scored more than once"),
    ],
)
def test_bad_scores_files_are_refused_with_the_reason(tmp_path, lines, message):
    data = tmp_path / "bench.jsonl"
    data.write_text(
        "".join(
            json.dumps({"id": i, "prompt": "q", "chosen": "a", "rejected": "b"}) + "\n"
            for i in ("1", "2")
        )
    )
    scores = tmp_path / "scores.jsonl"
    scores.write_text("\n".join(lines) + "\n")
    items = load_items("rewardbench", str(data))
    with pytest.raises(EvalDataError, match=message):
        file_scores(items, str(scores))


def test_rmbench_length_heuristic_gives_the_style_bias_baseline(config, ray_cluster):
    """The response-length scorer on the 798 RM-Bench prompts (3x3 styles each) is the known
    style-bias baseline: it wins easily when the chosen response is the more styled (longer)
    one, and mostly loses the hard cells (plain chosen vs styled rejected): easy 86.34,
    normal 40.35, hard 13.20."""
    data = shared_data(RM_BENCH)
    result = jobs.evaluate(config, "rmbench", str(data), model="heuristic:length").as_dict()
    metrics = result["metrics"]
    assert result["items"] == 798
    assert (round(metrics["easy"], 2), round(metrics["normal"], 2), round(metrics["hard"], 2)) == (
        86.34,
        40.35,
        13.20,
    )
    assert {c["category"] for c in result["categories"]} == {"chat", "code", "safety"}
    run = mlflow.get_run(result["run_id"])
    assert run.data.metrics["hard"] == pytest.approx(metrics["hard"])
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "eval")}
    assert artifacts >= {
        "eval/categories.json",
        "eval/scores.jsonl",
        "eval/score_distributions.png",
        "eval/accuracy_by_category.png",
    }


def test_a_model_scored_on_ray_gives_the_same_scores_as_in_process(config, ray_cluster, decoder_rm):
    data = shared_data(JUDGEBENCH)
    config.scoring.max_length = 256
    result = jobs.evaluate(config, "judgebench", str(data), model=decoder_rm).as_dict()
    assert result["items"] == 350
    run = mlflow.get_run(result["run_id"])
    assert run.data.metrics["scoring.truncated"] > 0, "JudgeBench answers exceed 256 tokens"
    assert run.data.tags["synpref.model_version"]
    logged = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/eval/scores.jsonl")
    lines = [json.loads(line) for line in logged.splitlines()]
    assert len(lines) == 350
    by_id = {i.id: i for i in load_items("judgebench", str(data))}
    model = RewardModel(decoder_rm, max_length=256)
    for line in lines[:4]:
        direct = model.score(by_id[line["id"]].conversations()).rewards.tolist()
        assert line["chosen"] + line["rejected"] == pytest.approx(direct, abs=1e-5)
    # For a reward model JudgeBench's two-order rule comes down to: right when the chosen
    # response scores above the rejected one (a tie loses a vote in each order).
    right = [line["chosen"][0] > line["rejected"][0] for line in lines]
    assert result["metrics"]["accuracy"] == pytest.approx(100 * sum(right) / len(right))


def test_an_offline_rm_on_rmbench_and_its_scores_artifact_evaluate_again(
    config, ray_cluster, tmp_path, encoder_rm
):
    data = shared_data(RM_BENCH) / "chat_filtered.json"
    config.scoring.max_length = 128
    first = jobs.evaluate(config, "rmbench", str(data), model=encoder_rm).as_dict()
    assert first["items"] == 129
    assert {"easy", "normal", "hard", "average"} <= first["metrics"].keys()
    saved = mlflow.artifacts.download_artifacts(
        f"runs:/{first['run_id']}/eval/scores.jsonl", dst_path=str(tmp_path)
    )
    again = jobs.evaluate(config, "rmbench", str(data), scores=saved).as_dict()
    assert again["metrics"] == first["metrics"]


def test_model_and_scores_are_exclusive(config):
    with pytest.raises(EvalDataError, match="exactly one"):
        jobs.evaluate(config, "rmbench", "x", model="heuristic:length", scores="y").as_dict()
    with pytest.raises(ValueError, match="unknown heuristic"):
        RewardModel("heuristic:coin")


@pytest.mark.parametrize(
    ("judgments", "message"),
    [
        ([], "non-empty list"),
        ([{"decision": "A>B"}], "judgment.scores"),
        ("A>B", "non-empty list"),
    ],
)
def test_bad_judgebench_outputs_are_refused(tmp_path, judgments, message):
    data = tmp_path / "judgebench.jsonl"
    record = {"pair_id": "p1", "question": "q", "response_A": "a", "response_B": "b"}
    data.write_text(json.dumps(record | {"label": "A>B", "source": "livebench-math"}) + "\n")
    scores = tmp_path / "outputs.jsonl"
    scores.write_text(json.dumps({"pair_id": "p1", "judgments": judgments}) + "\n")
    items = load_items("judgebench", str(data))
    with pytest.raises(EvalDataError, match=message):
        file_scores(items, str(scores))


def _rmb_message(text):
    return [{"content": text, "language": "English", "role": "user"}]


RMB_BON = [  # RMB's BoN_set layout (RMB_dataset/BoN_set/*/*.json), written here: no benchmark data
    {
        "conversation_input": _rmb_message("How do I keep basil alive indoors?"),
        "bon_best": {"llm_name": "m1", "answer": "Give it six hours of sun and water it often."},
        "loser_list": [
            {"llm_name": "m2", "answer": "No."},
            {"llm_name": "m3", "answer": "Basil is a plant."},
        ],
        "bon_uid": "1",
        "category_path": "BoN_set/Helpfulness/Chat/Casual Conversation",
    },
    {
        "conversation_input": _rmb_message("Name a prime number above 10."),
        "bon_best": {"llm_name": "m1", "answer": "11."},
        "loser_list": [{"llm_name": "m2", "answer": "Twelve is prime, as is every even number."}],
        "bon_uid": "2",
        "category_path": "BoN_set/Helpfulness/Reasoning/Logical Deduction",
    },
]
RMB_BON_MAP = [
    "prompt=conversation_input",
    "chosen=bon_best.answer",
    "rejected=loser_list[*].answer",
    "id=bon_uid",
    "category=category_path",
]
RMB_PAIRWISE_MAP = [
    "prompt=conversation_input",
    "chosen=chosen.answer",
    "rejected=reject.answer",
    "id=pair_uid",
    "category=category_path",
]


def test_rmb_best_of_n_layout_evaluates_through_the_cli_with_field_mappings(
    config, ray_cluster, tmp_path
):
    from click.testing import CliRunner

    from ray_jobs.cli import cli

    data = tmp_path / "S1.json"
    data.write_text(json.dumps(RMB_BON))
    flags = store_flags(config)
    mapping = [arg for spec in RMB_BON_MAP for arg in ("--map", spec)]
    args = [*flags, "eval", "bestofn", "--data", str(data), "--model", "heuristic:length", *mapping]
    summary = synpref_json(*args)
    assert summary["items"] == 2
    # The longest answer wins: the best is longest in item 1, not in item 2.
    assert summary["metrics"]["accuracy"] == 50.0
    assert {c["category"] for c in summary["categories"]} == {
        "BoN_set/Helpfulness/Chat/Casual Conversation",
        "BoN_set/Helpfulness/Reasoning/Logical Deduction",
    }
    unmapped = CliRunner().invoke(
        cli, [*flags, "eval", "bestofn", "--data", str(data), "--model", "heuristic:length"]
    )
    assert unmapped.exit_code == 1 and "'prompt' is missing" in unmapped.output
    bad = [*args[:-2], "--map", "rejected=loser_list.answer"]
    failed = CliRunner().invoke(cli, bad)
    assert failed.exit_code == 1 and "field path 'loser_list.answer' not found" in failed.output


def test_rmb_pairwise_layout_maps_to_items(tmp_path):
    record = {
        "pair_uid": "14587",
        "conversation_input": _rmb_message("Is the sun a star?"),
        "chosen": {"llm_name": "a", "answer": "Yes, a G-type star.", "score": 4.5},
        "reject": {"llm_name": "b", "answer": "No, it is a planet.", "score": 2.5},
        "category_path": "Pairwise_set/Helpfulness/Open QA/Factual",
    }
    data = tmp_path / "Factual.json"
    data.write_text(json.dumps([record]))
    from pipelines.ingest.formats import parse_mapping
    from pipelines.rm.benchmarks import EVAL_MAPPING_TARGETS

    mapping = parse_mapping(RMB_PAIRWISE_MAP, EVAL_MAPPING_TARGETS)
    (item,) = load_items("rewardbench", str(data), mapping)
    assert (item.id, item.chosen, item.rejected) == (
        "14587",
        ["Yes, a G-type star."],
        ["No, it is a planet."],
    )
    assert item.prompt == [{"role": "user", "content": "Is the sun a star?"}]
    (judged,) = load_items("judgebench", str(data), mapping)
    assert judged.label == "A>B"
    with pytest.raises(EvalDataError, match="3 chosen and 3 rejected"):
        load_items("rmbench", str(data), mapping)
    with pytest.raises(EvalDataError, match="needs prompt"):
        load_items(
            "rewardbench", str(data), {"chosen": "chosen.answer", "rejected": "reject.answer"}
        )
