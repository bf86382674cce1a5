"""Clip planning: a video becomes clips (the unit of work) and each clip gets its slice of one sampling grid.

`plan_video` runs a cheap pass in a decode child: the container header (duration, frame rate,
size), checked against the stream by a seek near its end (`END_PROBE_S`: the plan runs to the last
packet, whatever the header says, and the same seek tells whether the file can seek at all,
`VideoPlan.seekable`) and, with ``cuts='shot'``, TransNetV2 over every frame at 48x27
(`pipeline.shots`), whose last decoded frame then ends the plan. Then two
pure functions decide everything else, so that any task can recompute them and tests can check
them without video:

* `split_clips` cuts [0, duration) at the shot cuts, then splits each shot into windows of
  `clip_seconds` (see its docstring for the rule on short remainders).
* `sampling_rate` picks the rate actually used (`VideoPlan.sampled_fps`), and the grid is
  t_k = k / sampled_fps seconds from the stream's first frame, for every k with t_k < duration.
  A clip owns the grid points in [ts_start, ts_end) and also samples the next clip's first point
  (`ClipPlan.shared_time`): adjacent clips share that one frame, so linking tracks across a
  boundary is a function of the pair (mask IoU on the shared frame). Which frame answers a grid
  time is `pipeline.decode.range_decode`'s rule (nearest decoder PTS, the earlier on a tie), so the
  shared frame of clip i is exactly clip i+1's first frame.

Errors in the file raise `DecodeError` naming the uri; bad arguments raise `ValueError` with a
message the CLI prints as a usage error.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Sequence


from pipeline.errors import DecodeError
from pipeline.decode.isolation import call_isolated
from pipeline.decode.media import VideoSource, open_video, quarter_turns
from pipeline.shots import SHOT_THRESHOLD, ShotPass, detect_shots

#: ``--clip-seconds`` default, the one definition (`pipeline.config` and the CLI import it): 30 s at
#: 1 fps is 30 frames, about what SAM 2 tracks in one session on a GPU actor without its memory bank
#: growing large, and short enough that the clips of one long video spread over a cluster.
DEFAULT_CLIP_SECONDS = 30.0
#: Longer clips are refused, here and by `pipeline.config.IndexConfig`: a clip's frames are held in
#: memory at once, by one decode task and in one SAM 2 session (10 minutes at 1 fps and 1080p is
#: 3.7 GB), and nothing gains from longer clips.
MAX_CLIP_SECONDS = 600.0
#: No clip is shorter than this (or than one grid step, when that is longer), except a video
#: shorter than it: a sliver of a shot is merged into its neighbour.
MIN_CLIP_SECONDS = 1.0
#: The header's duration is checked against the stream: planning seeks this far before the end the
#: header claims and demuxes (no decoding) to the last packet, so a header that under-reports (a
#: recorder that wrote the duration of its first part, concatenated streams) does not hide the tail.
#: The same seek is the seek probe (`VideoPlan.seekable`).
END_PROBE_S = 1.0
#: A seek that lands further than this before its target is taken for one the demuxer ignored; a
#: seekable file lands within a GOP (a few seconds; long-GOP recordings lose only speed by a walk).
SEEK_LANDING_S = 30.0
#: Allowance per frame for the shot pass on top of `plan_video`'s `timeout_s`: three times what a
#: frame cost on a loaded 2-core machine (see `pipeline.shots`); a guard against hangs, not a budget.
SHOT_PASS_S_PER_FRAME = 0.1
CUT_MODES = ("shot", "none")
BOUNDARIES = ("shot", "window", "end")
_EPS = 1e-9


@dataclass(frozen=True)
class Clip:
    """[ts_start, ts_end) in seconds from the first frame; `boundary` says what ends it:
    ``'shot'`` a detected cut, ``'window'`` the clip_seconds cap, ``'end'`` the end of the video."""

    clip_index: int
    ts_start: float
    ts_end: float
    boundary: str


@dataclass(frozen=True)
class ClipPlan(Clip):
    """A clip with its slice [k_start, k_stop) of the video's grid, and the next clip's first grid
    time (None for the last clip), which it samples too."""

    k_start: int = 0
    k_stop: int = 0
    grid_times: tuple[float, ...] = ()
    shared_time: float | None = None


@dataclass(frozen=True)
class VideoPlan:
    """Everything the index needs to know about a video before decoding any clip of it.

    `width`/`height` are the displayed size (rotation applied). `num_frames` is exact after a shot
    pass, else the container's count (None when it has none). `sampled_fps` is the rate actually
    used; `thinned` says a frame budget lowered it. `note` is a non-fatal remark for the videos
    table (truncated stream, damaged packets, rate capped). `stream_start_s` is the first frame's
    time on the container's own clock (MPEG-TS starts at 1.4 s, say); every time in the plan and in
    the tables counts from that frame instead, so grid point k is at ``k / sampled_fps``.
    """

    uri: str
    duration_s: float
    fps: float | None
    width: int
    height: int
    num_frames: int | None
    sampled_fps: float
    thinned: bool
    num_sampled: int
    clips: tuple[ClipPlan, ...]
    cuts: str
    cut_times: tuple[float, ...]
    stream_start_s: float
    note: str | None = None
    #: Seconds the shot pass took (0 with fixed windows): `phase_s_decode_shots`.
    shots_s: float = 0.0
    #: False when the file cannot seek (a raw H.264 stream, say): its clips are then decoded by one
    #: sequential walk (`pipeline.decode.range_decode.walk_clips`) instead of one seek per clip, each of
    #: which would fall back to decoding from the first frame.
    seekable: bool = True

    def grid_time(self, k: int) -> float:
        return grid_time(k, self.sampled_fps)


def validate_clip_seconds(clip_seconds: float) -> float:
    """`clip_seconds` as a float, or ValueError saying what is allowed."""
    try:
        value = float(clip_seconds)
    except (TypeError, ValueError):
        raise ValueError(f"clip length must be a number of seconds, got {clip_seconds!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"clip length must be a positive number of seconds, got {clip_seconds!r}")
    if value > MAX_CLIP_SECONDS:
        raise ValueError(
            f"clip length {value:g} s is above the maximum of {MAX_CLIP_SECONDS:g} s "
            "(a clip's frames are held in memory at once)"
        )
    return value


def split_clips(
    duration_s: float,
    cut_times: Sequence[float] = (),
    clip_seconds: float = DEFAULT_CLIP_SECONDS,
    *,
    min_seconds: float = MIN_CLIP_SECONDS,
) -> list[Clip]:
    """Clips covering [0, duration_s): shots cut at `cut_times`, each split into windows.

    The rule, in order:

    1. A cut less than `min_seconds` after the previous kept cut (or the start) is dropped, so
       the sliver before it joins the next shot (a flash or a detector's double hit yields one
       cut); a cut less than `min_seconds` before the end is dropped, so the last sliver joins
       the shot before it. Cuts outside (0, duration) are ignored.
    2. Each shot is split into windows of exactly `clip_seconds` from its start (boundary
       ``'window'``); with no cuts (``--cuts none``) these are the fixed windows 0-30, 30-60, ...
    3. A shot's last window shorter than `min_seconds` is merged into the window before it, which
       is then longer than `clip_seconds` by less than `min_seconds`: a sliver of a clip would cost
       a tracking session for one frame or none. That is the only way a clip exceeds the cap.
       (Windows stay `clip_seconds` long even when `min_seconds` is longer; `assign_grid` then
       merges the ones that hold no grid point.)

    The last clip's boundary is ``'end'``; a clip ending at a kept cut is ``'shot'``.
    """
    clip_seconds = validate_clip_seconds(clip_seconds)
    if not (math.isfinite(duration_s) and duration_s > 0):
        raise ValueError(f"duration must be a positive number of seconds, got {duration_s!r}")
    if not (math.isfinite(min_seconds) and min_seconds >= 0):
        raise ValueError(f"min_seconds must be a non-negative number, got {min_seconds!r}")
    kept: list[float] = []
    for cut in sorted(float(c) for c in cut_times if 0 < c < duration_s):
        if cut - (kept[-1] if kept else 0.0) >= min_seconds and duration_s - cut >= min_seconds:
            kept.append(cut)
    spans: list[tuple[float, float, str]] = []
    for start, end in zip([0.0, *kept], [*kept, duration_s]):
        edges = [start]
        while end - edges[-1] > clip_seconds + _EPS:
            edges.append(edges[-1] + clip_seconds)
        if len(edges) > 1 and end - edges[-1] < min_seconds:
            edges.pop()
        edges.append(end)
        for a, b in zip(edges[:-1], edges[1:]):
            spans.append((a, b, "window"))
        spans[-1] = (spans[-1][0], spans[-1][1], "shot")
    spans[-1] = (spans[-1][0], spans[-1][1], "end")
    return [Clip(i, a, b, kind) for i, (a, b, kind) in enumerate(spans)]


def sampling_rate(
    duration_s: float,
    *,
    fps: float | None,
    num_frames: int | None,
    max_frames: int | None,
    stream_fps: float | None,
) -> tuple[float, bool, str | None]:
    """(sampled_fps, thinned, note): the rate of the grid over [0, duration_s).

    `num_frames` (it wins over `fps`) means N grid points over the video: N / duration. `fps` is
    honoured for any length. Neither goes above the stream's own rate (the same frames would be
    sampled twice; noted). A frame budget `max_frames` below the grid's size lowers the rate to
    max_frames / duration: ``thinned``.
    """
    note = None
    if num_frames is not None:
        rate = num_frames / duration_s
    elif fps is not None:
        rate = float(fps)
    else:
        raise ValueError("fps or num_frames is needed")
    if stream_fps and rate > stream_fps * (1 + 1e-6):
        note = f"{rate:g} frames/s asked, above the video's {stream_fps:g}: sampled at {stream_fps:g}"
        rate = float(stream_fps)
    thinned = max_frames is not None and grid_size(duration_s, rate) > max_frames
    if thinned:
        rate = max_frames / duration_s
    return rate, thinned, note


def grid_size(duration_s: float, rate: float) -> int:
    """How many grid points k / rate lie in [0, duration_s) (at least one)."""
    return max(1, math.ceil(duration_s * rate - _EPS))


def grid_time(k: int, rate: float) -> float:
    return k / rate


def assign_grid(clips: Sequence[Clip], rate: float, duration_s: float) -> list[ClipPlan]:
    """Each clip's grid slice. A clip that would own no grid point (possible only when a grid step
    is longer than a clip) is merged into the next clip, the last one into the clip before it, so
    every clip has at least one frame to track."""
    total = grid_size(duration_s, rate)
    merged: list[list] = []  # [ts_start, ts_end, boundary, k_start]
    for clip in clips:
        k = 0 if not merged else min(total, math.ceil(clip.ts_start * rate - _EPS))
        if merged and k == merged[-1][3]:  # the previous clip owns nothing: this one absorbs it
            merged[-1][1:3] = [clip.ts_end, clip.boundary]
            continue
        if merged and k >= total:  # past the last grid point: nothing left to own
            merged[-1][1:3] = [clip.ts_end, clip.boundary]
            continue
        merged.append([clip.ts_start, clip.ts_end, clip.boundary, k])
    plans: list[ClipPlan] = []
    for i, (start, end, boundary, k_start) in enumerate(merged):
        last = i == len(merged) - 1
        k_stop = total if last else merged[i + 1][3]
        plans.append(ClipPlan(
            clip_index=i, ts_start=start, ts_end=end, boundary=boundary, k_start=k_start, k_stop=k_stop,
            grid_times=tuple(grid_time(k, rate) for k in range(k_start, k_stop)),
            shared_time=None if last else grid_time(k_stop, rate),
        ))
    return plans


def check_plan_args(clip_seconds: float, cuts: str, fps: float | None, num_frames: int | None,
                    max_frames: int | None, threshold: float, timeout_s: float) -> float:
    """`clip_seconds` as a float, or ValueError naming the planning argument that is out of range."""
    clip_seconds = validate_clip_seconds(clip_seconds)
    if cuts not in CUT_MODES:
        raise ValueError(f"cuts must be one of {', '.join(CUT_MODES)}, got {cuts!r}")
    if num_frames is not None:
        if num_frames < 1:
            raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    elif fps is None or not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be a positive number when num_frames is not given, got {fps}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, got {max_frames}")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must lie between 0 and 1, got {threshold}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    return clip_seconds


def plan_video(
    uri: str,
    *,
    fps: float | None = 1.0,
    num_frames: int | None = None,
    max_frames: int | None = None,
    clip_seconds: float = DEFAULT_CLIP_SECONDS,
    cuts: str = "shot",
    threshold: float = SHOT_THRESHOLD,
    storage_options: dict | None = None,
    timeout_s: float = 120.0,
    header: "_Header | None" = None,
) -> VideoPlan:
    """Probe `uri`, find its shot cuts (``cuts='shot'``) and plan its clips and sampling grid.

    Two calls into a decode child: the header and the first frame (within `timeout_s`), then, with
    ``cuts='shot'``, one pass over every frame at 48x27, which may take `timeout_s` plus
    `SHOT_PASS_S_PER_FRAME` per frame (see `pipeline.shots` for what it costs per video-hour): a
    fixed deadline would either kill the pass on a long video or never catch a hang on a short
    one. A remote file is read through range requests either way. `header`: one `read_header` already got.
    """
    clip_seconds = check_plan_args(clip_seconds, cuts, fps, num_frames, max_frames, threshold, timeout_s)

    header = header or read_header(uri, storage_options, timeout_s)
    duration, num_frames_seen, notes = header_duration(header)
    interval = 1 / header.fps if header.fps else 0.0
    tolerance = max(0.5, 2 * interval)
    cut_times: list[float] = []
    shots_s = 0.0
    if cuts == "shot":
        frames = header.num_frames or (duration or 3600.0) * (header.fps or 30.0)
        shots_start = time.perf_counter()
        found: ShotPass = call_isolated(
            _shots_request, uri, storage_options, threshold,
            timeout_s=timeout_s + frames * SHOT_PASS_S_PER_FRAME, label=uri, retire=True,
        )
        shots_s = time.perf_counter() - shots_start
        if not found.num_frames:
            detail = f" (demuxer: {found.stream_error})" if found.stream_error else ""
            raise DecodeError(f"{uri}: no frame could be decoded{detail}")
        cut_times, num_frames_seen = found.cut_times, found.num_frames
        duration = pass_duration(duration, (found.last_time or 0.0) + interval, tolerance, found.failed_packets, notes)
    if duration is None:
        raise DecodeError(f"{uri}: the duration is unknown (no container header says it and no frame was indexed)")
    if header.duration_s is not None and duration - header.duration_s > tolerance:
        notes.insert(0, f"the header says {header.duration_s:.1f} s but the stream runs to {duration:.1f} s: "
                        "indexed to the end of the stream")
    if not header.seekable:
        notes.append("the file cannot seek: its clips were decoded in one pass from the start")

    rate, thinned, rate_note = sampling_rate(
        duration, fps=fps, num_frames=num_frames, max_frames=max_frames, stream_fps=header.fps
    )
    if rate_note:
        notes.append(rate_note)
    clips = split_clips(duration, cut_times, clip_seconds, min_seconds=max(MIN_CLIP_SECONDS, 1 / rate))
    return VideoPlan(
        uri=uri, duration_s=duration, fps=header.fps, width=header.width, height=header.height,
        num_frames=num_frames_seen, sampled_fps=rate, thinned=thinned, num_sampled=grid_size(duration, rate),
        clips=tuple(assign_grid(clips, rate, duration)), cuts=cuts, cut_times=tuple(cut_times),
        stream_start_s=header.stream_start_s, note="; ".join(notes) or None, shots_s=shots_s,
        seekable=header.seekable,
    )


@dataclass
class _Header:
    duration_s: float | None  # what the container header says (or a demux scan, when it says nothing)
    fps: float | None
    width: int  # displayed, rotation applied
    height: int
    num_frames: int | None
    stream_start_s: float
    stream_end_s: float | None = None  # end of the last packet demuxed (`_probe_end`)
    seekable: bool = True


def read_header(uri: str, storage_options: dict | None, timeout_s: float) -> _Header:
    """The container header, checked against the stream's end (`_header_request`, in a decode child)."""
    return call_isolated(_header_request, uri, storage_options, timeout_s=timeout_s, label=uri)


def header_duration(header: _Header) -> tuple[float | None, int | None, list[str]]:
    """(duration, frame count, notes) from the header and the end probe: the end of the video stream
    wins over a header that disagrees (its frame count is then as stale)."""
    notes: list[str] = []
    duration, num_frames = header.duration_s, header.num_frames
    interval = 1 / header.fps if header.fps else 0.0
    if header.stream_end_s is not None and (duration is None or abs(header.stream_end_s - duration) > max(0.5, 2 * interval)):
        if duration is not None and duration > header.stream_end_s:
            notes.append(f"the video stream ends at {header.stream_end_s:.1f} s, the header says {duration:.1f} s "
                         "(a cut file, or longer audio): planned to the end of the video stream")
        duration, num_frames = header.stream_end_s, None
    return duration, num_frames, notes


def pass_duration(duration: float | None, end: float, tolerance: float, failed_packets: int, notes: list[str]) -> float:
    """The duration once a pass over every frame ended at `end` (its last frame's time plus a frame):
    the pass wins where they disagree (a truncated stream is noted), and damaged packets are noted."""
    if duration is None or abs(duration - end) > tolerance:
        if duration is not None and duration > end:
            notes.append(f"stream truncated after {end:.1f} s of {duration:.1f} s: planned the decodable part")
        duration = end
    if failed_packets:
        notes.append(f"{failed_packets} damaged packets (their clips may fail)")
    return duration


def _header_request(uri: str, storage_options: dict | None) -> _Header:
    """Child side: the container header, and the first frame (it decodes; its rotation)."""
    import av

    with open_video(uri, storage_options) as source:
        stream = source.stream
        interval = source.frame_interval
        width, height = stream.codec_context.width, stream.codec_context.height
        num_frames = int(stream.frames) or None
        duration = _header_duration(source)
        turns = _first_frame_turns(source, av)
        end, seekable = _probe_end(source, av, duration, interval)  # may reopen the container
        if duration is None:
            duration = end
        return _Header(
            duration_s=duration,
            fps=1 / interval if interval else None,
            width=height if turns % 2 else width,
            height=width if turns % 2 else height,
            num_frames=num_frames,
            stream_start_s=float(source.origin * source.time_base),
            stream_end_s=end,
            seekable=seekable,
        )


def _shots_request(uri: str, storage_options: dict | None, threshold: float) -> ShotPass:
    """Child side: the pass over every frame (`pipeline.shots.detect_shots`)."""
    with open_video(uri, storage_options, sequential=True) as source:
        return detect_shots(source, threshold=threshold)


def _header_duration(source: VideoSource) -> float | None:
    """The stream's duration from the container header, in seconds; None when it has none."""
    stream = source.stream
    if stream.duration:
        value = float(stream.duration * stream.time_base)
    elif source.container.duration:
        value = source.container.duration / 1_000_000
    else:
        return None
    return value if math.isfinite(value) and value > 0 else None


def _first_frame_turns(source: VideoSource, av: Any) -> int:
    """Decode the first frame: proves the stream decodes and tells its display rotation."""
    try:
        for packet in source.container.demux(source.stream):
            try:
                frames = packet.decode()
            except (av.FFmpegError, ValueError):
                continue
            for frame in frames:
                return quarter_turns(frame)
    except (av.FFmpegError, OSError) as exc:
        raise DecodeError(f"{source.uri}: the video stream cannot be read ({exc})") from None
    raise DecodeError(f"{source.uri}: no frame could be decoded")


def _scan_duration(source: VideoSource, av: Any, interval: float | None) -> float | None:
    """End of the last packet from a demux-only pass, for containers whose header has no duration."""
    last = None
    try:
        for packet in source.container.demux(source.stream):
            if packet.pts is not None and (last is None or packet.pts > last):
                last = packet.pts
    except (av.FFmpegError, OSError):
        pass
    return None if last is None else source.seconds(int(last)) + (interval or 0.0)


def _probe_end(source: VideoSource, av: Any, duration: float | None, interval: float | None
               ) -> tuple[float | None, bool]:
    """(end of the last packet, seekable): a seek to `END_PROBE_S` before `duration`, then a demux to the end.

    A file cannot seek when the demuxer refuses the seek (a raw MJPEG stream: "Invalid argument")
    or ignores it, landing more than `SEEK_LANDING_S` before the target (an AVI written to a pipe,
    which has no index: demuxing goes on from where it was). Its end then comes from a demux pass
    from the start, which its clips' one sequential walk costs anyway. Only packet headers are
    read, never decoded: for a file whose header is right, the last second or so. Without a
    `duration` the seek goes to `END_PROBE_S` on a fresh container (demuxers that index what they
    read would seek by that index, which a clip task's fresh container lacks), and the demux after
    it is the scan for the end. None for the end when no packet follows the seek.
    """
    if duration is None:
        source.restart()
    target = END_PROBE_S if duration is None else max(0.0, duration - END_PROBE_S)
    try:
        source.container.seek(source.ticks(target), stream=source.stream, backward=True, any_frame=False)
    except (av.FFmpegError, OSError):
        source.restart()
        return _scan_duration(source, av, interval), False
    first = last = None
    try:
        for packet in source.container.demux(source.stream):
            stamp = packet.pts if packet.pts is not None else packet.dts
            if stamp is None or not packet.size:
                continue
            first = stamp if first is None else first
            last = stamp if last is None else max(last, stamp)
    except (av.FFmpegError, OSError):
        pass
    if last is None:
        return None, True
    end = source.seconds(int(last)) + (interval or 0.0)
    return end, source.seconds(int(first)) >= min(target, end) - SEEK_LANDING_S
