"""Clip planning: the pure rules (splitting, sampling rate, grid slices) and `plan_video` on real files.

Shot detection with TransNetV2 is in test_clips_shots.py (it loads a model).
"""

from __future__ import annotations

import ffmpeg
import numpy as np
import pytest

from pipeline.clips import (
    MAX_CLIP_SECONDS,
    Clip,
    assign_grid,
    grid_size,
    plan_video,
    sampling_rate,
    split_clips,
    validate_clip_seconds,
)
from pipeline.errors import DecodeError


def _spans(clips: list[Clip]) -> list[tuple[float, float, str]]:
    return [(round(c.ts_start, 6), round(c.ts_end, 6), c.boundary) for c in clips]


# ---------------------------------------------------------------- splitting (pure)


def test_fixed_windows_and_the_last_short_clip():
    assert _spans(split_clips(65.0, (), 30.0)) == [(0, 30, "window"), (30, 60, "window"), (60, 65, "end")]
    assert [c.clip_index for c in split_clips(65.0, (), 30.0)] == [0, 1, 2]
    # a remainder under min_seconds joins the window before it
    assert _spans(split_clips(60.5, (), 30.0)) == [(0, 30, "window"), (30, 60.5, "end")]
    assert _spans(split_clips(60.5, (), 30.0, min_seconds=0.25)) == [
        (0, 30, "window"), (30, 60, "window"), (60, 60.5, "end")
    ]
    assert _spans(split_clips(12.0, (), 30.0)) == [(0, 12, "end")]
    assert _spans(split_clips(0.4, (), 30.0)) == [(0, 0.4, "end")]  # shorter than min_seconds: still one clip
    assert _spans(split_clips(60.0, (), 30.0)) == [(0, 30, "window"), (30, 60, "end")]


def test_shot_cuts_then_windows_inside_long_shots():
    clips = split_clips(100.0, [50.0, 10.0], 30.0)  # unsorted on purpose
    assert _spans(clips) == [
        (0, 10, "shot"),
        (10, 40, "window"), (40, 50, "shot"),
        (50, 80, "window"), (80, 100, "end"),
    ]


def test_slivers_of_shots_are_merged():
    # 10.4 is 0.4 s after the cut at 10; 0.5 is 0.5 s after the start; 99.7 is 0.3 s before the end
    clips = split_clips(100.0, [0.5, 10.0, 10.4, 60.0, 99.7, 150.0, -3.0], 30.0)
    assert _spans(clips) == [
        (0, 10, "shot"), (10, 40, "window"), (40, 60, "shot"), (60, 90, "window"), (90, 100, "end")
    ]
    # with one grid step (4 s at 0.25 fps) as the minimum, a 3 s shot joins the next one
    assert _spans(split_clips(40.0, [20.0, 23.0], 30.0, min_seconds=4.0)) == [(0, 20, "shot"), (20, 40, "end")]


def test_split_properties_over_random_cuts():
    rng = np.random.default_rng(7)
    for _ in range(200):
        duration = float(rng.uniform(0.5, 500))
        cuts = rng.uniform(-5, duration + 5, rng.integers(0, 30)).tolist()
        cap = float(rng.choice([1.0, 7.5, 30.0, 90.0]))
        minimum = float(rng.choice([0.0, 1.0, 4.0]))
        clips = split_clips(duration, cuts, cap, min_seconds=minimum)
        assert clips[0].ts_start == 0 and clips[-1].ts_end == duration and clips[-1].boundary == "end"
        assert all(a.ts_end == b.ts_start for a, b in zip(clips, clips[1:]))
        assert [c.clip_index for c in clips] == list(range(len(clips)))
        for clip in clips:
            length = clip.ts_end - clip.ts_start
            assert length <= cap + minimum + 1e-9
            assert length >= min(minimum, cap) - 1e-9 or len(clips) == 1
        for clip in clips[:-1]:
            assert clip.boundary in ("shot", "window")
            if clip.boundary == "shot":
                assert any(abs(clip.ts_end - c) < 1e-9 for c in cuts)


@pytest.mark.parametrize("bad", [0, -1, -0.5, float("nan"), float("inf"), MAX_CLIP_SECONDS + 1, "abc", None])
def test_invalid_clip_seconds(bad, tmp_path):
    with pytest.raises(ValueError, match="clip length"):
        validate_clip_seconds(bad)
    with pytest.raises(ValueError, match="clip length"):
        split_clips(100.0, (), bad)
    # refused before any file is opened: the path does not even exist
    with pytest.raises(ValueError, match="clip length"):
        plan_video(str(tmp_path / "missing.mp4"), clip_seconds=bad)


def test_invalid_plan_arguments(tmp_path):
    path = str(tmp_path / "missing.mp4")
    with pytest.raises(ValueError, match="cuts"):
        plan_video(path, cuts="scenes")
    with pytest.raises(ValueError, match="fps"):
        plan_video(path, fps=0)
    with pytest.raises(ValueError, match="max_frames"):
        plan_video(path, max_frames=0)
    assert validate_clip_seconds("12.5") == 12.5 and validate_clip_seconds(MAX_CLIP_SECONDS) == MAX_CLIP_SECONDS


# ---------------------------------------------------------------- sampling rate and grid (pure)


def test_sampling_rate_honours_fps_and_records_thinning():
    assert sampling_rate(7209.0, fps=1.0, num_frames=None, max_frames=None, stream_fps=25.0) == (1.0, False, None)
    assert grid_size(7209.0, 1.0) == 7209
    rate, thinned, _ = sampling_rate(7209.0, fps=1.0, num_frames=None, max_frames=1000, stream_fps=25.0)
    assert thinned and rate == pytest.approx(1000 / 7209.0) and grid_size(7209.0, rate) == 1000
    # a budget above the grid's size changes nothing
    assert sampling_rate(100.0, fps=1.0, num_frames=None, max_frames=100, stream_fps=25.0)[:2] == (1.0, False)
    rate, thinned, _ = sampling_rate(100.0, fps=1.0, num_frames=16, max_frames=None, stream_fps=25.0)
    assert (rate, thinned) == (0.16, False) and grid_size(100.0, rate) == 16
    rate, thinned, _ = sampling_rate(100.0, fps=None, num_frames=16, max_frames=8, stream_fps=25.0)
    assert thinned and grid_size(100.0, rate) == 8
    rate, thinned, note = sampling_rate(10.0, fps=60.0, num_frames=None, max_frames=None, stream_fps=25.0)
    assert (rate, thinned) == (25.0, False) and "above the video's 25" in note


def test_grid_slices_own_every_point_once_and_share_the_next():
    clips = split_clips(65.0, (), 30.0)
    plans = assign_grid(clips, 1.0, 65.0)
    assert [(p.k_start, p.k_stop) for p in plans] == [(0, 30), (30, 60), (60, 65)]
    assert plans[0].grid_times == tuple(float(k) for k in range(30))
    assert [p.shared_time for p in plans] == [30.0, 60.0, None]
    owned = [t for p in plans for t in p.grid_times]
    assert owned == [float(k) for k in range(65)]
    for plan, following in zip(plans, plans[1:]):
        assert plan.shared_time == following.grid_times[0]
    for plan in plans:
        assert all(plan.ts_start <= t < plan.ts_end for t in plan.grid_times)


def test_clips_without_a_grid_point_are_merged():
    # one point every 25 s: the middle clip [10, 20) owns none and joins the next one
    clips = [Clip(0, 0.0, 10.0, "shot"), Clip(1, 10.0, 20.0, "shot"), Clip(2, 20.0, 30.0, "end")]
    plans = assign_grid(clips, 0.04, 30.0)
    assert [(p.ts_start, p.ts_end, p.boundary, p.k_start, p.k_stop) for p in plans] == [
        (0.0, 10.0, "shot", 0, 1), (10.0, 30.0, "end", 1, 2)
    ]
    assert [p.clip_index for p in plans] == [0, 1]
    # the last clip owns none (its start is past the last point): it joins the one before
    clips = split_clips(100.0, (), 30.0)  # 0-30, 30-60, 60-90, 90-100
    plans = assign_grid(clips, 0.05, 100.0)  # points at 0, 20, 40, 60, 80
    assert [(p.ts_start, p.ts_end, p.grid_times) for p in plans] == [
        (0.0, 30.0, (0.0, 20.0)), (30.0, 60.0, (40.0,)), (60.0, 100.0, (60.0, 80.0))
    ]
    assert plans[-1].boundary == "end" and plans[-1].shared_time is None


# ---------------------------------------------------------------- plan_video on real files


def _lavfi_video(path: str, source: str, *, vcodec: str = "libx264", **options) -> str:
    (
        ffmpeg.input(source, f="lavfi")
        .output(path, vcodec=vcodec, pix_fmt="yuv420p", preset="ultrafast", **options)
        .global_args("-loglevel", "error")
        .overwrite_output()
        .run()
    )
    return path


@pytest.fixture(scope="module")
def long_video(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("plan")
    return _lavfi_video(str(folder / "65s.mp4"), "testsrc2=size=160x90:rate=10:duration=65", g=20)


def test_plan_without_cuts_reads_the_header(long_video):
    plan = plan_video(long_video, fps=1.0, clip_seconds=30, cuts="none")
    assert plan.duration_s == pytest.approx(65.0)
    assert plan.fps == pytest.approx(10.0)
    assert (plan.width, plan.height) == (160, 90)
    assert plan.num_frames == 650 and plan.num_sampled == 65
    assert plan.sampled_fps == 1.0 and not plan.thinned and plan.note is None
    assert plan.cuts == "none" and plan.cut_times == () and plan.stream_start_s == 0.0
    assert [(c.ts_start, c.ts_end, c.boundary) for c in plan.clips] == [
        (0.0, 30.0, "window"), (30.0, 60.0, "window"), (60.0, 65.0, "end")
    ]
    assert [c.shared_time for c in plan.clips] == [30.0, 60.0, None]
    assert [t for c in plan.clips for t in c.grid_times] == [plan.grid_time(k) for k in range(65)]


def test_plan_with_a_frame_budget_is_thinned(long_video):
    plan = plan_video(long_video, fps=1.0, max_frames=13, clip_seconds=30, cuts="none")
    assert plan.thinned and plan.num_sampled == 13
    assert plan.sampled_fps == pytest.approx(13 / 65.0)
    assert sum(len(c.grid_times) for c in plan.clips) == 13
    plan = plan_video(long_video, num_frames=5, clip_seconds=10, cuts="none")
    assert plan.num_sampled == 5 and all(c.grid_times for c in plan.clips)
    assert max(c.ts_end - c.ts_start for c in plan.clips) >= 13  # clips grew to one grid step


def test_plan_of_rotated_video_reports_the_displayed_size(long_video, tmp_path):
    rotated = str(tmp_path / "rotated.mp4")
    ffmpeg.input(long_video).output(rotated, c="copy", **{"metadata:s:v:0": "rotate=90"}).overwrite_output().run(
        quiet=True
    )
    plan = plan_video(rotated, cuts="none")
    assert (plan.width, plan.height) == (90, 160)


def test_plan_of_mpegts_counts_from_the_first_frame(long_video, tmp_path):
    ts = str(tmp_path / "clip.ts")
    ffmpeg.input(long_video).output(ts, c="copy").overwrite_output().run(quiet=True)
    plan = plan_video(ts, fps=0.5, clip_seconds=20, cuts="none")
    assert plan.stream_start_s > 1.0  # MPEG-TS clocks start at 1.4 s
    assert plan.duration_s == pytest.approx(65.0, abs=0.1)
    assert plan.clips[0].grid_times[:3] == (0.0, 2.0, 4.0)


def test_plan_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    audio = str(tmp_path / "speech.m4a")
    ffmpeg.input("sine=duration=0.5", f="lavfi").output(audio, acodec="aac").overwrite_output().run(quiet=True)
    for path, words in ((tmp_path / "gone.mp4", "not found"), (empty, "empty"), (noise, "not a video"),
                        (audio, "no video stream")):
        with pytest.raises(DecodeError) as info:
            plan_video(str(path), cuts="none")
        assert str(path) in str(info.value) and words in str(info.value)
