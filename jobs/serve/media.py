"""A source video streamed to the browser with HTTP range requests (RFC 9110, section 14), read
through fsspec from the `uri` the index recorded, local or on a bucket.

Starlette's `FileResponse` answers ranges for local files only; a bucket's object is read here in
bounded chunks (`CHUNK`), so seeking in a 2-hour video fetches only the bytes around the new
position. One range per request: browsers' media elements never ask for several, and a
multipart answer would only serve clients that are not players.
"""

from __future__ import annotations

import mimetypes
import re
from typing import Any, Iterator, Mapping

import fsspec

from jobs.query_errors import UsageError

CHUNK = 1 << 20
#: The most one request returns: a player asks for "bytes=N-" and reads what it needs, so an open
#: range is answered with at most this much (206, with the true size), never a whole file at once.
MAX_RANGE = 8 << 20
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


class SourceMissing(Exception):
    """The recorded source of a video is gone or unreadable (HTTP 404, with this sentence)."""


class RangeNotSatisfiable(UsageError):
    """A range outside the file (HTTP 416)."""

    def __init__(self, message: str, size: int) -> None:
        super().__init__(message)
        self.size = size


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte, inclusive, of a `Range` header; None for the whole file (no header)."""
    if header is None:
        return None
    match = _RANGE_RE.match(header.strip())
    if not match or match.groups() == ("", ""):
        raise UsageError(f"bad Range header {header[:60]!r}: expected one range, bytes=FIRST-[LAST] or bytes=-SUFFIX")
    first, last = match.groups()
    if first == "":
        count = int(last)
        if count == 0:
            raise RangeNotSatisfiable("Range bytes=-0 asks for no bytes", size)
        return max(0, size - count), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or (last and int(last) < start):
        raise RangeNotSatisfiable(f"Range {header[:60]!r} is outside the file ({size} bytes)", size)
    return start, min(end, start + MAX_RANGE - 1)


class Source:
    """An open-able source video: its filesystem, path, size and media type."""

    def __init__(self, uri: str, storage_options: Mapping[str, Any]) -> None:
        try:
            self.fs, self.path = fsspec.core.url_to_fs(uri, **dict(storage_options))
            self.size = int(self.fs.size(self.path))
        except FileNotFoundError:
            raise SourceMissing(f"the source video {_name(uri)} is gone (not found where the index recorded it)") from None
        except (OSError, ValueError, ImportError) as exc:
            raise SourceMissing(f"the source video {_name(uri)} cannot be read ({type(exc).__name__})") from None
        self.media_type = mimetypes.guess_type(self.path)[0] or "application/octet-stream"

    def chunks(self, start: int, end: int) -> Iterator[bytes]:
        """Bytes start..end (inclusive), CHUNK at a time."""
        with self.fs.open(self.path, "rb", block_size=CHUNK, cache_type="none") as handle:
            handle.seek(start)
            left = end - start + 1
            while left > 0:
                data = handle.read(min(CHUNK, left))
                if not data:
                    return
                left -= len(data)
                yield data


def _name(uri: str) -> str:
    """The file name only: a bucket's address or a local folder is not the client's business."""
    return uri.rstrip("/").rsplit("/", 1)[-1]
