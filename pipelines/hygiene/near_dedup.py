"""Near-duplicate pairs by MinHash-LSH over the pair's three fields.

Two pairs are near-duplicates only when their history, chosen and rejected are *all* similar:

1. **Signatures** (Ray Data ``map_batches``): each field (history as one text, chosen,
   rejected) becomes a set of word n-gram shingles (``dedup.tokens``); each shingle is hashed
   with xxh3 and MinHashed with ``bands * rows`` multiply-shift hash functions, vectorised over
   the whole batch with numpy. A pair's signature is the three field signatures.
2. **Buckets**: each band of each field's signature is hashed into a bucket; pairs sharing any
   bucket are candidates: P(candidate) >= 1 - (1 - J^r)^b for the most similar field. On Ray
   Data: bucket rows hash-shuffled on the bucket, candidate edges per partition.
3. **Verification**: the candidate edges joined with both ends' signatures (Ray Data joins); a
   candidate is confirmed only when the estimated Jaccard similarity of *every* field (share
   of equal signature values) reaches ``threshold``; pairs sharing only a prompt are rejected.
4. **Clusters**: connected components of the confirmed edges (scipy, on the driver); the
   representative is the member from the most trusted source, then the smallest pair_id.

Defaults: word 3-grams (prompts and responses are short; a 5-gram shingle loses too much to one
edited word), 25 bands x 4 rows, threshold 0.5. A field with Jaccard 0.5 makes a pair a
candidate with probability 0.80 (0.99 when all three fields are at 0.5, since any field's
bucket counts), and verification's estimate has a standard error of about 0.05 at 100 hash
functions. Measured recall and precision on planted near-duplicates are in
docs/performance.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import xxhash
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipelines.core.config import MinHashConfig
from pipelines.core.lake import Lake, pair_keys
from pipelines.core.text import tokens
from storage_schemas import DEDUP_CLUSTERS, MINHASH_SIGNATURES, PAIRS

log = logging.getLogger(__name__)

_SHINGLES_PER_CHUNK = 1024
_MAX_BUCKET_PAIRS = 64
"""Members of a bucket compared all-to-all up to this size; larger buckets are chained."""


class MinHasher:
    """Batched MinHash signatures and LSH buckets of preference pairs."""

    def __init__(self, options: MinHashConfig) -> None:
        self.options = options
        rng = np.random.default_rng(options.seed)
        p = options.permutations
        self.a = rng.integers(1, 2**63, size=p, dtype=np.uint64) | np.uint64(1)
        self.b = rng.integers(0, 2**63, size=p, dtype=np.uint64)
        self.band_mix = rng.integers(1, 2**63, size=options.rows, dtype=np.uint64) | np.uint64(1)
        self.ngram_mix = rng.integers(1, 2**63, size=options.ngram, dtype=np.uint64) | np.uint64(1)
        self._word_hashes: dict[str, int] = {}

    def shingles(self, text: str) -> np.ndarray:
        """Hashes of the word n-grams of ``text`` (a shorter text is one shingle)."""
        cache = self._word_hashes
        words = np.fromiter(
            (
                cache.get(w) or cache.setdefault(w, xxhash.xxh3_64_intdigest(w.encode()))
                for w in tokens(text)
            ),
            dtype=np.uint64,
        )
        n = min(self.options.ngram, len(words))
        if n == 0:
            return words
        count = len(words) - n + 1
        hashes = np.zeros(count, dtype=np.uint64)
        for j in range(n):  # position-weighted sum: order matters within a shingle
            hashes += words[j : j + count] * self.ngram_mix[j]
        return hashes

    def signatures(self, texts: list[str]) -> np.ndarray:
        """(len(texts), permutations) uint32 MinHash signatures; an empty text gets all-max."""
        shingles = [self.shingles(t) for t in texts]
        counts = np.array([len(s) for s in shingles])
        result = np.full(
            (len(texts), self.options.permutations), np.iinfo(np.uint32).max, np.uint32
        )
        nonempty = np.flatnonzero(counts)
        if not len(nonempty):
            return result
        sizes = counts[nonempty]
        flat = np.concatenate([shingles[i] for i in nonempty])
        ends = np.cumsum(sizes)
        mins = np.empty((len(nonempty), self.options.permutations), np.uint32)
        # Multiply-shift hashing (top 32 bits of a*x + b mod 2^64), one column per function,
        # in place on cache-sized chunks of whole texts: 12x faster than one big expression.
        buffer = np.empty((_SHINGLES_PER_CHUNK, self.options.permutations), np.uint64)
        first = 0
        while first < len(nonempty):
            lo = ends[first] - sizes[first]
            last = max(first + 1, int(np.searchsorted(ends, lo + _SHINGLES_PER_CHUNK, "right")))
            hi = ends[last - 1]
            hashed = (
                buffer[: hi - lo]
                if hi - lo <= len(buffer)
                else np.empty_like(buffer, shape=(hi - lo, buffer.shape[1]))
            )
            np.multiply(flat[lo:hi, None], self.a, out=hashed)
            hashed += self.b
            hashed >>= np.uint64(32)
            offsets = ends[first:last] - sizes[first:last] - lo
            mins[first:last] = np.minimum.reduceat(hashed, offsets, axis=0)
            first = last
        result[nonempty] = mins
        return result

    def pair_signatures(self, batch: pa.Table) -> np.ndarray:
        """(pairs, 3, permutations) signatures of history, chosen and rejected."""
        texts: list[str] = []
        for history, chosen, rejected in zip(
            batch["history"].to_pylist(),
            batch["chosen"].to_pylist(),
            batch["rejected"].to_pylist(),
            strict=True,
        ):
            texts += ["\n".join(m["content"] for m in history), chosen, rejected]
        return self.signatures(texts).reshape(batch.num_rows, 3, self.options.permutations)

    def buckets(self, signatures: np.ndarray) -> np.ndarray:
        """(pairs, 3 * bands) uint64: one bucket per band of each field's signature."""
        o = self.options
        values = signatures.reshape(len(signatures), 3 * o.bands, o.rows).astype(np.uint64)
        mixed = (values * self.band_mix).sum(axis=2, dtype=np.uint64)
        return mixed ^ (np.arange(3 * o.bands, dtype=np.uint64) << np.uint64(52))


SIGNATURE_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("pair_id", pa.string(), nullable=False),
        pa.field("signature", pa.binary(), nullable=False),
        pa.field("buckets", pa.binary(), nullable=False),
    ]
)
"""``signature``: (3, permutations) uint32, ``buckets``: (bands,) uint64, as raw bytes."""


class SignatureMaker:
    """Ray Data ``map_batches`` callable: pairs -> ``SIGNATURE_SCHEMA`` rows."""

    def __init__(self, options: MinHashConfig) -> None:
        self.hasher = MinHasher(options)

    def __call__(self, batch: pa.Table) -> pa.Table:
        signatures = self.hasher.pair_signatures(batch)
        buckets = self.hasher.buckets(signatures)
        return pa.table(
            {
                "source": batch["source"],
                "pair_id": batch["pair_id"],
                "signature": pa.array([s.tobytes() for s in signatures], pa.binary()),
                "buckets": pa.array([b.tobytes() for b in buckets], pa.binary()),
            },
            schema=SIGNATURE_SCHEMA,
        )


def node_ids(pair_ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """int64 graph node of each pair: the first 64 bits of its content hash (``pair_id``).

    A collision only joins two pairs' candidate lists; verification looks up both signatures by
    node and compares the pairs themselves, so it never makes a false edge.
    """
    return np.array([int(p[:16], 16) for p in pair_ids.to_pylist()], np.uint64).view(np.int64)


def bucket_rows(batch: pa.Table) -> dict[str, np.ndarray]:
    """One row per band of each field of each pair, the key of the bucket shuffle."""
    buckets = _unpack(batch["buckets"], np.uint64).reshape(batch.num_rows, -1)
    nodes = node_ids(batch["pair_id"])
    return {"bucket": buckets.ravel(), "node": np.repeat(nodes, buckets.shape[1])}


def bucket_edges(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Candidate edges (a < b) of the pairs sharing a bucket, each once; ``batch`` holds whole
    buckets (hash-partitioned on ``bucket``). Buckets of up to ``_MAX_BUCKET_PAIRS`` members are
    compared all-to-all, bigger ones chained (a path keeps them in one component)."""
    order = np.lexsort((batch["node"], batch["bucket"]))
    buckets, nodes = batch["bucket"][order], batch["node"][order]
    starts = np.flatnonzero(np.diff(buckets, prepend=buckets[:1] ^ np.uint64(1)))
    sizes = np.diff(starts, append=len(buckets))
    edges = [np.empty((0, 2), np.int64)]
    for size in np.unique(sizes[sizes > 1]):  # vectorised over all buckets of one size
        members = nodes[starts[sizes == size][:, None] + np.arange(size)]
        if size <= _MAX_BUCKET_PAIRS:
            i, j = np.triu_indices(size, k=1)
        else:
            i, j = np.arange(size - 1), np.arange(1, size)
        edges.append(np.stack([members[:, i].ravel(), members[:, j].ravel()], axis=1))
    return _unique_edges({"a": (e := np.concatenate(edges))[:, 0], "b": e[:, 1]})


def candidate_edges(buckets: np.ndarray) -> np.ndarray:
    """In memory, for small sets: (edges, 2) row indices of the rows of a (rows, bands) bucket
    matrix that share a bucket (bucket values must differ between bands)."""
    nodes = np.repeat(np.arange(len(buckets)), buckets.shape[1])
    edges = bucket_edges({"bucket": buckets.ravel(), "node": nodes})
    return np.stack([edges["a"], edges["b"]], axis=1)


def _unique_edges(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Distinct edges with a < b (members are sorted by node, so a <= b on entry)."""
    a, b = batch["a"], batch["b"]
    order = np.lexsort((b, a))
    a, b = a[order], b[order]
    keep = (a != b) & np.concatenate([[True], (np.diff(a) != 0) | (np.diff(b) != 0)])
    return {"a": a[keep], "b": b[keep]}


def verified_edges(batch: pa.Table, threshold: float, permutations: int) -> pa.Table:
    """The candidate edges whose three fields all have estimated Jaccard >= threshold."""
    if not batch.num_rows:  # a join partition without rows may lack the columns of one side
        return pa.table({name: pa.array([], pa.string()) for name in EDGE_COLUMNS})
    left = _unpack(batch["signature_a"], np.uint32).reshape(batch.num_rows, 3, permutations)
    right = _unpack(batch["signature_b"], np.uint32).reshape(batch.num_rows, 3, permutations)
    similar = ((left == right).mean(axis=2) >= threshold).all(axis=1)
    return batch.select(EDGE_COLUMNS).filter(similar)


EDGE_COLUMNS = ["source_a", "pair_id_a", "source_b", "pair_id_b"]


def near_pairs(
    signatures: Callable[[list[str]], ray.data.Dataset],
    options: MinHashConfig,
    partitions: int,
) -> pa.Table:
    """Confirmed near-duplicate edges (``EDGE_COLUMNS``) among the pairs of ``signatures``
    (a fresh read of these columns of the signature rows), on Ray Data:

    bucket rows -> hash shuffle on bucket -> candidate edges per bucket -> shuffle on edge to
    drop repeats across bands -> join both ends with their signatures -> verify. Only the
    signatures of pairs in some candidate edge (a broadcast set of nodes) enter the joins.
    """
    candidates = (
        signatures(["pair_id", "buckets"])
        .map_batches(bucket_rows, batch_format="pyarrow", batch_size=None)
        .repartition(partitions, keys=["bucket"])
        .map_batches(bucket_edges, batch_format="numpy", batch_size=None)
        .repartition(partitions, keys=["a"])
        .map_batches(_unique_edges, batch_format="numpy", batch_size=None)
        .materialize()  # a known schema: the joins below keep it in partitions with no rows
    )
    ends = [t for t in ray.get(candidates.to_arrow_refs()) if t.num_rows]
    nodes = pc.unique(
        pa.chunked_array([c for t in ends for end in "ab" for c in t[end].chunks], pa.int64())
    )
    log.info(f"[dedup] {sum(map(len, ends)):,} candidate edges between {len(nodes):,} pairs")
    schema = pa.schema([(name, pa.string()) for name in EDGE_COLUMNS])
    if not ends:
        return schema.empty_table()
    for end in ("a", "b"):
        candidates = candidates.join(
            signatures(["source", "pair_id", "signature"]).map_batches(
                _node_signatures, batch_format="pyarrow", fn_kwargs={"end": end, "nodes": nodes}
            ),
            join_type="inner",
            num_partitions=partitions,
            on=(end,),
        )
    confirmed = candidates.map_batches(
        verified_edges,
        batch_format="pyarrow",
        fn_kwargs={"threshold": options.threshold, "permutations": options.permutations},
    )
    parts = [t for t in ray.get(confirmed.to_arrow_refs()) if t.num_rows]
    return pa.concat_tables([t.cast(schema) for t in parts]) if parts else schema.empty_table()


def near_pairs_on_driver(signatures: pa.Table, options: MinHashConfig) -> pa.Table:
    """``near_pairs`` in this process, for a set of at most ``NEAR_DEDUP_ON_DRIVER`` pairs:
    the same steps, with the whole set as one partition."""
    if not signatures.num_rows:
        return verified_edges(signatures, options.threshold, options.permutations)
    edges = bucket_edges(bucket_rows(signatures))
    candidates = pa.table(edges)
    nodes = pa.array(np.unique(np.concatenate([edges["a"], edges["b"]])))
    for end in ("a", "b"):
        candidates = candidates.join(_node_signatures(signatures, end, nodes), end)
    return verified_edges(candidates, options.threshold, options.permutations)


def _node_signatures(batch: pa.Table, end: str, nodes: pa.Array) -> pa.Table:
    """Signature rows of the pairs in ``nodes``, keyed for one end of an edge:
    (a, source_a, pair_id_a, signature_a)."""
    node = pa.array(node_ids(batch["pair_id"]))
    keep = pc.is_in(node, value_set=nodes)
    return pa.table(
        {
            end: node.filter(keep),
            f"source_{end}": batch["source"].filter(keep),
            f"pair_id_{end}": batch["pair_id"].filter(keep),
            f"signature_{end}": batch["signature"].filter(keep),
        }
    )


def near_clusters(edges: pa.Table, rank: Callable[[str], int], run_id: str) -> pa.Table:
    """``dedup_clusters`` rows (method ``near``): connected components of the confirmed
    ``edges``; ``rank`` orders sources by trust for the choice of representatives."""
    if not edges.num_rows:
        return DEDUP_CLUSTERS.schema.empty_table()
    ends = [
        pc.binary_join_element_wise(edges[f"source_{e}"], edges[f"pair_id_{e}"], "\x00")
        for e in ("a", "b")
    ]
    nodes = pc.unique(pa.chunked_array(ends[0].chunks + ends[1].chunks))
    index = np.stack([pc.index_in(e, nodes).to_numpy() for e in ends], axis=1)
    labels = components(index, len(nodes))
    sizes = np.bincount(labels)
    members = [key.split("\x00") for key in nodes.to_pylist()]
    best: dict[int, tuple[int, str, str]] = {}
    for (source, pair_id), label in zip(members, labels.tolist(), strict=True):
        candidate = (rank(source), pair_id, source)
        best[label] = min(best.get(label, candidate), candidate)
    now = datetime.now(UTC)
    rows = []
    for (source, pair_id), label in zip(members, labels.tolist(), strict=True):
        _, representative_pair_id, representative_source = best[label]
        rows.append(
            {
                "method": "near",
                "source": source,
                "pair_id": pair_id,
                "cluster_id": f"near-{representative_source}-{representative_pair_id}",
                "cluster_size": int(sizes[label]),
                "representative_source": representative_source,
                "representative_pair_id": representative_pair_id,
                "dedup_run_id": run_id,
                "decided_at": now,
            }
        )
    return pa.Table.from_pylist(rows, schema=DEDUP_CLUSTERS.schema)


def components(edges: np.ndarray, n: int) -> np.ndarray:
    """Connected-component label of each of ``n`` nodes of the graph ``edges``."""
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def store_signatures(lake: Lake, version: int, options: MinHashConfig) -> None:
    """Compute (on Ray Data, or on the driver for a few new pairs) and store the signatures of
    the corpus pairs at ``version`` that have none yet (incremental: a re-run hashes only the
    pairs added since)."""
    pairs = lake.read(PAIRS.name, version, ["source", "pair_id"], "source_kind = 'corpus'")
    if lake.exists(MINHASH_SIGNATURES.name):
        stored = lake.read(
            MINHASH_SIGNATURES.name,
            columns=["source", "pair_id"],
            where=f"params_id = '{options.params_id}'",
        )
        missing = pairs.join(stored, ["source", "pair_id"], join_type="left anti")
    else:
        missing = pairs
    if not missing.num_rows:
        return
    started = time.perf_counter()
    columns = ["source", "pair_id", "history", "chosen", "rejected"]
    keys = missing if missing.num_rows < pairs.num_rows else None
    if missing.num_rows <= NEAR_DEDUP_ON_DRIVER:
        rows = lake.read(PAIRS.name, version, columns, "source_kind = 'corpus'")
        if keys is not None:
            rows = rows.filter(pc.is_in(pair_keys(rows), value_set=pair_keys(keys)))
        new = SignatureMaker(options)(rows)
    else:
        signed = lake.dataset(
            PAIRS.name, version, columns, pc.field("source_kind") == "corpus", keys=keys
        ).map_batches(
            SignatureMaker,
            fn_constructor_kwargs={"options": options},
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=_cpus()),
        )
        new = pa.concat_tables([t for t in ray.get(signed.to_arrow_refs()) if t.num_rows])
    new = new.append_column("params_id", pa.array([options.params_id] * new.num_rows, pa.string()))
    lake.insert_new(MINHASH_SIGNATURES, new)
    log.info(
        f"[dedup] MinHash signatures of {new.num_rows:,} new pairs "
        f"in {time.perf_counter() - started:.1f}s"
    )


def _cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _drop(batch: pa.Table, keys: pa.Table) -> pa.Table:
    return batch.join(keys, ["source", "pair_id"], join_type="left anti")


NEAR_DEDUP_ON_DRIVER = 20_000
"""Pairs up to which the driver hashes the new pairs and finds the near-duplicate edges itself:
the Ray Data shuffles and joins cost about 30 s on 2 cores whatever the size (2,303 HH pairs:
31.7 s), the driver 0.5 s for the edges of 20,000 pairs (about 40 MB of signatures and
buckets), and 0.5 s for the signatures of 2,303 HH pairs (3.8 s on an actor pool)."""

_PAIRS_PER_PARTITION = 50_000
"""Shuffle partitions per pair: ~3.75M bucket rows (60 MB) per partition at 25 bands."""


def near_duplicates(
    lake: Lake,
    version: int,
    excluded: pa.Table,
    options: MinHashConfig,
    rank: Callable[[str], int],
    run_id: str,
) -> pa.Table:
    """Near-duplicate clusters among the corpus pairs at ``version`` but the ``excluded``
    (source, pair_id): in dedup, the pairs that are exact duplicates of another."""
    store_signatures(lake, version, options)
    started = time.perf_counter()
    count = lake.count(MINHASH_SIGNATURES.name, where=f"params_id = '{options.params_id}'")
    excluded = excluded.select(["source", "pair_id"])
    if count <= NEAR_DEDUP_ON_DRIVER:
        rows = lake.read(
            MINHASH_SIGNATURES.name,
            columns=["source", "pair_id", "signature", "buckets"],
            where=f"params_id = '{options.params_id}'",
        )
        edges = near_pairs_on_driver(_drop(rows, excluded), options)
        where = "on the driver"
    else:

        def signatures(columns: list[str]) -> ray.data.Dataset:
            rows = lake.dataset(
                MINHASH_SIGNATURES.name,
                columns=["source", *(c for c in columns if c != "source")],
                filter=pc.field("params_id") == options.params_id,
            )
            if excluded.num_rows:
                rows = rows.map_batches(_drop, batch_format="pyarrow", fn_kwargs={"keys": excluded})
            return rows.select_columns(columns)

        partitions = max(2 * _cpus(), -(-count // _PAIRS_PER_PARTITION))
        edges = near_pairs(signatures, options, partitions)
        where = f"{partitions} shuffle partitions"
    log.info(
        f"[dedup] {edges.num_rows:,} near-duplicate edges confirmed ({where}) "
        f"in {time.perf_counter() - started:.1f}s"
    )
    return near_clusters(edges, rank, run_id)


def _unpack(column: pa.ChunkedArray, dtype: type) -> np.ndarray:
    """Equal-length binary values -> one numpy array, without a Python loop over rows."""
    parts = [np.empty(0, dtype)]
    for chunk in pc.cast(column, pa.large_binary()).chunks:  # polars joins give large_binary
        if not len(chunk):
            continue
        data = np.frombuffer(chunk.buffers()[2], dtype=np.uint8)
        offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int64)
        offsets = offsets[chunk.offset : chunk.offset + len(chunk) + 1]
        parts.append(data[offsets[0] : offsets[-1]].view(dtype))
    return np.concatenate(parts)
