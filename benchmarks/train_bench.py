"""Reward-model training throughput: `synpref train` vs a plain PyTorch loop vs TRL's RewardTrainer.

    python benchmarks/train_bench.py --pairs 512 --max-length 256

All three train the same backbone (offline all-MiniLM-L6-v2 with a new one-output head, or
``--backbone``) for one epoch on the same HH-RLHF pairs (../shared/data) with the same global
batch, learning rate and max length, on this machine (2 cores):

- ``synpref``: the whole `synpref train` job: selection from the lake, tokenisation (by the
  driver for a set this small), 2 Ray Train workers (gloo DDP, 0.5 CPU each), length-grouped
  micro-batches under a token budget, checkpoints and validation off the hot path (one at the
  end), MLflow logging;
- ``plain``: one process (torch threads = 2), fixed batches of ``--batch`` pairs in input order
  padded to their longest member, chosen and rejected in one forward pass, AdamW;
- ``trl``: ``trl.RewardTrainer`` (1.16) with the same batch on CPU in fp32 without gradient
  checkpointing; note that it drops pairs longer than ``max_length`` where the others
  left-truncate them.

Each reports wall seconds for the whole call (model load included), steady pairs/s and
tokens/s (real tokens, not padding) and the fixed seconds (the call less its pairs at the steady
rate). Padding fractions: synpref's from its step metrics; the plain loop's from its batches.
Results go to ``benchmarks/out/train_bench.json``.
"""

from __future__ import annotations

import argparse
import operator
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest_bench import HH, OUT, job_bench_config, report

from pipelines import jobs
from pipelines.core.lake import Lake
from pipelines.core.model_paths import DEFAULT_EMBEDDER, resolve_model
from pipelines.ingest.job import IngestRequest
from pipelines.rm.losses import pairwise_loss
from pipelines.rm.model import (
    format_conversation,
    load_backbone,
    load_tokenizer,
    pair_conversations,
)

LEARNING_RATE = 1e-5
by_step = operator.attrgetter("step")


def tokenized(backbone: str, pairs: list[dict], max_length: int) -> tuple[list, list]:
    """Chosen and rejected token ids, left-truncated, as synpref tokenises them."""
    tokenizer = load_tokenizer(backbone)
    conversations = pair_conversations(
        [p["history"] for p in pairs], [p["chosen"] for p in pairs], [p["rejected"] for p in pairs]
    )
    texts = [format_conversation(tokenizer, c) for c in conversations]
    ids = [i[-max_length:] for i in tokenizer(texts, add_special_tokens=True)["input_ids"]]
    return ids[: len(pairs)], ids[len(pairs) :]


def plain_loop(backbone: str, pairs: list[dict], max_length: int, batch: int) -> dict:
    started = time.perf_counter()
    tokenizer = load_tokenizer(backbone)
    model = load_backbone(backbone)
    model.config.pad_token_id = tokenizer.pad_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    chosen, rejected = tokenized(backbone, pairs, max_length)
    tokens = padded = 0
    step_rates = []
    for start in range(0, len(pairs), batch):
        step_started = time.perf_counter()
        sequences = chosen[start : start + batch] + rejected[start : start + batch]
        inputs = tokenizer.pad({"input_ids": sequences}, return_tensors="pt")
        rewards = model(**inputs).logits[:, 0]
        n = len(sequences) // 2
        pairwise_loss(rewards[:n], rewards[n:]).backward()
        optimizer.step()
        optimizer.zero_grad()
        real = sum(len(s) for s in sequences)
        tokens, padded = tokens + real, padded + inputs["input_ids"].numel()
        step_rates.append((n, real, time.perf_counter() - step_started))
    seconds = time.perf_counter() - started
    return _rates(len(pairs), tokens, seconds, step_rates) | {
        "padding_fraction": 1 - tokens / padded
    }


def trl_trainer(backbone: str, pairs: list[dict], max_length: int, batch: int) -> dict:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    started = time.perf_counter()
    tokenizer = load_tokenizer(backbone)
    tokenizer.eos_token = tokenizer.eos_token or tokenizer.sep_token  # TRL appends an EOS
    model = load_backbone(backbone)
    model.config.pad_token_id = tokenizer.pad_token_id
    rows = [
        {
            "chosen": [*p["history"], {"role": "assistant", "content": p["chosen"]}],
            "rejected": [*p["history"], {"role": "assistant", "content": p["rejected"]}],
        }
        if tokenizer.chat_template
        else {
            "chosen": format_conversation(tokenizer, [*p["history"], _reply(p["chosen"])]),
            "rejected": format_conversation(tokenizer, [*p["history"], _reply(p["rejected"])]),
        }
        for p in pairs
    ]
    args = RewardConfig(
        output_dir=str(OUT / "trl-bench"),
        per_device_train_batch_size=batch,
        num_train_epochs=1,
        learning_rate=LEARNING_RATE,
        max_length=max_length,
        lr_scheduler_type="constant",
        report_to=[],
        save_strategy="no",
        logging_steps=10**6,
        use_cpu=True,
        # TRL's defaults are for GPUs: bf16 autocast and gradient checkpointing made it 4x
        # slower here (481 tokens/s, 2026-12-03); fp32 without recomputation, as the others.
        bf16=False,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
    )
    trainer = RewardTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    kept = len(trainer.train_dataset)
    train_started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    train_seconds = time.perf_counter() - train_started
    tokens = sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in trainer.train_dataset)
    return {
        "seconds": seconds,
        "pairs_per_s": kept / seconds,
        "steady_pairs_per_s": kept / train_seconds,
        "steady_tokens_per_s": tokens / train_seconds,
        "pairs_trained": kept,
        "pairs_dropped_as_too_long": len(pairs) - kept,
        "fixed_seconds": seconds - train_seconds,
    }


def _reply(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def _rates(pairs: int, tokens: int, seconds: float, steps: list[tuple[int, int, float]]) -> dict:
    """Whole-call and steady throughput: the steady rate is every step's pairs and tokens over
    their time, the first step excluded (length-grouped steps differ in size, so a median of
    per-step rates would weigh a step of short pairs like one of long pairs)."""
    steady = steps[1:] or steps
    step_seconds = sum(s for _, _, s in steady)
    return {
        "seconds": seconds,
        "pairs_per_s": pairs / seconds,
        "steady_pairs_per_s": sum(n for n, _, _ in steady) / step_seconds,
        "steady_tokens_per_s": sum(t for _, t, _ in steady) / step_seconds,
        "pairs_trained": pairs,
        # What the call costs beyond its pairs at the steady rate: start-up, first step, end.
        "fixed_seconds": seconds - pairs * step_seconds / sum(n for n, _, _ in steady),
    }


def synpref_train(config, name: str) -> dict:
    started = time.perf_counter()
    summary = jobs.train(config, name=name).as_dict()
    seconds = time.perf_counter() - started
    client, run = mlflow.MlflowClient(), summary["run_id"]
    history = {
        key: np.array([m.value for m in sorted(client.get_metric_history(run, key), key=by_step)])
        for key in ("batch_pairs", "pairs_per_s", "tokens_per_s", "padding_fraction")
    }
    step_seconds = history["batch_pairs"] / history["pairs_per_s"]
    step_tokens = history["tokens_per_s"] * step_seconds
    return _rates(
        summary["pairs_trained"],
        int(step_tokens.sum()),
        seconds,
        list(zip(history["batch_pairs"], step_tokens, step_seconds, strict=True)),
    ) | {
        "padding_fraction": float(np.mean(history["padding_fraction"])),
        "pairs_truncated": summary["pairs_truncated"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32, help="global batch (pairs per step)")
    parser.add_argument(
        "--micro-batch-tokens", type=int, default=2048, help="synpref's padded tokens per pass"
    )
    parser.add_argument("--backbone", default=DEFAULT_EMBEDDER)
    parser.add_argument("--skip-trl", action="store_true")
    args = parser.parse_args()
    backbone = resolve_model(args.backbone)

    training = {
        "backbone": backbone,
        "max_length": args.max_length,
        "global_batch": args.batch,
        "micro_batch_tokens": args.micro_batch_tokens,
        "learning_rate": LEARNING_RATE,
        "workers": 2,
        "checkpoint_every": 10**6,
        "validate_every": 10**6,
        "storage_path": str(OUT / "train-bench" / "checkpoints"),
        "register_as": None,
    }
    config = job_bench_config("train-bench", training=training)
    jobs.ingest(config, IngestRequest([str(HH)], source="hh"))
    lake = Lake(config.lake.root)
    keys = lake.read("pairs", columns=["pair_id"]).sort_by("pair_id")["pair_id"]
    last = keys[min(args.pairs, len(keys)) - 1].as_py()
    config.training.data.where = f"pair_id <= '{last}'"
    pairs = lake.read(
        "pairs", columns=["history", "chosen", "rejected"], where=config.training.data.where
    ).to_pylist()

    results = {
        "pairs": len(pairs),
        "max_length": args.max_length,
        "global_batch": args.batch,
        "micro_batch_tokens": args.micro_batch_tokens,
        "backbone": args.backbone,
        "synpref": synpref_train(config, "bench"),
    }
    ray.shutdown()
    torch.set_num_threads(2)
    results["plain"] = plain_loop(backbone, pairs, args.max_length, args.batch)
    if not args.skip_trl:
        results["trl"] = trl_trainer(backbone, pairs, args.max_length, args.batch)
    for baseline in ("plain", "trl"):
        if baseline in results:
            results[f"ratio_vs_{baseline}"] = {
                key: results["synpref"][key] / results[baseline][key]
                for key in ("pairs_per_s", "steady_pairs_per_s", "steady_tokens_per_s")
            }
    report("train_bench", results)


if __name__ == "__main__":
    main()
