"""`pixelrefer query` is read-only by construction: writes and reads outside OUTPUT are refused."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.query_errors import RefusedQuery
from jobs.query_sql import open_index

from query_helpers import IndexInfo, assert_clean_error

pytestmark = pytest.mark.timeout(120)


# --------------------------------------------------------------------------------------------
# Read-only by construction.
# --------------------------------------------------------------------------------------------

REFUSED = [
    "INSERT INTO videos SELECT * FROM videos",
    "CREATE TABLE t AS SELECT 1",
    "CREATE VIEW w AS SELECT 1",
    "DROP VIEW videos",
    "DELETE FROM videos",
    "UPDATE videos SET status = 'ok'",
    "COPY videos TO '{tmp}/leak.csv'",
    "COPY (SELECT 1) TO '{tmp}/leak.parquet' (FORMAT parquet)",
    "EXPORT DATABASE '{tmp}/leak'",
    "ATTACH ':memory:' AS other",
    "ATTACH '{tmp}/leak.duckdb' AS other",
    "INSTALL fts",
    "LOAD fts",
    "SET threads = 1",
    "RESET lock_configuration",
    "PRAGMA enable_profiling",
    "EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1",
    "SELECT 1; DROP VIEW videos",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('/etc/hostname')",
    "SELECT * FROM glob('/etc/*')",
    "SELECT * FROM read_blob('{source}')",
    "SELECT * FROM read_parquet('{output}/_claims/*.parquet')",
    "SELECT * FROM read_text('{output}/videos/../../../../../../../../etc/passwd')",
]
# On S3 the same guard applies; these cover writes, attach and reads elsewhere in the same bucket.
REFUSED_ON_S3 = [REFUSED[i] for i in (6, 10, 13, 18, 21, 22)]

# What OUTPUT holds besides the rows: the tables' Delta logs (inside the table folders), the claims table and the search index. A SELECT sees rows only through the views.
NOT_ROWS = [
    "SELECT * FROM read_text('{output}/videos/_delta_log/00000000000000000000.json')",
    "SELECT * FROM read_json_auto('{output}/runs/_delta_log/*.json')",
    "SELECT * FROM glob('{output}/masks/_delta_log/*')",
    "SELECT * FROM read_text('{output}/_search/state.json')",
    "SELECT * FROM read_text('{output}/_claims/_delta_log/00000000000000000000.json')",
    "SELECT * FROM read_parquet('{output}/_claims/*.parquet')",
]
REFUSED_ON_S3 += NOT_ROWS[:1]


def check_refused(index: IndexInfo, run_query, tmp_path: Path, statement: str) -> None:
    sql = statement.format(tmp=tmp_path, source=index.uris["a"], output=index.output)
    code, out, err = run_query(*index.cli(), "--sql", sql)
    assert_clean_error(code, err, 2, "refused")
    assert out == ""
    assert list(tmp_path.iterdir()) == []  # nothing was written


@pytest.mark.parametrize("statement", REFUSED)
def test_writes_and_outside_reads_are_refused(local_index: IndexInfo, run_query, tmp_path: Path, statement: str) -> None:
    check_refused(local_index, run_query, tmp_path, statement)
    code, out, err = run_query(local_index.output, "--sql", "SELECT count(*) AS n FROM videos", "--format", "json")
    assert code == 0 and json.loads(out) == [{"n": 5}], err  # and the views are intact


@pytest.fixture(scope="module")
def index_with_state(tmp_path_factory: pytest.TempPathFactory, sample_videos, data) -> IndexInfo:
    """A local index that also holds a claims table and a search index state (as index runs leave them)."""
    index = data.local_index_at(tmp_path_factory.mktemp("state"), sample_videos)
    root = Path(index.output)
    (root / "_search").mkdir()
    (root / "_search" / "state.json").write_text(json.dumps({"commits": ["1700000000/0"]}))
    (root / "_claims" / "_delta_log").mkdir(parents=True)
    (root / "_claims" / "_delta_log" / "00000000000000000000.json").write_text('{"commitInfo": {}}\n')
    pq.write_table(pa.table({"key": ["a"], "holder": ["run-x"]}), root / "_claims" / "part-0.parquet")
    return index


@pytest.mark.parametrize("statement", NOT_ROWS)
def test_logs_claims_and_search_state_cannot_be_read(index_with_state: IndexInfo, run_query, tmp_path: Path,
                                                     statement: str) -> None:
    check_refused(index_with_state, run_query, tmp_path, statement)
    code, out, err = run_query(index_with_state.output, "--sql", "SELECT count(*) AS n FROM runs", "--format", "json")
    assert code == 0 and json.loads(out) == [{"n": 4}], err  # the views read the same tables


@pytest.mark.parametrize("statement", REFUSED_ON_S3)
def test_writes_and_outside_reads_are_refused_on_s3(s3_index: IndexInfo, run_query, tmp_path: Path, statement: str) -> None:
    check_refused(s3_index, run_query, tmp_path, statement)


def test_dot_dot_cannot_reach_outside_output_on_s3(
    s3_index: IndexInfo, s3_storage_options: dict[str, Any], run_query
) -> None:
    """`OUTPUT/videos/../../src/a.mp4`, resolved, is the source video `a` in the same bucket.

    Object stores do not resolve "..", so DuckDB may read it as a (missing) key under
    OUTPUT/videos/, or refuse it as outside the allowed folders (DuckDB 2 does). Either is safe;
    returning the video's bytes is not.
    """
    import s3fs

    bucket = s3_index.output.removeprefix("s3://").split("/", 1)[0]
    outside = s3fs.S3FileSystem(**s3_storage_options).cat_file(f"{bucket}/src/a.mp4")
    assert s3_index.uris["a"] == f"s3://{bucket}/src/a.mp4" and len(outside) > 1000
    sql = f"SELECT size, content FROM read_blob('{s3_index.output}/videos/../../src/a.mp4')"
    code, out, err = run_query(*s3_index.cli(), "--sql", sql, "--format", "json")
    if code == 0:
        assert json.loads(out) == [], "a key outside OUTPUT was read"
    else:
        assert_clean_error(code, err, 2, "refused")
        assert out == ""
    assert base64.b64encode(outside[:3000]).decode() not in out  # read_blob's content, as JSON shows it


def test_the_connection_itself_is_locked(local_index: IndexInfo, tmp_path: Path) -> None:
    """The second layer alone (no statement check) still refuses files and settings."""
    import duckdb

    with open_index(local_index.output) as ix:
        with pytest.raises(duckdb.Error):
            ix.con.execute(f"COPY (SELECT 1) TO '{tmp_path}/x.csv'")
        with pytest.raises(duckdb.Error):
            ix.con.execute("SET enable_external_access = true")
        with pytest.raises(duckdb.Error):
            ix.con.execute("SELECT * FROM read_csv('/etc/passwd')")
        with pytest.raises(RefusedQuery):
            ix.sql("CREATE TABLE t AS SELECT 1")
    assert list(tmp_path.iterdir()) == []
