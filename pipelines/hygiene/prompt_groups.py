"""Prompt-level semantic groups: pairs whose histories say the same thing.

Not duplicates (the responses may differ): groups feed diversity statistics and retrieval, and
are recorded as ``dedup_clusters`` rows with method ``prompt`` (they never change a pair's
status). The prompt of a pair is its whole history as ``role: content`` lines. Identical
prompts are embedded once; embeddings (sentence-transformers, normalised) are bucketed with
random-hyperplane LSH (16 bands of 8 bits: two prompts with cosine 0.9 share a bucket with
probability 0.996), candidates are confirmed at cosine >= ``threshold``, and groups are the
connected components, as for near-duplicates.
"""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipelines.core.config import PromptGroupsConfig
from pipelines.core.lake import Lake
from pipelines.core.model_paths import resolve_model
from pipelines.core.text import prompt_text
from pipelines.hygiene.near_dedup import candidate_edges, components
from storage_schemas import DEDUP_CLUSTERS, PAIRS

_BANDS, _BITS = 16, 8


class PromptEmbedder:
    """Ray Data actor: loads the sentence-transformers model once, embeds prompts."""

    def __init__(self, model: str, batch_size: int) -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(resolve_model(model), device="cpu")
        self.batch_size = batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = [prompt_text(h) for h in batch["history"].to_pylist()]
        vectors = self.model.encode(
            texts, batch_size=self.batch_size, normalize_embeddings=True, show_progress_bar=False
        ).astype(np.float32)
        return pa.table(
            {
                "prompt_key": batch["prompt_key"],
                "embedding": pa.FixedSizeListArray.from_arrays(
                    pa.array(vectors.ravel()), vectors.shape[1]
                ),
            }
        )


def prompt_groups(
    lake: Lake, version: int, keys: pa.Table, options: PromptGroupsConfig, run_id: str
) -> pa.Table:
    """``dedup_clusters`` rows (method ``prompt``) for groups of two or more pairs; ``keys`` are
    the content keys of all pairs (source, pair_id, prompt_key)."""
    firsts = keys.group_by("prompt_key", use_threads=False).aggregate([("pair_id", "first")])
    pairs = lake.dataset(PAIRS.name, version, ["pair_id", "history"])
    wanted = firsts.rename_columns(["prompt_key", "pair_id"])
    embedded = pairs.map_batches(
        _with_prompt_key, batch_format="pyarrow", fn_kwargs={"first_pairs": wanted}
    ).map_batches(
        PromptEmbedder,
        fn_constructor_kwargs={"model": options.model, "batch_size": options.batch_size},
        batch_format="pyarrow",
        batch_size=1024,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=1),
    )
    parts = [t for t in ray.get(embedded.to_arrow_refs()) if t.num_rows]
    if not parts:
        return DEDUP_CLUSTERS.schema.empty_table()
    table = pa.concat_tables(parts).sort_by("prompt_key")
    vectors = table["embedding"].combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1)
    labels = components(_confirmed(vectors, options), table.num_rows)
    group_of = dict(zip(table["prompt_key"].to_pylist(), labels.tolist(), strict=True))
    return _group_rows(keys, group_of, run_id)


def _with_prompt_key(batch: pa.Table, first_pairs: pa.Table) -> pa.Table:
    """Only one pair per distinct prompt, tagged with its prompt_key."""
    position = pc.index_in(batch["pair_id"], value_set=first_pairs["pair_id"].combine_chunks())
    keep = pc.is_valid(position)
    return pa.table(
        {
            "prompt_key": first_pairs["prompt_key"].take(position.filter(keep)),
            "history": batch["history"].filter(keep),
        }
    )


def _confirmed(vectors: np.ndarray, options: PromptGroupsConfig) -> np.ndarray:
    planes = np.random.default_rng(options.seed).standard_normal((vectors.shape[1], _BANDS * _BITS))
    bits = (vectors @ planes > 0).reshape(len(vectors), _BANDS, _BITS)
    buckets = np.packbits(bits, axis=2).reshape(len(vectors), _BANDS).astype(np.uint64)
    buckets |= np.arange(_BANDS, dtype=np.uint64) << np.uint64(8)
    edges = candidate_edges(buckets)
    if not len(edges):
        return edges
    cosine = np.einsum("ij,ij->i", vectors[edges[:, 0]], vectors[edges[:, 1]])
    return edges[cosine >= options.threshold]


def _group_rows(keys: pa.Table, group_of: dict[str, int], run_id: str) -> pa.Table:
    group = pa.array([group_of[k] for k in keys["prompt_key"].to_pylist()], pa.int64())
    table = keys.select(["source", "pair_id"]).append_column("group", group)
    sizes = table.group_by("group").aggregate([("pair_id", "count")])
    table = table.join(sizes, "group", join_type="inner")
    table = table.filter(pc.greater_equal(table["pair_id_count"], 2)).sort_by(
        [("group", "ascending"), ("pair_id", "ascending"), ("source", "ascending")]
    )
    rows, representative = [], {}
    now = datetime.now(UTC)
    for row in table.to_pylist():
        first = representative.setdefault(row["group"], (row["source"], row["pair_id"]))
        rows.append(
            {
                "method": "prompt",
                "source": row["source"],
                "pair_id": row["pair_id"],
                "cluster_id": f"prompt-{first[0]}-{first[1]}",
                "cluster_size": row["pair_id_count"],
                "representative_source": first[0],
                "representative_pair_id": first[1],
                "dedup_run_id": run_id,
                "decided_at": now,
            }
        )
    return pa.Table.from_pylist(rows, schema=DEDUP_CLUSTERS.schema)
