"""The rules of a commit that each have one source of truth (issue 28, "one rule in one place")."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from pipeline.store import TableStore
from pipeline.store.commit import PUBLISH_ORDER, RunWriter, visible_videos
from schemas.tables import TABLES


def test_publish_order_covers_every_table_with_the_commit_point_last() -> None:
    assert sorted(PUBLISH_ORDER) == sorted(TABLES) and PUBLISH_ORDER[-2:] == ("videos", "runs")


def test_indexed_at_is_the_commit_time_not_the_run_start(tmp_path: Path) -> None:
    """"Latest" is ordered by `indexed_at`: a long run's late commit must sort after a short run
    that started later but committed earlier."""
    run_start = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    store = TableStore(str(tmp_path / "out"))
    writer = RunWriter(store, "r1")
    writer.add("videos", [{"video_id": "v", "uri": "/v.mp4", "size_bytes": 1, "etag": None, "duration_s": 1.0,
                           "fps": 1.0, "width": 2, "height": 2, "num_frames": 1, "sampled_ts": [0.0],
                           "sampled_fps": 1.0, "clips": 1, "status": "ok", "error": None, "model": "m",
                           "tracker": "t", "run_id": "r1", "indexed_at": run_start, "commit_index": 7}])
    writer.add("runs", [{"run_id": "r1", "commit_index": 0, "command": "index", "source": "/", "model": "m",
                         "tracker": "t", "mode": "lite", "started_at": run_start, "ended_at": run_start,
                         "status": "committed", "videos_listed": 1, "videos_skipped": 0, "videos_ok": 1,
                         "videos_failed": 0, "videos_quarantined": 0, "clips": 1, "video_seconds": 1.0,
                         "objects": 0, "captions": 0, "answers": 0, "retry_video_ids": [],
                         "embeddings_version": None}])
    before = dt.datetime.now(dt.timezone.utc)
    writer.commit()
    (row,) = visible_videos(store).to_pylist()
    assert row["indexed_at"] >= before - dt.timedelta(seconds=1)  # the commit's time, not the run's start
    assert row["commit_index"] == 0  # the writer's commit, whatever the row said
