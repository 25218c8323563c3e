"""LLM judging throughput: `synpref judge` vs the same model driven directly by its engine.

    python benchmarks/judge_bench.py --pairs 16 --batch-size 8

Both judge the same JudgeBench pairs (the ``--pairs`` with the smallest pair_id, as
``synpref judge --limit`` picks them), in both orders, with the same prompts (the
``pairwise-v1`` template, logprob verdicts) and the same engine (SmolLM2-135M-Instruct, offline
GGUF, transformers ``generate`` through ``HFBackend``), on this machine:

- ``synpref``: the whole `synpref judge` job on a fresh lake: select the pairs, find the missing
  judgments, a Ray Data actor pool (2 actors, 0.5 CPU and one torch thread each), the
  `judgments` merge, the verdicts and the quality metrics, the MLflow run;
- ``engine``: one process with two torch threads calling ``HFBackend.generate`` on all the
  prompts at once (the model loaded before the clock starts), no reads, writes or parsing.

Results go to ``benchmarks/out/judge_bench.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest_bench import job_bench_config, report

from pipelines import jobs
from pipelines.core.config import JudgeConfig
from pipelines.core.lake import Lake
from pipelines.ingest.job import IngestRequest
from pipelines.judging.identity import JudgeIdentity
from pipelines.judging.prompts import judge_prompt
from pipelines.llm.backends import HFBackend
from storage_schemas import JUDGE_ORDERS

JUDGEBENCH = Path(__file__).resolve().parents[2] / "shared/data/JudgeBench/data"
WHERE = "source = 'judgebench'"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8, help="requests per Ray Data batch")
    args = parser.parse_args()

    judge = JudgeConfig(actors=2, num_cpus=0.5, batch_size=args.batch_size)
    config = job_bench_config("judge-bench")
    config.judging.judges = [judge]
    jobs.ingest(config, IngestRequest([str(JUDGEBENCH)], source="judgebench"))

    started = time.perf_counter()
    summary = jobs.judge(config, where=WHERE, limit=args.pairs).as_dict()
    synpref_seconds = time.perf_counter() - started
    ray.shutdown()
    run = summary["judges"][0]

    lake = Lake(config.lake.root)
    pairs = (
        lake.read("pairs", columns=["pair_id", "history", "chosen", "rejected"], where=WHERE)
        .sort_by("pair_id")
        .slice(0, args.pairs)
        .to_pylist()
    )
    identity = JudgeIdentity.of(judge)
    prompts = [
        judge_prompt(identity, p["history"], p["chosen"], p["rejected"], order)
        for p in pairs
        for order in JUDGE_ORDERS
    ]
    torch.set_num_threads(2)
    backend = HFBackend(judge)
    started = time.perf_counter()
    generations = backend.generate(prompts, identity.sampling(0))
    engine_seconds = time.perf_counter() - started

    n = len(pairs)
    engine_output = sum(g.output_tokens for g in generations)
    results = {
        "pairs": n,
        "judgments": len(prompts),
        "prompt_tokens": sum(g.prompt_tokens for g in generations),
        "synpref": {
            "seconds": synpref_seconds,
            "judge_stage_seconds": run["seconds"],
            "pairs_per_s": n / synpref_seconds,
            "output_tokens_per_s": run["output_tokens"] / synpref_seconds,
        },
        "engine": {
            "seconds": engine_seconds,
            "pairs_per_s": n / engine_seconds,
            "output_tokens_per_s": engine_output / engine_seconds,
        },
        "batch_size": args.batch_size,
        "quality": summary["quality"],
    }
    results["ratio"] = results["synpref"]["pairs_per_s"] / results["engine"]["pairs_per_s"]
    report("judge_bench", results)


if __name__ == "__main__":
    main()
