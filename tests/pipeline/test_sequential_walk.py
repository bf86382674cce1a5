"""Files that cannot seek: planning finds out (`VideoPlan.seekable`), and their clips are decoded by
one pass over the file instead of one decode from the first frame per clip.

Two kinds that FFmpeg cannot seek, both test-made: a raw MJPEG stream (the demuxer refuses every
seek) and an AVI written to a pipe (no index: a seek is silently ignored, and the header's frame
count is a placeholder that claims hours).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import ffmpeg
import numpy as np
import pytest

import pipeline.decode.range_decode as range_decode
import pipeline.tasks as tasks
from pipeline.clips import plan_video
from pipeline.config import IndexConfig
from pipeline.decode.sampling import sample_clip
from pipeline.sources import VideoFile
from pipeline.tasks import decode_row, plan_rows, video_row

SECONDS, RATE = 40, 25  # raw MJPEG has no frame rate: FFmpeg reads it at 25 frames/s


@pytest.fixture(scope="module")
def mjpeg(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("walk") / "camera.mjpeg"
    ffmpeg.input(f"testsrc2=size=160x90:rate={RATE}:duration={SECONDS}", f="lavfi").output(
        str(path), vcodec="mjpeg", f="mjpeg").run(quiet=True)
    return str(path)


def _groups(plan) -> list[list[float]]:
    return [list(c.grid_times) + ([c.shared_time] if c.shared_time is not None else []) for c in plan.clips]


def test_planning_finds_that_the_file_cannot_seek(mjpeg):
    plan = plan_video(mjpeg, fps=1.0, clip_seconds=5, cuts="none")
    assert not plan.seekable
    assert plan.duration_s == pytest.approx(SECONDS) and len(plan.clips) == SECONDS // 5
    assert "cannot seek" in plan.note


def test_an_avi_written_to_a_pipe_cannot_seek(tmp_path):
    path = tmp_path / "piped.avi"
    with path.open("wb") as out:
        subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=160x90:rate=10:duration=45",
                        "-c:v", "libx264", "-bf", "0", "-g", "10", "-f", "avi", "pipe:1"], stdout=out, check=True)
    assert float(ffmpeg.probe(str(path))["format"]["duration"]) > 3600  # the placeholder frame count
    plan = plan_video(str(path), fps=1.0, clip_seconds=10, cuts="none")
    assert not plan.seekable
    assert plan.duration_s == pytest.approx(45.0, abs=0.2) and len(plan.clips) == 5
    assert "planned to the end of the video stream" in plan.note


def test_one_pass_decodes_every_clip_like_a_clip_alone(mjpeg, tmp_path, monkeypatch):
    plan = plan_video(mjpeg, fps=1.0, clip_seconds=5, cuts="none")
    passes, frames = [], []
    decode_from = range_decode._decode_from

    def counted(source, seek_pts, stats):
        passes.append(seek_pts)
        for item in decode_from(source, seek_pts, stats):
            frames.append(item[0])
            yield item

    monkeypatch.setattr(range_decode, "_decode_from", counted)
    got = range_decode.spill_walk(mjpeg, _groups(plan), str(tmp_path), max_side=None, storage_options=None)
    monkeypatch.undo()
    # one pass from the start, each frame decoded once, up to the one after the last grid time (39 s)
    assert passes == [None] and frames == sorted(set(frames)) and len(frames) == (SECONDS - 1) * RATE + 2
    assert [g["error"] for g in got] == [None] * len(plan.clips)
    assert [g["answered"] for g in got] == _groups(plan)
    for index in (0, len(plan.clips) - 1):
        clip = plan.clips[index]
        alone = sample_clip(mjpeg, ts_start=clip.ts_start, ts_end=clip.ts_end, grid_times=_groups(plan)[index],
                            shared=clip.shared_time is not None)
        assert got[index]["timestamps"] == alone.timestamps.tolist()
        np.testing.assert_array_equal(np.load(got[index]["path"]), alone.frames)


def test_planned_rows_leave_with_their_frames(mjpeg, tmp_path):
    cfg = IndexConfig(str(tmp_path), str(tmp_path / "out"), cuts="none", clip_seconds=5)
    video = VideoFile(uri=mjpeg, size_bytes=Path(mjpeg).stat().st_size, etag=None, mtime=None)
    rows = list(plan_rows(video_row(video, "run", "", ""), cfg=cfg))
    assert len(rows) == SECONDS // 5 and not any(r["error"] for r in rows)
    assert sum(r["num_owned"] for r in rows) == SECONDS
    assert all(r["frames"].shape == (6 if r["clip_index"] < 7 else 5, 90, 160, 3) for r in rows)
    assert "cannot seek" in rows[0]["note"]
    assert decode_row(rows[3], cfg=cfg) is rows[3]  # already decoded: passes through
    assert not list(Path(tasks.tempfile.gettempdir()).glob("pixelrefer-walk-*"))


def test_frames_that_do_not_fit_the_disk_fail_the_video_with_a_reason(mjpeg, tmp_path, monkeypatch):
    monkeypatch.setattr(tasks.shutil, "disk_usage", lambda _: type("Usage", (), {"free": 1 << 20})())
    cfg = IndexConfig(str(tmp_path), str(tmp_path / "out"), cuts="none", clip_seconds=5)
    video = VideoFile(uri=mjpeg, size_bytes=Path(mjpeg).stat().st_size, etag=None, mtime=None)
    rows = list(plan_rows(video_row(video, "run", "", ""), cfg=cfg))
    assert len(rows) == 8 and all("do not fit" in r["error"] for r in rows)
    assert all(decode_row(r, cfg=cfg)["frames"].size == 0 for r in rows)


def test_ray_data_streams_the_walked_rows_beside_seekable_ones(mjpeg, tmp_path, ray_local):
    """The graph's first two operators on a video that cannot seek and one that can: planning's
    generator rows (with frames) and the per-clip decode's rows leave with the same columns."""
    import ray.data

    seekable = tmp_path / "seekable.mp4"
    ffmpeg.input("testsrc2=size=160x90:rate=10:duration=7", f="lavfi").output(
        str(seekable), vcodec="libx264", g=10, pix_fmt="yuv420p").run(quiet=True)
    cfg = IndexConfig(str(tmp_path), str(tmp_path / "out"), cuts="none", clip_seconds=5)
    rows = [video_row(VideoFile(uri=uri, size_bytes=Path(uri).stat().st_size, etag=None, mtime=None), "run", "", "")
            for uri in (mjpeg, str(seekable))]
    ctx = ray.data.DataContext.get_current()
    ctx.target_max_block_size = 1
    ds = ray.data.from_items(rows, override_num_blocks=2)
    ds = ds.flat_map(plan_rows, fn_kwargs={"cfg": cfg}).map(decode_row, fn_kwargs={"cfg": cfg})
    out = sorted(((r["uri"], int(r["clip_index"]), r["frames"].shape[0], r["error"]) for r in ds.iter_rows()))
    expected = [(mjpeg, i, 6 if i < 7 else 5, "") for i in range(8)] + [(str(seekable), 0, 6, ""),
                                                                         (str(seekable), 1, 2, "")]
    assert out == sorted(expected)
