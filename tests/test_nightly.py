"""Incremental indexing on a real S3 API (moto on loopback), and quarantine.

A driver killed mid-run is tested in test_long_video.py (killed after its first commit: the next run
resumes, nothing uncommitted shows) and a commit killed at every step in
tests/pipeline/test_commit_crash.py."""

from __future__ import annotations

import datetime as dt

import fsspec

from jobs.cli import main
from pipeline.config import IndexConfig
from pipeline.run import run_index
from pipeline.samples import DEFAULT_SHAPES, make_video
from pipeline.store import TableStore
from pipeline.store.commit import RunWriter, read_visible as read_table
from pipeline.sources import list_videos

DATA_TABLES = ("videos", "objects", "captions", "qa")
FAST = ["--num-frames", "2", "--max-new-tokens", "4", "--max-objects", "2"]


def counts(output: str, options: dict | None = None) -> dict[str, int]:
    return {t: read_table(output, t, options).num_rows for t in DATA_TABLES}


def last_run(output: str, options: dict | None = None) -> dict:
    return max(read_table(output, "runs", options).to_pylist(), key=lambda r: r["started_at"])


def test_nightly_on_s3_is_incremental(ray_local, s3_bucket, tmp_path):
    import json

    from jobs.query_sql import open_index

    bucket, options = s3_bucket
    fs = fsspec.filesystem("s3", **options)
    local = tmp_path / "videos"
    for i in range(2):
        make_video(local / f"clip {i} ü.mp4", shapes=DEFAULT_SHAPES[:1], duration_s=1.0, seed=i)
        fs.put_file(str(local / f"clip {i} ü.mp4"), f"{bucket}/in/clip {i} ü.mp4")
    source, output = f"s3://{bucket}/in", f"s3://{bucket}/index"
    argv = ["nightly", source, output, "--storage-options", json.dumps(options), *FAST]

    assert main(argv) == 0
    first = counts(output, options)
    assert first["videos"] == 2
    assert last_run(output, options)["videos_ok"] == 2

    assert main(argv) == 0  # unchanged source: no new rows, one more run record
    assert counts(output, options) == first
    assert last_run(output, options)["videos_skipped"] == 2

    make_video(local / "new.mp4", shapes=DEFAULT_SHAPES[1:2], duration_s=1.0, seed=7)
    fs.put_file(str(local / "new.mp4"), f"{bucket}/in/new.mp4")
    make_video(local / "changed.mp4", shapes=DEFAULT_SHAPES[:1], duration_s=1.5, seed=9)
    fs.put_file(str(local / "changed.mp4"), f"{bucket}/in/clip 0 ü.mp4")  # same key, new content
    assert main(argv) == 0
    run = last_run(output, options)
    assert (run["videos_listed"], run["videos_skipped"], run["videos_ok"]) == (3, 1, 2)
    videos = read_table(output, "videos", options).to_pylist()
    assert len(videos) == 4 and len({v["video_id"] for v in videos}) == 4
    assert sum(v["uri"].endswith("clip 0 ü.mp4") for v in videos) == 2  # old provenance kept

    with open_index(output, storage_options=options) as index:  # DuckDB over the S3 endpoint
        table = index.sql("SELECT count(*) AS n FROM videos WHERE status = 'ok'")
    assert table.column("n").to_pylist() == [4]

    from pipeline.search.index import committed  # kept up to date in the bucket by every run
    from pipeline.search.reader import SearchIndex

    search, why = SearchIndex.open(output, options, committed(output, options))
    assert search is not None, why
    pairs = lambda rows: sorted((r["video_id"], r["text_run_id"], r["text"]) for r in rows)  # noqa: E731
    with open_index(output, storage_options=options) as index:  # each source's latest run: not the replaced content
        latest = index.sql("SELECT e.video_id, e.text_run_id, e.text FROM embeddings e JOIN latest_videos l "
                           "ON e.video_id = l.video_id AND e.text_run_id = l.run_id").to_pylist()
    assert len(latest) < read_table(output, "embeddings", options).num_rows  # the old "clip 0" vectors stay history
    assert pairs(search.dataset.to_table(columns=["video_id", "text_run_id", "text"]).to_pylist()) == pairs(latest)


def test_changing_the_model_reindexes_and_keeps_old_rows(ray_local, tmp_path):
    make_video(tmp_path / "v" / "a.mp4", shapes=DEFAULT_SHAPES[:1], duration_s=1.0)
    out = str(tmp_path / "out")
    assert main(["index", str(tmp_path / "v"), out, *FAST]) == 0
    assert main(["index", str(tmp_path / "v"), out, *FAST, "--mode", "full"]) == 0
    models = sorted(r["model"] for r in read_table(out, "videos").to_pylist())
    assert models == ["tiny-full", "tiny-lite"]
    assert {r["mode"] for r in read_table(out, "captions").to_pylist()} <= {"lite", "full"}


def test_videos_lost_to_worker_crashes_are_quarantined_after_max_attempts(tmp_path):
    make_video(tmp_path / "v" / "poison.mp4", shapes=DEFAULT_SHAPES[:1], duration_s=1.0)
    out = str(tmp_path / "out")
    cfg = IndexConfig(source=str(tmp_path / "v"), output=out, max_attempts=2)
    (video,) = list_videos(cfg.source)
    for n in range(2):  # two earlier runs whose workers crashed on it
        writer = RunWriter(TableStore(out), f"crash-{n}")
        writer.add("runs", [{
            "run_id": f"crash-{n}", "command": "nightly", "source": cfg.source, "model": cfg.model_label,
            "tracker": cfg.tracker_label, "mode": "lite", "started_at": dt.datetime.now(dt.timezone.utc),
            "ended_at": None, "status": "committed", "videos_listed": 1, "videos_skipped": 0, "videos_ok": 0,
            "videos_failed": 0, "videos_quarantined": 0, "objects": 0, "captions": 0, "answers": 0,
            "retry_video_ids": [video.video_id],
        }])
        writer.commit()
    summary = run_index(cfg, progress=lambda line: None)  # needs no Ray: nothing is left to process
    assert summary.committed and summary.videos_quarantined == 1
    (row,) = read_table(out, "videos").to_pylist()
    assert row["status"] == "failed" and row["error"].startswith("quarantined")
    again = run_index(IndexConfig(source=cfg.source, output=out, max_attempts=2), progress=lambda line: None)
    assert again.videos_skipped == 1 and again.videos_quarantined == 0
