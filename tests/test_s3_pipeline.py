"""The whole pipeline once on an `s3://` lake (moto's server on the loopback), as on a cluster:
the raw files read from the bucket, then ingest, dedup, decontaminate, judge, train and score,
each reading and writing Delta tables in S3. Every step's own logic is tested on local lakes
elsewhere; this checks that none of them assumes a local path."""

from __future__ import annotations

import gzip
import json

import pytest

from pipelines import jobs
from pipelines.core.lake import Lake
from pipelines.ingest.job import IngestRequest
from tests.conftest import HH_HARMLESS, RM_BENCH, scripted_judge, shared_data

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_the_pipeline_end_to_end_on_an_s3_lake(
    config, s3_endpoint, scripted_server_url, ray_cluster, tmp_path
):
    client, options = s3_endpoint
    client.create_bucket(Bucket="pipeline")
    with gzip.open(shared_data(HH_HARMLESS), "rt") as hh:
        records = [json.loads(line) for line in hh.read().splitlines()[:80]]
    benchmark = json.loads(shared_data(RM_BENCH / "chat_filtered.json").read_text())[:20]
    planted = benchmark[0]["prompt"]  # a benchmark prompt in the corpus: contamination
    records.append(
        {
            "chosen": f"\n\nHuman: {planted}\n\nAssistant: Here is a careful answer.",
            "rejected": f"\n\nHuman: {planted}\n\nAssistant: No.",
        }
    )
    records.append(records[0])  # an exact repeat
    for key, body in (
        ("raw/hh.jsonl", "".join(json.dumps(r) + "\n" for r in records)),
        ("raw/rmbench/chat_filtered.json", json.dumps(benchmark)),
    ):
        client.put_object(Bucket="pipeline", Key=key, Body=body.encode())

    config.lake.root = "s3://pipeline/lake"
    config.lake.storage_options = options
    config.judging.judges = [scripted_judge(scripted_server_url)]
    config.training = config.training.model_copy(
        update={
            "workers": 0,  # Ray Data reads the s3 lake for the trainer whichever mode it runs
            "cpus_per_worker": 1.5,
            "max_length": 32,
            "global_batch": 16,
            "storage_path": str(tmp_path / "checkpoints"),
            "data": config.training.data.model_copy(
                update={"where": "source = 'hh'", "validation_fraction": 0.25}
            ),
        }
    )
    config.scoring = config.scoring.model_copy(update={"max_length": 32})

    ingested = jobs.ingest(config, IngestRequest(["s3://pipeline/raw/hh.jsonl"], "hh")).summary
    jobs.ingest(config, IngestRequest(["s3://pipeline/raw/rmbench/"], "rm-bench"))
    lake = Lake(config.lake.root, config.lake.storage_options)
    pairs = lake.count("pairs", where="source = 'hh'")
    assert ingested.candidates == 82 and pairs == ingested.pairs_inserted
    assert pairs + ingested.pairs_already_present + ingested.quarantined_inserted == 82

    assert jobs.dedup(config).summary.pairs == pairs, "the corpus, not the benchmark"
    contaminated = jobs.decontaminate(config).summary
    assert contaminated.contaminated_pairs.get("hh", 0) >= 1, "the planted benchmark prompt"
    judged = jobs.judge(config, where="source = 'hh'").summary
    assert judged.judges[0].judged == 2 * pairs, "every pair in both orders"
    trained = jobs.train(config, "s3-rm").summary
    assert trained.train_pairs + trained.validation_pairs == pairs
    scored = jobs.score(config, trained.model_folder, "s3-rm", "source = 'hh'").summary
    assert scored.scored == pairs

    written = {
        key["Key"].split("/")[1]
        for key in client.list_objects_v2(Bucket="pipeline", Prefix="lake/")["Contents"]
        if "/_delta_log/" in key["Key"]
    }
    assert {
        "pairs",
        "quarantine",
        "curation_status",
        "contamination",
        "judgments",
        "verdicts",
        "rm_scores",
    } <= written
