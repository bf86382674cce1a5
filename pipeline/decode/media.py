"""Opening one video for PyAV so that only the bytes a task needs are read, local or remote.

Clip planning (`pipeline.clips`) and range decoding (`pipeline.decode.range_decode`) open files through
`open_video`. A local file goes to PyAV by path. A remote one (``s3://`` or any fsspec URL) is
opened with fsspec as a seekable file object and handed to PyAV, so FFmpeg's own seeks become
HTTP range requests: a task reads the container header and index plus the stretch it decodes,
never the whole object (no download to disk either, unlike `pipeline.decode.sampling.sample_video`).

Caching: a clip uses fsspec's ``blockcache`` (aligned 1 MiB blocks, the last 16 kept), because
opening an MP4 jumps from the header at the start to the index at the end and back to the first
sample: a single read-ahead buffer re-fetched the first megabyte each time (measured: 5.3 MB read
for a clip whose packets span 2.5 MB; 4.9 MB with blocks). 1 MiB keeps a 30 s clip of a 5 Mbit/s
stream at about 20 requests, whose first-byte latency (10-30 ms on S3) costs well under the
decode. A pass over a whole file (``sequential``: shot detection) reads ahead in 8 MiB requests.
`VideoSource.bytes_read` counts what came over the network.

Timestamps: everything counts seconds from the stream's first frame, the timeline of every table.
That origin is the stream's ``start_time`` from the container header (the first frame's PTS; the
demux index of `pipeline.decode.probe` finds the same value for every container but AVI with B-frames), so
any task can compute it from the header alone, and two tasks on the same file always agree.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Iterator

from pipeline.errors import DecodeError
from pipeline.decode.probe import MAX_SOURCE_SIDE, check_file
from pipeline.sources import is_local, local_path

#: Bytes per ranged read of a remote file when decoding a clip, and how many blocks stay cached.
REMOTE_BLOCK_SIZE = 1 << 20
REMOTE_BLOCKS_KEPT = 16
#: Bytes per ranged read of a pass over a whole remote file (shot detection).
SEQUENTIAL_BLOCK_SIZE = 8 << 20
#: PyAV's buffer between FFmpeg and a Python file object; its 32 KiB default means one Python
#: call per 32 KiB, which costs more than the copy at these sizes.
_AVIO_BUFFER = 256 << 10

_OPEN_HINTS = (
    ("Invalid data found when processing input",
     "not a video file that ffmpeg can read (invalid data; an MP4 cut before its index?)"),
    ("Permission denied", "permission denied"),
    ("No such file", "file not found (deleted or moved after it was listed?)"),
)


@dataclass
class VideoSource:
    """An open container, its video stream and the clock that turns PTS into seconds from the first frame."""

    uri: str
    container: Any  # av.container.InputContainer
    stream: Any  # av.video.stream.VideoStream
    origin: int  # PTS of the first frame, in stream ticks
    time_base: Fraction
    _target: Any = None  # what av.open reads: a local path or the fsspec file of a remote video
    _counter: "_FetchCounter | None" = None

    def seconds(self, pts: int) -> float:
        """Seconds from the first frame; (ticks * num) / den is exact in float64 for real files,
        the same rounding as `pipeline.decode.probe.demux_index`, so equal PTS give equal floats."""
        return (pts - self.origin) * self.time_base.numerator / self.time_base.denominator

    def ticks(self, seconds: float) -> int:
        """The stream PTS at `seconds` from the first frame, rounded down."""
        return self.origin + math.floor(seconds * self.time_base.denominator / self.time_base.numerator)

    def bytes_read(self) -> int | None:
        """Bytes fetched from storage so far for a remote file; None for a local one."""
        return self._counter.total if self._counter is not None else None

    @property
    def frame_interval(self) -> float | None:
        rate = self.stream.average_rate or self.stream.guessed_rate
        return float(1 / rate) if rate else None

    def restart(self) -> None:
        """Reopen the container, so that demuxing starts at the first byte: the one sure way to the
        first frame where a seek to it lands late (MPEG-TS)."""
        index = self.stream.index
        self.container.close()
        if not isinstance(self._target, str):
            self._target.seek(0)
        self.container = _open_container(self._target, self.uri)
        self.stream = self.container.streams[index]
        _configure(self.stream)

    def close(self) -> None:
        self.container.close()


@contextlib.contextmanager
def open_video(uri: str, storage_options: dict | None = None, *, sequential: bool = False) -> Iterator[VideoSource]:
    """The video stream of `uri`, ready to seek and decode; closes everything on exit.

    `sequential`: the caller will read the whole file in order (larger read-ahead requests).

    Failures a user can act on (missing, empty, not a video, no video stream, absurd frame size)
    raise `DecodeError` naming `uri`. Decoder threads follow `pipeline.decode.backends.decoder_threads`.
    """
    with contextlib.ExitStack() as stack:
        counter = None
        if is_local(uri):
            target: Any = local_path(uri)
            check_file(target, uri)
        else:
            target = stack.enter_context(_open_remote(uri, storage_options, sequential))
            counter = _FetchCounter.install(target)
        container = _open_container(target, uri)
        source = VideoSource(uri, container, None, 0, Fraction(1), target, counter)
        stack.callback(source.close)
        source.stream = _video_stream(container, uri)
        source.time_base = Fraction(source.stream.time_base)
        _configure(source.stream)
        if source.stream.start_time is not None:
            source.origin = int(source.stream.start_time)
        else:
            source.origin = _first_pts(container, source.stream, uri)
            source.restart()
        yield source


def _open_container(target: Any, uri: str) -> Any:
    import av

    try:
        return av.open(target, options={"fflags": "+genpts"}, buffer_size=_AVIO_BUFFER)
    except av.FFmpegError as exc:
        raise DecodeError(f"{uri}: {_open_message(exc)}") from None
    except OSError as exc:  # the file object's own errors (network, permissions)
        raise DecodeError(f"{uri}: cannot read ({type(exc).__name__}: {exc})") from None


def _configure(stream: Any) -> None:
    from pipeline.decode.backends import decoder_threads

    stream.thread_type = "AUTO"
    if decoder_threads():
        stream.codec_context.thread_count = decoder_threads()


def _open_remote(uri: str, storage_options: dict | None, sequential: bool) -> Any:
    """A seekable, range-reading fsspec file, with fsspec's errors turned into user messages."""
    if sequential:
        caching: dict[str, Any] = {"block_size": SEQUENTIAL_BLOCK_SIZE, "cache_type": "readahead"}
    else:
        caching = {"block_size": REMOTE_BLOCK_SIZE, "cache_type": "blockcache",
                   "cache_options": {"maxblocks": REMOTE_BLOCKS_KEPT}}
    fs, path, _ = remote_file(uri, storage_options)
    with _read_errors(uri):
        return fs.open(path, "rb", **caching)


def remote_file(uri: str, storage_options: dict | None) -> tuple[Any, str, int]:
    """(filesystem, path, size) of a remote source that exists and is not empty, or `DecodeError`
    with a user's sentence: the one check before opening (here) or downloading (`sampling`) it."""
    import fsspec

    with _read_errors(uri):
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        size = fs.size(path)
    if size == 0:
        raise DecodeError(f"{uri}: empty file (0 bytes)")
    return fs, path, size


@contextlib.contextmanager
def _read_errors(uri: str) -> Iterator[None]:
    """fsspec's errors reading `uri` as one `DecodeError` sentence each."""
    try:
        yield
    except FileNotFoundError:
        raise DecodeError(f"{uri}: file not found (deleted or moved after it was listed?)") from None
    except PermissionError as exc:
        raise DecodeError(f"{uri}: permission denied ({exc})") from None
    except (OSError, ValueError, ImportError) as exc:
        raise DecodeError(f"{uri}: cannot read ({type(exc).__name__}: {exc})") from None


class _FetchCounter:
    """Wraps an fsspec file's cache fetcher to count the bytes that really came from storage
    (the cache's own ``total_requested_bytes`` counts past the end of the file)."""

    def __init__(self, fetcher: Any) -> None:
        self.fetcher = fetcher
        self.total = 0

    def __call__(self, start: int, end: int) -> bytes:
        data = self.fetcher(start, end)
        self.total += len(data)
        return data

    @classmethod
    def install(cls, handle: Any) -> "_FetchCounter | None":
        cache = getattr(handle, "cache", None)
        if cache is None or not callable(getattr(cache, "fetcher", None)):
            return None  # not a buffered fsspec file: nothing to count
        counter = cls(cache.fetcher)
        cache.fetcher = counter
        return counter


def _open_message(exc: Exception) -> str:
    text = str(exc)
    for needle, message in _OPEN_HINTS:
        if needle in text:
            return message
    return f"ffmpeg cannot open it ({text[-300:]})"


def _video_stream(container: Any, uri: str) -> Any:
    """The first real video stream (cover art is a one-frame "video" stream: skipped)."""
    from av.stream import Disposition

    video = [s for s in container.streams.video if not (s.disposition & Disposition.attached_pic)]
    if not video:
        kinds = sorted({f"{s.type} ({s.codec_context.name if s.codec_context else '?'})" for s in container.streams})
        if container.streams.audio:
            raise DecodeError(f"{uri}: no video stream, the file holds only {', '.join(kinds)} (audio only?)")
        raise DecodeError(f"{uri}: no video stream ({', '.join(kinds) or 'no streams at all'})")
    stream = video[0]
    width, height = stream.codec_context.width, stream.codec_context.height
    if not width or not height:
        raise DecodeError(f"{uri}: the video stream has no frame size (codec {stream.codec_context.name})")
    if max(width, height) > MAX_SOURCE_SIDE:
        raise DecodeError(
            f"{uri}: frame size {width}x{height} exceeds the limit of {MAX_SOURCE_SIDE} px per side; "
            "refusing to decode it"
        )
    return stream


def _first_pts(container: Any, stream: Any, uri: str) -> int:
    """PTS of the first packet, for the rare container without a start time (the caller rewinds)."""
    import av

    try:
        for packet in container.demux(stream):
            stamp = packet.pts if packet.pts is not None else packet.dts
            if packet.size and stamp is not None:
                return int(stamp)
    except (av.FFmpegError, OSError) as exc:
        raise DecodeError(f"{uri}: the video stream cannot be read ({exc})") from None
    raise DecodeError(f"{uri}: the video stream holds no frames")


def quarter_turns(frame: Any) -> int:
    """Counter-clockwise quarter turns (`numpy.rot90`'s k) that show `frame` upright.

    PyAV reads the frame's display matrix as ffprobe does (``side_data_list[].rotation``, which
    `pipeline.decode.probe` uses for whole videos): both paths turn frames alike.
    """
    angle = getattr(frame, "rotation", 0) or 0
    return int(round(angle / 90.0)) % 4
