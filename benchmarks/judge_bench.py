"""LLM judging throughput: `synpref judge` vs the same model driven directly by its engine.

    python benchmarks/judge_bench.py --pairs 16 --batch-size 8
    HF_HUB_OFFLINE=1 .venv-vllm/bin/python benchmarks/judge_bench.py --backend vllm --pairs 64

All paths judge the same JudgeBench pairs (the ``--pairs`` with the smallest pair_id, as
``synpref judge --limit`` picks them), in both orders, with the same prompts (the
``pairwise-v1`` template, logprob verdicts: one output token) and the same engine settings,
on this machine.

``--backend hf`` (SmolLM2-135M-Instruct, offline GGUF, transformers ``generate``):

- ``synpref``: the whole `synpref judge` job on a fresh lake: select the pairs, find the missing
  judgments, a Ray Data actor pool (2 actors, 0.5 CPU and one torch thread each), the
  `judgments` merge, the verdicts and the quality metrics, the MLflow run;
- ``engine``: one process with two torch threads calling ``HFBackend.generate`` on all the
  prompts at once (the model loaded before the clock starts), no reads, writes or parsing.

``--backend vllm`` (the same SmolLM2 as an HF folder, vLLM from ``make test-vllm``'s
``.venv-vllm``; ``VLLM_CPU_KVCACHE_SPACE`` 2 GB unless set):

- ``engine``: bare ``vllm.LLM.generate`` on the token ids of all prompts, both orders of a pair
  adjacent (loaded before the clock; the load is reported apart), with prefix caching on and
  off; and with caching on, one order alone and both orders one after the other (all AB, then
  all BA): the cost of the second order;
- ``synpref``: the whole `synpref judge` job with the ``vllm`` backend (one actor, 1 CPU), its
  judge stage (engine start included) and the time inside the actor's calls;
- ``ray_data_llm``: ``ray.data.llm``'s vLLM processor (``build_processor``) on the same token
  ids and sampling, on a local Ray of 8 logical CPUs (its stages need them on 2 cores).

Results go to ``benchmarks/out/judge_bench.json``.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest_bench import SHARED, job_bench_config, report

from pipelines import jobs
from pipelines.core.config import JudgeConfig
from pipelines.core.lake import Lake
from pipelines.ingest.job import IngestRequest
from pipelines.judging.identity import JudgeIdentity
from pipelines.judging.prompts import judge_prompt
from pipelines.llm.backends import HFBackend, prompt_token_ids, resolve_llm, vllm_sampling
from storage_schemas import JUDGE_ORDERS

JUDGEBENCH = SHARED / "JudgeBench" / "data"
WHERE = "source = 'judgebench'"
VLLM_ENGINE = {"gpu_memory_utilization": 0.4, "max_model_len": 8192, "seed": 0}
"""The engine settings of every vLLM path (CPU: the memory share sizes host memory)."""
VLLM_PATHS = ["engine", "no_caching", "synpref", "ray_data_llm"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=None, help="requests per Ray Data batch")
    parser.add_argument(
        "--paths", nargs="+", choices=VLLM_PATHS, default=VLLM_PATHS, help="vllm: what to run"
    )
    args = parser.parse_args()
    if args.backend == "vllm":
        vllm_bench(args.pairs, args.batch_size or 64, args.paths)
    else:
        hf_bench(args.pairs, args.batch_size or 8)


def judge_job(
    judge: JudgeConfig, pairs: int, name: str, run: bool = True
) -> tuple[dict, float, list[dict]]:
    """(summary, seconds) of `synpref judge` on a fresh lake (``{}``, 0 unless ``run``), and
    the pairs it judges. ``actor_seconds``: the time inside the actors' calls."""
    config = job_bench_config(name)
    config.judging.judges = [judge]
    jobs.ingest(config, IngestRequest([str(JUDGEBENCH)], source="judgebench"))
    lake = Lake(config.lake.root)
    summary, seconds = {}, 0.0
    if run:
        started = time.perf_counter()
        summary = jobs.judge(config, where=WHERE, limit=pairs).as_dict()
        seconds = time.perf_counter() - started
        actor = lake.read("judgments", columns=["seconds"])["seconds"]
        summary["actor_seconds"] = sum(actor.to_pylist())
    ray.shutdown()
    rows = lake.read("pairs", columns=["pair_id", "history", "chosen", "rejected"], where=WHERE)
    return summary, seconds, rows.sort_by("pair_id").slice(0, pairs).to_pylist()


def both_orders(judge: JudgeConfig, pairs: list[dict]) -> list[list[dict]]:
    """The job's prompts, both orders of a pair adjacent (AB, BA, AB, BA, ...)."""
    identity = JudgeIdentity.of(judge)
    return [
        judge_prompt(identity, p["history"], p["chosen"], p["rejected"], order)
        for p in pairs
        for order in JUDGE_ORDERS
    ]


def hf_bench(n_pairs: int, batch_size: int) -> None:
    judge = JudgeConfig(actors=2, num_cpus=0.5, batch_size=batch_size)
    summary, synpref_seconds, pairs = judge_job(judge, n_pairs, "judge-bench")
    run = summary["judges"][0]
    prompts = both_orders(judge, pairs)
    torch.set_num_threads(2)
    backend = HFBackend(judge)
    started = time.perf_counter()
    generations = backend.generate(prompts, JudgeIdentity.of(judge).sampling(0))
    engine_seconds = time.perf_counter() - started

    n = len(pairs)
    engine_output = sum(g.output_tokens for g in generations)
    results = {
        "backend": "hf",
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
        "batch_size": batch_size,
        "quality": summary["quality"],
    }
    results["ratio"] = results["synpref"]["pairs_per_s"] / results["engine"]["pairs_per_s"]
    report("judge_bench", results)


def shared_prefix(a: list[int], b: list[int]) -> int:
    """Tokens the two prompts share from the start: what prefix caching can reuse."""
    differ = (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    return next(differ, min(len(a), len(b)))


def rate(n_pairs: int, tokens: int, seconds: float) -> dict[str, float]:
    return {
        "seconds": seconds,
        "pairs_per_s": n_pairs / seconds,
        "prompt_tokens_per_s": tokens / seconds,
    }


def vllm_bench(n_pairs: int, batch_size: int, paths: list[str]) -> None:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    model = resolve_llm(JudgeConfig().model)  # a plain HF folder: vLLM and the tokenizer
    judge = JudgeConfig(
        name="vllm-smol", backend="vllm", model=model, actors=1, num_cpus=1,
        batch_size=batch_size, **VLLM_ENGINE,
    )  # fmt: skip
    summary, seconds, pairs = judge_job(judge, n_pairs, "judge-bench-vllm", "synpref" in paths)
    ids = prompt_token_ids(AutoTokenizer.from_pretrained(model), both_orders(judge, pairs))
    ab, ba = ids[0::2], ids[1::2]
    n, tokens = len(pairs), sum(map(len, ids))
    shared = sum(shared_prefix(a, b) for a, b in zip(ab, ba, strict=True))
    results: dict = {
        "backend": "vllm",
        "pairs": n,
        "judgments": len(ids),
        "prompt_tokens": tokens,
        "shared_prefix_tokens": shared,
        "both_vs_one_order_bound": (tokens - shared) / sum(map(len, ab)),
        "batch_size": batch_size,
    }
    if summary:
        run = summary["judges"][0]
        results["synpref"] = rate(n, tokens, seconds) | {
            "judge_stage": rate(n, tokens, run["seconds"]),
            "actor_calls": rate(n, tokens, summary["actor_seconds"]),
            "quality": summary["quality"],
        }

    sampling = vllm_sampling(JudgeIdentity.of(judge).sampling(0))  # as the job samples
    params = SamplingParams(**sampling)

    def timed(llm: LLM, prompts: list[list[int]]) -> float:
        llm.reset_prefix_cache()
        started = time.perf_counter()
        llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return time.perf_counter() - started

    for key, caching in (("engine", True), ("no_caching", False)):
        if key not in paths:
            continue
        started = time.perf_counter()
        llm = LLM(model=model, enable_prefix_caching=caching, **VLLM_ENGINE)
        load = time.perf_counter() - started
        both, one = timed(llm, ids), timed(llm, ab)
        results[key] = rate(n, tokens, both) | {
            "load_seconds": load,
            "one_order_seconds": one,
            "both_vs_one_order": both / one,
        }
        if caching:  # all AB, then all BA: the second order after the first has left the cache
            apart = timed(llm, ab + ba)
            results[key] |= {"orders_apart_seconds": apart, "orders_apart_vs_one": apart / one}
        del llm
        gc.collect()

    if "ray_data_llm" in paths:
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
        try:
            seconds_data_llm = ray_data_llm(model, ids, sampling, batch_size)
            results["ray_data_llm"] = rate(n, tokens, seconds_data_llm)
        except Exception as exc:  # reported; the other paths stand
            results["ray_data_llm"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        ray.shutdown()

    if "engine" in results:  # pairs/s relative to the bare engine (its load not counted)
        bare, load = results["engine"]["seconds"], results["engine"]["load_seconds"]
        ratios = {}
        if summary:
            ratios |= {
                "synpref_whole": bare / seconds,
                "synpref_judge_stage": bare / run["seconds"],
                "synpref_judge_stage_less_load": bare / (run["seconds"] - load),
                "synpref_actor_calls": bare / summary["actor_seconds"],
            }
        if "seconds" in results.get("ray_data_llm", {}):
            data_llm = results["ray_data_llm"]["seconds"]
            ratios |= {
                "ray_data_llm": bare / data_llm,
                "ray_data_llm_less_load": bare / (data_llm - load),
            }
        results["ratios_to_engine"] = ratios
    report("judge_bench", results)


def ray_data_llm(model: str, ids: list[list[int]], sampling: dict, batch_size: int) -> float:
    """Seconds of ``ray.data.llm``'s vLLM processor on the token ids (engine start included:
    the processor starts its engine in the pipeline), on a CPU placement group."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    config = vLLMEngineProcessorConfig(
        model_source=model,
        engine_kwargs={"enable_prefix_caching": True, "distributed_executor_backend": "uni"}
        | VLLM_ENGINE,
        placement_group_config={"bundles": [{"CPU": 1}]},
        batch_size=batch_size,
        concurrency=1,
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
    )
    processor = build_processor(
        config,
        preprocess=lambda row: {"tokenized_prompt": row["ids"], "sampling_params": sampling},
        postprocess=lambda row: {"tokens": row["num_input_tokens"]},
    )
    dataset = ray.data.from_items([{"ids": p} for p in ids])
    started = time.perf_counter()
    out = processor(dataset).take_all()
    seconds = time.perf_counter() - started
    assert sum(r["tokens"] for r in out) == sum(map(len, ids)), "ray.data.llm: token counts differ"
    return seconds


if __name__ == "__main__":
    main()
