"""Parquet output: staged writes, an atomic-in-effect commit, and what is already indexed.

Layout under OUTPUT (any fsspec URL):

    <table>/run_id=<id>/part-NNNNN.parquet     committed rows (what readers glob)
    _staging/<id>/<table>/part-NNNNN.parquet   a run in progress (never matched by the glob)
    _staging/<id>/_COMMIT                      the run's file list, written before publishing

Object stores have no atomic multi-file rename, so a commit is a two-phase roll-forward: the
commit marker is written first, then files are moved into place with the `videos` table last.
A crash before the marker leaves only staging data (invisible); a crash after it is finished by
`recover()` at the start of the next run. Readers that join through `videos` never see a video
whose other rows are missing, because `videos` is published last.

Ray Data's own `write_parquet` is not used: it writes one dataset to one folder, while a video
fans out to four tables, and it has no commit step.
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
from typing import Any, Iterable, Mapping

import fsspec
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from schemas.tables import TABLES, to_table

log = logging.getLogger(__name__)

STAGING = "_staging"
COMMIT_MARKER = "_COMMIT"
# Publish order: `videos` after the rows that hang off it, so a reader never sees a video whose
# objects are not there yet; `runs` last, as the record that the run is complete.
PUBLISH_ORDER = ("objects", "captions", "qa", "videos", "runs")


class OutputError(RuntimeError):
    """OUTPUT cannot be written (permissions, missing bucket, ...); the run cannot commit."""


def filesystem(output: str, storage_options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = fsspec.core.url_to_fs(output, **dict(storage_options or {}))
    return fs, root.rstrip("/")


class RunWriter:
    """Buffers validated rows per table and writes Parquet files of a sensible size into staging."""

    def __init__(
        self,
        output: str,
        run_id: str,
        storage_options: Mapping[str, Any] | None = None,
        rows_per_file: int = 100_000,
        bytes_per_file: int = 128 * 1024 * 1024,
    ) -> None:
        self.fs, self.root = filesystem(output, storage_options)
        self.run_id = run_id
        self.rows_per_file = rows_per_file
        self.bytes_per_file = bytes_per_file
        self.staging = posixpath.join(self.root, STAGING, run_id)
        self._buffers: dict[str, list[pa.Table]] = {name: [] for name in TABLES}
        self._files: dict[str, list[str]] = {name: [] for name in TABLES}
        self.rows_written: dict[str, int] = {name: 0 for name in TABLES}
        try:
            self.fs.makedirs(self.staging, exist_ok=True)
            probe = posixpath.join(self.staging, ".write-probe")
            self.fs.pipe_file(probe, b"ok")
            self.fs.rm_file(probe)
        except Exception as exc:  # noqa: BLE001 - any backend's refusal means the same to the user
            raise OutputError(f"OUTPUT {output!r} is not writable: {exc}") from exc

    def add(self, table: str, rows: Iterable[Mapping[str, Any]]) -> None:
        """Validate a batch against its schema now, so a bad row fails before anything commits."""
        rows = list(rows)
        if not rows:
            return
        self._buffers[table].append(to_table(table, rows))
        buffered = self._buffers[table]
        if sum(t.num_rows for t in buffered) >= self.rows_per_file or sum(t.nbytes for t in buffered) >= self.bytes_per_file:
            self.flush(table)

    def flush(self, table: str) -> None:
        buffered = self._buffers[table]
        if not buffered:
            return
        data = pa.concat_tables(buffered)
        path = posixpath.join(self.staging, table, f"part-{len(self._files[table]):05d}.parquet")
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        with self.fs.open(path, "wb") as f:
            pq.write_table(data, f, compression="zstd")
        self._files[table].append(path)
        self.rows_written[table] += data.num_rows
        self._buffers[table] = []

    def commit(self) -> dict[str, int]:
        """Flush, write the commit marker, publish. Returns rows written per table."""
        for table in TABLES:
            self.flush(table)
        moves = []
        for table in PUBLISH_ORDER:
            for src in self._files[table]:
                dst = posixpath.join(self.root, table, f"run_id={self.run_id}", posixpath.basename(src))
                moves.append([src, dst])
        marker = {"run_id": self.run_id, "moves": moves, "rows": self.rows_written, "committed_at": time.time()}
        self.fs.pipe_file(posixpath.join(self.staging, COMMIT_MARKER), json.dumps(marker).encode())
        _publish(self.fs, self.staging, moves)
        return dict(self.rows_written)

    def abort(self) -> None:
        """Drop the staged files of a run that will not commit."""
        try:
            if self.fs.exists(self.staging):
                self.fs.rm(self.staging, recursive=True)
        except Exception as exc:  # noqa: BLE001 - cleanup must never mask the original failure
            log.warning("could not remove staging %s: %s", self.staging, exc)


def _publish(fs: fsspec.AbstractFileSystem, staging: str, moves: list[list[str]]) -> None:
    for src, dst in moves:
        if fs.exists(src):
            fs.makedirs(posixpath.dirname(dst), exist_ok=True)
            fs.mv(src, dst)
        elif not fs.exists(dst):
            raise OutputError(f"commit of {staging} lost {src}: neither staged nor published")
    fs.rm(staging, recursive=True)


def recover(output: str, storage_options: Mapping[str, Any] | None = None, stale_after_s: float = 24 * 3600) -> list[str]:
    """Finish commits that a crash interrupted; drop staging of runs that never committed.

    Uncommitted staging younger than `stale_after_s` is left alone: it may belong to a run that is
    still going on elsewhere. Returns the run ids whose commit was finished here.
    """
    fs, root = filesystem(output, storage_options)
    staging_root = posixpath.join(root, STAGING)
    finished = []
    if not fs.exists(staging_root):
        return finished
    for entry in fs.ls(staging_root, detail=False):
        marker = posixpath.join(entry, COMMIT_MARKER)
        if fs.exists(marker):
            info = json.loads(fs.cat_file(marker))
            _publish(fs, entry, info["moves"])
            finished.append(info["run_id"])
            log.warning("finished the interrupted commit of run %s", info["run_id"])
            continue
        try:
            mtimes = [_mtime(fs, p) for p in fs.find(entry)] or [_mtime(fs, entry)]
        except FileNotFoundError:
            continue
        if time.time() - max(m for m in mtimes if m is not None) > stale_after_s:
            fs.rm(entry, recursive=True)
    return finished


def _mtime(fs: fsspec.AbstractFileSystem, path: str) -> float:
    info = fs.info(path)
    value = info.get("mtime", info.get("LastModified", info.get("created")))
    if value is None:
        return time.time()
    return value.timestamp() if hasattr(value, "timestamp") else float(value)


def read_table(
    output: str, table: str, storage_options: Mapping[str, Any] | None = None, columns: list[str] | None = None
) -> pa.Table:
    """Committed rows of one table (empty, with the right schema, when nothing is committed)."""
    fs, root = filesystem(output, storage_options)
    folder = posixpath.join(root, table)
    schema = TABLES[table]
    if not fs.exists(folder) or not fs.find(folder):
        empty = schema.empty_table()
        return empty.select(columns) if columns else empty
    dataset = pads.dataset(folder, filesystem=fs, format="parquet", partitioning="hive", schema=schema)
    return dataset.to_table(columns=columns)


def retry_counts(output: str, model: str, tracker: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, int]:
    """How many committed runs of this model and tracker lost each video to a worker crash."""
    runs = read_table(output, "runs", storage_options, columns=["model", "tracker", "retry_video_ids"])
    counts: dict[str, int] = {}
    for row in runs.to_pylist():
        if row["model"] == model and row["tracker"] == tracker:
            for video_id in row["retry_video_ids"] or []:
                counts[video_id] = counts.get(video_id, 0) + 1
    return counts


def indexed_video_ids(
    output: str, model: str, tracker: str, storage_options: Mapping[str, Any] | None = None, include_failed: bool = True
) -> set[str]:
    """Videos that already have a committed row for this model and tracker: a rerun skips them."""
    videos = read_table(output, "videos", storage_options, columns=["video_id", "status", "model", "tracker"])
    done = set()
    for row in videos.to_pylist():
        if row["model"] == model and row["tracker"] == tracker and (include_failed or row["status"] == "ok"):
            done.add(row["video_id"])
    return done
