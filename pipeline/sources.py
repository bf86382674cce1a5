"""Listing the videos of a SOURCE (a local folder or file, ``s3://``, any fsspec URL).

The listing runs once on the driver; every entry becomes one row of the Ray dataset (split into clips by
``pipeline.clips``), whose decode later reads the file inside Ray tasks. The listing therefore records
what identifies the content *at listing time* (size, etag, mtime), so that a video that changes
gets a new ``video_id`` and the nightly job indexes it again, while an unchanged one is skipped.

All filesystem work goes through fsspec, so local paths, ``s3://`` (s3fs), ``gs://`` and any other
fsspec URL behave the same, with ``storage_options`` passed through unchanged (credentials,
``endpoint_url``, ...). Local folders are the exception: they are walked here (`_list_local`) so
that symbolic links are followed, which fsspec's local listing does not do.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import os
import posixpath
import stat as _stat
from dataclasses import dataclass
from typing import IO, Any, ContextManager

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline import storage_errors

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv")


class SourceError(Exception):
    """The SOURCE cannot be listed (missing, not reachable, unknown protocol, no permission).

    Raised for the source as a whole; the message names the source and the reason so that the CLI
    can print it as is (it never contains credentials).
    """


@dataclass(frozen=True)
class VideoFile:
    """One video found by `list_videos`.

    `uri` is an absolute local path or a full URL (``s3://bucket/key``): it is what the decoder
    opens and what the ``videos`` table stores, so it must be usable from any Ray worker.
    """

    uri: str
    size_bytes: int
    etag: str | None
    mtime: float | None

    @property
    def content_version(self) -> str:
        """What changes when the bytes change: the store's etag, else size and modification time."""
        if self.etag:
            return self.etag
        return f"{self.size_bytes}-{self.mtime!r}"

    @property
    def video_id(self) -> str:
        """Stable id: sha256 of the URI and the content version, first 16 hex digits (64 bits).

        Hashing the version in (not only the URI) is what makes a re-encoded or replaced file a new
        video for the incremental job; 64 bits keep collisions negligible below billions of videos.
        """
        digest = hashlib.sha256(f"{self.uri}\n{self.content_version}".encode("utf-8")).hexdigest()
        return digest[:16]


def _is_video_name(name: str) -> bool:
    return posixpath.splitext(name)[1].lower() in VIDEO_EXTENSIONS


def _etag(info: dict[str, Any]) -> str | None:
    """The store's entity tag, without the quotes that S3 puts around it."""
    for key in ("ETag", "etag", "Etag"):
        value = info.get(key)
        if value:
            return str(value).strip('"')
    return None


def _mtime(info: dict[str, Any]) -> float | None:
    """Modification time as POSIX seconds.

    fsspec backends disagree on the key and the type (local: float ``mtime``; s3fs: datetime
    ``LastModified``; gcsfs: ISO string ``updated``; adlfs: datetime ``last_modified``), so all are
    normalised here.
    """
    for key in ("mtime", "LastModified", "last_modified", "updated", "modified", "created"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, _dt.datetime):
            if value.tzinfo is None:
                value = value.replace(tzinfo=_dt.timezone.utc)
            return value.timestamp()
        if isinstance(value, str):
            try:
                parsed = _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=_dt.timezone.utc)
            return parsed.timestamp()
    return None


def _size(info: dict[str, Any]) -> int:
    value = info.get("size", info.get("Size"))
    return int(value) if value is not None else 0


def _has_hidden_part(relative: str) -> bool:
    """True for names under a hidden file or folder (``.git/``, ``._clip.mp4``).

    macOS copies leave AppleDouble files named ``._clip.mp4`` next to every video; they carry a
    video extension but hold no video, and would otherwise show up as one failed video each.
    ``.`` and ``..`` are not hidden names: on a local disk they never come out of a listing, and in
    an object store they are plain characters of a key (``x/../y.mp4`` is its own object, which
    s3fs reads literally), so such a video is listed like any other.
    """
    return any(part.startswith(".") and part not in (".", "..") for part in relative.split("/") if part)


def _to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Absolute path for local files, full URL (with protocol) for every other filesystem."""
    if isinstance(fs, LocalFileSystem):
        return path
    return fs.unstrip_protocol(path)


def _video_file(fs: fsspec.AbstractFileSystem, info: dict[str, Any]) -> VideoFile:
    return VideoFile(uri=_to_uri(fs, info["name"]), size_bytes=_size(info), etag=_etag(info), mtime=_mtime(info))


def _filesystem(source: str, storage_options: dict | None) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return fsspec.core.url_to_fs(source, **(storage_options or {}))
    except ImportError as exc:  # e.g. gcsfs not installed for gs://
        raise SourceError(f"cannot open source {source!r}: its filesystem package is not installed ({exc})") from exc
    except (ValueError, TypeError) as exc:  # unknown protocol, bad storage options
        raise SourceError(f"cannot open source {source!r}: {exc}") from exc


def list_videos(source: str, storage_options: dict | None = None) -> list[VideoFile]:
    """All video files under `source`, recursively, sorted by URI.

    `source` may be a folder or a single file, local or any fsspec URL. Files are kept when their
    extension (any case) is in `VIDEO_EXTENSIONS`; a single file named explicitly is kept whatever
    its extension, since the user asked for it (the decoder then says if it is no video). Hidden
    files and folders are skipped (see `_has_hidden_part`). On a local disk symbolic links to files
    and folders are followed (see `_list_local`). An existing but empty source gives
    ``[]``: whether that is an error is the job's decision. A missing or unreadable source raises
    `SourceError` naming it.
    """
    if not source:
        raise SourceError("no source given: expected a folder, a file or a URL such as s3://bucket/prefix")
    fs, root = _filesystem(source, storage_options)
    local = isinstance(fs, LocalFileSystem)
    if local and os.path.islink(root) and not os.path.exists(root):
        raise SourceError(f"source {source!r} is a symbolic link to {os.readlink(root)!r}, which does not exist")
    try:
        info = fs.info(root)
    except Exception as exc:  # noqa: BLE001 - narrowed by `_source_error`
        raise _source_error(exc, source, storage_options, fs, root, "reading it") from exc

    if info.get("type") != "directory":
        return [_video_file(fs, info)]

    try:
        if local:
            return _list_local(root)
        found = fs.find(root, detail=True, withdirs=False)
    except Exception as exc:  # noqa: BLE001 - narrowed by `_source_error`
        raise _source_error(exc, source, storage_options, fs, root, "listing it") from exc

    prefix = root.rstrip("/")
    videos = []
    for name, entry in found.items():
        if entry.get("type", "file") != "file" or not _is_video_name(name):
            continue
        relative = name[len(prefix) :] if name.startswith(prefix) else name
        if _has_hidden_part(relative):
            continue
        videos.append(_video_file(fs, entry))
    videos.sort(key=lambda video: video.uri)
    return videos


def _list_local(root: str) -> list[VideoFile]:
    """The videos under the local folder `root`, following symbolic links, sorted by URI.

    fsspec's ``LocalFileSystem.find`` cannot be used: its listing describes each ``os.scandir``
    entry without following links, so a link to a video has type ``other`` (and `list_videos` kept
    only ``file``) and a link to a folder is never entered. A corpus laid out as a folder of links
    to the real files was therefore listed as empty.

    Links are followed like ``find -L`` does:

    - Every path is listed under its own name, also when two links reach the same file: the names
      are the user's (they select prompts and questions and are what queries show), and the URI is
      part of the video id. Size and modification time are the target's, so replacing the target
      file gives the link a new video id as it should.
    - A folder that is its own ancestor on the walk (``corpus/all -> ..``, or a link to the source
      itself) is not entered again, with a warning; that is the only way a walk can loop.
    - A dangling link, or a folder that cannot be read, is skipped with a warning: one bad entry
      must not cost the run its other videos. The source folder itself must be readable.

    Hidden names are skipped before anything is followed (see `_has_hidden_part`).
    """
    videos: list[VideoFile] = []
    top = os.stat(root)
    # Each folder still to walk, with the (device, inode) identities of the folders above it.
    pending: list[tuple[str, frozenset[tuple[int, int]]]] = [(root, frozenset({(top.st_dev, top.st_ino)}))]
    while pending:
        folder, ancestors = pending.pop()
        try:
            with os.scandir(folder) as scan:
                entries = list(scan)
        except OSError as exc:
            if folder == root:
                raise
            log.warning("skipping folder %s: %s", folder, exc.strerror or exc)
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = f"{folder.rstrip('/')}/{entry.name}"
            try:
                found = entry.stat()  # follows links
            except OSError as exc:
                if entry.is_symlink():
                    log.warning("skipping %s: it is a symbolic link to %r, which cannot be read (%s)",
                                path, _readlink(path), exc.strerror or exc)
                continue  # otherwise removed since the folder was read
            if _stat.S_ISDIR(found.st_mode):
                identity = (found.st_dev, found.st_ino)
                if identity in ancestors:
                    log.warning("not following %s: it links back to %s, which is already being listed (a loop)",
                                path, os.path.realpath(path))
                    continue
                pending.append((path, ancestors | {identity}))
            elif _stat.S_ISREG(found.st_mode) and _is_video_name(entry.name):
                videos.append(VideoFile(uri=path, size_bytes=found.st_size, etag=None, mtime=found.st_mtime))
    videos.sort(key=lambda video: video.uri)
    return videos


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def _source_error(
    exc: Exception, source: str, storage_options: dict | None, fs: fsspec.AbstractFileSystem, root: str, action: str
) -> SourceError:
    """`SourceError` for a storage failure; anything else (a bug) is raised again unchanged.

    The store's answer decides the words: a missing source or bucket, rejected credentials, a
    refused read, throttling or a network failure that outlasted the client's retries.
    """
    if not storage_errors.is_storage_exception(exc):
        raise exc
    problem = storage_errors.classify(storage_errors.better(exc, fs, root))
    if problem.kind == "not_found":
        bucket = storage_errors.bucket_of(source)
        if bucket and root.strip("/") == bucket:  # the source is a whole bucket, and it is not there
            problem = problem.as_missing_bucket()
        else:
            return SourceError(f"source not found: {storage_errors.redact_url(source)!r} does not exist")
    message = storage_errors.explain(exc, source, role="SOURCE", action=action, storage_options=storage_options,
                                     problem=problem)
    return SourceError(message)


def is_local(uri: str) -> bool:
    """True when `uri` names a file on this machine (plain path or ``file://`` URL)."""
    protocol = fsspec.utils.get_protocol(uri)
    return protocol in ("file", "local")


def local_path(uri: str) -> str:
    """The plain path of a local `uri` (strips ``file://``)."""
    return fsspec.utils.stringify_path(LocalFileSystem._strip_protocol(uri))


def open_file(uri: str, storage_options: dict | None = None) -> ContextManager[IO[bytes]]:
    """Context manager giving a binary, seekable file object for `uri` (local path or URL).

    A thin wrapper over `fsspec.open` so that every reader passes `storage_options` the same way.
    """
    return fsspec.open(uri, "rb", **(storage_options or {}))
