"""MinHash signatures: synpref's batched numpy implementation vs datasketch on the same shingles.

    python benchmarks/minhash_bench.py --texts 3000

Word 3-gram shingles of random 150-word texts, 100 hash functions. datasketch is timed two
ways: one ``MinHash.update_batch`` per text and ``MinHash.bulk`` over all texts; both include
its shingle hashing (xxh32, the width of its default scheme), as synpref's time includes its own.
"""

from __future__ import annotations

import argparse
import random
import time

import xxhash
from datasketch import MinHash

from pipelines.core.config import MinHashConfig
from pipelines.core.text import tokens
from pipelines.hygiene.near_dedup import MinHasher


def shingles(text: str) -> list[bytes]:
    words = tokens(text)
    return [" ".join(words[i : i + 3]).encode() for i in range(len(words) - 2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=3000)
    args = parser.parse_args()
    rng = random.Random(0)
    vocabulary = [f"w{i}" for i in range(5000)]
    texts = [" ".join(rng.choice(vocabulary) for _ in range(150)) for _ in range(args.texts)]

    started = time.perf_counter()
    MinHasher(MinHashConfig()).signatures(texts)
    ours = time.perf_counter() - started

    started = time.perf_counter()
    for text in texts:
        MinHash(num_perm=100, hashfunc=xxhash.xxh32_intdigest).update_batch(shingles(text))
    per_text = time.perf_counter() - started

    started = time.perf_counter()
    MinHash.bulk([shingles(t) for t in texts], num_perm=100, hashfunc=xxhash.xxh32_intdigest)
    bulk = time.perf_counter() - started

    print(
        f"{args.texts} texts: synpref {ours:.2f}s, datasketch update_batch {per_text:.2f}s "
        f"({per_text / ours:.1f}x slower), datasketch bulk {bulk:.2f}s ({bulk / ours:.1f}x slower)"
    )


if __name__ == "__main__":
    main()
