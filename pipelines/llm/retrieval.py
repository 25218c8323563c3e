"""Retrieval of similar pairs by embedding: gold few-shot examples for the judges.

The paper prompts its judges with up to 8 gold (human-verified) pairs similar to the judged one;
its curation loop retrieves, the other way round, unverified pairs similar to each gold pair.
Both are "the k nearest pairs of one set to each pair of another", so one small index serves
both: ``SimilarityIndex`` holds normalised sentence-transformers embeddings of the prompts
(``prompt_text`` of the history, the text the paper retrieves on) and returns the nearest keys
by cosine, never the query pair itself.
"""

from __future__ import annotations

import functools
import hashlib
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.core.lake import Lake, pair_keys
from pipelines.core.model_paths import resolve_model
from pipelines.core.text import prompt_text
from storage_schemas import PAIRS

MEMO_TEXTS = 50_000
"""Embeddings a process keeps, per model (MiniLM's 384 floats: about 80 MB): the loop embeds
the same gold and pool prompts in every iteration, and each judge job its gold set again."""


class Embedder:
    """A sentence-transformers model (offline MiniLM by default), normalised embeddings; a text
    embedded before in this process (by any ``Embedder`` of the model) is not embedded again."""

    def __init__(self, model: str, batch_size: int = 64) -> None:
        self.model, self.memo = _sentence_transformer(resolve_model(model))
        self.batch_size = batch_size

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        keys = [hashlib.blake2b(t.encode(), digest_size=16).digest() for t in texts]
        found = {k: self.memo[k] for k in keys if k in self.memo}
        for k in found:
            self.memo.move_to_end(k)
        new = {k: t for k, t in zip(keys, texts, strict=True) if k not in found}
        if new:
            vectors = self.model.encode(
                list(new.values()),
                batch_size=self.batch_size,
                normalize_embeddings=True,
                show_progress_bar=False,
            ).astype(np.float32)
            found.update(zip(new, vectors, strict=True))
            # Rows copied: a view would keep its whole batch alive after the row is evicted.
            self.memo.update(zip(new, (v.copy() for v in vectors), strict=True))
            while len(self.memo) > MEMO_TEXTS:
                self.memo.popitem(last=False)
        if not keys:
            return np.empty((0, self.model.get_embedding_dimension()), np.float32)
        return np.stack([found[k] for k in keys])


@functools.lru_cache(maxsize=2)
def _sentence_transformer(path: str) -> tuple[Any, OrderedDict[bytes, np.ndarray]]:
    """The model, loaded once per process (a judge job builds its gold index and, for a small
    set, finds each pair's examples in the same process; the loop's driver judges every
    iteration), and its memo of embeddings by text digest, least recently used first."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device="cpu"), OrderedDict()


@dataclass(frozen=True)
class SimilarityIndex:
    """Pairs (their rows, with ``pair_id``) and their prompt embeddings, for nearest lookups.

    Exact search (one matrix product): gold sets are thousands of pairs; a corpus-sized index
    would shard the rows over Ray Data blocks the same way.
    """

    rows: list[dict[str, Any]]
    vectors: np.ndarray

    def nearest(self, queries: np.ndarray, k: int, exclude: Sequence[str] = ()) -> list[list[int]]:
        """Per query, the positions of the ``k`` most similar rows (most similar first),
        skipping the row whose ``pair_id`` is the query's entry in ``exclude``."""
        if not self.rows or k == 0:
            return [[] for _ in range(len(queries))]
        scores = queries @ self.vectors.T
        ids = [r["pair_id"] for r in self.rows]
        result = []
        for row, ranked in enumerate(np.argsort(-scores, axis=1, kind="stable")):
            skip = exclude[row] if row < len(exclude) else None
            result.append([int(j) for j in ranked[: k + 1] if ids[j] != skip][:k])
        return result


def build_index(
    lake: Lake,
    version: int,
    keys: pa.Table,
    embedder: Embedder,
    attributes: dict[tuple[str, str], dict[str, Any]] | None = None,
    flipped: Collection[tuple[str, str]] = (),
) -> SimilarityIndex:
    """The pairs ``keys`` (source, pair_id) of ``pairs`` at ``version`` (the version the judges'
    identities were computed from) with their prompt embeddings, each with its ``attributes``
    (keyed by (source, pair_id)) when given; ``flipped`` pairs with chosen and rejected
    swapped (a human relabelled them)."""
    table = lake.read(PAIRS.name, version, ["source", "pair_id", "history", "chosen", "rejected"])
    table = table.filter(pc.is_in(pair_keys(table), value_set=pair_keys(keys).combine_chunks()))
    rows = table.sort_by([("pair_id", "ascending"), ("source", "ascending")]).to_pylist()
    for row in rows:
        key = (row["source"], row["pair_id"])
        row["attributes"] = (attributes or {}).get(key)
        if key in flipped:
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
    vectors = embedder([prompt_text(r["history"]) for r in rows]) if rows else np.empty((0, 0))
    return SimilarityIndex(rows, vectors)


class NearestGold:
    """Ray Data actor: adds ``examples`` (gold pair ids) and ``example_rows`` (their content, as
    JSON) to a batch of pairs, the ``k`` gold pairs most similar to each."""

    def __init__(self, index: SimilarityIndex, embedder: str, k: int) -> None:
        self.index, self.k = index, k
        self.embed = Embedder(embedder)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import orjson

        queries = self.embed([prompt_text(h) for h in batch["history"].to_pylist()])
        nearest = self.index.nearest(queries, self.k, batch["pair_id"].to_pylist())
        rows = self.index.rows
        return batch.append_column(
            "examples",
            pa.array([[rows[j]["pair_id"] for j in n] for n in nearest], pa.list_(pa.string())),
        ).append_column(
            "example_rows",
            pa.array([orjson.dumps([rows[j] for j in n]).decode() for n in nearest], pa.string()),
        )
