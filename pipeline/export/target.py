"""Where an export is written: a local path or an fsspec URL (`s3://bucket/exports/x`), through
the same `location.filesystem` as OUTPUT, so the same `--storage-options` reach it. Files are
written through fsspec's streams (multipart uploads on S3), never assembled in memory first."""

from __future__ import annotations

import posixpath
from typing import IO, Any, Mapping

from pipeline import storage_errors
from pipeline.store.location import filesystem, storage_guard


class Target:
    """`--out PATH`: a file (YTVIS) or a folder of per-video files (the other formats)."""

    def __init__(self, out: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.out = out
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = filesystem(out, storage_options)
        self.shown = storage_errors.redact_url(out)
        self.local = not storage_errors.is_object_store(self.fs)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def open(self, *parts: str, mode: str = "w") -> IO[Any]:
        """A file under the target (the target itself when no parts), its folders made."""
        path = self.path(*parts) if parts else self.root
        if self.local:
            self.fs.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
        kwargs = {"encoding": "utf-8", "newline": "\n"} if "b" not in mode else {}
        return self.fs.open(path, mode, **kwargs)

    def guard(self, action: str) -> Any:
        """Storage failures become `OutputError` naming `--out`."""
        return storage_guard(self.out, self.storage_options, action, self.fs, self.root,
                             subject=f"--out {self.shown!r}")
