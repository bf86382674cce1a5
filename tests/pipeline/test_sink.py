"""The staged writer: validation before commit, nothing visible before commit, roll-forward."""

from __future__ import annotations

import datetime as dt
import json
import posixpath

import duckdb
import pytest

from pipeline.sink import COMMIT_MARKER, OutputError, RunWriter, indexed_video_ids, read_table, recover
from schemas.tables import SchemaError


def video_row(video_id: str, run_id: str, status: str = "ok", model: str = "tiny-lite") -> dict:
    return {
        "video_id": video_id, "uri": f"/v/{video_id}.mp4", "size_bytes": 10, "etag": None, "duration_s": 1.0,
        "fps": 10.0, "width": 16, "height": 8, "num_frames": 10, "sampled_ts": [0.0, 0.5], "status": status,
        "error": None if status == "ok" else "broken", "model": model, "tracker": "tiny-sam2", "run_id": run_id,
        "indexed_at": dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
    }


def caption_row(video_id: str, run_id: str, object_id: int) -> dict:
    return {"video_id": video_id, "object_id": object_id, "ts_start": 0.0, "ts_end": 0.5, "caption": "a box",
            "mode": "lite", "model": "tiny-lite", "num_tokens": 2, "run_id": run_id}


def glob_count(output, table: str) -> int:
    return duckdb.sql(
        f"SELECT count(*) FROM read_parquet('{output}/{table}/**/*.parquet', hive_partitioning=true)"
    ).fetchall()[0][0]


def test_nothing_visible_before_commit_then_everything(tmp_path):
    writer = RunWriter(str(tmp_path), "r1", rows_per_file=2)
    for video_id in "abc":
        writer.add("videos", [video_row(video_id, "r1")])
    writer.add("captions", [caption_row("a", "r1", 0)])
    assert not (tmp_path / "videos").exists()  # a flushed part sits in staging only
    rows = writer.commit()
    assert rows["videos"] == 3 and rows["captions"] == 1
    assert glob_count(tmp_path, "videos") == 3
    assert glob_count(tmp_path, "captions") == 1
    assert sorted(p.name for p in (tmp_path / "videos" / "run_id=r1").iterdir()) == ["part-c0000-00000.parquet", "part-c0000-00001.parquet"]
    assert not (tmp_path / "_staging" / "r1").exists()
    ids = duckdb.sql(f"SELECT DISTINCT run_id FROM read_parquet('{tmp_path}/videos/**/*.parquet', hive_partitioning=true)").fetchall()
    assert ids == [("r1",)]


def test_invalid_batch_is_refused_before_writing(tmp_path):
    writer = RunWriter(str(tmp_path), "r1")
    bad = video_row("a", "r1", status="maybe")
    with pytest.raises(SchemaError, match="status"):
        writer.add("videos", [bad])
    with pytest.raises(SchemaError, match="unexpected columns"):
        writer.add("videos", [{**video_row("a", "r1"), "extra": 1}])


def test_abort_leaves_nothing(tmp_path):
    writer = RunWriter(str(tmp_path), "r1", rows_per_file=1)
    writer.add("videos", [video_row("a", "r1")])
    writer.abort()
    assert not list(tmp_path.rglob("*.parquet"))


def test_recover_finishes_an_interrupted_commit(tmp_path, monkeypatch):
    writer = RunWriter(str(tmp_path), "r1")
    writer.add("videos", [video_row("a", "r1")])
    writer.add("captions", [caption_row("a", "r1", 0)])
    import pipeline.sink as sink

    def crash(fs, staging, moves):
        src, dst = moves[0]
        fs.makedirs(posixpath.dirname(dst), exist_ok=True)
        fs.mv(src, dst)
        raise KeyboardInterrupt("killed mid-publish")

    monkeypatch.setattr(sink, "_publish", crash)
    with pytest.raises(KeyboardInterrupt):
        writer.commit()
    monkeypatch.undo()
    assert (tmp_path / "_staging" / "r1" / COMMIT_MARKER).exists()
    assert glob_count(tmp_path, "captions") == 1 and not (tmp_path / "videos").exists()  # videos go last
    assert recover(str(tmp_path)) == ["r1"]
    assert glob_count(tmp_path, "videos") == 1
    assert json.loads(json.dumps(read_table(str(tmp_path), "videos").column("video_id").to_pylist())) == ["a"]


def test_recover_keeps_young_uncommitted_staging_and_drops_stale(tmp_path):
    writer = RunWriter(str(tmp_path), "r1", rows_per_file=1)
    writer.add("videos", [video_row("a", "r1")])
    assert recover(str(tmp_path)) == []
    assert (tmp_path / "_staging" / "r1").exists()
    recover(str(tmp_path), stale_after_s=-1)
    assert not (tmp_path / "_staging" / "r1").exists()


def test_indexed_video_ids(tmp_path):
    writer = RunWriter(str(tmp_path), "r1")
    writer.add("videos", [video_row("a", "r1"), video_row("b", "r1", status="failed"), video_row("c", "r1", model="other")])
    writer.commit()
    assert indexed_video_ids(str(tmp_path), "tiny-lite", "tiny-sam2") == {"a", "b"}
    assert indexed_video_ids(str(tmp_path), "tiny-lite", "tiny-sam2", include_failed=False) == {"a"}
    assert indexed_video_ids(str(tmp_path / "empty"), "tiny-lite", "tiny-sam2") == set()


def test_unwritable_output_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match="not writable"):
        RunWriter(str(blocker / "out"), "r1")
