"""The Delta access layer: creation from specs, idempotent writes, retries, time travel, S3."""

from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, Schema
from deltalake.exceptions import DeltaError, TableNotFoundError

from pipelines.core.errors import SelectionError
from pipelines.core.lake import Lake
from pipelines.core.selection import select_pair_keys
from storage_schemas import PAIRS, QUARANTINE, SCHEMA_VERSION, TABLES, TableSpec, table_spec
from tests.conftest import pairs_rows


def test_tables_are_created_from_their_spec(lake: Lake):
    lake.insert_new(PAIRS, pairs_rows(range(2)))
    table = DeltaTable(lake.uri("pairs"))
    assert table.schema() == Schema.from_arrow(PAIRS.schema)
    assert table.metadata().partition_columns == list(PAIRS.partition_by)
    configuration = table.metadata().configuration
    assert {f"delta.constraints.{name}" for name in PAIRS.constraints} <= configuration.keys()
    created = lake.history("pairs")[-1]
    assert created["operation"] == "CREATE TABLE"
    assert created["synpref.schemaVersion"] == str(SCHEMA_VERSION)


def test_insert_new_is_idempotent_and_returns_versions(lake: Lake):
    first = lake.insert_new(PAIRS, pairs_rows(range(3)))
    again = lake.insert_new(PAIRS, pairs_rows(range(3)))
    more = lake.insert_new(PAIRS, pairs_rows(range(2, 5)))
    assert (first.rows_inserted, again.rows_inserted, more.rows_inserted) == (3, 0, 2)
    assert again.version == first.version, "a write that adds nothing makes no commit"
    assert more.version == first.version + 1
    assert lake.read("pairs").num_rows == 5


def test_insert_new_streams_from_a_parquet_dataset(lake: Lake, tmp_path):
    pq.write_table(pairs_rows(range(4)), tmp_path / "staged.parquet")
    result = lake.insert_new(PAIRS, pads.dataset(tmp_path / "staged.parquet"))
    assert result.rows_inserted == 4


def test_upsert_overwrites_existing_keys(lake: Lake):
    lake.insert_new(PAIRS, pairs_rows(range(3)))
    result = lake.upsert(PAIRS, pairs_rows(range(2, 4), chosen="better"))
    assert (result.rows_inserted, result.rows_updated) == (1, 1)
    rows = {r["pair_id"]: r["chosen"] for r in lake.read("pairs").to_pylist()}
    assert rows[f"{2:032x}"] == "better 2" and rows[f"{0:032x}"] == "good 0"


def test_read_at_a_version_is_time_travel(lake: Lake):
    v1 = lake.insert_new(PAIRS, pairs_rows(range(2))).version
    lake.insert_new(PAIRS, pairs_rows(range(2, 6)))
    assert lake.read("pairs", version=v1).num_rows == 2
    assert lake.read("pairs").num_rows == 6
    only = lake.read("pairs", columns=["pair_id"], where="source_row >= 4")
    assert only.column_names == ["pair_id"] and only.num_rows == 2
    assert only.schema.field("pair_id").type == pa.string()


def test_append_adds_rows_as_they_are(lake: Lake):
    lake.append(PAIRS, pairs_rows(range(2)))
    lake.append(PAIRS, pairs_rows(range(2)))
    assert lake.read("pairs").num_rows == 4


def test_concurrent_writers_all_land(lake: Lake):
    lake.insert_new(PAIRS, pairs_rows([0]))  # create the table once

    def write(batch: int):
        return lake.insert_new(PAIRS, pairs_rows(range(batch * 10 + 1, batch * 10 + 11)))

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(write, range(4)))
    assert sum(r.rows_inserted for r in results) == 40
    assert lake.read("pairs").num_rows == 41


def test_constraints_reject_bad_rows(lake: Lake):
    rows = pairs_rows([1]).set_column(4, "chosen", pa.array(["bad 1"]))
    with pytest.raises(DeltaError, match="failed validation"):
        lake.insert_new(PAIRS, rows)


def test_bad_data_gets_clear_errors(lake: Lake):
    with pytest.raises(ValueError, match="keys occur more than once"):
        lake.insert_new(PAIRS, pa.concat_tables([pairs_rows([1]), pairs_rows([1])]))
    with pytest.raises(ValueError, match="lacks columns"):
        lake.insert_new(PAIRS, pairs_rows([1]).drop_columns(["chosen"]))
    nulls = pairs_rows([1]).set_column(4, "chosen", pa.array([None], pa.string()))
    with pytest.raises(ValueError, match="chosen is NOT NULL"):
        lake.insert_new(PAIRS, nulls)
    with pytest.raises(TableNotFoundError, match="does not exist"):
        lake.read("quarantine")


@pytest.mark.parametrize(
    "where",
    [
        "1=1 LIMIT 1",
        "1=0 UNION ALL SELECT * FROM t",
        "source = 's'; DROP TABLE t",
        "1=0) UNION ALL SELECT * FROM t WHERE (1=1",
        "1=0 /*(*/) UNION ALL SELECT * FROM t WHERE (1=1 /*)*/",
        "pair_id IN (SELECT pair_id FROM t WHERE chosen LIKE 'good%')",
        "no_such_column = 1",
    ],
)
def test_a_selection_is_one_predicate_and_nothing_else(lake: Lake, where: str):
    """A user's predicate cannot append a query, a limit or a statement to the one it selects
    with, however it places its parentheses and comments."""
    lake.insert_new(PAIRS, pairs_rows(range(3)))
    with pytest.raises(SelectionError, match="predicate on"):
        lake.check_predicate("pairs", where)
    with pytest.raises(SelectionError, match="predicate on"):
        select_pair_keys(lake, lake.version("pairs"), where)


def test_a_predicate_selects_what_it_says(lake: Lake):
    lake.insert_new(PAIRS, pairs_rows(range(3)))
    for where in ("source = 's' AND source_row < 2", "chosen LIKE '%) UNION (%' OR source_row = 0"):
        lake.check_predicate("pairs", where)
    keys = select_pair_keys(lake, lake.version("pairs"), "source_row < 2 OR chosen = '1) OR (1=1'")
    assert keys.num_rows == 2


def test_tables_lists_versions_and_row_counts(lake: Lake):
    assert lake.tables() == []
    lake.insert_new(PAIRS, pairs_rows(range(3)))
    (info,) = lake.tables()
    assert (info.name, info.rows) == ("pairs", 3)


def test_every_spec_is_consistent():
    for name, spec in TABLES.items():
        assert spec.name == name
        assert set(spec.keys) <= set(spec.schema.names)
        assert all(not spec.schema.field(k).nullable for k in spec.keys)
    assert table_spec("quarantine") is QUARANTINE
    with pytest.raises(KeyError, match="known tables"):
        table_spec("nope")
    with pytest.raises(ValueError, match="not in schema"):
        TableSpec("t", "", pa.schema([("a", pa.int64())]), keys=("b",))


def test_an_s3_lake_works_by_configuration(s3_endpoint):
    client, options = s3_endpoint
    client.create_bucket(Bucket="lake-unit")
    lake = Lake("s3://lake-unit/prod", options)
    assert lake.insert_new(PAIRS, pairs_rows(range(3))).rows_inserted == 3
    assert lake.insert_new(PAIRS, pairs_rows(range(3))).rows_inserted == 0
    assert [t.rows for t in lake.tables()] == [3]
    assert lake.read("pairs", version=0).num_rows == 0


def test_upsert_with_compare_rewrites_only_changed_rows(lake: Lake):
    lake.insert_new(PAIRS, pairs_rows(range(3)))
    version = lake.version("pairs")
    same = lake.upsert(PAIRS, pairs_rows(range(3)), compare=("chosen",))
    assert (same.rows_updated, same.version) == (0, version), "nothing changed, no commit"
    changed = lake.upsert(PAIRS, pairs_rows([1], chosen="other"), compare=("chosen",))
    assert changed.rows_updated == 1


def test_replace_decisions_keeps_exactly_the_new_decisions(lake: Lake):
    lake.replace_decisions(PAIRS, pairs_rows(range(4)), compare=("chosen",))
    version = lake.version("pairs")
    same = lake.replace_decisions(PAIRS, pairs_rows(range(4)), compare=("chosen",))
    assert same.version == version, "the same decisions make no commit"
    fewer = lake.replace_decisions(PAIRS, pairs_rows(range(2)), compare=("chosen",))
    assert (fewer.rows_deleted, lake.read("pairs").num_rows) == (2, 2)
    assert lake.read("pairs", version=version).num_rows == 4, "earlier decisions stay readable"
    empty = lake.replace_decisions(PAIRS, pairs_rows([]), compare=("chosen",))
    assert (empty.rows_deleted, lake.read("pairs").num_rows) == (2, 0)
