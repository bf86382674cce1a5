"""One long video planned in parallel: its shot pass split into time segments scored by separate
tasks, and its clips released in order as a prefix of segments is done.

Why: the shot pass reads every frame (about 31 ms a frame on a CPU, `pipeline.shots`), so a 2-hour
video planned by one task took about 90 CPU-minutes before its first clip could start. Each segment
is scored apart (`pipeline.shots.score_span`: its range, plus the 25 frames before it and up to 74
after that TransNetV2's windows need), and the scores concatenated in order are the single pass's,
frame for frame, when every segment starts on a multiple of the model's 50-frame step (the frame
rate is constant; with a variable rate the windows are aligned to each segment's first frame
instead, which moves scores slightly, never loses or doubles a frame: frames belong to segments by
time). Cuts come from the concatenated scores by the package's rule (`pipeline.shots.cut_times`),
which only looks back one frame, so the cuts of a finished prefix are final.

The segment length rule (`plan_segments`): two segments of `SEGMENT_FIRST_FRAMES` (500) frames,
then each twice the one before, up to `SEGMENT_MAX_FRAMES` (4,000); a remainder shorter than the
first segment joins the last. The first clip of a video leaves planning when its first two
segments are done (the last clip of a segment waits for the next one's first score, and a 500-frame
segment is one clip at the default 30 s), and the two run side by side: at the measured 31 ms a
frame on a CPU that is about 16 s of model time plus 3-10 s to start PyTorch and load the weights
in each decode child, so the first clips of a video of any length start within about half a
minute of its planning where two CPUs are free for it (500 frames are 20 s of 25-fps footage, 8 s
at 60 fps). Further on the doubling keeps that start-up at 3-8% of a segment's work (a 2-hour
25-fps video: 48 segments, most of them about 2 minutes on one CPU, all running at once on a
cluster with the CPUs). Videos under two first segments (40 s at 25 fps)
keep the single pass; so do files that cannot seek (`VideoPlan.seekable`), videos whose header
gives no frame rate, and prompted videos (their prompts are placed on the whole clip list).

Clip boundaries: each segment is split on its own cuts by `pipeline.clips.split_clips`, and its
edges are forced clip boundaries (``'window'``, or ``'shot'`` where the next segment's first frame
is a cut), so clips released earlier never change. The last clip of a segment waits for the next
segment's first score; the others leave as soon as their segment and all before it are done. The
grid is the video's (rate from the header's duration), so clip ``i``'s shared frame is still clip
``i + 1``'s first grid point. The number of clips is known only with the last segment, so rows
released before it carry no ``num_clips`` (`pipeline.assemble.VideoAssembly.complete`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from pipeline.clips import Clip, ClipPlan, grid_time, pass_duration, split_clips
from pipeline.decode.isolation import call_isolated
from pipeline.decode.media import open_video
from pipeline.errors import DecodeError
from pipeline.shots import _STEP, SHOT_THRESHOLD, SpanScores, cut_times, score_span

#: Frames of each of the first two segments (a multiple of TransNetV2's 50-frame step); see the module docstring.
SEGMENT_FIRST_FRAMES = 500
#: Frames of the longest segment (a multiple of the step).
SEGMENT_MAX_FRAMES = 4000
_EPS = 1e-9


@dataclass(frozen=True)
class Segment:
    """[start_s, end_s) of the video (seconds from the first frame; None: to the end of the stream)."""

    index: int
    start_s: float
    end_s: float | None
    first_frame: int
    frames: int  # planned (the last one's from the header's count)


def plan_segments(num_frames: float | None, fps: float | None, *, min_seconds: float = 1.0,
                  first: int = SEGMENT_FIRST_FRAMES, most: int = SEGMENT_MAX_FRAMES) -> list[Segment]:
    """The segments of a video of about `num_frames` frames at `fps` (the rule in the module
    docstring); [] when one pass should plan it: too short, no frame rate, or a first segment shorter
    than two of the shortest clips (a sampling step longer than that, say)."""
    if first % _STEP or most % _STEP or first <= 0 or most < first:
        raise ValueError(f"segment lengths must be positive multiples of {_STEP} frames, got {first} and {most}")
    if not fps or not num_frames or num_frames < 2 * first or first / fps < 2 * min_seconds:
        return []
    edges, sizes = [0], [first, first]  # two of the first size: the first clips need both (see `ClipRelease`)
    while num_frames - (edges[-1] + sizes[0]) >= first:
        edges.append(edges[-1] + sizes.pop(0))
        if not sizes:
            sizes.append(min(most, (edges[-1] - edges[-2]) * 2))
    ends = [*edges[1:], int(num_frames)]
    return [Segment(i, start / fps, None if i == len(edges) - 1 else end / fps, start, end - start)
            for i, (start, end) in enumerate(zip(edges, ends))]


def score_segment(uri: str, start_s: float, end_s: float | None, storage_options: dict | None,
                  timeout_s: float) -> SpanScores:
    """A segment's scores, from a decode child (retired after: PyTorch holds about 1 GB there)."""
    return call_isolated(_segment_request, uri, storage_options, start_s, end_s, timeout_s=timeout_s, label=uri,
                         retire=True)


def _segment_request(uri: str, storage_options: dict | None, start_s: float, end_s: float | None) -> SpanScores:
    with open_video(uri, storage_options, sequential=True) as source:
        return score_span(source, start_s, end_s)


@dataclass
class ClipRelease:
    """Turns the scores of a video's segments, fed in order (`add`), into its clips, each released once final.

    `duration` is the header's (checked against the stream's end), `rate` the grid's; when the last
    segment is in, `done` is set and `duration`, `num_frames`, `cut_times`, `num_clips` and `notes`
    are the plan's, as `pipeline.clips.plan_video` would give them.
    """

    segments: Sequence[Segment]
    rate: float
    clip_seconds: float
    min_seconds: float
    interval: float
    duration: float | None
    threshold: float = SHOT_THRESHOLD
    done: bool = False
    num_clips: int = 0
    num_frames: int = 0
    cut_times: list[float] = field(default_factory=list)
    failed_packets: int = 0
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=lambda: {"decode": 0.0, "model": 0.0})
    _times: list[np.ndarray] = field(default_factory=list)
    _scores: list[np.ndarray] = field(default_factory=list)
    _held: Clip | None = None  # the last clip so far; boundary "open" until the next segment's first score
    _start: float = 0.0  # where the next segment's clips begin (its start, or a cut just before it)
    _next: int = 0

    def add(self, got: SpanScores) -> list[ClipPlan]:
        """Take the next segment's scores; the clips that are now final, in order."""
        if self.done:
            raise ValueError("every segment is in already")
        seg = self.segments[self._next]
        self._next += 1
        self.failed_packets += got.failed_packets
        for k, v in got.timings.items():
            self.timings[k] = self.timings.get(k, 0.0) + v
        self._times.append(got.times)
        self._scores.append(got.scores)
        self.num_frames += len(got.times)
        times, scores = np.concatenate(self._times), np.concatenate(self._scores)
        self.cut_times = cut_times(scores, times, self.threshold) if len(times) else []
        last = seg.end_s is None or got.ended or bool(got.stream_error) or not len(got.times)
        if last:
            if not len(times):
                detail = f" (demuxer: {got.stream_error})" if got.stream_error else ""
                raise DecodeError(f"no frame could be decoded{detail}")
            tolerance = max(0.5, 2 * self.interval)
            self.duration = pass_duration(self.duration, float(times[-1]) + self.interval, tolerance,
                                          self.failed_packets, self.notes)
        end = self.duration if last else seg.end_s
        start = self._start if self._held is not None else seg.start_s
        first_time = float(got.times[0]) if len(got.times) else None
        open_seam = self._held is not None and self._held.boundary == "open"
        own = [c for c in self.cut_times if start < c < end and not (open_seam and c == first_time)]
        out: list[Clip] = []
        if self._held is not None:
            held, self._held = self._held, None
            if open_seam:
                if first_time is not None and first_time in set(self.cut_times):
                    held = Clip(held.clip_index, held.ts_start, held.ts_end, "shot")
                elif own and own[0] - start < self.min_seconds and own[0] - held.ts_start >= self.min_seconds:
                    # a cut just after the seam ends the clip before it, as in one pass
                    held, start, own = Clip(held.clip_index, held.ts_start, own[0], "shot"), own[0], own[1:]
                else:
                    held = Clip(held.clip_index, held.ts_start, held.ts_end, "window")
            if last and end - start < self.min_seconds:  # no room for a clip after the seam
                return self._finish([Clip(held.clip_index, held.ts_start, end, "end")])
            out.append(held)
        kept: list[float] = []  # split_clips' rule 1, less its "not near the end" part
        for c in own:
            if c - (kept[-1] if kept else start) >= self.min_seconds:
                kept.append(c)
        # A cut just before the seam ends this segment's clips there; the next segment starts at it.
        tail = kept.pop() if not last and kept and end - kept[-1] < self.min_seconds else None
        stop = end if tail is None else tail
        pieces = split_clips(stop - start, [c - start for c in kept], self.clip_seconds, min_seconds=self.min_seconds)
        clips = [Clip(self.num_clips + i, start + p.ts_start, stop if i == len(pieces) - 1 else start + p.ts_end,
                      p.boundary) for i, p in enumerate(pieces)]
        self.num_clips += len(clips)
        if last:
            return self._finish(out + clips)
        held = clips[-1]
        self._held = Clip(held.clip_index, held.ts_start, held.ts_end, "shot" if tail is not None else "open")
        self._start = stop
        return self._plans(out + clips[:-1])

    def fail(self) -> tuple[list[ClipPlan], Clip | None]:
        """A segment could not be scored: the clip held back (a ``'window'`` boundary), and the failed
        rest of the video as one clip (None when nothing is left after it); the plan is then done."""
        held, self._held = self._held, None
        self.done = True
        if held is None:
            return [], None
        rest = None
        if self.duration is not None and self.duration - held.ts_end > _EPS:
            rest = Clip(held.clip_index + 1, held.ts_end, self.duration, "end")
        self.num_clips = held.clip_index + 1 + (rest is not None)
        boundary = "end" if rest is None else "shot" if held.boundary == "shot" else "window"
        kept = Clip(held.clip_index, held.ts_start, held.ts_end, boundary)
        return self._plans([kept], final=rest is None), rest

    def _finish(self, clips: list[Clip]) -> list[ClipPlan]:
        self.done = True
        self.num_clips = clips[-1].clip_index + 1 if clips else self.num_clips
        return self._plans(clips, final=True)

    def _plans(self, clips: list[Clip], final: bool = False) -> list[ClipPlan]:
        """Each clip's slice of the video's grid: k_start is the first grid point at or after its start
        (0 for the first clip), k_stop the next clip's k_start, or the grid's size for the last clip."""
        out = []
        for n, clip in enumerate(clips):
            is_last = final and n == len(clips) - 1
            k_start = 0 if clip.clip_index == 0 else self._k(clip.ts_start)
            k_stop = max(1, self._k(clip.ts_end)) if is_last else self._k(clip.ts_end)
            out.append(ClipPlan(
                clip_index=clip.clip_index, ts_start=clip.ts_start, ts_end=clip.ts_end, boundary=clip.boundary,
                k_start=k_start, k_stop=k_stop, grid_times=tuple(grid_time(k, self.rate) for k in range(k_start, k_stop)),
                shared_time=None if is_last else grid_time(k_stop, self.rate),
            ))
        return out

    def _k(self, t: float) -> int:
        return max(0, math.ceil(t * self.rate - _EPS))

