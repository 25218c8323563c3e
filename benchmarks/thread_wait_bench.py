"""Two torch trainings side by side on this machine's cores, by OpenMP wait policy.

    python benchmarks/thread_wait_bench.py --seconds 20

Each run is MiniLM (the default backbone) taking AdamW steps on 16 x 128 tokens with torch's
default threads, in a process of its own: one alone, then two started together, with the
default OpenMP wait policy (idle threads spin), ``OMP_WAIT_POLICY=PASSIVE`` (they sleep),
GNU OpenMP's spin shortened (``GOMP_SPINCOUNT``; the default spins about 300,000 times) and
``OMP_NUM_THREADS=1``. This is what chose ``OMP_WAIT_POLICY=PASSIVE`` for the local cluster
(``LOCAL_CLUSTER_ENV``, docs/performance.md: The test suite). Results go to
``benchmarks/out/thread_wait_bench.json``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest_bench import report

SETTINGS = {
    "spinning": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin-10k": {"GOMP_SPINCOUNT": "10000"},
    "spin-100k": {"GOMP_SPINCOUNT": "100000"},
    "one-thread": {"OMP_NUM_THREADS": "1"},
}


def steps(seconds: float) -> None:
    """Train for ``seconds`` and print the tokens per second (the child process)."""
    import torch

    from pipelines.core.model_paths import DEFAULT_EMBEDDER, resolve_model
    from pipelines.rm.model import load_backbone

    model = load_backbone(resolve_model(DEFAULT_EMBEDDER))
    optimizer = torch.optim.AdamW(model.parameters(), 1e-5)
    ids = torch.randint(1000, 20000, (16, 128))
    started, done = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        model(input_ids=ids).logits.sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        done += 1
    print(done * ids.numel() / (time.perf_counter() - started))


def rates(processes: int, env: dict[str, str], seconds: float) -> list[float]:
    """Tokens/s of each of ``processes`` trainings started together with ``env``."""
    command = [sys.executable, __file__, "--child", "--seconds", str(seconds)]
    children = [
        subprocess.Popen(
            command, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        for _ in range(processes)
    ]
    return [round(float(child.communicate()[0].decode().split()[-1])) for child in children]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        steps(args.seconds)
        return
    results = {}
    for name, env in SETTINGS.items():
        alone = rates(1, env, args.seconds)[0]
        first, second = rates(2, env, args.seconds)
        results[name] = {"alone": alone, "side_by_side_1": first, "side_by_side_2": second}
    columns = {"alone": ",d", "side_by_side_1": ",d", "side_by_side_2": ",d"}
    report("thread_wait_bench", {"seconds": args.seconds, "results": results}, columns)


if __name__ == "__main__":
    main()
