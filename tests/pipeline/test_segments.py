"""A long video planned in segments (`pipeline.segments`): the same cuts as one pass (the real
TransNetV2 on a test-made video with cuts at and near the seams), clips released in order and never
changed, and the driver waiting for the clip count that only the last segment knows."""

from __future__ import annotations

import json
import random

import ffmpeg
import numpy as np
import pytest

from pipeline.assemble import VideoAssembly
from pipeline.clips import split_clips
from pipeline.config import IndexConfig
from pipeline.errors import DecodeError
from pipeline.segments import ClipRelease, plan_segments
from pipeline.shots import SpanScores, cut_times

FPS = 10
#: Hard cuts of the test video, in seconds: inside the first segment, on the first seam (frame 50),
#: two frames before the second seam (frame 100) and three after it.
CUTS = [2.0, 5.0, 9.8, 10.3]


@pytest.fixture(scope="module")
def seam_video(tmp_path_factory) -> str:
    """157 frames at 10 fps (the last segment is not a multiple of the model's step), five sources."""
    path = str(tmp_path_factory.mktemp("segments") / "seams.mp4")
    parts = [("testsrc2", 2.0), ("mandelbrot", 3.0), ("smptebars", 4.8), ("testsrc", 0.5), ("rgbtestsrc", 5.4)]
    inputs = [ffmpeg.input(f"{src}=size=160x96:rate={FPS}", f="lavfi").trim(duration=d).setpts("PTS-STARTPTS")
              for src, d in parts]
    (ffmpeg.concat(*inputs).output(path, vcodec="libx264", preset="ultrafast", pix_fmt="yuv420p", g=30)
     .global_args("-loglevel", "error").overwrite_output().run())
    return path


def test_segments_scored_apart_give_the_single_pass_cuts_and_scores(seam_video):
    """The one test here with the real model (about 10 s on an idle 2-core machine: two passes over
    157 frames): equality has to be shown on real scores, at a seam cut and cuts beside seams."""
    from pipeline.decode.media import open_video
    from pipeline.shots import detect_shots, score_span

    segments = plan_segments(157, FPS, first=50, most=50)
    assert [(s.start_s, s.end_s) for s in segments] == [(0.0, 5.0), (5.0, 10.0), (10.0, None)]
    with open_video(seam_video) as source:
        single = detect_shots(source, keep_scores=True)
        spans = [score_span(source, s.start_s, s.end_s) for s in segments]
    assert single.cut_times == pytest.approx(CUTS, abs=0.01)  # the model does see every cut
    assert [len(s.times) for s in spans] == [50, 50, 57] and spans[-1].ended and not spans[0].ended
    assert spans[0].next_time == pytest.approx(5.0) and spans[1].next_time == pytest.approx(10.0)
    np.testing.assert_array_equal(np.concatenate([s.scores for s in spans]), single.scores)
    times = np.concatenate([s.times for s in spans])
    assert cut_times(np.concatenate([s.scores for s in spans]), times) == single.cut_times

    release = ClipRelease(segments, rate=5.0, clip_seconds=3.0, min_seconds=1.0, interval=1 / FPS, duration=15.7)
    clips = [c for span in spans for c in release.add(span)]
    assert release.done and release.cut_times == single.cut_times and release.num_frames == 157
    # Here the seams fall where one pass's clips end anyway (a cut on one, a cut 0.2 s before the
    # other): the same clips, 10.3 dropped by both (0.5 s after 9.8).
    one_pass = split_clips(15.7, single.cut_times, 3.0)
    assert [(round(c.ts_start, 3), round(c.ts_end, 3), c.boundary) for c in clips] == [
        (round(c.ts_start, 3), round(c.ts_end, 3), c.boundary) for c in one_pass]


def test_segment_rule():
    segments = plan_segments(180_000, 25.0)  # a 2-hour video at 25 fps
    sizes = [s.frames for s in segments]
    assert sizes[:5] == [500, 500, 1000, 2000, 4000] and max(sizes) < 4000 + 500 and sum(sizes) == 180_000
    assert all(s.first_frame % 50 == 0 for s in segments) and segments[-1].end_s is None
    assert [s.end_s for s in segments[:-1]] == [s.start_s for s in segments[1:]]
    assert plan_segments(999, 25.0) == []  # under two first segments: one pass
    assert plan_segments(1000, 25.0) != [] and plan_segments(10_000, None) == []
    assert plan_segments(10_000, 25.0, min_seconds=12.0) == []  # a grid step longer than half the first segment
    with pytest.raises(ValueError, match="multiples of 50"):
        plan_segments(10_000, 25.0, first=120)


def test_the_cuts_of_a_prefix_are_final():
    """The package's rule looks back one frame: cuts found on a prefix of the scores are the whole
    video's cuts up to the prefix's last frame (what lets clips leave before the rest is scored)."""
    rng = random.Random(7)
    for _ in range(200):
        n = rng.randint(1, 60)
        scores = np.array([rng.choice([0.1, 0.9]) for _ in range(n)], dtype=np.float32)
        times = np.arange(n, dtype=np.float64)
        whole = cut_times(scores, times)
        for m in range(1, n + 1):
            assert cut_times(scores[:m], times[:m]) == [t for t in whole if t < m]


def _spans(scores: np.ndarray, segments, fps: float) -> list[SpanScores]:
    out = []
    for s in segments:
        stop = len(scores) if s.end_s is None else s.first_frame + s.frames
        idx = np.arange(s.first_frame, stop)
        out.append(SpanScores(times=idx / fps, scores=scores[idx], ended=s.end_s is None,
                              next_time=None if s.end_s is None else stop / fps))
    return out


def _release(segments, duration: float, clip_seconds: float = 30.0) -> ClipRelease:
    return ClipRelease(segments, rate=1.0, clip_seconds=clip_seconds, min_seconds=1.0, interval=0.1, duration=duration)


def test_clips_leave_in_order_with_one_grid_and_shot_boundaries_at_seams():
    fps, n = 10.0, 2000  # 200 s; seams at 5, 10, 20, 40, 80, 120 and 160 s
    segments = plan_segments(n, fps, first=50, most=400)
    scores = np.full(n, 0.05, dtype=np.float32)
    # 200: a seam's first frame; 397: 0.3 s before a seam; 804: 0.4 s after one; 1502: 0.5 s after 1497
    cut_frames = [23, 200, 397, 500, 804, 1497, 1502]
    for f in cut_frames:
        scores[f - 1] = 0.9  # the frame before a cut scores high: the cut is the next frame
    assert [s.first_frame for s in segments] == [0, 50, 100, 200, 400, 800, 1200, 1600]
    release = _release(segments, duration=200.0)
    released: list = []
    per_segment = []
    for span in _spans(scores, segments, fps):
        got = release.add(span)
        per_segment.append(len(got))
        released += got
    assert release.done and release.num_clips == len(released)
    assert release.cut_times == pytest.approx([f / fps for f in cut_frames])
    assert [c.clip_index for c in released] == list(range(len(released)))
    assert per_segment[0] == 1 and all(per_segment)  # the first clip leaves with the first segment
    for a, b in zip(released, released[1:]):
        assert a.ts_end == b.ts_start and a.shared_time == b.grid_times[0] and a.k_stop == b.k_start
    assert released[-1].shared_time is None and released[-1].ts_end == 200.0 and released[-1].k_stop == 200
    assert sum(len(c.grid_times) for c in released) == 200
    ends = {round(c.ts_end, 6): c.boundary for c in released}
    assert ends[20.0] == "shot"  # a cut on the seam's first frame
    assert ends[5.0] == "window" and ends[120.0] == "window" and 40.0 not in ends  # plain seams; one moved to a cut
    assert ends[2.3] == "shot" and ends[50.0] == "shot" and ends[149.7] == "shot"
    assert 150.2 not in ends  # 0.5 s after the cut before it: dropped by the same rule as in one pass
    assert ends[39.7] == "shot" and ends[80.4] == "shot"  # cuts near a seam end their clips, as in one pass
    assert all(c.ts_end - c.ts_start <= 30.0 + 1.0 for c in released)
    # Only window edges differ from one pass: the shot boundaries are the same.
    one_pass = split_clips(200.0, release.cut_times, 30.0)
    shots = {round(c.ts_end, 6) for c in released if c.boundary == "shot"}
    assert shots == {round(c.ts_end, 6) for c in one_pass if c.boundary == "shot"}


def test_a_short_last_segment_joins_the_clip_before_it():
    """A stream that ends just after a seam (the header promised more): the sliver joins the held clip."""
    fps = 10.0
    segments = plan_segments(1000, fps, first=50, most=400)
    scores = np.full(1005, 0.05, dtype=np.float32)
    release = _release(segments, duration=100.0)
    spans = _spans(scores, segments, fps)
    truncated = SpanScores(times=np.arange(100, 105) / fps, scores=scores[100:105], ended=True)
    clips = release.add(spans[0]) + release.add(spans[1]) + release.add(truncated)
    assert release.done and clips[-1].ts_end == pytest.approx(10.5) and clips[-1].boundary == "end"
    assert clips[-1].ts_start == 5.0 and release.duration == pytest.approx(10.5)
    assert "truncated" in "; ".join(release.notes)
    assert [c.clip_index for c in clips] == list(range(len(clips)))


def _fake_header(duration: float, fps: float):
    from pipeline.clips import _Header

    return _Header(duration_s=duration, fps=fps, width=64, height=48, num_frames=int(duration * fps),
                   stream_start_s=0.0, stream_end_s=duration)


def _rows(scores_iter, segments, duration=200.0, fps=10.0):
    from pipeline.tasks import ROW_DEFAULTS, streamed_rows

    cfg = IndexConfig(source="s", output="o", fps=1.0, clip_seconds=30.0)
    row = {**ROW_DEFAULTS, "video_id": "v", "uri": "/videos/v.mp4", "size_bytes": 1, "etag": "", "run_id": "r",
           "prompts_json": "", "questions_json": "[]"}
    return list(streamed_rows(row, cfg, _fake_header(duration, fps), segments, scores_iter, 0.0))


def test_streamed_rows_say_their_clip_count_once_known_and_the_driver_waits_for_it():
    fps, n = 10.0, 2000
    segments = plan_segments(n, fps, first=50, most=400)
    scores = np.full(n, 0.05, dtype=np.float32)
    scores[[99, 699]] = 0.9
    rows = _rows(iter(_spans(scores, segments, fps)), segments)
    metas = [json.loads(r["video_json"]) for r in rows]
    total = metas[-1]["num_clips"]
    assert total == len(rows) and [r["clip_index"] for r in rows] == list(range(total))
    known = [m["num_clips"] is not None for m in metas]
    assert not known[0] and known[-1] and known == sorted(known)  # unknown, then known, never back
    assert metas[-1]["num_frames"] == n and all(r["discover"] == "keyframes" for r in rows)
    clips = [json.loads(r["clip_json"]) for r in rows]
    assert clips[0]["ts_start"] == 0.0 and clips[-1]["ts_end"] == 200.0 and not clips[-1]["shared"]
    assert all(a["grid"][-1] == b["grid"][0] for a, b in zip(clips, clips[1:]))  # the shared frame

    # The driver, rows in any order: complete only with every clip, whichever row brought the count.
    for seed in range(5):
        order = rows[:]
        random.Random(seed).shuffle(order)
        video = VideoAssembly("v", "/videos/v.mp4", "r", 1, None, {"num_clips": None})
        for k, row in enumerate(order):
            assert not video.complete
            video.learn(json.loads(row["video_json"]))
            video.add({**row, "timestamps": "[]", "num_owned": 0})
        assert video.complete and video.meta["num_clips"] == total and video.meta["num_frames"] == n


def test_the_driver_finishes_a_streamed_video_once_its_last_clip_is_in(tmp_path, monkeypatch):
    """`pipeline.run`'s driver: rows without a clip count do not finish a video, the count is added to
    the progress total once, and the video is assembled exactly once, after its last clip."""
    from pipeline import run as run_module
    from pipeline.summary import RunSummary

    fps, n = 10.0, 2000
    segments = plan_segments(n, fps, first=50, most=400)
    rows = _rows(iter(_spans(np.full(n, 0.05, dtype=np.float32), segments, fps)), segments)
    finished: list = []
    monkeypatch.setattr(run_module._Run, "_finish", lambda self, video: finished.append(video))
    cfg = IndexConfig(source=str(tmp_path), output=str(tmp_path / "out"), embedder="none")
    driver = run_module._Run(cfg, None, "r", RunSummary(run_id="r"), 1, lambda line: None)
    order = rows[1:] + rows[:1]  # the final rows first, the first clip last
    for k, row in enumerate(order):
        driver.take({**row, "timestamps": "[]", "num_owned": 0, "tracks_json": "[]"})
        assert len(finished) == (1 if k == len(order) - 1 else 0)
    assert driver.clips_total == len(rows) and driver.clips_done == len(rows)
    assert len(finished[0].clips) == len(rows) and finished[0].meta["num_frames"] == n


def test_a_segment_that_fails_after_clips_left_fails_the_rest_as_one_clip():
    fps, n = 10.0, 2000
    segments = plan_segments(n, fps, first=50, most=400)
    spans = _spans(np.full(n, 0.05, dtype=np.float32), segments, fps)

    def scores():
        yield from spans[:3]
        raise DecodeError("/videos/v.mp4: the decoder died")

    rows = _rows(scores(), segments)
    metas = [json.loads(r["video_json"]) for r in rows]
    assert metas[-1]["num_clips"] == len(rows) and [r["clip_index"] for r in rows] == list(range(len(rows)))
    last = json.loads(rows[-1]["clip_json"])
    assert (last["ts_start"], last["ts_end"], last["boundary"]) == (20.0, 200.0, "end")
    assert "shot detection failed from 20.0 s" in rows[-1]["error"] and "decoder died" in rows[-1]["error"]
    assert not any(r["error"] for r in rows[:-1])

    def nothing():
        raise DecodeError("/videos/v.mp4: cannot open")
        yield  # pragma: no cover

    (failed,) = _rows(nothing(), segments)
    assert failed["kind"] == "failed" and "cannot open" in failed["error"]



def test_the_first_clip_of_a_long_video_leaves_with_its_first_two_segments():
    """At the defaults (30-s clips, 25 fps) a first segment is one clip, held for the next segment's
    first score: the rule makes the second segment as short as the first, so both finish together."""
    n, fps = 180_000, 25.0
    segments = plan_segments(n, fps)
    release = ClipRelease(segments, rate=1.0, clip_seconds=30.0, min_seconds=1.0, interval=1 / fps, duration=7200.0)
    spans = _spans(np.full(n, 0.05, dtype=np.float32), segments, fps)
    assert segments[0].frames == segments[1].frames == 500
    assert release.add(spans[0]) == [] and [c.clip_index for c in release.add(spans[1])] == [0]
