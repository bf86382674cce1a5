"""`pixelrefer migrate`: an index of the pre-Delta layout, written by hand here, becomes Delta tables.

The old layout is built file by file (as the former `pipeline.sink` wrote it) so the tests need no
Ray and no models: two runs, one of them with a second commit, one file of the oldest naming.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.store import OutputError, TableStore
from pipeline.store import migrate as migrate_module
from pipeline.store.commit import visible_videos
from pipeline.store.migrate import DONE_MARKER, LEGACY_TABLES, BatchLimits, migrate, old_schema
from schemas.tables import TABLES

WHEN = dt.datetime(2024, 5, 1, tzinfo=dt.timezone.utc)
#: (run_id, commit_index, file name, video ids): run "2" is digits only (a hive type trap).
COMMITS = [
    ("run-a", 0, "part-c0000-00000.parquet", ["v1", "v2"]),
    ("2", 0, "part-c0000-00000.parquet", ["v3"]),
    ("2", 1, "part-c0001-00000.parquet", ["v4", "v5"]),
    ("run-old", 0, "part-00000.parquet", ["v6"]),
]


def _rows(table: str, run_id: str, commit_index: int, videos: list[str]) -> list[dict[str, Any]]:
    if table == "videos":
        return [{"video_id": v, "uri": f"s3://src/{v}.mp4", "status": "ok", "run_id": run_id, "clips": 1,
                 "model": "m", "tracker": "t", "indexed_at": WHEN, "sampled_ts": [0.0, 1.0]} for v in videos]
    if table == "clips":
        return [{"video_id": v, "clip_index": 0, "status": "ok", "boundary": "end", "run_id": run_id} for v in videos]
    if table == "objects":
        return [{"video_id": v, "object_id": i, "source": "auto", "run_id": run_id} for v in videos for i in (0, 1)]
    if table == "masks":
        return [{"video_id": v, "object_id": 0, "frame_index": f, "bbox": [0.0, 0.0, 1.0, 1.0],
                 "rle": {"size": [4, 4], "counts": "abc"}, "run_id": run_id} for v in videos for f in range(3)]
    if table == "captions":
        return [{"video_id": v, "object_id": 0, "caption": "a cat", "mode": "lite", "run_id": run_id} for v in videos]
    if table == "qa":
        return [{"video_id": v, "object_ids": [0], "question": "q?", "answer": "a", "mode": "lite", "run_id": run_id}
                for v in videos]
    if table == "embeddings":
        return [{"video_id": v, "kind": "caption", "object_id": 0, "text": "a cat", "embedder": "e", "dim": 2,
                 "vector": [0.5, 0.5], "text_run_id": run_id, "run_id": run_id} for v in videos]
    assert table == "runs"
    return [{"run_id": run_id, "commit_index": commit_index, "status": "committed", "videos_ok": len(videos),
             "started_at": WHEN, "retry_video_ids": []}]


def _write(root: Path, table: str, run_id: str, name: str, rows: list[dict[str, Any]],
           schema: pa.Schema | None = None) -> None:
    folder = root / table / f"run_id={run_id}"
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema or old_schema(table)), folder / name)


def build_old_index(root: Path) -> dict[str, int]:
    """The pre-Delta layout with every table, a staged uncommitted run and a search index; rows per table."""
    counts = {t: 0 for t in LEGACY_TABLES}
    for run_id, commit_index, name, videos in COMMITS:
        for table in LEGACY_TABLES:
            rows = _rows(table, run_id, commit_index, videos)
            _write(root, table, run_id, name, rows)
            counts[table] += len(rows)
    (root / "_staging" / "run-b" / "videos").mkdir(parents=True)
    (root / "_staging" / "run-b" / "videos" / "part-c0000-00000.parquet").write_bytes(b"staged")
    (root / "_search").mkdir()
    (root / "_search" / "state.json").write_text("{}")
    return counts


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("run_id=*"))


def _delta_counts(store: TableStore) -> dict[str, int]:
    return {t: store.read(t).num_rows for t in LEGACY_TABLES}


def test_migrate_converts_every_table_and_cleans_up(tmp_path: Path) -> None:
    counts = build_old_index(tmp_path)
    store = TableStore(str(tmp_path))
    assert store.legacy_tables()

    report = migrate(store, limits=BatchLimits(files=3))

    assert {c.table: (c.old_rows, c.new_rows) for c in report.tables} == {t: (n, n) for t, n in counts.items()}
    assert _delta_counts(store) == counts
    assert sorted(visible_videos(store, ["video_id"]).column("video_id").to_pylist()) == [f"v{i}" for i in range(1, 7)]
    videos = {r["video_id"]: (r["run_id"], r["commit_index"]) for r in store.read("videos").to_pylist()}
    assert videos["v3"] == ("2", 0) and videos["v4"] == ("2", 1) and videos["v6"] == ("run-old", 0)
    assert set(store.read("runs").column("embeddings_version").to_pylist()) == {None}
    assert report.hidden_videos == 0
    assert _leftovers(tmp_path) == []
    assert not (tmp_path / "_staging").exists() and not (tmp_path / "_search").exists()
    assert not (tmp_path / DONE_MARKER).exists()
    assert store.legacy_tables() == []
    store.check_layout()
    # Batches of several files: masks' four files make two Delta appends, not four.
    assert store.version("masks") == 2
    assert any("old rows ->" in line for line in report.lines(str(tmp_path)))

    again = migrate(store)
    assert again.already_migrated
    assert "already migrated" in again.lines(str(tmp_path))[0]


def test_rerun_after_a_crash_mid_table_converts_it_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counts = build_old_index(tmp_path)
    store = TableStore(str(tmp_path))
    real_append = TableStore.append
    calls = {"objects": 0}

    def crash_in_objects(self: TableStore, table: str, data: pa.Table, commit: str | None = None) -> int:
        if table == "objects":
            calls["objects"] += 1
            if calls["objects"] == 2:
                raise RuntimeError("killed mid-table")
        return real_append(self, table, data, commit=commit)

    monkeypatch.setattr(TableStore, "append", crash_in_objects)
    with pytest.raises(RuntimeError, match="killed"):
        migrate(store, limits=BatchLimits(files=1))
    monkeypatch.setattr(TableStore, "append", real_append)
    assert store.exists("clips") and store.exists("objects") and not store.exists("videos")
    assert 0 < store.read("objects").num_rows < counts["objects"]
    assert len(_leftovers(tmp_path)) == len(LEGACY_TABLES) * 3  # nothing old deleted

    messages: list[str] = []
    report = migrate(store, progress=messages.append)
    resumed = {c.table for c in report.tables if c.resumed}
    assert resumed == {"clips"}
    assert any("objects: an earlier migrate was cut" in m for m in messages)
    assert _delta_counts(store) == counts
    assert len(visible_videos(store)) == 6
    assert _leftovers(tmp_path) == []


def test_rerun_after_a_crash_during_the_deletions_finishes_them(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    counts = build_old_index(tmp_path)
    store = TableStore(str(tmp_path))
    monkeypatch.setattr(migrate_module, "_delete_old", lambda _store: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError):
        migrate(store)
    monkeypatch.undo()
    assert (tmp_path / DONE_MARKER).exists() and _leftovers(tmp_path)
    # Half the old folders gone: counts would no longer match, and must not be compared again.
    for table in ("masks", "videos"):
        for folder in (tmp_path / table).glob("run_id=*"):
            for f in folder.iterdir():
                f.unlink()
            folder.rmdir()

    report = migrate(store)
    assert not report.already_migrated and all(c.resumed for c in report.tables)
    assert _delta_counts(store) == counts
    assert _leftovers(tmp_path) == [] and not (tmp_path / DONE_MARKER).exists()
    assert migrate(store).already_migrated


def test_a_run_still_being_published_is_refused_unless_dropped(tmp_path: Path) -> None:
    counts = build_old_index(tmp_path)
    (tmp_path / "_staging" / "run-b" / "_COMMIT").write_text(json.dumps({"run_id": "run-b", "moves": []}))
    store = TableStore(str(tmp_path))
    with pytest.raises(OutputError, match=r"run-b.*--drop-unfinished") as refused:
        migrate(store)
    assert str(tmp_path) in str(refused.value)
    assert not any(store.exists(t) for t in TABLES)

    report = migrate(store, drop_unfinished=True)
    assert report.dropped_unfinished == ["run-b"]
    assert _delta_counts(store) == counts and not (tmp_path / "_staging").exists()


def test_first_contract_is_refused(tmp_path: Path) -> None:
    frame = pa.struct([("frame_index", pa.int32()), ("ts", pa.float64())])
    objects = pa.schema([*old_schema("objects"), ("frames", pa.list_(frame))])
    _write(tmp_path, "objects", "r1", "part-00000.parquet",
           [{"video_id": "v1", "object_id": 0, "run_id": "r1", "frames": [{"frame_index": 0, "ts": 0.0}]}], objects)
    videos = pa.schema([f for f in old_schema("videos") if f.name not in ("clips", "sampled_fps")])
    _write(tmp_path, "videos", "r1", "part-00000.parquet",
           [{"video_id": "v1", "uri": "a.mp4", "status": "ok", "run_id": "r1"}], videos)
    store = TableStore(str(tmp_path))
    with pytest.raises(OutputError, match="first pixelrefer layout.*re-index the sources into a new OUTPUT"):
        migrate(store)
    assert not any(store.exists(t) for t in TABLES)
    assert len(_leftovers(tmp_path)) == 2


def test_a_mix_of_first_contract_and_later_runs_is_refused(tmp_path: Path) -> None:
    build_old_index(tmp_path)
    frame = pa.struct([("frame_index", pa.int32())])
    objects = pa.schema([*old_schema("objects"), ("frames", pa.list_(frame))])
    _write(tmp_path, "objects", "ancient", "part-00000.parquet",
           [{"video_id": "v9", "object_id": 0, "run_id": "ancient", "frames": []}], objects)
    with pytest.raises(OutputError, match="mixes runs of the first pixelrefer layout.*run ancient"):
        migrate(TableStore(str(tmp_path)))


def test_a_delta_table_with_real_runs_next_to_old_folders_is_refused(tmp_path: Path) -> None:
    build_old_index(tmp_path)
    store = TableStore(str(tmp_path))
    store.append("clips", pa.Table.from_pylist(_rows("clips", "new-run", 0, ["v7"]), schema=TABLES["clips"]),
                 commit="new-run/0")
    with pytest.raises(OutputError, match="mixes layouts: table 'clips'"):
        migrate(store)
    assert len(_leftovers(tmp_path)) == len(LEGACY_TABLES) * 3


def test_an_empty_output_has_nothing_to_migrate(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="holds no pixelrefer tables"):
        migrate(TableStore(str(tmp_path)))


def test_cli_migrate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from jobs.cli import main

    counts = build_old_index(tmp_path)
    assert main(["migrate", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"masks: {counts['masks']} old rows -> {counts['masks']} Delta rows" in out
    assert main(["migrate", str(tmp_path)]) == 0
    assert "already migrated" in capsys.readouterr().out
    assert main(["migrate", str(tmp_path), "--storage-options", "[1]"]) == 2
    assert main(["migrate", os.fspath(tmp_path / "nothing-here")]) == 1
    assert "holds no pixelrefer tables" in capsys.readouterr().err



def test_migrate_on_s3(tmp_path: Path, s3_endpoint: str) -> None:
    """On an object store: s3fs caches listings while delta-rs writes beside them."""
    import boto3
    import fsspec

    options = {"key": "testing", "secret": "testing", "endpoint_url": s3_endpoint,
               "client_kwargs": {"region_name": "us-east-1"}}
    bucket = "migrate"
    counts = build_old_index(tmp_path / "old")
    s3 = fsspec.filesystem("s3", skip_instance_cache=True, **options)
    boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    s3.put(f"{tmp_path / 'old'}/", f"{bucket}/idx", recursive=True)
    store = TableStore(f"s3://{bucket}/idx", options)

    report = migrate(store)

    assert {c.table: c.new_rows for c in report.tables} == counts
    assert _delta_counts(store) == counts
    assert len(visible_videos(store)) == 6
    s3.invalidate_cache()
    assert not [p for p in s3.find(f"{bucket}/idx") if "run_id=" in p or "/_staging/" in p or "/_search/" in p]
    assert migrate(TableStore(f"s3://{bucket}/idx", options)).already_migrated
