"""`pixelrefer query` and `open_index` over the test index, locally and on loopback S3."""

from __future__ import annotations

import argparse
import ast
import base64
import csv
import io
import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from jobs.query import add_query_arguments, query_main
from jobs.query_errors import RefusedQuery
from jobs.query_formats import FORMATS, WRITERS
from jobs.query_search import STOPWORDS
from jobs.query_sql import open_index
from jobs.query_video import presence_spans
from schemas.tables import TABLES

IndexInfo = Any  # tests/jobs/conftest.py: IndexInfo (conftest modules are not imported by name)

# The run ids of the test index (tests/jobs/conftest.py); parametrized ids need them at import.
RUN1, RUN2, RUN3, STAGED_RUN = "1700000000", "run-2024-02", "run-2024-03", "run-2024-04"

pytestmark = pytest.mark.timeout(120)


def is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def assert_clean_error(code: int, err: str, expected_code: int, *phrases: str) -> None:
    assert code == expected_code, err
    assert "Traceback" not in err
    for phrase in phrases:
        assert phrase.lower() in err.lower(), err


# --------------------------------------------------------------------------------------------
# Views.
# --------------------------------------------------------------------------------------------


def test_views_have_schema_columns_and_a_single_string_run_id(index: IndexInfo, data) -> None:
    with open_index(index.output, index.storage_options) as ix:
        for name, schema in TABLES.items():
            table = ix.sql(f"SELECT * FROM {name}")
            assert table.column_names == schema.names, name  # hive run_id merged, not duplicated
            assert is_text(table.schema.field("run_id").type), name  # "1700000000" stays a string
        expected = data.index_tables(index.uris, index.truths)
        for name in TABLES:
            rows = ix.sql(f"SELECT run_id, count(*) AS n FROM {name} GROUP BY run_id").to_pylist()
            counts = {r["run_id"]: r["n"] for r in rows}
            want = {run: len(tables[name]) for run, tables in expected.items() if tables[name]}
            assert counts == want, name
        # The value stored in each file (hive partitioning off) is the one its folder names.
        rows = ix.sql("SELECT run_id, filename FROM read_parquet("
                      f"'{ix.location.table_glob('captions')}', filename = true, hive_partitioning = false)"
                      ).to_pylist()  # fmt: skip
        assert rows and all(f"/run_id={r['run_id']}/" in r["filename"] for r in rows)
        view = ix.sql("SELECT run_id, count(*) AS n FROM captions GROUP BY ALL ORDER BY ALL").to_pylist()
        assert view == [{"run_id": k, "n": v} for k, v in sorted(Counter(r["run_id"] for r in rows).items())]


def test_staging_is_never_read(index: IndexInfo, run_query) -> None:
    with open_index(index.output, index.storage_options) as ix:
        for name in ("videos", "objects"):
            runs = ix.sql(f"SELECT DISTINCT run_id FROM {name}").column("run_id").to_pylist()
            assert STAGED_RUN not in runs
        assert ix.sql("SELECT * FROM videos WHERE uri LIKE '%#staged'").num_rows == 0
    code, _, err = run_query(*index.cli(), "--sql", f"SELECT * FROM read_parquet('{index.output}/_staging/**/*.parquet')")
    assert_clean_error(code, err, 2, "refused")


def test_latest_videos_view_picks_latest_ok_run(index: IndexInfo) -> None:
    with open_index(index.output, index.storage_options) as ix:
        latest = {r["video_id"]: r["run_id"] for r in ix.sql("SELECT video_id, run_id FROM latest_videos").to_pylist()}
    assert latest == {index.video_ids["a"]: RUN2, index.video_ids["b"]: RUN1}  # "c" never indexed ok


# --------------------------------------------------------------------------------------------
# --sql and the output formats.
# --------------------------------------------------------------------------------------------


def test_sql_in_each_format(index: IndexInfo, run_query) -> None:
    sql = "SELECT video_id, object_id, run_id, first_ts, frames[1].bbox AS bbox FROM objects ORDER BY ALL"
    code, out, err = run_query(*index.cli(), "--sql", sql)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["video_id", "object_id", "run_id", "first_ts", "bbox"]
    assert lines[-1] == "(8 rows)"

    code, out, err = run_query(*index.cli(), "--sql", sql, "--format", "json")
    assert code == 0, err
    rows = json.loads(out)  # one document: an array of row objects
    assert len(rows) == 8 and rows[0]["bbox"] and all(len(r["bbox"]) == 4 for r in rows)
    assert {r["run_id"] for r in rows} == {RUN1, RUN2}

    code, out, err = run_query(*index.cli(), "--sql", sql, "--format", "csv")
    assert code == 0, err
    parsed = list(csv.DictReader(io.StringIO(out)))
    assert [dict(r) for r in parsed][0].keys() == rows[0].keys()
    assert [json.loads(r["bbox"]) for r in parsed] == [r["bbox"] for r in rows]

    code, out, err = run_query(*index.cli(), "--sql", sql, "--format", "jsonl")
    assert code == 0, err
    assert [json.loads(line) for line in out.splitlines()] == rows  # one object per line


def test_json_is_one_document_even_when_empty(local_index: IndexInfo, run_query) -> None:
    empty = "SELECT video_id FROM videos WHERE false"
    code, out, err = run_query(local_index.output, "--sql", empty, "--format", "json")
    assert code == 0 and json.loads(out) == [], err
    code, out, err = run_query(local_index.output, "--sql", empty, "--format", "jsonl")
    assert code == 0 and out == "", err
    code, out, err = run_query(local_index.output, "--text", "zebra", "--format", "json")
    assert code == 0 and json.loads(out) == [], err
    code, out, err = run_query(local_index.output, "--format", "json")  # the runs listing
    assert code == 0 and [r["run_id"] for r in json.loads(out)] == [RUN1, RUN2, RUN3], err


def test_sql_json_handles_timestamps_and_nested_rows(local_index: IndexInfo, run_query) -> None:
    code, out, err = run_query(local_index.output, "--sql", "SELECT * FROM videos WHERE run_id = 'run-2024-02'",
                               "--format", "json")  # fmt: skip
    assert code == 0, err
    (row,) = json.loads(out)
    assert row["indexed_at"].startswith("2024-02-01T00:00:00")
    assert row["sampled_ts"][:3] == [0.0, 0.2, 0.4]


def test_intervals_print_as_durations_in_every_format(local_index: IndexInfo, run_query) -> None:
    sql = ("SELECT INTERVAL 32673 MILLISECONDS AS took, INTERVAL 1 DAY + INTERVAL 2 SECONDS AS day, "
           "INTERVAL 1 MONTH AS month")  # fmt: skip
    code, out, err = run_query(local_index.output, "--sql", sql)
    assert code == 0, err
    assert out.splitlines()[2].split() == ["0:00:32.673000", "1", "day,", "0:00:02", "P1M0DT0S"]
    code, out, err = run_query(local_index.output, "--sql", sql, "--format", "json")
    assert json.loads(out) == [{"took": 32.673, "day": 86402.0, "month": "P1M0DT0S"}]
    code, out, err = run_query(local_index.output, "--sql", sql, "--format", "jsonl")
    assert json.loads(out) == {"took": 32.673, "day": 86402.0, "month": "P1M0DT0S"}
    code, out, err = run_query(local_index.output, "--sql", sql, "--format", "csv")
    assert out.splitlines()[1] == "32.673,86402.0,P1M0DT0S"


def test_query_streams_record_batches(local_index: IndexInfo) -> None:
    with open_index(local_index.output) as ix:
        reader = ix.reader("SELECT video_id, object_id FROM objects", batch_rows=3)
        sizes = [batch.num_rows for batch in reader]
    assert sum(sizes) == 8 and len(sizes) >= 3 and max(sizes) <= 3


@pytest.mark.parametrize("fmt", FORMATS)
def test_writers_emit_each_batch_before_pulling_the_next(fmt: str) -> None:
    """The CLI never collects a result: the first rows are out before the second batch exists."""
    out = io.StringIO()
    seen_before_second: list[str] = []
    schema = pa.schema([("x", pa.int64()), ("tags", pa.list_(pa.string()))])

    def batches():
        yield pa.record_batch([pa.array([1, 2]), pa.array([["a"], []])], schema=schema)
        seen_before_second.append(out.getvalue())
        yield pa.record_batch([pa.array([3]), pa.array([None], pa.list_(pa.string()))], schema=schema)

    WRITERS[fmt](pa.RecordBatchReader.from_batches(schema, batches()), out)
    assert "2" in seen_before_second[0]
    assert "3" in out.getvalue()
    if fmt == "json":  # one document across the batch boundary
        assert json.loads(out.getvalue()) == [{"x": 1, "tags": ["a"]}, {"x": 2, "tags": []}, {"x": 3, "tags": None}]


def test_filters_on_run_id_prune_other_runs(private_local_index: IndexInfo, run_query) -> None:
    """A damaged file in another run's partition is never opened when run_id is filtered."""
    bad = Path(private_local_index.output) / "objects" / "run_id=zzz-damaged" / "part-00000.parquet"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not parquet at all")
    code, out, err = run_query(private_local_index.output, "--sql",
                               f"SELECT count(*) AS n FROM objects WHERE run_id = '{RUN1}'", "--format", "json")  # fmt: skip
    assert code == 0, err
    assert json.loads(out) == [{"n": 5}]
    code, out, err = run_query(private_local_index.output, "--video", private_local_index.video_ids["a"])
    assert code == 0, err  # the video view reads only the chosen run
    code, out, err = run_query(private_local_index.output, "--sql", "SELECT count(*) FROM objects", "--format", "json")
    assert_clean_error(code, err, 1, "zzz-damaged")
    assert out == ""  # the array's `[` waits for the first row: no half document on an early error


# --------------------------------------------------------------------------------------------
# --video.
# --------------------------------------------------------------------------------------------


def video_json(run_query, index: IndexInfo, *argv: str) -> dict:
    code, out, err = run_query(*index.cli(), *argv, "--format", "json")
    assert code == 0, err
    doc = json.loads(out)  # one object, not rows
    code, line, err = run_query(*index.cli(), *argv, "--format", "jsonl")
    assert code == 0 and line.count("\n") == 1 and json.loads(line) == doc, err
    return doc


def test_video_shows_latest_ok_run_by_id_uri_and_prefix(index: IndexInfo, run_query, data) -> None:
    by_id = video_json(run_query, index, "--video", index.video_ids["a"])
    assert by_id["video"]["run_id"] == RUN2 and by_id["video"]["model"] == "tiny-b"
    assert [r["run_id"] for r in by_id["runs"]] == [RUN3, RUN2, RUN1]
    assert [c["caption"] for c in by_id["captions"]] == list(data.CAPTIONS[(RUN2, "a")].values())
    assert [(a["object_ids"], a["answer"]) for a in by_id["qa"]] == [(ids, ans) for ids, _, ans in data.QA[(RUN2, "a")]]
    objects = {o["object_id"]: o for o in by_id["objects"]}
    assert objects[3]["first_ts"] == pytest.approx(1.0) and objects[3]["spans"] == [[1.0, 1.8]]
    assert objects[1]["num_frames"] == 10 and "frames" not in objects[1]
    assert video_json(run_query, index, "--video", index.uris["a"]) == by_id
    assert video_json(run_query, index, "--video", index.video_ids["a"][:7]) == by_id


def test_video_run_option_and_failed_video(index: IndexInfo, run_query, data) -> None:
    old = video_json(run_query, index, "--video", index.video_ids["a"], "--run", RUN1)
    assert [c["caption"] for c in old["captions"]] == list(data.CAPTIONS[(RUN1, "a")].values())
    failed = video_json(run_query, index, "--video", index.uris["c"])
    assert failed["video"]["status"] == "failed" and failed["video"]["error"] == "moov atom not found"
    assert failed["objects"] == [] and failed["captions"] == []


def test_video_table_and_csv(local_index: IndexInfo, run_query) -> None:
    code, out, err = run_query(local_index.output, "--video", local_index.video_ids["a"])
    assert code == 0, err
    assert "run_id      run-2024-02" in out
    for section in ("objects:", "captions:", "answers:"):
        assert section in out
    assert "a yellow square falling slowly" in out
    code, out, err = run_query(local_index.output, "--video", local_index.video_ids["a"], "--format", "csv")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert Counter(r["section"] for r in rows) == {"object": 3, "caption": 3, "answer": 2}
    assert {r["run_id"] for r in rows} == {RUN2}


def test_video_not_found(index: IndexInfo, run_query) -> None:
    code, _, err = run_query(*index.cli(), "--video", "no-such-video")
    assert_clean_error(code, err, 1, "no video 'no-such-video'")
    code, _, err = run_query(*index.cli(), "--video", index.video_ids["a"], "--run", "no-such-run")
    assert_clean_error(code, err, 1, "no run 'no-such-run'")


# --------------------------------------------------------------------------------------------
# --text: BM25, checked against an independent implementation of the documented formula.
# --------------------------------------------------------------------------------------------


def reference_terms(text: str) -> list[str]:
    """Tokenizer as documented in jobs.query_search: lower case, split on non-alphanumerics, stop words, S-stemmer."""
    terms = []
    for word in re.split(r"[^\w]+|_", text.lower()):
        if not word or word in STOPWORDS:
            continue
        if len(word) > 3 and word.endswith("ies") and not word.endswith(("eies", "aies")):
            word = word[:-3] + "y"
        elif len(word) > 3 and word.endswith("es") and not word.endswith(("aes", "ees", "oes")):
            word = word[:-1]
        elif len(word) > 3 and word.endswith("s") and not word.endswith(("us", "ss")):
            word = word[:-1]
        terms.append(word)
    return terms


def reference_bm25(docs: dict[tuple[str, int], list[str]], query: str, k1: float = 1.2, b: float = 0.75) -> dict:
    terms = set(reference_terms(query))
    tokens = {key: [t for text in texts for t in reference_terms(text)] for key, texts in docs.items()}
    n = len(tokens)
    avg = sum(len(v) for v in tokens.values()) / n
    df = {t: sum(1 for v in tokens.values() if t in v) for t in terms}
    scores = {}
    for key, toks in tokens.items():
        score = 0.0
        for t in terms:
            tf = toks.count(t)
            if tf:
                idf = math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5))
                score += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(toks) / avg))
        if score:
            scores[key] = score
    return scores


def latest_documents(index: IndexInfo, data) -> dict[tuple[str, int], list[str]]:
    """Object -> its captions and answers, for each video's latest ok run (a: RUN2, b: RUN1)."""
    docs: dict[tuple[str, int], list[str]] = {}
    for run, name in ((RUN2, "a"), (RUN1, "b")):
        vid = index.video_ids[name]
        for oid, text in data.CAPTIONS[(run, name)].items():
            docs.setdefault((vid, oid), []).append(text)
        for ids, _, answer in data.QA[(run, name)]:
            for oid in ids:
                docs.setdefault((vid, oid), []).append(answer)
    return docs


@pytest.mark.parametrize("words", ["red trucks", "blue ball", "Purple!", "green car parked"])
def test_text_search_matches_reference_bm25(index: IndexInfo, run_query, data, words: str) -> None:
    code, out, err = run_query(*index.cli(), "--text", words, "--format", "json")
    assert code == 0, err
    got = json.loads(out)
    want = reference_bm25(latest_documents(index, data), words)
    assert {(r["video_id"], r["object_id"]): r["score"] for r in got} == pytest.approx(want)
    assert [r["score"] for r in got] == sorted((r["score"] for r in got), reverse=True)
    assert all(r["run_id"] in (RUN1, RUN2) and r["match"] for r in got)


def test_text_search_ranking_and_edges(index: IndexInfo, run_query) -> None:
    with open_index(index.output, index.storage_options) as ix:
        top = ix.search("red truck", limit=1).to_pylist()
        assert [(r["video_id"], r["object_id"]) for r in top] == [(index.video_ids["a"], 1)]
        assert top[0]["match"] == "a red truck with a red cabin moving right"
        assert ix.search("RED TRUCK").to_pylist() == ix.search("red truck").to_pylist()
        assert ix.search("small").num_rows == 0  # only in RUN1's caption of "a": superseded by RUN2
        assert ix.search("cabin").column("run_id").to_pylist() == [RUN2]
    code, out, err = run_query(*index.cli(), "--text", "zebra")
    assert code == 0 and out.strip().endswith("(0 rows)"), err
    code, _, err = run_query(*index.cli(), "--text", "the a ,")
    assert_clean_error(code, err, 2, "no searchable words")


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
    "SELECT * FROM read_parquet('{output}/_staging/**/*.parquet')",
    "SELECT * FROM read_text('{output}/videos/../../../../../../../../etc/passwd')",
]
# On S3 the same guard applies; these cover writes, attach and reads elsewhere in the same bucket.
REFUSED_ON_S3 = [REFUSED[i] for i in (6, 10, 13, 18, 21, 22)]


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


# --------------------------------------------------------------------------------------------
# Bad input: one clear line, a non-zero exit, never a traceback.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "phrase"),
    [
        ("SELEC * FROM videos", "syntax error"),
        ("SELECT * FROM no_such_table", "the tables are: videos"),
        ("SELECT no_such_column FROM videos", "no_such_column"),
        ("", "empty"),
    ],
)
def test_bad_sql(index: IndexInfo, run_query, sql: str, phrase: str) -> None:
    code, _, err = run_query(*index.cli(), "--sql", sql)
    assert_clean_error(code, err, 2, phrase)


def test_output_without_a_committed_run(tmp_path: Path, local_index: IndexInfo, run_query, data) -> None:
    runs = data.index_tables(local_index.uris, local_index.truths)
    import fsspec

    data.write_index(fsspec.filesystem("file"), str(tmp_path / "out"), runs, prefix="_staging/crashed/")
    code, _, err = run_query(str(tmp_path / "out"))
    assert_clean_error(code, err, 1, "no committed run")
    code, _, err = run_query(str(tmp_path / "does-not-exist"))
    assert_clean_error(code, err, 1, "does not exist")


def test_s3_output_without_a_committed_run(s3_index: IndexInfo, run_query) -> None:
    code, _, err = run_query(*[a.replace("/index", "/no-index") for a in s3_index.cli()])
    assert_clean_error(code, err, 1, "s3://")


def test_bad_storage_options(local_index: IndexInfo, run_query) -> None:
    code, _, err = run_query(local_index.output, "--storage-options", "{not json")
    assert_clean_error(code, err, 2, "--storage-options")
    code, _, err = run_query(local_index.output, "--storage-options", "[1]")
    assert_clean_error(code, err, 2, "JSON object")


def test_tables_without_files_are_empty_not_errors(tmp_path: Path, local_index: IndexInfo, data) -> None:
    """A run with no questions writes no qa file: the view is empty, with the table's columns."""
    import fsspec

    runs = data.index_tables(local_index.uris, local_index.truths)
    only = {RUN1: {"videos": runs[RUN1]["videos"], "objects": runs[RUN1]["objects"], "captions": [], "qa": []}}
    data.write_index(fsspec.filesystem("file"), str(tmp_path / "out"), only)
    (tmp_path / "out" / "captions").mkdir()  # a folder without files counts as no files
    with open_index(str(tmp_path / "out")) as ix:
        assert ix.sql("SELECT * FROM qa").column_names == TABLES["qa"].names
        assert ix.search("red").num_rows == 0
        assert ix.video(local_index.video_ids["a"]).objects.num_rows == 3


# --------------------------------------------------------------------------------------------
# API and CLI plumbing.
# --------------------------------------------------------------------------------------------


def test_python_api(local_index: IndexInfo) -> None:
    with open_index(local_index.output) as ix:
        table = ix.sql("SELECT video_id, status FROM videos WHERE status = $s", {"s": "failed"})
        assert isinstance(table, pa.Table) and table.num_rows == 2
        result = ix.video(local_index.uris["b"])
        assert result.run_id == RUN1 and result.objects.num_rows == 2
        assert result.objects.column("frames")[0].as_py()[0]["rle"]["counts"]
        assert ix.search("green", limit=5).column("object_id").to_pylist() == [1]
        assert ix.runs().column("run_id").to_pylist() == [RUN1, RUN2, RUN3]


def test_subparser_wiring_as_the_umbrella_cli_does_it(local_index: IndexInfo, capsys) -> None:
    parser = argparse.ArgumentParser(prog="pixelrefer")
    sub = parser.add_subparsers(dest="command", required=True)
    add_query_arguments(sub.add_parser("query"))
    args = parser.parse_args(["query", local_index.output, "--text", "ball", "--format", "csv", "--limit", "1"])
    assert query_main(args) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 1 and "ball" in rows[0]["match"]
    with pytest.raises(SystemExit):
        parser.parse_args(["query", local_index.output, "--sql", "SELECT 1", "--video", "x"])


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function (lazy imports count too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_job_modules_import_downward_only() -> None:
    """The CLI imports its subcommands and `jobs.query` its parts; never the other way round."""
    jobs = Path(__file__).resolve().parents[2] / "jobs"
    for path in sorted(jobs.glob("*.py")):
        imports = imported_modules(path)
        if path.stem != "cli":
            assert "jobs.cli" not in imports, f"{path.name} imports jobs.cli"
        if path.stem.startswith("query_"):
            assert "jobs.query" not in imports, f"{path.name} imports the command module jobs.query"


def test_presence_spans_break_at_missed_sampled_frames() -> None:
    sampled = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert presence_spans([0.5, 1.0, 2.0, 2.5], sampled) == [(0.5, 1.0), (2.0, 2.5)]
    assert presence_spans([1.5], sampled) == [(1.5, 1.5)]
    assert presence_spans([0.1, 0.9], None) == [(0.1, 0.9)]
    assert presence_spans([], sampled) == []


def test_run_summary_without_a_mode(local_index: IndexInfo, run_query) -> None:
    code, out, err = run_query(local_index.output, "--format", "csv")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["run_id"], r["videos_ok"], r["videos_failed"]) for r in rows] == [
        (RUN1, "2", "1"), (RUN2, "1", "0"), (RUN3, "0", "1"),
    ]  # fmt: skip
    assert os.path.isdir(local_index.output)
