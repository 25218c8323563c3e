"""Reward API throughput and latency: Ray Serve with dynamic batching vs a single-process
FastAPI server scoring each request on its own (the design of OpenRLHF's ``serve_rm``).

    python benchmarks/serve_bench.py --requests 1000 --concurrency 32

Same model (offline all-MiniLM-L6-v2 with a one-output head, max length 256), same machine,
same run, same load: ``--requests`` POSTs of one HH-RLHF pair each from ``--concurrency``
concurrent clients over the loopback.

- ``serve``: `synpref serve`'s app: ``--replicas`` replicas of the API (default one per
  core, one torch thread each), each holding the model, ``@serve.batch`` (up to 32 requests
  per call), length-sorted token-budget forward passes;
- ``fastapi``: uvicorn + FastAPI in one process (torch on 2 threads), each request's
  conversations scored as one batch as it arrives, one request at a time (the tokenizer is not
  thread-safe).

Results (requests/s, p50/p95 latency) go to ``benchmarks/out/serve_bench.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import multiprocessing
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import ray
from ray import serve

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest_bench import report
from score_bench import HH, reward_model

from pipelines.core.config import load_config
from pipelines.ingest.formats import Limits, Pair, convert
from pipelines.rm.serving import reward_app

MAX_LENGTH = 256
CPUS = 2
"""The cores of the machine the benchmark was written for; both servers get them all."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def request_bodies(count: int) -> list[dict]:
    """One valid HH-RLHF pair per request body (cycled when ``count`` exceeds the file)."""
    with gzip.open(HH, "rt") as lines:
        records = [json.loads(line) for line in lines]
    pairs = [
        {"prompt": p.history, "chosen": p.chosen, "rejected": p.rejected}
        for record in records
        for p in convert(record, "hh", Limits())
        if isinstance(p, Pair)
    ]
    return [{"pairs": [pairs[i % len(pairs)]]} for i in range(count)]


def baseline_server(model_path: str, port: int) -> None:
    """A FastAPI app that scores each request's conversations as it comes, in one process."""
    import torch
    import uvicorn
    from fastapi import FastAPI

    from pipelines.rm.model import RewardModel, pair_conversations

    torch.set_num_threads(2)
    model = RewardModel(model_path, max_length=MAX_LENGTH)
    # FastAPI runs a sync endpoint on a thread pool, and a Hugging Face tokenizer is not
    # thread-safe (a request lost its truncation to another's call and failed): one at a time.
    one_at_a_time = threading.Lock()
    app = FastAPI()

    @app.post("/v1/score")
    def score(body: dict) -> dict:
        prompts, chosen, rejected = zip(
            *((p["prompt"], p["chosen"], p["rejected"]) for p in body["pairs"]), strict=True
        )
        conversations = pair_conversations(prompts, chosen, rejected)
        with one_at_a_time:
            return {"rewards": model.score(conversations).rewards.tolist()}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


async def load(url: str, bodies: list[dict], concurrency: int) -> dict:
    latencies: list[float] = []
    errors = 0
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300) as client:

        async def one(body: dict) -> None:
            nonlocal errors
            async with gate:
                started = time.perf_counter()
                reply = await client.post("/v1/score", json=body)
                latencies.append(time.perf_counter() - started)
                errors += reply.status_code != 200

        await client.post("/v1/score", json=bodies[0])  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        seconds = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "seconds": seconds,
        "requests_per_s": len(bodies) / seconds,
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "errors": errors,
    }


def wait_until_up(url: str) -> None:
    for _ in range(600):
        try:
            httpx.get(f"{url}/docs", timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up")


def measure_fastapi(model: str, bodies: list[dict], concurrency: int) -> dict:
    port = free_port()
    server = multiprocessing.get_context("spawn").Process(
        target=baseline_server, args=(model, port), daemon=True
    )
    server.start()
    wait_until_up(f"http://127.0.0.1:{port}")
    result = asyncio.run(load(f"http://127.0.0.1:{port}", bodies, concurrency))
    server.terminate()
    return result


def measure_serve(model: str, bodies: list[dict], concurrency: int, replicas: int) -> dict:
    """The reward app with ``replicas`` replicas sharing the CPUs (one torch thread per CPU)."""
    port = free_port()
    config = load_config(
        None,
        {
            "scoring": {"max_length": MAX_LENGTH, "num_cpus": CPUS / replicas},
            "serving": {"port": port, "replicas": replicas},
        },
    )
    ray.init(num_cpus=CPUS, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(reward_app({"rm": model}, config.scoring, config.serving), route_prefix="/")
    result = asyncio.run(load(f"http://127.0.0.1:{port}", bodies, concurrency))
    serve.shutdown()
    ray.shutdown()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--replicas", type=int, default=CPUS, help="Serve replicas sharing the CPUs"
    )
    args = parser.parse_args()
    model = reward_model()
    bodies = request_bodies(args.requests)
    results = {"requests": len(bodies), "concurrency": args.concurrency, "replicas": args.replicas}
    results["fastapi"] = measure_fastapi(model, bodies, args.concurrency)
    print("fastapi:", results["fastapi"])
    results["serve"] = measure_serve(model, bodies, args.concurrency, args.replicas)
    print("serve:", results["serve"])
    results["ratio_requests_per_s"] = (
        results["serve"]["requests_per_s"] / results["fastapi"]["requests_per_s"]
    )
    report("serve_bench", results)


if __name__ == "__main__":
    main()
