"""Sample the frames of one whole video, safely, inside a Ray Data task.

`sample_video` returns only the sampled frames (RGB uint8) and their presentation timestamps. The
metadata and the exact PTS index come from `pipeline.decode.probe`, the pixels from `pipeline.decode.backends`
(PyAV; decord when chosen), and all of it runs in a decode child (`pipeline.decode.isolation`), so a
hang or a crash costs one video, never the job. Times are seconds from the stream's first frame,
taken from the demuxer, never ``index / fps``.

This is the whole-file path, for short videos: `sample_video` downloads a remote file whole (see
`_download`) and indexes every packet. Long videos go through clips instead: `pipeline.clips`
plans them, `sample_clip` decodes one clip from its own byte range, and `sample_at` fetches frames
at given times (K frames spread over a long track); both pick frames by `pipeline.decode.range_decode`'s
rule and run in a decode child too. `sample_at` is also how `pixelrefer report` gets its frames
back: every path returns frames upright (rotation metadata applied), the frames masks refer to.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pipeline.decode.backends import decode_frames
from pipeline.errors import DecodeError
from pipeline.decode.isolation import call_isolated
from pipeline.decode.media import remote_file
from pipeline.decode.probe import FrameIndex, Probe, check_file, demux_index, output_size, probe_file
from pipeline.decode.range_decode import pick_frames
from pipeline.sources import is_local, local_path

#: Refuse a sample whose frames would take more memory than this (all frames together); the
#: message suggests `max_side` or fewer frames. 64 frames of 4K UHD take 1.6 GB.
MAX_SAMPLE_BYTES = 4 << 30


@dataclass
class SampledVideo:
    """The sampled frames of one video and the stream's metadata.

    `timestamps[i]` is the presentation time of `frames[i]` in seconds from the stream start. Width
    and height are those of the displayed picture (after rotation metadata is applied), not of the
    returned frames, which `max_side` may have scaled down. `error` is a non-fatal note (truncated
    stream, frames that did not decode, fallback decoder used); ``None`` when all went well.
    """

    frames: np.ndarray
    timestamps: np.ndarray
    duration_s: float | None
    fps: float | None
    width: int | None
    height: int | None
    num_frames: int | None
    error: str | None = None


@dataclass
class _Request:
    uri: str
    storage_options: dict | None
    fps: float | None
    num_frames: int | None
    max_frames: int
    max_side: int | None
    scratch_dir: str | None


def sample_video(
    uri: str,
    *,
    fps: float | None = 1.0,
    num_frames: int | None = None,
    max_frames: int = 64,
    max_side: int | None = None,
    storage_options: dict | None = None,
    timeout_s: float = 120.0,
) -> SampledVideo:
    """Decode `uri` and return its sampled frames with their presentation timestamps.

    Sampling: with `num_frames` set (it wins over `fps`, whose default is always present), N frames
    uniformly spaced by PTS between the first and the last frame; otherwise the frames nearest to
    t = 0, 1/fps, 2/fps, ... up to the last frame. At most `max_frames` frames: when the fps grid
    holds more, `max_frames` uniformly spaced frames over the whole video are taken instead of its
    first `max_frames` points, so a long video is covered to its end. Duplicates (fps above the
    video's rate) are dropped. `max_side` scales frames down so that their longer side is at most
    that many pixels, keeping the aspect ratio; ``None`` keeps them as they are.

    Everything that can go wrong with the file (missing, empty, not a video, audio only, truncated,
    undecodable, too large, a decoder hang past `timeout_s` or a decoder crash) raises
    `DecodeError` naming the file; frames lost to a damaged stream are reported in `error` instead
    when some frames still decode. Bad arguments raise `ValueError`. A `RuntimeError` means the
    environment is broken (decoder process cannot start), which is no property of this video.
    """
    if num_frames is not None:
        if num_frames < 1:
            raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    elif fps is None or not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be a positive number when num_frames is not given, got {fps}")
    if max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, got {max_frames}")
    if max_side is not None and max_side < 2:
        raise ValueError(f"max_side must be at least 2 pixels, got {max_side}")
    if not (timeout_s > 0):
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")

    scratch = None if is_local(uri) else tempfile.mkdtemp(prefix="pixelrefer-decode-")
    request = _Request(uri, storage_options, fps, num_frames, max_frames, max_side, scratch)
    try:
        return call_isolated(_sample_request, request, timeout_s=timeout_s, label=uri)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


@dataclass
class SampledClip:
    """Frames of one clip (or of `sample_at`'s times), in time order.

    `timestamps[i]` is the decoder PTS of `frames[i]` in seconds from the stream's first frame, and
    `grid_times[i]` the requested time it answers (the nearest frame to it). `shared` is True when
    the last frame answers the next clip's first grid time. Times the stream cannot answer (it ends
    before them) are left out and said in `error`, a non-fatal note. `bytes_read` counts the bytes
    fetched from storage for a remote file (None for a local one).
    """

    frames: np.ndarray
    timestamps: np.ndarray
    grid_times: np.ndarray
    shared: bool
    error: str | None = None
    bytes_read: int | None = None


@dataclass
class _RangeRequest:
    uri: str
    times: list[float]
    shared: bool
    strict: bool
    max_side: int | None
    storage_options: dict | None


def sample_clip(
    uri: str,
    *,
    ts_start: float,
    ts_end: float,
    grid_times: Sequence[float],
    shared: bool = False,
    max_side: int | None = None,
    storage_options: dict | None = None,
    timeout_s: float = 120.0,
) -> SampledClip:
    """The frames of the clip [ts_start, ts_end) at its `grid_times`, decoding only that stretch.

    `grid_times` are the clip's own grid times (`pipeline.clips.ClipPlan.grid_times`), followed by
    the next clip's first one when `shared` (`ClipPlan.shared_time`). Only the clip's byte range
    is read (plus the container header and index), locally or through fsspec range requests. A
    damaged stretch within the clip, a hang or a crash raise `DecodeError` for this clip only;
    bad arguments raise `ValueError`.
    """
    times = _checked_times(grid_times, timeout_s, max_side)
    if not (math.isfinite(ts_start) and math.isfinite(ts_end) and 0 <= ts_start < ts_end):
        raise ValueError(f"need 0 <= ts_start < ts_end, got {ts_start}..{ts_end}")
    owned = times[:-1] if shared else times
    if shared and len(times) < 2:
        raise ValueError("a shared clip needs its own grid times before the shared one")
    # a microsecond of slack: `pipeline.clips` rounds grid slices with a tolerance of its own
    if owned and (owned[0] < ts_start - 1e-6 or owned[-1] >= ts_end + 1e-6):
        raise ValueError(
            f"grid times {owned[0]:g}..{owned[-1]:g} are not within the clip {ts_start:g}..{ts_end:g}"
        )
    if shared and times[-1] < ts_end - 1e-6:
        raise ValueError(f"the shared grid time {times[-1]:g} lies before the clip's end {ts_end:g}")
    request = _RangeRequest(uri, times, shared, True, max_side, storage_options)
    label = f"{uri} [{ts_start:.2f}-{ts_end:.2f} s]"
    return call_isolated(_range_request, request, timeout_s=timeout_s, label=label)


def sample_at(
    uri: str,
    timestamps: Sequence[float],
    *,
    max_side: int | None = None,
    storage_options: dict | None = None,
    timeout_s: float = 120.0,
) -> SampledClip:
    """The upright frame nearest to each of `timestamps` (seconds from the first frame), in time order.

    Close times are decoded in one forward pass, distant ones each after its own seek
    (`pipeline.decode.range_decode.SEEK_GAP_S`). The times of a pass that meets a damaged stretch are
    left out with a note instead of failing the others: these are a track's K caption frames,
    and the rest of them still serve.
    """
    times = _checked_times(sorted(float(t) for t in timestamps), timeout_s, max_side)
    request = _RangeRequest(uri, times, False, False, max_side, storage_options)
    return call_isolated(_range_request, request, timeout_s=timeout_s, label=uri)


def _checked_times(times: Sequence[float], timeout_s: float, max_side: int | None) -> list[float]:
    values = [float(t) for t in times]
    if not values:
        raise ValueError("no times to sample")
    if not all(math.isfinite(t) and t >= 0 for t in values):
        raise ValueError(f"times must be finite and not negative, got {values}")
    if any(b < a for a, b in zip(values, values[1:])):
        raise ValueError("grid times must be in ascending order")
    if max_side is not None and max_side < 2:
        raise ValueError(f"max_side must be at least 2 pixels, got {max_side}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    return values


def _range_request(request: _RangeRequest) -> SampledClip:
    """Child side of `sample_clip` and `sample_at`."""
    uri, times = request.uri, request.times
    picked = pick_frames(
        uri, times, max_side=request.max_side, storage_options=request.storage_options, strict=request.strict,
        max_bytes=MAX_SAMPLE_BYTES,
    )
    if not picked.frames:
        reason = "; ".join(picked.notes) or "the decoder returned nothing"
        raise DecodeError(f"{uri}: no frame could be decoded at {times[0]:.2f}-{times[-1]:.2f} s ({reason})")
    shared = request.shared and picked.answered[-1] == times[-1]
    return SampledClip(
        frames=np.stack(picked.frames),
        timestamps=np.asarray(picked.timestamps, dtype=np.float64),
        grid_times=np.asarray(picked.answered, dtype=np.float64),
        shared=shared,
        error="; ".join(picked.notes) or None,
        bytes_read=picked.bytes_read,
    )


def _sample_request(request: _Request) -> SampledVideo:
    """Child side of `sample_video`: resolve the file, probe, index, select, decode."""
    uri = request.uri
    if is_local(uri):
        path = local_path(uri)
    else:
        path = _download(uri, request.storage_options, request.scratch_dir)
    check_file(path, uri)
    probe = probe_file(path, uri)
    out_w, out_h = output_size(probe.width, probe.height, request.max_side)
    index = demux_index(path, probe, uri)
    positions = select_frames(
        index.times, fps=request.fps, num_frames=request.num_frames, max_frames=request.max_frames
    )
    needed = len(positions) * out_w * out_h * 3
    if needed > MAX_SAMPLE_BYTES:
        raise DecodeError(
            f"{uri}: {len(positions)} frames of {out_w}x{out_h} would take {needed / 2**30:.1f} GiB "
            f"(limit {MAX_SAMPLE_BYTES / 2**30:.0f} GiB); pass max_side or sample fewer frames"
        )
    decoded = decode_frames(path, probe, index, positions, out_w, out_h, uri)
    if not len(decoded.frames):
        reason = "; ".join(decoded.notes) or "the decoder returned nothing"
        raise DecodeError(f"{uri}: no frame could be decoded ({reason})")

    frames = decoded.frames if isinstance(decoded.frames, np.ndarray) else np.stack(decoded.frames)
    kept = np.asarray(decoded.positions, dtype=np.int64)
    notes = list(decoded.notes)
    truncation = _truncation_note(index, probe, request, len(kept))
    if truncation:
        notes.insert(0, truncation)
    width, height = (probe.height, probe.width) if probe.rotation % 2 else (probe.width, probe.height)
    duration = probe.duration_s if probe.duration_s else _indexed_end(index)
    fps = probe.fps
    if not fps and duration:
        fps = len(index.times) / duration
    return SampledVideo(
        frames=frames,
        timestamps=index.times[kept].astype(np.float64),
        duration_s=duration,
        fps=fps,
        width=width,
        height=height,
        num_frames=int(len(index.times)),
        error="; ".join(notes) if notes else None,
    )


def _download(uri: str, storage_options: dict | None, scratch_dir: str | None) -> str:
    """Copy a remote video into the call's private scratch folder and return its path.

    A temporary file rather than decord's file-object input: decord reads a file object whole into
    a bytearray (memory = file size, per concurrent task), and ffprobe and PyAV need a path as
    well; a file costs disk and page cache only, is read by all three, and the parent deletes the
    folder after the call even when the child was killed. The copy is bounded by the free space
    of the temporary folder (checked first, ``TMPDIR`` chooses it) and by the call's timeout.
    """

    if scratch_dir is None:  # pragma: no cover - sample_video always makes one for remote files
        raise DecodeError(f"{uri}: no scratch folder for a remote file")
    fs, path, size = remote_file(uri, storage_options)
    free = shutil.disk_usage(scratch_dir).free
    if size is not None and size > free - (256 << 20):
        raise DecodeError(
            f"{uri}: {size / 2**30:.1f} GiB does not fit in the temporary folder {scratch_dir} "
            f"({free / 2**30:.1f} GiB free); set TMPDIR to a larger disk"
        )
    suffix = os.path.splitext(path)[1][:16]
    local = os.path.join(scratch_dir, "video" + suffix)
    try:
        fs.get_file(path, local)
    except FileNotFoundError:
        raise DecodeError(f"{uri}: file not found (deleted or moved after it was listed?)") from None
    except OSError as exc:
        raise DecodeError(f"{uri}: download failed ({type(exc).__name__}: {exc})") from None
    return local


def select_frames(
    times: np.ndarray, *, fps: float | None = 1.0, num_frames: int | None = None, max_frames: int = 64
) -> np.ndarray:
    """Positions (into the sorted `times`) of the frames to sample; sorted, without duplicates.

    See `sample_video` for the rules. Nearest means smallest |pts - target|, the earlier frame on a
    tie.
    """
    times = np.asarray(times, dtype=np.float64)
    if times.size == 0:
        return np.zeros(0, dtype=np.int64)
    first, last = float(times[0]), float(times[-1])
    if num_frames is not None:
        count = min(num_frames, max_frames)
        targets = np.linspace(first, last, count) if count > 1 else np.array([first])
    else:
        assert fps is not None and fps > 0
        steps = int(math.floor(max(last, 0.0) * fps + 1e-9)) + 1
        if steps > max_frames:
            targets = np.linspace(0.0, last, max_frames) if max_frames > 1 else np.array([0.0])
        else:
            targets = np.arange(steps, dtype=np.float64) / fps
    right = np.clip(np.searchsorted(times, targets, side="left"), 0, times.size - 1)
    left = np.clip(right - 1, 0, times.size - 1)
    pick = np.where(np.abs(times[left] - targets) <= np.abs(times[right] - targets), left, right)
    return np.unique(pick).astype(np.int64)


def _indexed_end(index: FrameIndex) -> float:
    """End of the last indexed frame: its time plus the typical frame interval."""
    times = index.times
    step = float(np.median(np.diff(times))) if times.size > 1 else 0.0
    return float(times[-1]) + step


def _truncation_note(index: FrameIndex, probe: Probe, request: _Request, kept: int) -> str | None:
    """A note when the stream ends well before the duration its header announces, or the demuxer failed.

    "Well before": by more than half a second and more than two frame intervals, so that rounding
    of container durations never reads as truncation.
    """
    end = _indexed_end(index)
    step = end - float(index.times[-1])
    expected = probe.duration_s
    cut = expected is not None and expected - end > max(0.5, 2 * step)
    if not cut and index.complete:
        return None
    if expected is None or not cut:
        return f"stream damaged after {end:.1f} s (demuxer: {index.demux_error}): indexed {kept} frames up to there"
    if request.num_frames is not None:
        return f"stream truncated after {end:.1f} s of {expected:.1f} s: sampled {kept} frames from the decodable part"
    full = np.arange(0.0, expected - 1e-9, 1.0 / request.fps) if request.fps else np.zeros(1)
    planned = min(len(full), request.max_frames)
    return f"stream truncated after {end:.1f} s of {expected:.1f} s: indexed {kept} of ~{planned} frames"

