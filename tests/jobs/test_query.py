"""`pixelrefer query` and `open_index` over the test index, locally and on loopback S3."""

from __future__ import annotations

import argparse
import ast
import csv
import io
import json
import os
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from jobs.query import add_query_arguments, query_main
from jobs.query_formats import FORMATS, WRITERS
from jobs.query_sql import open_index
from schemas.tables import TABLES

from query_helpers import (RUN1, RUN2, RUN3, STAGED_RUN, IndexInfo, assert_clean_error, assert_types_match,
                           is_text)

pytestmark = pytest.mark.timeout(120)


# --------------------------------------------------------------------------------------------
# Views.
# --------------------------------------------------------------------------------------------


def test_views_have_schema_columns_and_a_single_string_run_id(index: IndexInfo, data) -> None:
    with open_index(index.output, index.storage_options) as ix:
        for name, schema in TABLES.items():
            table = ix.sql(f"SELECT * FROM {name}")
            assert table.column_names == schema.names, name  # hive run_id merged, not duplicated
            assert is_text(table.schema.field("run_id").type), name  # "1700000000" stays a string
            assert_types_match(table, schema)
        assert ix.notes == []
        expected = data.index_tables(index.uris, index.truths)
        for name in TABLES:
            rows = ix.sql(f"SELECT run_id, count(*) AS n FROM {name} GROUP BY run_id").to_pylist()
            counts = {r["run_id"]: r["n"] for r in rows}
            want = {run: len(tables[name]) for run, tables in expected.items() if tables[name]}
            assert counts == want, name
        # Every table reads through its Delta log: the same rows as deltalake alone gives.
        from deltalake import DeltaTable

        from pipeline.store import TableStore

        store = TableStore(index.output, index.storage_options)
        for name in ("captions", "runs"):
            alone = pa.table(DeltaTable(store.uri(name), storage_options=store.rust_options or None)
                             .to_pyarrow_table()).num_rows
            assert ix.sql(f"SELECT count(*) AS n FROM {name}").column("n")[0].as_py() <= alone


def test_a_killed_commit_is_never_read(index: IndexInfo, run_query) -> None:
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
    sql = "SELECT video_id, object_id, run_id, ts, bbox FROM masks WHERE frame_index = 0 ORDER BY ALL"
    code, out, err = run_query(*index.cli(), "--sql", sql)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["video_id", "object_id", "run_id", "ts", "bbox"]
    assert lines[-1] == "(6 rows)"  # objects 1 and 2 of a (two runs) and of b; 3 enters later

    code, out, err = run_query(*index.cli(), "--sql", sql, "--format", "json")
    assert code == 0, err
    rows = json.loads(out)  # one document: an array of row objects
    assert len(rows) == 6 and rows[0]["bbox"] and all(len(r["bbox"]) == 4 for r in rows)
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


def test_only_files_in_the_delta_log_are_read(private_local_index: IndexInfo, run_query) -> None:
    """A file in a table's folder that its log does not list (a killed writer's, a foreign one) is
    never opened; a damaged file the log does list is a clean error naming it."""
    from pipeline.store import TableStore

    stray = Path(private_local_index.output) / "objects" / "run_id=zzz-damaged" / "part-00000.parquet"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"not parquet at all")
    code, out, err = run_query(private_local_index.output, "--sql",
                               f"SELECT count(*) AS n FROM objects WHERE run_id = '{RUN1}'", "--format", "json")  # fmt: skip
    assert code == 0, err
    assert json.loads(out) == [{"n": 5}]
    listed = TableStore(private_local_index.output).files("objects")
    Path(listed[0]).write_bytes(b"damaged too")
    code, out, err = run_query(private_local_index.output, "--sql", "SELECT count(*) FROM objects", "--format", "json")
    assert_clean_error(code, err, 1, Path(listed[0]).name)
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


def captions_in_clip_order(captions: dict) -> list[str]:
    """As `--video` lists them: clip by clip (by object within a clip), whole-track captions last."""
    keys = sorted(captions, key=lambda k: (k[1] is None, k[1] or 0, k[0]))
    return [captions[k] for k in keys]


def test_video_shows_latest_ok_run_by_id_uri_and_prefix(index: IndexInfo, run_query, data) -> None:
    by_id = video_json(run_query, index, "--video", index.video_ids["a"])
    assert by_id["video"]["run_id"] == RUN2 and by_id["video"]["model"] == "tiny-b"
    assert by_id["video"]["sampled_fps"] == 5.0 and by_id["video"]["clips"] == 2
    assert by_id["video"]["num_sampled"] == 10 and "sampled_ts" not in by_id["video"]
    assert [r["run_id"] for r in by_id["runs"]] == [RUN3, RUN2, RUN1]
    assert [c["caption"] for c in by_id["captions"]] == captions_in_clip_order(data.CAPTIONS[(RUN2, "a")])
    assert [(a["object_ids"], a["answer"], a["clip_index"]) for a in by_id["qa"]] == [
        (ids, ans, clip) for ids, _, ans, clip in data.QA[(RUN2, "a")]
    ]
    objects = {o["object_id"]: o for o in by_id["objects"]}
    assert objects[3]["first_ts"] == pytest.approx(1.0) and objects[3]["spans"] == [[1.0, 1.8]]
    assert objects[3]["clips"] == [1] and objects[3]["track_caption"] is None  # seen in one clip only
    assert objects[1]["num_frames"] == 10 and objects[1]["clips"] == [0, 1] and objects[1]["label"] == "truck"
    assert objects[1]["track_caption"] == data.CAPTIONS[(RUN2, "a")][(1, None)]
    assert "frames" not in objects[1] and "rle" not in json.dumps(by_id)
    assert video_json(run_query, index, "--video", index.uris["a"]) == by_id
    assert video_json(run_query, index, "--video", index.video_ids["a"][:7]) == by_id


def test_video_run_option_and_failed_video(index: IndexInfo, run_query, data) -> None:
    old = video_json(run_query, index, "--video", index.video_ids["a"], "--run", RUN1)
    assert [c["caption"] for c in old["captions"]] == captions_in_clip_order(data.CAPTIONS[(RUN1, "a")])
    failed = video_json(run_query, index, "--video", index.uris["c"])
    assert failed["video"]["status"] == "failed" and failed["video"]["error"] == "moov atom not found"
    assert failed["objects"] == [] and failed["captions"] == [] and failed["clips"] == []


def test_video_json_has_the_clip_timeline(index: IndexInfo, run_query, data) -> None:
    doc = video_json(run_query, index, "--video", index.video_ids["a"])
    clips = doc["clips"]
    assert [(c["clip_index"], c["ts_start"], c["ts_end"], c["boundary"], c["status"], c["num_sampled"])
            for c in clips] == [(0, 0.0, 1.0, "window", "ok", 5), (1, 1.0, 2.0, "end", "ok", 5)]  # fmt: skip
    assert [c["object_ids"] for c in clips] == [[1, 2], [1, 2, 3]]
    want = data.CAPTIONS[(RUN2, "a")]
    for clip in clips:
        got = {(cap["object_id"], clip["clip_index"]): cap["caption"] for cap in clip["captions"]}
        assert got == {k: v for k, v in want.items() if k[1] == clip["clip_index"]}
        assert all(clip["ts_start"] <= cap["ts_start"] <= cap["ts_end"] <= clip["ts_end"] for cap in clip["captions"])
    assert [a["question"] for a in clips[1]["answers"]] == ["Which one is faster?"]
    # The object 3 caption spans only the frames where it is seen in its clip.
    (cap,) = [c for c in clips[1]["captions"] if c["object_id"] == 3]
    assert (cap["ts_start"], cap["ts_end"]) == (1.0, 1.8)


def test_presence_spans_break_where_the_tracker_missed_a_frame(index: IndexInfo, run_query, data) -> None:
    """Object 2 of "b" has no mask at 1.2 s: present 0.0-1.0 and 1.4-1.8, computed over `masks` in DuckDB."""
    doc = video_json(run_query, index, "--video", index.video_ids["b"])
    objects = {o["object_id"]: o for o in doc["objects"]}
    assert data.MISSED["b"] == (2, 1.2)
    assert objects[2]["spans"] == [[0.0, 1.0], [1.4, 1.8]] and objects[2]["num_frames"] == 9
    assert objects[1]["spans"] == [[0.0, 1.8]]
    answers = {a["question"]: a for a in doc["qa"]}
    assert answers["Is it daytime?"]["clip_index"] is None  # a question about the whole video
    assert all(a["question"] != "Is it daytime?" for c in doc["clips"] for a in c["answers"])


def test_video_table_and_csv(local_index: IndexInfo, run_query) -> None:
    code, out, err = run_query(local_index.output, "--video", local_index.video_ids["a"])
    assert code == 0, err
    assert "run_id      run-2024-02" in out and "sampled_fps 5" in out
    for section in ("clips:", "objects:", "timeline:"):
        assert section in out
    timeline = out[out.index("timeline:"):].splitlines()
    assert timeline[1].split() == ["clip", "ts_start", "ts_end", "object_ids", "text"]
    assert [line.split()[0] for line in timeline[3:-1]] == ["0"] * 3 + ["1"] * 4 + ["track"] * 2
    assert any(line.split()[0] == "1" and "a yellow square falling slowly" in line for line in timeline)
    code, out, err = run_query(local_index.output, "--video", local_index.video_ids["a"], "--format", "csv")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert Counter(r["section"] for r in rows) == {"clip": 2, "object": 3, "caption": 7, "answer": 2}
    assert {r["run_id"] for r in rows} == {RUN2}
    assert Counter(r["clip_index"] for r in rows if r["section"] == "caption") == {"0": 2, "1": 3, "": 2}


def test_video_not_found(index: IndexInfo, run_query) -> None:
    code, _, err = run_query(*index.cli(), "--video", "no-such-video")
    assert_clean_error(code, err, 1, "no video 'no-such-video'")
    code, _, err = run_query(*index.cli(), "--video", index.video_ids["a"], "--run", "no-such-run")
    assert_clean_error(code, err, 1, "no run 'no-such-run'")


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
    data.write_index(str(tmp_path / "out"), runs, committed=False)  # a killed commit: rows, no runs row
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
    runs = data.index_tables(local_index.uris, local_index.truths)
    only = {RUN1: {"videos": runs[RUN1]["videos"], "objects": runs[RUN1]["objects"], "runs": runs[RUN1]["runs"]}}
    data.write_index(str(tmp_path / "out"), only)
    with open_index(str(tmp_path / "out")) as ix:
        for name in ("qa", "clips", "masks", "runs"):
            assert ix.sql(f"SELECT * FROM {name}").column_names == TABLES[name].names
        assert ix.search("red").num_rows == 0
        result = ix.video(local_index.video_ids["a"])
        assert result.objects.num_rows == 3 and result.clips.num_rows == 0
        assert result.objects.column("spans").to_pylist() == [[], [], []]  # no masks: no presence to show


# --------------------------------------------------------------------------------------------
# API and CLI plumbing.
# --------------------------------------------------------------------------------------------


def test_python_api(local_index: IndexInfo) -> None:
    with open_index(local_index.output) as ix:
        table = ix.sql("SELECT video_id, status FROM videos WHERE status = $s", {"s": "failed"})
        assert isinstance(table, pa.Table) and table.num_rows == 2
        result = ix.video(local_index.uris["b"])
        assert result.run_id == RUN1 and result.objects.num_rows == 2 and result.clips.num_rows == 2
        masks = ix.sql("SELECT rle FROM masks WHERE run_id = $r AND video_id = $v", {"r": RUN1, "v": result.video_id})
        assert masks.num_rows == 19 and masks.column("rle")[0].as_py()["counts"]  # 10 + 9 (one frame missed)
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


def test_run_summary_without_a_mode(local_index: IndexInfo, run_query) -> None:
    code, out, err = run_query(local_index.output, "--format", "csv")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["run_id"], r["videos_ok"], r["videos_failed"], r["clips"], r["commits"]) for r in rows] == [
        (RUN1, "2", "1", "4", "1"), (RUN2, "1", "0", "2", "2"), (RUN3, "0", "1", "0", "1"),
    ]  # fmt: skip
    assert float(rows[0]["video_hours"]) == pytest.approx(round(4.0 / 3600, 3))
    assert os.path.isdir(local_index.output)


# --------------------------------------------------------------------------------------------
# The long `masks` table: "what was visible at t" is a filter, not an unnest.
# --------------------------------------------------------------------------------------------

VISIBLE_AT = """
WITH f AS (SELECT video_id, run_id, list_filter(sampled_ts, lambda x: x <= {t})[-1] AS ts FROM latest_videos)
SELECT m.video_id, m.object_id, m.ts, m.bbox FROM masks m JOIN f USING (video_id, run_id, ts) ORDER BY ALL
"""


@pytest.mark.parametrize("t", [0.5, 1.25])
def test_sql_what_was_visible_at_t(index: IndexInfo, run_query, data, t: float) -> None:
    """The latest sampled frame at or before t, per video, and each object's box on it."""
    code, out, err = run_query(*index.cli(), "--sql", VISIBLE_AT.format(t=t), "--format", "json")
    assert code == 0, err
    got = [(r["video_id"], r["object_id"], r["ts"], r["bbox"]) for r in json.loads(out)]
    want = []
    for name in ("a", "b"):
        truth = index.truths[name]
        ts = max(s for s in truth.timestamps[::2] if s <= t)
        for i in range(len(truth.shapes)):
            mask = truth.mask(i, ts)
            if mask is not None and data.MISSED.get(name) != (i + 1, ts):
                ys, xs = mask.nonzero()
                want.append((index.video_ids[name], i + 1, ts, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]))
    assert got == sorted(want)
    assert {oid for vid, oid, *_ in got if vid == index.video_ids["a"]} == ({1, 2, 3} if t > 1 else {1, 2})


def test_long_video_what_was_visible_and_search(long_index: IndexInfo, run_query, data) -> None:
    with open_index(long_index.output) as ix:
        at = lambda t: ix.sql(VISIBLE_AT.format(t=t)).column("object_id").to_pylist()  # noqa: E731
        assert at(3015.5) == []  # the failed clip: nothing tracked there
        assert at(4204.0) == list(range(1, 8)) and at(4205.0) == list(range(1, 9))
        hit = ix.search("zebra").to_pylist()
        obj, clip = data.LONG_ZEBRA
        assert [(r["object_id"], r["clip_index"], r["ts_start"], r["match"]) for r in hit] == [
            (obj, clip, clip * data.LONG_CLIP_SECONDS, "a zebra crossing the street")
        ]


def test_long_video_json_timeline(long_index: IndexInfo, run_query, data) -> None:
    """A 2-hour video at 1 fps: 240 clips, presence spans over ~46,000 masks computed in DuckDB."""
    import time

    started = time.monotonic()
    doc = video_json(run_query, long_index, "--video", long_index.video_ids["long"])
    assert time.monotonic() - started < 30
    clips = doc["clips"]
    assert len(clips) == data.LONG_SECONDS // data.LONG_CLIP_SECONDS == doc["video"]["clips"] == 240
    assert doc["video"]["num_sampled"] == 7200
    failed = clips[data.LONG_FAILED_CLIP]
    assert (failed["status"], failed["error"], failed["object_ids"], failed["captions"]) == (
        "failed", "invalid NAL unit", [], [])
    assert clips[-1]["boundary"] == "end" and clips[3]["boundary"] == "shot"
    objects = {o["object_id"]: o for o in doc["objects"]}
    assert len(objects) == data.LONG_OBJECTS
    gap = (data.LONG_FAILED_CLIP * data.LONG_CLIP_SECONDS, (data.LONG_FAILED_CLIP + 1) * data.LONG_CLIP_SECONDS)
    assert objects[1]["spans"] == [[5.0, gap[0] - 1.0], [float(gap[1]), 7199.0]]
    assert objects[8]["spans"] == [[float(data.LONG_FIRST[8]), 7199.0]]
    assert objects[8]["clips"] == list(range(data.LONG_FIRST[8] // 30, 240))
    assert objects[1]["track_caption"] == "thing 1 over the whole video"
    assert sum(len(c["captions"]) for c in clips) + data.LONG_OBJECTS == len(doc["captions"])


def test_hostile_text_is_neutralised_in_table_and_csv_only(local_index: IndexInfo, run_query) -> None:
    """Escapes cannot drive the terminal, formulas cannot run in a spreadsheet; json keeps the exact text."""
    sql = "SELECT chr(27) || '[2Jred' || chr(8238) AS caption, '=HYPERLINK(''http://x'')' AS f, -1.5 AS score"
    code, out, err = run_query(local_index.output, "--sql", sql)
    assert code == 0, err
    assert "\x1b" not in out and "\u202e" not in out and "\\x1b[2Jred\\u202e" in out
    code, out, err = run_query(local_index.output, "--sql", sql, "--format", "csv")
    assert code == 0, err
    assert list(csv.reader(io.StringIO(out)))[1] == ["\x1b[2Jred\u202e", "'=HYPERLINK('http://x')", "-1.5"]
    code, out, err = run_query(local_index.output, "--sql", sql, "--format", "json")
    assert json.loads(out) == [{"caption": "\x1b[2Jred\u202e", "f": "=HYPERLINK('http://x')", "score": -1.5}]
