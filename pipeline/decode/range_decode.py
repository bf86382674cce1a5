"""Child side of `sample_clip` and `sample_at`: the frames nearest to given times, decoding only around them.

The frame chosen for a time t is the decoded frame whose PTS is nearest to t, the earlier one on a
tie: a function of t and the stream alone, never of where decoding started. That is what lets two
adjacent clips, decoded by different tasks, return the very same frame (same PTS, same pixels) for
their shared boundary time.

How: the times are cut into runs (consecutive times less than `SEEK_GAP_S` apart). For each run
PyAV seeks to the key frame before its first time (``container.seek(backward=True)``) and decodes
forward until a frame lies past its last time, then stops. A seek is trusted only when the first
frame it yields is at or before the run's first time: demuxers disagree on what a seek target means
(MP4 seeks by decode time, MPEG-TS lands after the target), so otherwise it seeks again earlier,
1 s, 2 s, 4 s... back, and finally decodes from the start of the file.

Why PyAV rather than decord for clips: decord numbers frames from an index of the whole file that
it builds on open (so opening costs a pass over the file's packets, and a remote file must be read
whole into memory), and it miscounts after seeks in open-GOP and MPEG-TS streams
(`pipeline.decode.backends.decord_unsafe`); PyAV matches frames by PTS and reads a file object through
range requests (`pipeline.decode.media`).

Damage: a packet that fails to decode, or a frame the decoder flags as corrupt, within a run
raises `DecodeError` when `strict` (a clip), because the frames after it in its GOP are wrong
too; otherwise the run's times are dropped with a note (`sample_at`). A stream that ends (or
whose demuxer fails) before a time leaves that time unanswered, with a note.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from pipeline.decode.backends import upright_rgb
from pipeline.errors import DecodeError
from pipeline.decode.media import VideoSource, open_video, quarter_turns
from pipeline.decode.probe import output_size

#: Times further apart than this start a new run (a seek) instead of decoding through the gap: a
#: seek costs about one GOP of decoding (1-10 s of video), decoding the gap costs all of it.
SEEK_GAP_S = 10.0
#: A time later than the stream's last frame by more than this is beyond the end: unanswered
#: (the last frame is nearest to anything after it, but it does not show that moment).
END_SLACK_S = 1.0
#: Earlier and earlier re-seeks before decoding from the start (see the module docstring).
_BACKOFFS_S = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


@dataclass
class Picked:
    """The frames answering some of the requested times, in time order, and what went wrong."""

    frames: list[np.ndarray] = field(default_factory=list)
    timestamps: list[float] = field(default_factory=list)  # decoder PTS, seconds from the first frame
    answered: list[float] = field(default_factory=list)  # the requested time each frame answers
    notes: list[str] = field(default_factory=list)
    bytes_read: int | None = None


class _Damaged(Exception):
    def __init__(self, start: float, end: float, failed: int, corrupt: int) -> None:
        super().__init__(f"damaged stream between {start:.2f} s and {end:.2f} s "
                         f"({failed} packets failed to decode, {corrupt} frames corrupt)")


def pick_frames(
    uri: str,
    times: Sequence[float],
    *,
    max_side: int | None,
    storage_options: dict | None,
    strict: bool,
    max_bytes: int | None = None,
) -> Picked:
    """The frame nearest to each of `times` (seconds from the first frame, ascending).

    `max_bytes` refuses, before decoding, a request whose frames would take more memory than that.
    """
    targets = np.asarray(times, dtype=np.float64)
    picked = Picked()
    with open_video(uri, storage_options) as source:
        width, height = output_size(source.stream.codec_context.width, source.stream.codec_context.height, max_side)
        needed = targets.size * width * height * 3
        if max_bytes is not None and needed > max_bytes:
            raise DecodeError(
                f"{uri}: {targets.size} frames of {width}x{height} would take {needed / 2**30:.1f} GiB "
                f"(limit {max_bytes / 2**30:.0f} GiB); pass max_side or sample fewer frames"
            )
        for run in _runs(targets):
            try:
                _pick_run(source, run, width, height, picked)
            except _Damaged as exc:
                if strict:
                    raise DecodeError(f"{uri}: {exc}") from None
                picked.notes.append(f"{len(run)} requested frames skipped: {exc}")
        picked.bytes_read = source.bytes_read()
    return picked


def _runs(targets: np.ndarray) -> list[np.ndarray]:
    if targets.size == 0:
        return []
    breaks = np.nonzero(np.diff(targets) > SEEK_GAP_S)[0] + 1
    return np.split(targets, breaks)


class _Nearest:
    """The decoded frame nearest each of a rising sequence of times, walking the frames once: the
    earlier frame on a tie, the first frame for a time before the stream, and nothing for a time
    more than `END_SLACK_S` past the last frame. The one rule of clip decodes and sequential walks."""

    def __init__(self, frames: Iterator[tuple[float, Any]]) -> None:
        self.frames = frames
        self.previous: tuple[float, Any] | None = None
        self.current = next(frames, None)

    def pick(self, target: float) -> tuple[float, Any] | None:
        while self.current is not None and self.current[0] <= target:
            self.previous, self.current = self.current, next(self.frames, None)
        previous, current = self.previous, self.current
        if previous is None:
            return current
        if current is None:
            return previous if target - previous[0] <= END_SLACK_S else None
        return previous if target - previous[0] <= current[0] - target else current

    def fill(self, targets: Sequence[float], picked: "Picked", converted: dict[float, np.ndarray],
             width: int, height: int) -> None:
        """Append each target's nearest frame to `picked`, upright and converted once per frame
        (`converted` carries frames already converted, e.g. a clip's shared frame)."""
        for target in map(float, targets):
            choice = self.pick(target)
            if choice is None:
                continue
            stamp, frame = choice
            if stamp not in converted:
                converted[stamp] = upright_rgb(frame, width, height, quarter_turns(frame))
            picked.frames.append(converted[stamp])
            picked.timestamps.append(stamp)
            picked.answered.append(target)


def _pick_run(source: VideoSource, run: np.ndarray, width: int, height: int, picked: Picked) -> None:
    """Decode from the key frame before ``run[0]`` until past ``run[-1]``; choose the nearest frames."""
    frames, stats = _start_before(source, float(run[0]))
    nearest = _Nearest(frames)
    converted: dict[float, np.ndarray] = {}
    answered_up_to = len(picked.answered)
    nearest.fill(run, picked, converted, width, height)
    if stats.failed or stats.corrupt:
        del picked.frames[answered_up_to:], picked.timestamps[answered_up_to:], picked.answered[answered_up_to:]
        raise _Damaged(stats.first_time, float(run[-1]), stats.failed, stats.corrupt)
    missing = len(run) - (len(picked.answered) - answered_up_to)
    if missing:
        end = f"the stream ends at {nearest.previous[0]:.2f} s" if nearest.previous is not None else "no frame decodes there"
        detail = f" (demuxer: {stats.stream_error})" if stats.stream_error else ""
        picked.notes.append(f"{missing} of {len(run)} requested times from {run[0]:.2f} s not sampled: {end}{detail}")


@dataclass
class _Stats:
    failed: int = 0
    corrupt: int = 0
    stream_error: str | None = None
    first_time: float = 0.0


def _start_before(source: VideoSource, target: float) -> tuple[Iterator[tuple[float, Any]], _Stats]:
    """Frames from a point at or before the frame nearest `target` (see the module docstring)."""
    for back in (0.0, *_BACKOFFS_S):
        start = target - back
        if start <= 0.0:
            break
        stats = _Stats()
        frames = _decode_from(source, source.ticks(start), stats)
        first = next(frames, None)
        if first is not None and first[0] <= target:
            stats.first_time = first[0]
            return _chain(first, frames), stats
    stats = _Stats()
    frames = _decode_from(source, None, stats)
    first = next(frames, None)
    if first is None:
        return iter(()), stats
    stats.first_time = first[0]
    return _chain(first, frames), stats


def _chain(first: tuple[float, Any], rest: Iterator[tuple[float, Any]]) -> Iterator[tuple[float, Any]]:
    yield first
    yield from rest


def _decode_from(source: VideoSource, seek_pts: int | None, stats: _Stats) -> Iterator[tuple[float, Any]]:
    """(seconds, frame) in presentation order from a seek (or the start of the file, for None)."""
    import av

    try:
        if seek_pts is None:
            source.restart()
        else:
            source.container.seek(seek_pts, stream=source.stream, backward=True, any_frame=False)
    except (av.FFmpegError, OSError) as exc:
        stats.stream_error = str(exc)
        return
    container, stream = source.container, source.stream
    try:
        for packet in container.demux(stream):
            try:
                decoded = packet.decode()
            except (av.FFmpegError, ValueError):
                stats.failed += 1
                continue
            for frame in decoded:
                if frame.pts is None:
                    continue
                if frame.is_corrupt:
                    stats.corrupt += 1
                yield source.seconds(int(frame.pts)), frame
    except (av.FFmpegError, OSError) as exc:
        stats.stream_error = str(exc)



# ---------------------------------------------------------------- files that cannot seek


@dataclass
class WalkedClip:
    """One clip's frames from `walk_clips`; `error` says its stretch was damaged (its frames are dropped)."""

    picked: Picked
    error: str | None = None


def walk_clips(
    uri: str, groups: Sequence[Sequence[float]], *, max_side: int | None, storage_options: dict | None
) -> Iterator[WalkedClip]:
    """The frame nearest to each time of each group (a clip's grid, then its shared time), from one
    pass over the file from its first frame, one `WalkedClip` per group as soon as it is complete.

    For files that cannot seek (`pipeline.clips.VideoPlan.seekable`), where `pick_frames` per clip
    would decode from the first frame for every clip: quadratic in the clips, so the late clips of
    a long file time out. The choice is `pick_frames`'s (nearest PTS, the earlier on a tie), so a
    clip gets the frames it would get alone, and a shared frame is converted once for both clips.
    Packets that fail, or frames flagged corrupt, since the previous group's last frame fail this
    group alone, as `pick_frames(strict=True)` fails one clip.
    """
    with open_video(uri, storage_options, sequential=True) as source:
        context = source.stream.codec_context
        width, height = output_size(context.width, context.height, max_side)
        stats = _Stats()
        nearest = _Nearest(_decode_from(source, None, stats))
        kept: dict[float, np.ndarray] = {}  # the last group's last frame: the next group's shared one
        failed = corrupt = 0
        for times in groups:
            picked = Picked()
            nearest.fill(times, picked, kept, width, height)
            kept = {picked.timestamps[-1]: picked.frames[-1]} if picked.frames else {}
            error = None
            if stats.failed > failed or stats.corrupt > corrupt:
                error = (f"damaged stream before {float(times[-1]):.2f} s ({stats.failed - failed} packets "
                         f"failed to decode, {stats.corrupt - corrupt} frames corrupt)")
                picked = Picked()
                failed, corrupt = stats.failed, stats.corrupt
            elif len(picked.answered) < len(times):
                end = f"the stream ends at {nearest.previous[0]:.2f} s" if nearest.previous is not None else "no frame decodes"
                detail = f" (demuxer: {stats.stream_error})" if stats.stream_error else ""
                picked.notes.append(f"{len(times) - len(picked.answered)} of {len(times)} requested times from "
                                    f"{float(times[0]):.2f} s not sampled: {end}{detail}")
            picked.bytes_read = source.bytes_read()
            yield WalkedClip(picked, error)


def spill_walk(
    uri: str, groups: Sequence[Sequence[float]], folder: str, *, max_side: int | None, storage_options: dict | None
) -> list[dict[str, Any]]:
    """Child side of the one-pass decode of a video that cannot seek (`walk_clips`).

    A decode child answers a call with one result, and a whole video's frames do not fit one
    answer: each clip's frames go to ``folder/clip-NNNNNN.npy`` as the walk reaches them, so the
    child holds one clip at a time. Returns per group: the file (None without frames), timestamps,
    answered times, notes and error.
    """
    import os

    out: list[dict[str, Any]] = []
    for n, walked in enumerate(walk_clips(uri, groups, max_side=max_side, storage_options=storage_options)):
        picked, path = walked.picked, None
        if picked.frames:
            path = os.path.join(folder, f"clip-{n:06d}.npy")
            np.save(path, np.stack(picked.frames))
        out.append({"path": path, "timestamps": picked.timestamps, "answered": picked.answered,
                    "notes": picked.notes, "error": walked.error})
    return out
