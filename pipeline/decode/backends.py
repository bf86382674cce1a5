"""Turning chosen frames of a whole video into pixels: PyAV, or decord when the user asks for it.

**Pixels** come from PyAV (`decode_pyav`): it was the faster of the two in ``bench/decode.py``
(sampling 16 frames of a 120 s 1080p file: 0.24x the time of a full decode, decord 0.41x), it
matches frames by PTS, and it is what clips and the report decode with (`pipeline.decode.range_decode`).
decord is an optional extra (``pip install 'pixelrefer-pipeline[decord]'``, no wheels for
Apple-silicon laptops), imported only when ``PIXELREFER_DECODER=decord`` is set in the workers'
environment; ``get_batch`` then decodes the frames (it seeks to the key frame before each wanted
frame, scales while converting and applies rotation metadata). Where decord would return wrong
frames (`decord_unsafe`), cannot open the file (AV1, damaged index), fails midway (truncated
stream), disagrees with the demuxer's index or is not installed, PyAV decodes the same frames
and keeps what decodes; a failure midway is said in a note, the rest is logged.

Everything here runs inside a decode child (`pipeline.decode.isolation`), which calls `load_decoders`
once at start.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from pipeline.decode.probe import FrameIndex, Probe

log = logging.getLogger(__name__)

_DECORD: Any = None


#: The environment variable naming the decoder of whole videos: ``pyav`` (the default) or ``decord``.
DECODER_ENV = "PIXELREFER_DECODER"


def load_decoders() -> dict[str, str]:
    """Import the decoders once per child, so that no call pays for it inside its deadline.

    decord only when asked for: importing it costs every child its start-up time and memory, and
    it is an optional extra that may not be installed at all.
    """
    global _DECORD
    import av

    av.logging.set_level(None)  # libav's console chatter about damaged frames is reported, not printed
    versions = {"av": av.__version__}
    _DECORD = None
    choice = os.environ.get(DECODER_ENV, "pyav").strip().lower() or "pyav"
    if choice != "decord":
        if choice != "pyav":
            log.warning("%s=%r is not a decoder (pyav or decord); PyAV decodes everything", DECODER_ENV, choice)
        return versions
    try:
        import decord

        decord.logging.set_level(decord.logging.QUIET)
        _DECORD = decord
        versions["decord"] = decord.__version__
    except Exception as exc:  # noqa: BLE001 - any import failure means: use PyAV
        log.warning("%s=decord, but decord is not usable (%s; install the 'decord' extra); PyAV decodes everything",
                    DECODER_ENV, exc)  # fmt: skip
    return versions


@dataclass
class Decoded:
    """What a decode pass delivered: the frames that decoded, where they are in the index, and notes."""

    frames: list[np.ndarray] | np.ndarray = field(default_factory=list)  # decord gives one array
    positions: list[int] = field(default_factory=list)  # positions in the index
    notes: list[str] = field(default_factory=list)


def decode_frames(
    path: str, probe: Probe, index: FrameIndex, positions: np.ndarray, out_w: int, out_h: int, uri: str
) -> Decoded:
    """PyAV, or decord when chosen (`load_decoders`) and known to be right for this file.

    Frames come back upright (rotation metadata applied) at the scaled size.
    """
    notes: list[str] = []
    unsafe = decord_unsafe(probe, index) if _DECORD is not None else None
    if unsafe:
        log.info("%s: %s; decoding with PyAV", uri, unsafe)
    elif _DECORD is not None:
        try:
            frames = decode_decord(path, probe, index, positions, out_w, out_h)
        except _DecordUnsuitable as exc:
            log.info("%s: %s; decoding with PyAV", uri, exc)
        except Exception as exc:  # noqa: BLE001 - decord raises DECORDError, RuntimeError, AssertionError...
            notes.append(f"decord could not decode it ({short_error(exc)}), decoded with PyAV")
        else:
            return Decoded(frames=frames, positions=[int(p) for p in positions])
    decoded = decode_pyav(path, probe, index, positions, out_w, out_h)
    decoded.notes[:0] = notes
    return decoded


#: Containers in which decord's frames were checked against ground truth (tests and
#: ``bench/decode.py``). In MPEG-TS it returns frames a whole GOP late with the right timestamps,
#: in MPEG-PS and AVI (B-frames) frames off by one or more.
DECORD_CONTAINERS = ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "flv", "asf")


def decord_unsafe(probe: Probe, index: FrameIndex) -> str | None:
    """Why decord would return wrong frames for this file, or None when it is safe.

    decord finds frame n by seeking to the key frame before it and counting decoded frames. That
    count is off when the decoder drops leading frames after a seek (open GOPs: x264 ``open-gop``,
    x265's default, MPEG-2) and when its seek lands elsewhere than it assumes (MPEG-TS/PS): it then
    returns the wrong frames with the right timestamps, silently. PyAV matches frames by PTS instead.
    """
    if probe.format_name not in DECORD_CONTAINERS:
        return f"decord mis-seeks in the {probe.format_name!r} container"
    if index.open_gop:
        return "open GOP (frames shown before their key frame): decord counts frames wrongly after a seek"
    if index.pts_from_order:
        return "no stored presentation timestamps"
    return None


class _DecordUnsuitable(Exception):
    """decord's frame list or orientation differs from the demuxer's: fall back without a note."""


def decode_decord(
    path: str, probe: Probe, index: FrameIndex, positions: np.ndarray, out_w: int, out_h: int
) -> np.ndarray:
    """``get_batch`` of the wanted frames, after checking that decord numbers frames like the index.

    decord applies the container's rotation itself and scales after rotating, so it is given the
    displayed size.
    """
    decord = _DECORD
    disp_w, disp_h = (out_h, out_w) if probe.rotation % 2 else (out_w, out_h)
    scaled = (out_w, out_h) != (probe.width, probe.height)
    reader = decord.VideoReader(
        path,
        ctx=decord.cpu(0),
        width=disp_w if scaled else -1,
        height=disp_h if scaled else -1,
        num_threads=decoder_threads(),
    )
    if len(reader) != len(index.times):
        raise _DecordUnsuitable(f"decord counts {len(reader)} frames, the demuxer {len(index.times)}")
    stamps = reader.get_frame_timestamp(positions.tolist())[:, 0].astype(np.float64)
    # float32 seconds: allow its rounding (~1e-7 relative) on top of a millisecond.
    tolerance = 1e-3 + 1e-6 * np.abs(index.times[positions])
    if not np.all(np.abs(stamps - index.times[positions]) <= tolerance):
        raise _DecordUnsuitable("decord's timestamps differ from the demuxer's")
    frames = reader.get_batch(positions.tolist()).asnumpy()
    if frames.shape != (len(positions), disp_h, disp_w, 3):
        raise _DecordUnsuitable(f"decord returned frames of shape {frames.shape}, expected {disp_h}x{disp_w}")
    return frames


def decoder_threads() -> int:
    """Decoder threads: Ray sets OMP_NUM_THREADS to the task's CPUs; otherwise let FFmpeg choose.

    Following it keeps sixteen concurrent tasks on sixteen cores from each starting sixteen
    decoder threads.
    """
    try:
        return max(0, int(os.environ.get("OMP_NUM_THREADS", "0")))
    except ValueError:
        return 0


def decode_pyav(
    path: str, probe: Probe, index: FrameIndex, positions: np.ndarray, out_w: int, out_h: int
) -> Decoded:
    """Decode the wanted frames with PyAV, seeking to the key frame before each when it lies ahead.

    Written here because PyAV has no "frames at these indices" call. Two measured speed-ups over a
    plain decode loop: packets of frames that are not wanted are sent with ``skip_frame=NONREF``,
    so the decoder drops the frames nothing else refers to (about half of an x264 stream's frames:
    it made sequential sampling 25-40% faster here), and only wanted frames are converted to RGB.
    Seeking: demuxers disagree on which timestamp a seek means (MP4 and Matroska land on the key
    frame given its PTS, MPEG-TS/PS need its DTS), so the key frame's PTS is tried, then its DTS,
    and the first packet read tells whether the seek landed on or before the key frame; if neither
    does, one sequential pass from the start decodes the rest. It is also the robust path: a
    packet that fails to decode is skipped and counted, a demuxer error ends the stream, and the
    frames that did decode are returned with a note.
    """
    import av

    wanted = {int(index.pts[p]): int(p) for p in positions}
    order = sorted(wanted)
    # For every frame, the last key frame at or before it in presentation order.
    key_at = np.maximum.accumulate(np.where(index.keyframe, np.arange(index.pts.size), 0))
    result: dict[int, np.ndarray] = {}
    failures = 0
    stream_error: str | None = None

    def open_stream() -> tuple[Any, Any]:
        container = av.open(path, options={"fflags": "+genpts"})
        stream = container.streams[probe.stream_index]
        stream.thread_type = "AUTO"
        if decoder_threads():
            stream.codec_context.thread_count = decoder_threads()
        return container, stream

    def seek_packets(container: Any, stream: Any, key: int) -> Iterator[Any] | None:
        """Packets from the key frame `key` (or an earlier one) on; None when no seek lands there."""
        key_pts = int(index.pts[key])
        for stamp in dict.fromkeys((key_pts, int(index.dts[key]))):
            try:
                container.seek(stamp, stream=stream, backward=True, any_frame=False)
                packets = container.demux(stream)
                first = next(packets, None)
            except (av.FFmpegError, OSError):
                continue
            if first is None or first.pts is None:
                continue
            if first.is_keyframe and first.pts <= key_pts:
                return itertools.chain([first], packets)
        return None

    def frames_of(packets: Iterator[Any], codec: Any, skip: bool = True) -> Iterator[Any]:
        nonlocal failures, stream_error
        try:
            for packet in packets:
                if skip:
                    codec.skip_frame = "DEFAULT" if packet.size == 0 or packet.pts in wanted else "NONREF"
                try:
                    yield from packet.decode()
                except (av.FFmpegError, ValueError):
                    failures += 1
        except (av.FFmpegError, OSError) as exc:
            stream_error = str(exc)

    container, stream = open_stream()
    if index.pts_from_order:
        container.close()
        return _decode_pyav_in_order(open_stream, frames_of, positions, out_w, out_h, probe.rotation)
    try:
        frames = frames_of(container.demux(stream), stream.codec_context)
        position: int | None = None  # pts of the last frame decoded; None: at the file start
        sequential = False  # seeking failed once: decode everything else in one pass
        for target in order:
            if target in result:
                continue
            key = int(key_at[wanted[target]])
            # Seek when the key frame lies ahead of where decoding stands: cheaper than decoding up to it.
            ahead = key > 0 if position is None else index.pts[key] > position
            if ahead and not sequential:
                packets = seek_packets(container, stream, key)
                if packets is None:
                    container.close()
                    container, stream = open_stream()
                    packets, sequential = container.demux(stream), True
                frames, position = frames_of(packets, stream.codec_context), None
            reached = False
            for frame in frames:
                if frame.pts is None:
                    continue
                position = int(frame.pts)
                if position in wanted and position not in result:
                    result[position] = upright_rgb(frame, out_w, out_h, probe.rotation)
                if position >= target:
                    reached = True
                    break
            if not reached:
                break  # the stream ended: nothing decodes past it, later targets are missing too
    finally:
        container.close()

    decoded = Decoded()
    for pts_value in order:
        if pts_value in result:
            decoded.frames.append(result[pts_value])
            decoded.positions.append(wanted[pts_value])
    missing = len(order) - len(decoded.frames)
    if missing:
        detail = f" (decoder: {stream_error})" if stream_error else ""
        decoded.notes.append(f"{missing} of {len(order)} sampled frames could not be decoded{detail}")
    elif failures:
        decoded.notes.append(f"{failures} damaged packets skipped while decoding")
    return decoded


def _decode_pyav_in_order(
    open_stream: Callable[[], tuple[Any, Any]],
    frames_of: Callable[[Iterator[Any], Any, bool], Iterator[Any]],
    positions: np.ndarray,
    out_w: int,
    out_h: int,
    rotation: int,
) -> Decoded:
    """One pass from the start for streams without stored PTS: the n-th frame out is position n.

    Frames leave the decoder in display order, so counting them is exact where their made-up PTS
    are not; seeking is impossible for the same reason (the count would be lost).
    """
    wanted = set(int(p) for p in positions)
    last = max(wanted)
    decoded = Decoded()
    container, stream = open_stream()
    try:
        count = -1
        # No skipping here: a skipped frame would not come out and would shift the count.
        for count, frame in enumerate(frames_of(container.demux(stream), stream.codec_context, False)):
            if count in wanted:
                decoded.frames.append(upright_rgb(frame, out_w, out_h, rotation))
                decoded.positions.append(count)
            if count >= last:
                break
    finally:
        container.close()
    missing = len(wanted) - len(decoded.frames)
    if missing:
        decoded.notes.append(f"{missing} of {len(wanted)} sampled frames could not be decoded")
    return decoded


def upright_rgb(frame: Any, width: int, height: int, turns: int) -> np.ndarray:
    """A decoded frame as RGB, scaled to `width` x `height` as stored, then turned upright.

    `turns` counts counter-clockwise quarter turns (`numpy.rot90`'s k). Every PyAV path (whole
    videos here, clips and the report through `pipeline.decode.range_decode`) turns frames here, so all of
    them return the frames that masks were computed on.
    """
    array = frame.to_ndarray(format="rgb24", width=width, height=height)
    return np.ascontiguousarray(np.rot90(array, k=turns)) if turns % 4 else array


def short_error(exc: BaseException) -> str:
    """One line of an exception, without decord's C++ log prefix (time, source file and line)."""
    text = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^(\[[\d:]+\]\s+\S+:\d+:\s*)+", "", text)
    text = re.sub(r"^(Error|Check failed):\s*", "", text)
    return text[:160]
