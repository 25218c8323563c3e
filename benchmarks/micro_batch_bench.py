"""Forward + backward tokens/s of the default backbone by ``micro_batch_tokens`` (one core).

    python benchmarks/micro_batch_bench.py --pairs 96 --budgets 1024 2048 4096 8192

The HH pairs (../shared/data) are tokenised as training tokenises them (chat formatting, left
truncation to the backbone's 512 tokens), grouped by length into micro-batches under each budget
(``length_batches``, as a training step does) and run forward and backward with torch on one
thread, the share of one Ray Train worker with the default 0.5 CPU. Tokens are real tokens, not
padding. This is what chose the default budget (docs/performance.md).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest_bench import HH

from pipelines.core.batching import length_batches
from pipelines.core.model_paths import resolve_model
from pipelines.ingest.formats import Limits, Pair, convert
from pipelines.rm.model import (
    backbone_max_length,
    encode,
    format_conversation,
    load_backbone,
    load_tokenizer,
    pair_conversations,
)

BACKBONE = "sentence-transformers/all-MiniLM-L6-v2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=96)
    parser.add_argument("--budgets", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    args = parser.parse_args()
    torch.set_num_threads(1)
    backbone = resolve_model(BACKBONE)
    tokenizer = load_tokenizer(backbone)
    with gzip.open(HH, "rt") as file:
        items = (item for line in file for item in convert(json.loads(line), "hh", Limits()))
        pairs = [item for item in items if isinstance(item, Pair)][: args.pairs]
    conversations = pair_conversations(
        [p.history for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs]
    )
    texts = [format_conversation(tokenizer, c) for c in conversations]
    ids, _ = encode(tokenizer, texts, backbone_max_length(backbone, None))
    lengths = np.array([len(i) for i in ids])
    model = load_backbone(backbone)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.train()
    results = {}
    for budget in args.budgets:
        started = time.perf_counter()
        for batch in length_batches(lengths, budget):
            inputs = tokenizer.pad({"input_ids": [ids[i] for i in batch]}, return_tensors="pt")
            model(**inputs).logits.sum().backward()
            model.zero_grad(set_to_none=True)
        results[budget] = round(int(lengths.sum()) / (time.perf_counter() - started))
        print(f"micro_batch_tokens {budget}: {results[budget]} tokens/s", flush=True)
    print(json.dumps({"pairs": len(pairs), "tokens": int(lengths.sum()), "tokens_per_s": results}))


if __name__ == "__main__":
    main()
