"""End to end on a long video: clips as the unit of work, on local Ray with the real tiny models.

A test-made 5-minute video indexed at 1 fps in 30-s windows is 10 clips and 300 sampled frames. One
stretch of its packets is overwritten with noise, so one clip fails while the video stays `ok`.
A second test kills a run after its first commit and checks that the same command resumes there.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import duckdb
import numpy as np
import pytest

import pipeline.run as run_module
from jobs.cli import main
from pipeline.samples import DEFAULT_SHAPES, make_long_video, make_video
from schemas.tables import TABLES, validate

DURATION_S = 300.0
DAMAGED = (125.0, 126.0)  # inside clip 4 (120-150 s)


def rows(output: Path, sql: str) -> list[dict]:
    con = duckdb.connect()
    for table in TABLES:
        if list((output / table).glob("**/*.parquet")):
            con.sql(f"CREATE VIEW {table} AS SELECT * FROM read_parquet('{output}/{table}/**/*.parquet', "
                    "hive_partitioning=true, union_by_name=true)")
    rel = con.sql(sql)
    return [dict(zip(rel.columns, r, strict=True)) for r in rel.fetchall()]


def damage(path: Path, start: float, end: float) -> None:
    """Overwrite the packets shown in [start, end) s with noise (a damaged stretch mid-file)."""
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(3)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for packet in container.demux(stream):
            if packet.pts is not None and start <= float(packet.pts * stream.time_base) < end:
                data[packet.pos : packet.pos + packet.size] = rng.integers(0, 256, packet.size, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def long_run(tmp_path_factory, ray_local) -> dict:
    root = tmp_path_factory.mktemp("long")
    video = root / "videos" / "five_minutes.mp4"
    video.parent.mkdir()
    make_long_video(video, DURATION_S, segment_s=60.0, width=160, height=120, fps=10.0)
    damage(video, *DAMAGED)
    output = root / "index"
    argv = ["index", str(video.parent), str(output), "--fps", "1", "--cuts", "none", "--max-objects", "2",
            "--max-new-tokens", "4", "--object-frames", "4"]
    log = io.StringIO()
    seen: list[dict] = []
    take = run_module._Run.take

    def spy(self, row):
        seen.append({k: (np.asarray(v).shape if isinstance(v, np.ndarray) else type(v).__name__) for k, v in row.items()})
        return take(self, row)

    with contextlib.redirect_stderr(log), pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_module._Run, "take", spy)
        code = main(argv)
    return {"output": output, "code": code, "log": log.getvalue(), "video": video, "driver_rows": seen}


def test_the_driver_never_sees_pixels(long_run):
    """Frames end at the referrer: what reaches the driver is JSON text and numbers per clip."""
    assert long_run["driver_rows"]
    for row in long_run["driver_rows"]:
        assert "frames" not in row
        assert not any(isinstance(v, tuple) and len(v) >= 2 for v in row.values()), row


def test_every_clip_is_there_in_order(long_run):
    assert long_run["code"] == 0, long_run["log"]
    out = long_run["output"]
    for table in TABLES:
        if list((out / table).glob("**/*.parquet")):
            con = duckdb.connect()
            arrow = con.sql(f"SELECT * FROM read_parquet('{out}/{table}/**/*.parquet', hive_partitioning=true)").to_arrow_table()
            validate(table, arrow.select(TABLES[table].names).cast(TABLES[table]))
    clips = rows(out, "SELECT * FROM clips ORDER BY clip_index")
    assert [c["clip_index"] for c in clips] == list(range(10))
    assert clips[0]["ts_start"] == 0.0
    assert clips[-1]["ts_end"] == pytest.approx(DURATION_S, abs=0.2)
    for before, after in zip(clips, clips[1:]):
        assert after["ts_start"] == pytest.approx(before["ts_end"])
    assert [c["boundary"] for c in clips] == ["window"] * 9 + ["end"]
    assert [c["num_sampled"] for c in clips if c["status"] == "ok"] == [30] * 9


def test_a_damaged_stretch_fails_its_clip_not_the_video(long_run):
    out = long_run["output"]
    failed = rows(out, "SELECT clip_index, error FROM clips WHERE status = 'failed'")
    assert [c["clip_index"] for c in failed] == [4]
    assert "five_minutes.mp4" in failed[0]["error"]
    (video,) = rows(out, "SELECT * FROM videos")
    assert video["status"] == "ok"
    assert "1 of 10 clips failed (clip 4)" in video["error"]
    assert video["clips"] == 10 and video["sampled_fps"] == pytest.approx(1.0)


def test_fps_means_what_it_says_and_times_are_the_decoders(long_run):
    (video,) = rows(long_run["output"], "SELECT sampled_ts FROM videos")
    ts = np.asarray(video["sampled_ts"])
    assert len(ts) == 270  # 300 frames at 1 fps, less the failed clip's 30
    assert np.all(np.diff(ts) > 0)
    # 10 fps content: a decoder timestamp is a multiple of 0.1 s, the nearest frame to its grid time
    assert np.allclose(ts * 10, np.round(ts * 10), atol=1e-3)
    grid = np.concatenate([np.arange(0, 120), np.arange(150, 300)]).astype(float)
    assert np.all(np.abs(ts - grid) <= 0.05 + 1e-9)


def test_captions_per_object_per_clip(long_run):
    out = long_run["output"]
    per_clip = rows(out, """
        SELECT c.clip_index, c.object_id, c.ts_start, c.ts_end, c.caption, k.ts_start AS clip_start, k.ts_end AS clip_end
        FROM captions c JOIN clips k USING (video_id, clip_index) WHERE c.clip_index IS NOT NULL""")
    clips_with_captions = {r["clip_index"] for r in per_clip}
    assert clips_with_captions == set(range(10)) - {4}
    for r in per_clip:
        assert r["clip_start"] <= r["ts_start"] <= r["ts_end"] < r["clip_end"]
        assert r["caption"]
    masks = rows(out, """
        SELECT m.object_id, m.clip_index, m.ts, k.ts_start, k.ts_end FROM masks m JOIN clips k USING (video_id, clip_index)""")
    assert masks and all(m["ts_start"] <= m["ts"] < m["ts_end"] for m in masks)
    objects = rows(out, "SELECT object_id, num_frames, first_ts, last_ts FROM objects")
    counts = rows(out, "SELECT object_id, count(*) AS n, min(ts) AS a, max(ts) AS b FROM masks GROUP BY 1")
    assert {o["object_id"]: (o["num_frames"], o["first_ts"], o["last_ts"]) for o in objects} == {
        c["object_id"]: (c["n"], c["a"], c["b"]) for c in counts
    }
    # ids are video-wide: an object captioned in two clips is one linked track, with a whole-track caption
    spans = rows(out, "SELECT object_id, count(DISTINCT clip_index) AS n FROM masks GROUP BY 1")
    multi = {s["object_id"] for s in spans if s["n"] > 1}
    whole = {r["object_id"] for r in rows(out, "SELECT object_id FROM captions WHERE clip_index IS NULL")}
    assert whole == multi


def test_progress_says_clips_video_hours_and_rate(long_run):
    log = long_run["log"]
    assert "[clips 10/10 · videos 1/1 · 0.08 video-h" in log, log
    assert "clips 10 (1 failed), video 0.08 h indexed" in log, log


# ---------------------------------------------------------------- a killed run resumes


def test_a_killed_run_resumes_from_its_last_commit(tmp_path, ray_local):
    videos = tmp_path / "videos"
    for i in range(4):
        make_video(videos / f"v{i}.mp4", shapes=DEFAULT_SHAPES[:1], duration_s=2.0, seed=10 + i, width=96, height=72)
    output = tmp_path / "index"
    # One clip per referrer call: videos finish one by one, so the kill lands between commits.
    argv = ["index", str(videos), str(output), "--fps", "1", "--cuts", "none", "--max-objects", "1",
            "--max-new-tokens", "2", "--commit-every", "0.001", "--clips-per-call", "1"]
    address = ray_local.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", *argv, "--address", address], env=env,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    seen = []
    deadline = time.monotonic() + 300
    try:
        for line in proc.stderr:
            seen.append(line)
            if "commit 1 published" in line or time.monotonic() > deadline:
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert any("commit 1 published" in line for line in seen), "".join(seen)
    first = rows(output, "SELECT run_id, commit_index, videos_ok FROM runs")
    committed = rows(output, "SELECT video_id FROM videos")
    assert first and 1 <= len(committed) < 4, (first, committed)
    assert {r["commit_index"] for r in first} == set(range(len(first)))

    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        assert main(argv) == 0, log.getvalue()
    assert f"{len(committed)} already indexed" in log.getvalue()
    videos_rows = rows(output, "SELECT video_id, status FROM videos")
    assert len(videos_rows) == 4 and {v["status"] for v in videos_rows} == {"ok"}
    dupes = rows(output, "SELECT video_id, object_id, frame_index, count(*) n FROM masks GROUP BY ALL HAVING n > 1")
    assert dupes == []
    runs = rows(output, "SELECT run_id, commit_index FROM runs ORDER BY run_id, commit_index")
    assert len({r["run_id"] for r in runs}) == 2
    assert sum(r["run_id"] != first[0]["run_id"] for r in runs) >= 1


@pytest.mark.parametrize("value", ["0", "-5", "100000", "nan"])
def test_clip_seconds_out_of_range_is_a_usage_error(tmp_path, value, capsys):
    assert main(["index", str(tmp_path), str(tmp_path / "out"), "--clip-seconds", value]) == 2
    assert "--clip-seconds" in capsys.readouterr().err
