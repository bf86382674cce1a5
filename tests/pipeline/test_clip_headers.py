"""A container header that under-reports the duration: planning indexes to the end of the stream, with a note.

The file is a real Matroska video whose Segment Info duration says a third of what its clusters
hold, as a recorder leaves it when it writes the duration of its first part and keeps appending.
(Fragmented MP4 and MPEG-TS joined with `cat` are no such case for FFmpeg: it reads every
fragment, or the last timestamps of the file, and reports the whole length.)
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ffmpeg
import pytest

from pipeline.clips import plan_video
from pipeline.config import IndexConfig
from pipeline.decode.sampling import sample_clip
from pipeline.sources import VideoFile
from pipeline.tasks import decode_row, plan_rows, video_row

DURATION_S = 12.0
CLAIMED_S = 4.0


def _under_reporting_mkv(path: Path) -> str:
    """A 12-s Matroska file whose header says 4 s: its Segment Info Duration (EBML id 0x4489, an
    8-byte float in milliseconds as FFmpeg writes it) is overwritten."""
    (
        ffmpeg.input(f"testsrc2=size=160x90:rate=10:duration={DURATION_S:g}", f="lavfi")
        .output(str(path), vcodec="libx264", g=10, pix_fmt="yuv420p")
        .overwrite_output().run(quiet=True)
    )
    data = bytearray(path.read_bytes())
    at = data.find(b"\x44\x89\x88")
    assert at > 0 and struct.unpack(">d", data[at + 3 : at + 11])[0] == pytest.approx(DURATION_S * 1000)
    data[at + 3 : at + 11] = struct.pack(">d", CLAIMED_S * 1000)
    path.write_bytes(bytes(data))
    return str(path)


@pytest.fixture(scope="module")
def short_header(tmp_path_factory) -> str:
    path = _under_reporting_mkv(tmp_path_factory.mktemp("header") / "appended.mkv")
    info = ffmpeg.probe(path)
    assert float(info["format"]["duration"]) == pytest.approx(CLAIMED_S)  # the header really is short
    return path


def test_plan_runs_to_the_end_of_the_stream(short_header):
    plan = plan_video(short_header, fps=1.0, clip_seconds=5, cuts="none")
    assert plan.duration_s == pytest.approx(DURATION_S)
    assert plan.seekable
    assert [(c.ts_start, c.ts_end) for c in plan.clips] == [(0, 5), (5, 10), (10, DURATION_S)]
    assert plan.num_sampled == 12 and plan.clips[-1].grid_times[-1] == 11.0
    assert "the header says 4.0 s but the stream runs to 12.0 s" in plan.note
    tail = plan.clips[-1]
    got = sample_clip(short_header, ts_start=tail.ts_start, ts_end=tail.ts_end, grid_times=tail.grid_times)
    assert got.timestamps.tolist() == [10.0, 11.0] and got.error is None


def test_a_right_header_gets_no_note(tmp_path):
    path = tmp_path / "whole.mkv"
    ffmpeg.input("testsrc2=size=160x90:rate=10:duration=6", f="lavfi").output(
        str(path), vcodec="libx264", g=10, pix_fmt="yuv420p").run(quiet=True)
    plan = plan_video(str(path), fps=1.0, clip_seconds=5, cuts="none")
    assert plan.duration_s == pytest.approx(6.0) and plan.note is None and plan.seekable


def test_the_note_reaches_the_video_through_its_first_clip(short_header, tmp_path):
    cfg = IndexConfig(str(tmp_path), str(tmp_path / "out"), cuts="none", clip_seconds=5)
    video = VideoFile(uri=short_header, size_bytes=Path(short_header).stat().st_size, etag=None, mtime=None)
    rows = list(plan_rows(video_row(video, "run", "", ""), cfg=cfg))
    assert [r["kind"] for r in rows] == ["clip"] * 3
    assert "header says 4.0 s" in json.loads(rows[0]["video_json"])["note"]
    assert "header says 4.0 s" in rows[0]["note"] and rows[1]["note"] == ""
    first, last = decode_row(rows[0], cfg=cfg), decode_row(rows[-1], cfg=cfg)
    assert "header says 4.0 s" in first["note"] and not first["error"]
    assert last["num_owned"] == 2 and not last["error"] and last["note"] == ""


def test_the_shot_pass_plans_what_decodes_too(short_header):
    """With shot cuts every frame is decoded: the plan ends at the last decoded frame (TransNetV2 runs,
    on 120 small frames)."""
    plan = plan_video(short_header, fps=1.0, clip_seconds=5, cuts="shot")
    assert plan.duration_s == pytest.approx(DURATION_S) and plan.num_frames == DURATION_S * 10
    assert plan.note.startswith("the header says 4.0 s but the stream runs to 12.0 s")
    assert plan.clips[-1].ts_end == pytest.approx(DURATION_S)
