"""Where OUTPUT is: its fsspec filesystem, the URL and options delta-rs and Lance take, and the one
translation of storage failures into `OutputError`.

delta-rs and Lance do their own I/O through Rust's `object_store`, which reads its own option
names; users give s3fs's (`--storage-options`). `object_store_options` is the single translation,
shared by the tables and the search index, and refuses an option it cannot carry over rather than
dropping it (a dropped endpoint would send writes to the real AWS).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Mapping

import fsspec

from pipeline import storage_errors


class OutputError(RuntimeError):
    """OUTPUT cannot be read or written (permissions, missing bucket, a damaged table, ...).

    The message names OUTPUT (and the table, where there is one), the reason and what to do, and
    never contains credentials.
    """


class UnsupportedStore(OutputError):
    """OUTPUT is on a store (or has options) that delta-rs / Lance cannot reach."""


def filesystem(output: str, storage_options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and root path of OUTPUT; an unusable OUTPUT raises `OutputError`.

    On object stores the key prefix must be plain: an empty segment (``s3://b//x`` makes keys that
    start with ``/``) or a ``.``/``..`` segment is kept literally by S3 but normalised away by other
    clients (URL libraries, query engines), so the tables could be written to one place and read
    from another.
    """
    shown = storage_errors.redact_url(output)
    try:
        fs, root = fsspec.core.url_to_fs(output, **dict(storage_options or {}))
    except ImportError as exc:
        raise OutputError(f"cannot open OUTPUT {shown!r}: its filesystem package is not installed ({exc})") from exc
    except (ValueError, TypeError) as exc:
        raise OutputError(storage_errors.redact(f"cannot open OUTPUT {shown!r}: {exc}", storage_options)) from exc
    root = root.rstrip("/")
    if storage_errors.is_object_store(fs):
        segments = root.split("/")[1:]
        if any(part in ("", ".", "..") for part in segments):
            raise OutputError(
                f"OUTPUT {shown!r}: the key prefix has an empty, '.' or '..' segment; object stores keep such "
                "keys literally while other tools normalise them, so give a plain prefix (s3://bucket/a/b)"
            )
    return fs, root


def protocol_of(fs: fsspec.AbstractFileSystem) -> str:
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def rust_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """`path` inside `fs` as the URL delta-rs and Lance open; other stores raise `UnsupportedStore`."""
    protocol = protocol_of(fs)
    if protocol in ("file", "local"):
        return path
    if protocol in ("s3", "s3a"):
        return f"s3://{path}"
    raise UnsupportedStore(f"{protocol}:// storage is not supported for the index tables (local folders and S3)")


def object_store_options(fs: fsspec.AbstractFileSystem, options: Mapping[str, Any] | None) -> dict[str, str]:
    """s3fs's storage options as object_store's keys; unset ones fall back, as with s3fs, to the
    AWS_* environment. An option with no equivalent is refused by name."""
    if protocol_of(fs) in ("file", "local"):
        return {}
    options = dict(options or {})
    client = dict(options.get("client_kwargs") or {})
    out: dict[str, str] = {}
    names = {"key": "aws_access_key_id", "secret": "aws_secret_access_key", "token": "aws_session_token"}
    ignored = ("client_kwargs", "config_kwargs", "use_listings_cache", "skip_instance_cache", "default_block_size",
               "default_fill_cache", "anon", "endpoint_url", *names)
    for name, value in options.items():
        if name in names and value:
            out[names[name]] = str(value)
        elif name == "endpoint_url" and value:
            client["endpoint_url"] = value
        elif name == "anon" and value:
            out["aws_skip_signature"] = "true"
        elif name not in ignored:
            raise UnsupportedStore(f"storage option {name!r} has no equivalent for delta-rs / Lance; "
                                   "give credentials as key/secret/token or through the AWS_* environment")
    endpoint = client.get("endpoint_url")
    if endpoint:
        out["aws_endpoint"] = str(endpoint)
        if str(endpoint).startswith("http://"):
            out["allow_http"] = "true"
    region = client.get("region_name") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        out["aws_region"] = str(region)
    elif endpoint:
        out["aws_region"] = "us-east-1"  # S3-compatible stores ignore it, but the client needs one
    return out


@contextlib.contextmanager
def storage_guard(
    output: str, storage_options: Mapping[str, Any] | None, action: str,
    fs: fsspec.AbstractFileSystem | None = None, root: str | None = None, subject: str | None = None,
) -> Iterator[None]:
    """Storage failures inside the block become `OutputError` with a clear message; bugs pass through."""
    try:
        yield
    except OutputError:
        raise
    except Exception as exc:
        if not storage_errors.is_storage_exception(exc):
            raise
        cause = storage_errors.better(exc, fs, root) if fs is not None and root is not None else exc
        raise OutputError(storage_errors.explain(
            cause, output, role="OUTPUT", action=action, storage_options=storage_options, subject=subject
        )) from exc


def require_location(fs: fsspec.AbstractFileSystem, root: str, output: str) -> None:
    """Fail early, before any work, when OUTPUT's bucket is missing or unreachable.

    A missing prefix in an existing bucket is fine (a new OUTPUT); a missing bucket is not, and
    neither are credentials the store refuses. Local folders are created by the writer.
    """
    if not storage_errors.is_object_store(fs):
        return
    try:
        fs.info(root)
    except FileNotFoundError as exc:
        problem = storage_errors.classify(exc)
        if problem.kind == "no_bucket" or "/" not in root.strip("/"):
            raise OutputError(storage_errors.explain(
                exc, output, role="OUTPUT", action="opening it", problem=problem.as_missing_bucket(),
            )) from exc
