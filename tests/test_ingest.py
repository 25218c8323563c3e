"""Ingest on Ray Data with real data: every row accounted for, idempotent, tracked in MLflow."""

import gzip
import hashlib
import json
from pathlib import Path

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import jobs
from pipelines.core.config import SynprefConfig
from pipelines.core.lake import Lake
from pipelines.ingest.formats import FormatError, Limits
from pipelines.ingest.job import IngestRequest, normalise_batch
from pipelines.ingest.record_files import RAW_SCHEMA
from pipelines.ingest.synthetic import BAD_ROW_KINDS, CorpusSpec, write_corpus
from storage_schemas import PAIRS, QUARANTINE
from tests.conftest import HH_HARMLESS, JUDGEBENCH, RM_BENCH, shared_data

pytestmark = pytest.mark.usefixtures("ray_cluster")

RMBENCH_PROMPTS = {"chat": 129, "code": 228, "safety-refuse": 284, "safety-response": 157}


def ingest(config: SynprefConfig, paths, source: str, **options) -> dict:
    return jobs.ingest(
        config,
        IngestRequest(paths=[str(p) for p in paths], source=source, **options),
    ).as_dict()


def quarantine_reasons(lake: Lake, source: str) -> dict[str, int]:
    reasons = lake.read("quarantine", columns=["reason"], where=f"source = '{source}'")["reason"]
    return {r: reasons.to_pylist().count(r) for r in set(reasons.to_pylist())}


def test_hh_rlhf_every_row_is_accounted_for_and_reingest_adds_nothing(config, lake):
    path = shared_data(HH_HARMLESS)
    first = ingest(config, [path], "hh")
    assert first["records_read"] == first["candidates"] == 2312
    assert first["pairs_inserted"] + first["quarantined_inserted"] == 2312
    assert first["balanced"]
    # The five pairs whose conversation prefix differs between chosen and rejected:
    assert first["quarantine_reasons"]["history_mismatch"] == 5
    assert quarantine_reasons(lake, "hh")["history_mismatch"] == 5
    assert lake.read("pairs").num_rows == first["pairs_inserted"]

    second = ingest(config, [path], "hh")
    assert second["pairs_inserted"] == second["quarantined_inserted"] == 0
    assert second["pairs_already_present"] == first["pairs_inserted"]
    assert second["quarantined_already_present"] == first["quarantined_inserted"]
    assert second["pairs_version"] == first["pairs_version"]
    assert lake.read("pairs").num_rows == first["pairs_inserted"]

    pairs = lake.read("pairs")
    assert pairs.schema == PAIRS.schema
    assert set(pairs["ingest_run_id"].to_pylist()) == {first["run_id"]}
    row = pairs.slice(0, 1).to_pylist()[0]
    assert row["history"][0]["role"] == "user" and row["history_turns"] == len(row["history"])
    assert row["chosen_chars"] == len(row["chosen"])


def test_the_mlflow_run_records_input_hash_output_versions_and_counts(config, lake):
    path = shared_data(HH_HARMLESS)
    result = ingest(config, [path], "hh")
    mlflow.set_tracking_uri(config.tracking.uri)
    run = mlflow.get_run(result["run_id"])
    assert run.data.metrics["records_read"] == 2312
    assert run.data.metrics["quarantine.history_mismatch"] == 5
    assert run.data.params["request.source"] == "hh"
    assert run.data.tags["synpref.output.pairs.version"] == str(result["pairs_version"])
    assert result["inputs"][0]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert inputs["test.jsonl.gz"].dataset.digest == result["inputs"][0]["sha256"][:36]
    assert (
        json.loads(inputs["pairs"].dataset.source)["delta_table_version"] == result["pairs_version"]
    )
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(result["run_id"])}
    assert {"ingest_summary.json", "quarantine_sample.json"} <= artifacts


def test_rm_bench_ingests_nine_pairs_per_prompt_as_a_benchmark(config, lake):
    path = shared_data(RM_BENCH)
    result = ingest(config, [path], "rm-bench")
    assert result["source_kind"] == "benchmark"
    assert {i["format"] for i in result["inputs"]} == {"rmbench"}
    assert result["records_read"] == sum(RMBENCH_PROMPTS.values())
    assert result["candidates"] == 9 * sum(RMBENCH_PROMPTS.values())
    assert result["balanced"]
    pairs = lake.read("pairs", columns=["source_meta", "source_kind"])
    styles = {
        (m["chosen_style"], m["rejected_style"])
        for m in map(json.loads, pairs["source_meta"].to_pylist())
    }
    assert len(styles) == 9
    assert set(pairs["source_kind"].to_pylist()) == {"benchmark"}


def test_judgebench_ingests_350_pairs(config, lake):
    path = shared_data(JUDGEBENCH)
    result = ingest(config, [path], "judgebench")
    assert result["source_kind"] == "benchmark"
    assert (result["records_read"], result["pairs_inserted"], result["quarantined"]) == (
        350,
        350,
        0,
    )
    meta = [
        json.loads(m)
        for m in lake.read("pairs", columns=["source_meta"])["source_meta"].to_pylist()
    ]
    assert {m["label"] for m in meta} == {"A>B", "B>A"}


def test_synthetic_bad_rows_and_repeats_are_quarantined_with_reasons(config, lake, tmp_path):
    spec = CorpusSpec(pairs=300, seed=3, exact_duplicate_rate=0.05, bad_row_rate=0.1)
    files = write_corpus(spec, tmp_path / "corpus", shards=2)
    result = ingest(config, files, "synthetic")
    reasons = result["quarantine_reasons"]
    assert set(BAD_ROW_KINDS) <= reasons.keys()
    assert sum(reasons[k] for k in BAD_ROW_KINDS) == 30
    assert reasons["duplicate_in_source"] == 15
    assert result["balanced"] and result["pairs_inserted"] == 300 + 9 + 3  # + near-dups + flips
    repeats = lake.read("quarantine", where="reason = 'duplicate_in_source'")
    kept = set(lake.read("pairs", columns=["pair_id"])["pair_id"].to_pylist())
    assert set(repeats["pair_id"].to_pylist()) <= kept, "each repeat points at the kept pair"
    assert all("same pair as" in d for d in repeats["detail"].to_pylist())
    assert lake.read("quarantine").schema == QUARANTINE.schema
    again = ingest(config, files, "synthetic")
    assert again["pairs_inserted"] == again["quarantined_inserted"] == 0 and again["balanced"]


def test_json_parquet_and_mapping_inputs(config, lake, tmp_path):
    records = [
        {"q": f"question {i}", "answers": [{"text": f"good {i}"}, {"text": f"bad {i}"}]}
        for i in range(20)
    ]
    (tmp_path / "a.json").write_text(json.dumps(records))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "b.parquet")
    result = ingest(
        config,
        [tmp_path / "a.json", tmp_path / "b.parquet"],
        "mapped",
        format="mapping",
        mapping={"prompt": "q", "chosen": "answers.0.text", "rejected": "answers[1].text"},
    )
    # The same 20 pairs in two files: kept once, the repeats quarantined as such.
    assert (result["pairs_inserted"], result["quarantine_reasons"]) == (
        20,
        {"duplicate_in_source": 20},
    )
    assert result["records_read"] == 40


def test_a_malformed_json_file_and_undetectable_formats_are_reported(config, lake, tmp_path):
    (tmp_path / "broken.json").write_text('[{"prompt": "a", "chosen": "b", "rejected": "c"},')
    result = ingest(config, [tmp_path / "broken.json"], "broken", format="prompt")
    assert result["quarantine_reasons"] == {"malformed_json": 1}
    (tmp_path / "odd.jsonl").write_text('{"text": "hello"}\n')
    with pytest.raises(FormatError, match="cannot detect the format of .*odd.jsonl"):
        ingest(config, [tmp_path / "odd.jsonl"], "odd")
    with pytest.raises(FileNotFoundError, match="input not found"):
        ingest(config, [tmp_path / "missing.jsonl"], "odd")
    with pytest.raises(ValueError, match="source name"):
        IngestRequest(paths=["x"], source="bad name; drop")
    with pytest.raises(FormatError, match="no input paths given"):
        IngestRequest(paths=[], source="odd")
    (tmp_path / "pairs.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(FormatError, match="pairs.csv: unsupported file type; expected"):
        ingest(config, [tmp_path / "pairs.csv"], "odd")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("not records")
    with pytest.raises(FileNotFoundError, match="no record files .* in .*notes"):
        ingest(config, [tmp_path / "notes"], "odd")


def test_invalid_utf8_lines_are_quarantined_not_fatal(config, lake, tmp_path):
    path = tmp_path / "mixed.jsonl.gz"
    good = json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}).encode()
    with gzip.open(path, "wb") as f:
        f.write(good + b"\n\xff\xfe broken\n\n" + good.replace(b'"b"', b'"d"') + b"\n")
    result = ingest(config, [path], "mixed")
    assert (result["pairs_inserted"], result["quarantine_reasons"]) == (2, {"malformed_json": 1})
    rows = lake.read("quarantine").to_pylist()
    assert rows[0]["source_row"] == 1 and "invalid UTF-8" in rows[0]["detail"]


def _record(i: int, **extra) -> dict:
    return {"prompt": f"question {i}", "chosen": f"good {i}", "rejected": f"bad {i}", **extra}


def _nested(levels: int) -> str:
    return '{"x": ' * levels + "1" + "}" * levels


def test_files_a_reader_chokes_on_leave_a_reason_and_every_other_row_lands(config, lake, tmp_path):
    """Found by probing as a user: each of these crashed the whole ingest or kept a bad row."""
    lines = [json.dumps(_record(i)).encode() for i in range(20_000)]
    whole = gzip.compress(b"\n".join(lines) + b"\n")
    (tmp_path / "truncated.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    other = [json.dumps(_record(i)).encode() for i in range(100_000, 100_002)]  # not in the gzip
    bom = b"\xef\xbb\xbf"
    (tmp_path / "bom.jsonl").write_bytes(bom + b"\n".join(other) + b"\n")
    (tmp_path / "bom.json").write_bytes(bom + json.dumps([_record(-2), _record(-3)]).encode())
    utf8 = json.dumps([_record(-4), _record(-5, chosen="CHOSEN")]).encode()
    (tmp_path / "utf8.json").write_bytes(utf8.replace(b"CHOSEN", b"bad \xff byte"))
    binary = pa.array([b"good 6", b"bad \xff byte"]).view(pa.string())
    table = pa.table(
        {"prompt": ["question -6", "question -7"], "chosen": binary, "rejected": ["x", "y"]}
    )
    pq.write_table(table, tmp_path / "utf8.parquet")
    ratings = [
        {
            "prompt": "q",
            "completions": [{"response": "a", "rating": 5}, {"response": "b", "rating": 3}],
        },
    ]
    infinite = json.dumps(ratings[0]).replace("3}", "1e999}")
    (tmp_path / "ratings.jsonl").write_text(json.dumps(ratings[0]) + "\n" + infinite + "\n")
    deep = [
        json.dumps(_record(-9))[:-1] + f', "extra": {_nested(levels)}}}'
        for levels in (1_000, 100_000)
    ]
    nan_meta = json.dumps(_record(-10))[:-1] + ', "score": NaN}'
    (tmp_path / "deep.jsonl").write_text(
        "\n".join([*deep, nan_meta, json.dumps(_record(-11))]) + "\n"
    )

    result = ingest(config, [tmp_path], "probed")
    assert result["balanced"]
    quarantined = {
        (r["source_file"].rsplit("/", 1)[-1], r["source_row"]): r
        for r in lake.read("quarantine", where="source = 'probed'").to_pylist()
    }
    truncated = [r for (f, _), r in quarantined.items() if f == "truncated.jsonl.gz"]
    assert len(truncated) == 1 and "truncated.jsonl.gz" in truncated[0]["detail"]
    kept_from_truncated = lake.count("pairs", where="source_file LIKE '%truncated.jsonl.gz'")
    assert 0 < kept_from_truncated == truncated[0]["source_row"], "every record before the cut"
    assert lake.count("pairs", where="source_file LIKE '%bom.json%'") == 4, "a BOM is no data"
    assert "invalid UTF-8" in quarantined[("utf8.json", 1)]["detail"]
    assert "invalid UTF-8" in quarantined[("utf8.parquet", 1)]["detail"]
    assert "\ufffd" in quarantined[("utf8.parquet", 1)]["record"], "the row, readable"
    assert "not a finite number" in quarantined[("ratings.jsonl", 1)]["detail"]
    assert quarantined[("deep.jsonl", 0)]["reason"] == "malformed_json"
    assert "nested too deep" in quarantined[("deep.jsonl", 1)]["detail"]
    assert "NaN is not a JSON number" in quarantined[("deep.jsonl", 2)]["detail"]
    for path in ("utf8.json", "utf8.parquet", "deep.jsonl"):
        assert lake.count("pairs", where=f"source_file LIKE '%{path}'") == 1, path
    metas = lake.read("pairs", columns=["source_meta"], where="source_meta IS NOT NULL")
    for meta in metas["source_meta"].to_pylist():
        json.loads(meta, parse_constant=lambda name: pytest.fail(f"{name} in source_meta"))


def test_staging_left_by_an_ended_ingest_is_removed_by_the_next(config, lake, tmp_path):
    """A SIGKILLed ingest cannot remove its staging; the next ingest does, once the killed
    one's run has ended (a running ingest's staging, or a folder of no run, stays)."""
    mlflow.set_tracking_uri(config.tracking.uri)
    with mlflow.start_run() as ended:
        pass
    staging = Path(config.lake.root) / "_staging"
    for name in (f"ingest-{ended.info.run_id}", "ingest-not-a-run"):
        (staging / name / "kind=pair").mkdir(parents=True)
        (staging / name / "kind=pair" / "part-0.parquet").write_bytes(b"PAR1")
    (tmp_path / "one.jsonl").write_text(json.dumps(_record(0)) + "\n")
    ingest(config, [tmp_path / "one.jsonl"], "one")
    assert sorted(p.name for p in staging.iterdir()) == ["ingest-not-a-run"]


def test_normalise_batch_is_a_pure_arrow_function():
    raw = pa.Table.from_pylist(
        [
            {
                "source_file": "f",
                "source_row": 0,
                "record": '{"prompt": "p", "chosen": "a", "rejected": "b"}',
                "read_error": None,
            },
            {"source_file": "f", "source_row": 1, "record": "{not json", "read_error": None},
        ],
        schema=RAW_SCHEMA,
    )
    out = normalise_batch(
        raw, source="s", source_kind="corpus", formats={"f": "prompt"}, limits=Limits(), run_id="r"
    )
    assert out["kind"].to_pylist() == ["pair", "quarantine"]
    assert out["reason"].to_pylist() == [None, "malformed_json"]


@pytest.mark.slow
def test_s3_input_into_an_s3_lake(config, s3_endpoint, tmp_path):
    client, options = s3_endpoint
    client.create_bucket(Bucket="raw")
    client.create_bucket(Bucket="lake-ingest")
    files = write_corpus(CorpusSpec(pairs=50, seed=1), tmp_path / "c")
    client.upload_file(str(files[0]), "raw", "corpus/part-0.jsonl.gz")
    s3_config = config.model_copy(
        update={
            "lake": config.lake.model_copy(
                update={"root": "s3://lake-ingest/lake", "storage_options": options}
            )
        }
    )
    result = ingest(s3_config, ["s3://raw/corpus/"], "s3src")
    assert result["inputs"][0]["path"] == "s3://raw/corpus/part-0.jsonl.gz"
    assert result["balanced"] and result["pairs_inserted"] > 50
    lake = Lake("s3://lake-ingest/lake", options)
    assert lake.read("pairs").num_rows == result["pairs_inserted"]
    staged = client.list_objects_v2(Bucket="lake-ingest", Prefix="lake/_staging/ingest-")
    assert staged.get("KeyCount", 0) == 0, "staging is cleaned up"


def test_a_crash_between_the_two_commits_is_repaired_by_a_rerun(
    config, lake, tmp_path, monkeypatch
):
    """Pairs committed, then the job dies before the quarantine commit: the re-run completes the
    quarantine and adds no pair twice."""
    files = write_corpus(CorpusSpec(pairs=100, seed=11, bad_row_rate=0.1), tmp_path / "c")
    real_insert = Lake.insert_new

    def crash_on_quarantine(self, spec, data):
        if spec.name == "quarantine":
            raise RuntimeError("worker lost")
        return real_insert(self, spec, data)

    monkeypatch.setattr(Lake, "insert_new", crash_on_quarantine)
    with pytest.raises(RuntimeError, match="worker lost"):
        ingest(config, files, "crashy")
    pairs_after_crash = lake.read("pairs").num_rows
    assert not list((tmp_path / "lake" / "_staging").glob("ingest-*")), "staging is cleaned up"

    monkeypatch.setattr(Lake, "insert_new", real_insert)
    rerun = ingest(config, files, "crashy")
    assert rerun["pairs_inserted"] == 0 and rerun["pairs_already_present"] == pairs_after_crash
    assert rerun["quarantined_inserted"] == rerun["quarantined"] > 0
    assert lake.read("pairs").num_rows == pairs_after_crash
