"""What a video file holds, found before anything is decoded: ffprobe metadata and the demux index.

* **Metadata** comes from ffprobe through ffmpeg-python (Debian's ffprobe): it names the failure of
  a broken file in words a user understands, and sees audio-only files, rotation and frame size
  before anything is decoded, so absurd frame sizes are refused instead of allocated. Its cost is
  the start of the ffprobe binary (0.15-0.3 s here, mostly loading FFmpeg's shared libraries).
* **Timestamps** come from the demuxer's packet PTS, read with PyAV without decoding (about 50 ms
  for the 3000 packets of a 2-minute 1080p file). decord exposes PTS only as float32 seconds,
  which loses precision on long videos and is garbage for packets without PTS (MPEG-PS); the
  exact index is also what the fallback decoder needs. Times are seconds from the video stream's
  first frame, as decord and ffmpeg count them, never ``index / fps`` (wrong for variable frame
  rate).

Both read the whole file's packet headers: they serve `pipeline.decode.sampling.sample_video` (short
videos, decoded whole); clips of long videos are planned and decoded without them
(`pipeline.clips`, `pipeline.decode.range_decode`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import DecodeError

#: Frames larger than this on either side are refused before anything is decoded: the decoder's
#: own buffers for such streams (reference frames included) reach gigabytes, and H.264/HEVC
#: levels stop at 8192 px anyway.
MAX_SOURCE_SIDE = 8192


@dataclass
class Probe:
    """The video stream's metadata, from ffprobe."""

    stream_index: int
    width: int
    height: int
    rotation: int  # counter-clockwise quarter turns to apply for display (0..3)
    fps: float | None
    duration_s: float | None
    codec: str
    format_name: str = ""  # ffprobe's container name, e.g. "mov,mp4,m4a,3gp,3g2,mj2", "mpegts"
    has_b_frames: int = 0  # frames are reordered between decoding and display


@dataclass
class FrameIndex:
    """Presentation-ordered frames of the video stream, from demuxing only."""

    pts: np.ndarray  # int64, in stream time base
    dts: np.ndarray  # int64, the packet's DTS (its PTS when it has none): what seeks use
    times: np.ndarray  # float64 seconds from the stream start
    keyframe: np.ndarray  # bool
    time_base: float
    complete: bool  # False when the demuxer stopped on an error before the end of the file
    demux_error: str | None = None
    open_gop: bool = False  # frames after a key frame (decode order) are shown before it
    pts_from_order: bool = False  # the container stores no PTS: the n-th frame decoded is times[n]


def check_file(path: str, uri: str) -> None:
    """Refuse missing, special and empty files with a clear message before any decoder sees them.

    A FIFO or a device would block or stream forever in ffprobe; an empty file gets ffprobe's
    unhelpful "Invalid data found" otherwise.
    """
    import stat

    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DecodeError(f"{uri}: file not found (deleted or moved after it was listed?)") from None
    except OSError as exc:
        raise DecodeError(f"{uri}: cannot read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise DecodeError(f"{uri}: is a folder, not a video file")
    if not stat.S_ISREG(st.st_mode):
        raise DecodeError(f"{uri}: not a regular file (pipe, socket or device)")
    if st.st_size == 0:
        raise DecodeError(f"{uri}: empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise DecodeError(f"{uri}: permission denied")


_FFPROBE_HINTS = (
    ("moov atom not found", "incomplete MP4: its index ('moov' atom) is missing, the file was cut or never finalised"),
    ("Invalid data found when processing input", "not a video file that ffmpeg can read (invalid data)"),
    ("could not find codec parameters", "no decodable stream: codec parameters could not be found"),
    ("Permission denied", "permission denied"),
)


def probe_file(path: str, uri: str) -> Probe:
    """Stream metadata through ffprobe (ffmpeg-python), with failures turned into user messages."""
    import ffmpeg

    try:
        info = ffmpeg.probe(path, v="error")
    except ffmpeg.Error as exc:
        stderr = (exc.stderr or b"").decode("utf-8", "replace").strip()
        if "moov atom not found" in stderr and not _starts_like_mp4(path):
            stderr = "Invalid data found when processing input"  # ffprobe chose MP4 from the name only
        for needle, text in _FFPROBE_HINTS:
            if needle in stderr:
                raise DecodeError(f"{uri}: {text}") from None
        last = stderr.splitlines()[-1] if stderr else "unknown error"
        raise DecodeError(f"{uri}: ffprobe cannot read the file ({last[-300:]})") from None
    except FileNotFoundError:
        raise RuntimeError("ffprobe is not installed (it comes with ffmpeg); it is needed for video metadata") from None
    except ValueError as exc:  # ffprobe printed something that is not JSON
        raise DecodeError(f"{uri}: ffprobe output unreadable ({exc})") from None

    streams = info.get("streams", [])
    video = [
        s for s in streams if s.get("codec_type") == "video" and not (s.get("disposition") or {}).get("attached_pic")
    ]
    if not video:
        kinds = sorted({f"{s.get('codec_type')} ({s.get('codec_name')})" for s in streams})
        if any(s.get("codec_type") == "audio" for s in streams):
            raise DecodeError(f"{uri}: no video stream, the file holds only {', '.join(kinds)} (audio only?)")
        held = ", ".join(kinds) if kinds else "no streams at all"
        raise DecodeError(f"{uri}: no video stream ({held})")
    stream = video[0]
    width, height = int(stream.get("width") or 0), int(stream.get("height") or 0)
    if width <= 0 or height <= 0:
        raise DecodeError(f"{uri}: the video stream has no frame size (codec {stream.get('codec_name')})")
    if max(width, height) > MAX_SOURCE_SIDE:
        raise DecodeError(
            f"{uri}: frame size {width}x{height} exceeds the limit of {MAX_SOURCE_SIDE} px per side; "
            "refusing to decode it"
        )
    duration = _float(stream.get("duration")) or _float((info.get("format") or {}).get("duration"))
    fps = _rate(stream.get("avg_frame_rate")) or _rate(stream.get("r_frame_rate"))
    return Probe(
        stream_index=int(stream["index"]),
        width=width,
        height=height,
        rotation=_quarter_turns(stream),
        fps=fps,
        duration_s=duration if duration and duration > 0 else None,
        codec=str(stream.get("codec_name")),
        format_name=str((info.get("format") or {}).get("format_name", "")),
        has_b_frames=int(stream.get("has_b_frames") or 0),
    )


def _starts_like_mp4(path: str) -> bool:
    """True when the file begins with an ISO-BMFF box (``ftyp``, ``mdat``...), as a real MP4 does."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
    except OSError:
        return False
    return head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot", b"uuid")


def _float(value: Any) -> float | None:
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def _rate(value: Any) -> float | None:
    """ffprobe's "num/den" frame rate as a float; ``None`` for 0/0 and absurd values."""
    if not value or "/" not in str(value):
        return _float(value)
    num, _, den = str(value).partition("/")
    try:
        rate = float(num) / float(den)
    except (ValueError, ZeroDivisionError):
        return None
    return rate if 0 < rate < 10_000 else None


def _quarter_turns(stream: dict) -> int:
    """Counter-clockwise quarter turns that display the stream upright.

    decord and PyAV return frames as stored; phones store portrait video as landscape plus a
    display matrix, and frames shown sideways would mislead the tracker and the captions. ffprobe
    reports the matrix's angle counter-clockwise (``side_data_list[].rotation``); the old ``rotate``
    tag is clockwise.
    """
    for side in stream.get("side_data_list") or []:
        if "rotation" in side:
            angle = _float(side["rotation"]) or 0.0
            return int(round(angle / 90.0)) % 4
    tag = _float((stream.get("tags") or {}).get("rotate"))
    if tag:
        return int(round(-tag / 90.0)) % 4
    return 0


def output_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """Stored (unrotated) frame size after scaling the longer side down to `max_side`."""
    if max_side is None or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def demux_index(path: str, probe: Probe, uri: str) -> FrameIndex:
    """Exact PTS and key-frame flags of every video packet, in presentation order, without decoding.

    ``genpts`` makes the demuxer fill in PTS that containers such as AVI or raw streams omit. A
    demuxer error part-way (a cut file) keeps the packets read so far: they are what can decode.
    Times count from the first frame: the stream's ``start_time`` is the same in all but AVI with
    B-frames, where it precedes the first frame by the reorder delay. Also found on the way: open
    GOPs (a packet after a key frame in decode order but shown before it; decoders drop such
    frames after a seek) and AVI's missing PTS (with B-frames, the PTS FFmpeg makes up are decode
    times, and only the order frames come out of the decoder tells their display times).
    """
    import av

    pts: list[int] = []
    dts: list[int] = []
    keys: list[bool] = []
    complete, error = True, None
    open_gop, key_pts = False, None
    try:
        container = av.open(path, options={"fflags": "+genpts"})
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise DecodeError(f"{uri}: cannot open the file for demuxing ({exc})") from None
    with container:
        try:
            stream = container.streams[probe.stream_index]
        except IndexError:
            stream = container.streams.video[0]
        time_base = stream.time_base
        try:
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                stamp = packet.pts if packet.pts is not None else packet.dts
                if stamp is None:
                    continue
                pts.append(int(stamp))
                dts.append(int(packet.dts) if packet.dts is not None else int(stamp))
                keys.append(bool(packet.is_keyframe))
                if packet.is_keyframe:
                    key_pts = int(stamp)
                elif key_pts is not None and stamp < key_pts:
                    open_gop = True
        except (av.FFmpegError, OSError, ValueError) as exc:
            complete, error = False, str(exc)
    if not pts:
        reason = f" (demuxer: {error})" if error else ""
        raise DecodeError(f"{uri}: the video stream holds no frames{reason}")
    pts_from_order = probe.format_name == "avi" and probe.has_b_frames > 0
    if pts_from_order:
        pts = dts  # AVI's DTS are the frame slots; its made-up PTS are off at the stream's end
    order = np.argsort(np.asarray(pts, dtype=np.int64), kind="stable")
    pts_arr = np.asarray(pts, dtype=np.int64)[order]
    origin = int(pts_arr[0])
    # (ticks * num) / den, both exact integers in float64, is the correctly rounded quotient: the
    # same float as the decimal value (0.9, not 0.9000000000000001).
    times = (pts_arr - origin).astype(np.float64) * time_base.numerator / time_base.denominator
    return FrameIndex(
        pts=pts_arr,
        dts=np.asarray(dts, dtype=np.int64)[order],
        times=times,
        keyframe=np.asarray(keys, dtype=bool)[order],
        time_base=float(time_base),
        complete=complete,
        demux_error=error,
        open_gop=open_gop,
        pts_from_order=pts_from_order,
    )

