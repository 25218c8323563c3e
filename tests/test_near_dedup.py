"""MinHash-LSH near-duplicate pairs: signatures, candidates, clusters, the incremental job."""

import json

import numpy as np
import pyarrow as pa
import pytest
import ray

from pipelines import jobs
from pipelines.core.config import MinHashConfig
from pipelines.core.lake import Lake
from pipelines.hygiene import near_dedup
from pipelines.hygiene.near_dedup import (
    MinHasher,
    SignatureMaker,
    bucket_edges,
    near_clusters,
    near_pairs,
    near_pairs_on_driver,
    node_ids,
)
from pipelines.ingest.job import IngestRequest
from pipelines.ingest.synthetic import CorpusSpec, write_corpus

OPTIONS = MinHashConfig()
TEXT = " ".join(f"word{i % 97} token{i % 13}" for i in range(120))


def test_signatures_are_the_minimum_of_each_hash_function():
    hasher = MinHasher(OPTIONS)
    texts = [TEXT, TEXT.replace("word5 ", "other "), "", "one two"]
    signatures = hasher.signatures(texts)
    for text, signature in zip(texts, signatures, strict=True):
        shingles = hasher.shingles(text)
        if len(shingles):
            expected = ((shingles[:, None] * hasher.a + hasher.b) >> np.uint64(32)).min(axis=0)
            assert (signature == expected.astype(np.uint32)).all()
        else:
            assert (signature == np.iinfo(np.uint32).max).all()
    assert len(hasher.shingles("one two")) == 1, "a text shorter than n is one shingle"


def test_same_parameters_same_signature_in_any_process():
    assert (MinHasher(OPTIONS).signatures([TEXT]) == MinHasher(OPTIONS).signatures([TEXT])).all()
    assert MinHashConfig(bands=10).params_id != OPTIONS.params_id


def pair_table(*triples):
    return pa.Table.from_pylist(
        [
            {
                "source": "s",
                "pair_id": f"p{i}",
                "history": [{"role": "user", "content": h}],
                "chosen": c,
                "rejected": r,
            }
            for i, (h, c, r) in enumerate(triples)
        ]
    )


def edit(text: str, every: int) -> str:
    words = text.split()
    return " ".join("EDITED" if i % every == 0 else w for i, w in enumerate(words))


def test_near_duplicates_need_all_three_fields_similar(ray_cluster):
    h, c, r = TEXT, TEXT[::-1], " ".join(reversed(TEXT.split()))
    batch = pair_table(
        (h, c, r),
        (edit(h, 60), edit(c, 60), edit(r, 60)),  # a light edit of every field
        (h, c, "a completely different rejected response " * 10),  # same history and chosen only
        ("unrelated " * 50, "nothing alike " * 40, "at all " * 30),
        (edit(h, 30), edit(c, 30), edit(r, 30)),  # a heavier edit, still similar
    )
    batch = batch.set_column(1, "pair_id", pa.array([str(i) * 32 for i in range(5)]))
    signatures = SignatureMaker(OPTIONS)(batch)

    def read(columns):
        return ray.data.from_arrow(signatures).select_columns(columns)

    edges = near_pairs(read, OPTIONS, partitions=3)
    found = sorted(zip(edges["pair_id_a"].to_pylist(), edges["pair_id_b"].to_pylist(), strict=True))
    assert [(a[0], b[0]) for a, b in found] == [("0", "1"), ("0", "4"), ("1", "4")]
    order = [("pair_id_a", "ascending"), ("pair_id_b", "ascending")]
    assert near_pairs_on_driver(signatures, OPTIONS).sort_by(order).equals(edges.sort_by(order))
    assert near_pairs_on_driver(signatures.slice(0, 0), OPTIONS).num_rows == 0
    clusters = near_clusters(edges, lambda s: 0, "r")
    assert sorted(p[0] for p in clusters["pair_id"].to_pylist()) == ["0", "1", "4"]
    assert set(clusters["cluster_size"].to_pylist()) == {3}
    assert set(clusters["representative_pair_id"].to_pylist()) == {"0" * 32}


def test_node_ids_are_the_leading_64_bits_of_the_content_hash():
    ids = pa.array(["ffffffffffffffff" + "0" * 16, "0000000000000001" + "f" * 16])
    assert node_ids(ids).tolist() == [-1, 1]


def test_big_buckets_are_chained_not_compared_all_to_all():
    shared = {"bucket": np.zeros(200, np.uint64), "node": np.arange(200)[::-1].copy()}
    edges = bucket_edges(shared)  # everyone shares one bucket
    assert len(edges["a"]) == 199 and (edges["a"] < edges["b"]).all()
    small = {
        "bucket": np.array([7, 5, 7, 7, 5, 9], np.uint64),
        "node": np.array([3, 2, 1, 1, 4, 5]),
    }
    edges = bucket_edges(small)  # a repeated node is no edge; singletons make none
    assert list(zip(edges["a"].tolist(), edges["b"].tolist(), strict=True)) == [(1, 3), (2, 4)]


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"threshold": 0}, "threshold"), ({"bands": 0}, "bands")]
)
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MinHashConfig(**kwargs)


def truth(lake, source):
    rows = lake.read(
        "pairs", columns=["pair_id", "source_meta"], where=f"source = '{source}'"
    ).to_pylist()
    return {r["pair_id"]: json.loads(r["source_meta"])["truth"] for r in rows}


@pytest.mark.usefixtures("ray_cluster")
def test_planted_near_duplicates_are_found_incrementally(config, lake, tmp_path, monkeypatch):
    """Found incrementally on the driver (a small set), and the same again from scratch on Ray
    Data (the path of sets over ``NEAR_DEDUP_ON_DRIVER``)."""
    spec = CorpusSpec(
        pairs=600, seed=4, near_duplicate_rate=0.1, near_duplicate_edit_rate=0.02, bad_row_rate=0
    )
    first = write_corpus(spec, tmp_path / "one")
    jobs.ingest(config, IngestRequest(paths=[str(f) for f in first], source="one")).as_dict()
    jobs.dedup(config).as_dict()

    second = write_corpus(
        CorpusSpec(
            pairs=200,
            seed=5,
            near_duplicate_rate=0.1,
            near_duplicate_edit_rate=0.02,
            bad_row_rate=0,
        ),
        tmp_path / "two",
    )
    jobs.ingest(config, IngestRequest(paths=[str(f) for f in second], source="two")).as_dict()
    result = jobs.dedup(config).as_dict()
    signatures = lake.history("minhash_signatures")
    assert [c["operation"] for c in signatures][:2] == ["MERGE", "MERGE"], (
        "second run hashed only new pairs"
    )
    assert (
        signatures[0]["operationMetrics"]["num_target_rows_inserted"] == 200 + 20 + 2
    )  # originals, near-dups, flips (exact repeats were quarantined)

    clusters = lake.read("dedup_clusters", where="method = 'near'").to_pylist()
    cluster_of = {(c["source"], c["pair_id"]): c["cluster_id"] for c in clusters}
    family, near_dups, originals = {}, [], {}  # family: the original a pair was planted from
    truths = {source: truth(lake, source) for source in ("one", "two")}
    for source, pairs in truths.items():
        for pid, t in pairs.items():
            if t["kind"] == "original":
                family[(source, pid)] = originals[(source, t["id"])] = (source, pid)
            elif t["kind"] == "near_dup":
                near_dups.append((source, pid))
    for source, pid in near_dups:
        family[(source, pid)] = originals[(source, truths[source][pid]["of"])]
    assert len(near_dups) == 80
    found = [k for k in near_dups if k in cluster_of and cluster_of[k] == cluster_of.get(family[k])]
    assert len(found) / len(near_dups) >= 0.95, "recall"
    members: dict[str, set] = {}
    for key, cluster in cluster_of.items():
        members.setdefault(cluster, set()).add(family.get(key))
    pure = [f for f in members.values() if len(f) == 1 and None not in f]
    assert len(pure) / len(members) >= 0.95, "precision: a cluster holds one planted family"
    assert result["near_duplicates"] == len(cluster_of) - len(members)

    fresh = config.model_copy(
        update={"lake": config.lake.model_copy(update={"root": str(tmp_path / "fresh")})}
    )
    for source, files in (("one", first), ("two", second)):
        jobs.ingest(fresh, IngestRequest(paths=[str(f) for f in files], source=source)).as_dict()
    monkeypatch.setattr(near_dedup, "NEAR_DEDUP_ON_DRIVER", 0)
    full = jobs.dedup(fresh).as_dict()
    assert (full["near_clusters"], full["near_duplicates"]) == (
        result["near_clusters"],
        result["near_duplicates"],
    )
    fresh_lake = Lake(fresh.lake.root)
    columns = ["source", "pair_id", "representative_source", "representative_pair_id"]
    order = [(c, "ascending") for c in columns]
    for_both = [
        near_lake.read("dedup_clusters", columns=columns, where="method = 'near'").sort_by(order)
        for near_lake in (lake, fresh_lake)
    ]
    assert for_both[0].equals(for_both[1]), "the driver and Ray Data found the same clusters"
    near_status = fresh_lake.count("curation_status", where="status = 'near_dup'")
    assert 0 < near_status <= full["near_duplicates"]  # a conflict outranks being a near-dup
    fresh.dedup.minhash.enabled = False
    without = jobs.dedup(fresh).as_dict()
    assert without["near_duplicates"] == 0
    assert fresh_lake.count("dedup_clusters", where="method = 'near'") == 0, (
        "stale decisions are removed"
    )
    assert fresh_lake.count("curation_status", where="status = 'near_dup'") == 0
