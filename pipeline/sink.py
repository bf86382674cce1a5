"""Parquet output: staged writes, an atomic-in-effect commit, and what is already indexed.

Layout under OUTPUT (any fsspec URL):

    <table>/run_id=<id>/part-cCCCC-NNNNN.parquet   committed rows of commit C (what readers glob)
    _staging/<id>/<table>/part-cCCCC-NNNNN.parquet a run in progress (never matched by the glob)
    _staging/<id>/_COMMIT                      the run's file list, written before publishing
    _search/                                   the search index, derived (`pipeline.search_index`)

Object stores have no atomic multi-file rename, so a commit is a two-phase roll-forward: the
commit marker is written first, then files are moved into place with the `videos` table last.
A crash before the marker leaves only staging data (invisible); a crash after it is finished by
`recover()` at the start of the next run. Readers that join through `videos` never see a video
whose other rows are missing, because `videos` is published last.

If publishing fails with an error (a write refused half-way, retries exhausted), the files already
published are taken back into staging in reverse order and the marker is removed, so the failed run
leaves nothing visible; only a crash (or a store that refuses even that) leaves the roll-forward to
`recover()`. Either way a reader sees all of a run or none of it.

Storage failures (wrong credentials, a missing bucket, a refused write, throttling or a network
error that outlasted the client's retries) become `OutputError` with one clear sentence, written by
`pipeline.storage_errors`; s3fs and botocore do the retrying. On object stores no "folder" is ever
created: s3fs's ``makedirs`` would create a missing *bucket* rather than report it.

Every key written is ``<OUTPUT>/<fixed name>/...`` with a validated run id: nothing taken from the
videos (their names, their keys) is part of an output path, so no source key can make a write
land outside OUTPUT.

Ray Data's own `write_parquet` is not used: it writes one dataset to one folder, while a video
fans out to four tables, and it has no commit step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import posixpath
import re
import time
from typing import Any, Iterable, Iterator, Mapping

import fsspec
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline import storage_errors
from schemas.tables import TABLES, to_table

log = logging.getLogger(__name__)

STAGING = "_staging"
COMMIT_MARKER = "_COMMIT"
# Publish order: `videos` after the rows that hang off it, so a reader never sees a video whose
# objects are not there yet; `runs` last, as the record that the run is complete.
PUBLISH_ORDER = ("clips", "objects", "masks", "captions", "qa", "embeddings", "videos", "runs")


#: Run ids become one path segment (``run_id=<id>``, ``_staging/<id>``): plain characters only.
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class OutputError(RuntimeError):
    """OUTPUT cannot be written (permissions, missing bucket, ...); the run cannot commit.

    The message names OUTPUT and the reason, and never contains credentials.
    """


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
        raise OutputError(
            storage_errors.redact(f"cannot open OUTPUT {shown!r}: {exc}", storage_options)
        ) from exc
    root = root.rstrip("/")
    if storage_errors.is_object_store(fs):
        segments = root.split("/")[1:]
        if any(part in ("", ".", "..") for part in segments):
            raise OutputError(
                f"OUTPUT {shown!r}: the key prefix has an empty, '.' or '..' segment; object stores keep such "
                "keys literally while other tools normalise them, so give a plain prefix (s3://bucket/a/b)"
            )
    return fs, root


@contextlib.contextmanager
def _storage(
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


def _makedirs(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Create a folder where folders exist; on object stores do nothing (it could create a bucket)."""
    if not storage_errors.is_object_store(fs):
        fs.makedirs(path, exist_ok=True)


def _require_location(fs: fsspec.AbstractFileSystem, root: str, output: str) -> None:
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
                exc, output, role="OUTPUT", action="opening it",
                problem=problem.as_missing_bucket(),
            )) from exc


class RunWriter:
    """Buffers validated rows per table and writes Parquet files of a sensible size into staging."""

    def __init__(
        self,
        output: str,
        run_id: str,
        storage_options: Mapping[str, Any] | None = None,
        rows_per_file: int = 100_000,
        bytes_per_file: int = 128 * 1024 * 1024,
        commit_index: int = 0,
    ) -> None:
        if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
            raise OutputError(f"invalid run id {run_id!r}: use letters, digits, '.', '_' and '-' only")
        self.output = output
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = filesystem(output, storage_options)
        self.run_id = run_id
        self.rows_per_file = rows_per_file
        self.bytes_per_file = bytes_per_file
        # A long run commits several times (`--commit-every`): each commit has its own staging
        # folder and file names, so the commits of one run never overwrite each other.
        self.commit_index = int(commit_index)
        self.staging = posixpath.join(self.root, STAGING, run_id if not commit_index else f"{run_id}.c{commit_index:04d}")
        self._buffers: dict[str, list[pa.Table]] = {name: [] for name in TABLES}
        self._files: dict[str, list[str]] = {name: [] for name in TABLES}
        self.rows_written: dict[str, int] = {name: 0 for name in TABLES}
        with _storage(
            output, storage_options, "checking that it can be written", self.fs, self.root,
            subject=f"OUTPUT {storage_errors.redact_url(output)!r} is not writable",
        ):
            _makedirs(self.fs, self.staging)
            probe = posixpath.join(self.staging, ".write-probe")
            self.fs.pipe_file(probe, b"ok")
            self.fs.rm_file(probe)

    def _storage(self, action: str) -> contextlib.AbstractContextManager[None]:
        return _storage(self.output, self.storage_options, action, self.fs, self.root)

    def add(self, table: str, rows: Iterable[Mapping[str, Any]] | pa.Table) -> None:
        """Validate a batch against its schema now, so a bad row fails before anything commits."""
        if not isinstance(rows, pa.Table):
            rows = list(rows)
        if not len(rows):
            return
        self._buffers[table].append(to_table(table, rows))
        buffered = self._buffers[table]
        if sum(t.num_rows for t in buffered) >= self.rows_per_file or sum(t.nbytes for t in buffered) >= self.bytes_per_file:
            with self._storage(f"writing a staged part of table {table!r}"):
                self.flush(table)

    def flush(self, table: str) -> None:
        buffered = self._buffers[table]
        if not buffered:
            return
        data = pa.concat_tables(buffered)
        path = posixpath.join(self.staging, table, f"part-c{self.commit_index:04d}-{len(self._files[table]):05d}.parquet")
        _makedirs(self.fs, posixpath.dirname(path))
        with self.fs.open(path, "wb") as f:
            pq.write_table(data, f, compression="zstd")
        self._files[table].append(path)
        self.rows_written[table] += data.num_rows
        self._buffers[table] = []

    def commit(self) -> dict[str, int]:
        """Flush, write the commit marker, publish. Returns rows written per table.

        Raises `OutputError` when the store refuses or keeps failing; the run is then not visible:
        files already published are taken back (see `_roll_back`) before the error is raised.
        """
        with self._storage("writing the run's staged files"):
            for table in TABLES:
                self.flush(table)
        moves = []
        for table in PUBLISH_ORDER:
            for src in self._files[table]:
                dst = posixpath.join(self.root, table, f"run_id={self.run_id}", posixpath.basename(src))
                moves.append([src, dst])
        marker = {"run_id": self.run_id, "moves": moves, "rows": self.rows_written, "committed_at": time.time()}
        marker_path = posixpath.join(self.staging, COMMIT_MARKER)
        with self._storage("writing the commit marker"):
            self.fs.pipe_file(marker_path, json.dumps(marker).encode())
        try:
            _publish(self.fs, self.staging, moves)
        except Exception as exc:  # not BaseException: a crash or ^C leaves the roll-forward to `recover`
            left = _roll_back(self.fs, marker_path, moves)
            if left:
                outcome = (f"{len(left)} published file(s) could not be taken back, so the commit marker stays and "
                           "the next run finishes publishing this run")
            else:
                outcome = "nothing of this run was published"
            if not storage_errors.is_storage_exception(exc):
                log.error("publishing run %s failed (%s): %s", self.run_id, outcome, exc)
                raise
            cause = storage_errors.better(exc, self.fs, self.root)
            reason = storage_errors.explain(cause, self.output, role="OUTPUT", action="publishing the run",
                                            storage_options=self.storage_options)
            raise OutputError(f"{reason}; {outcome}") from exc
        return dict(self.rows_written)

    def abort(self) -> None:
        """Drop the staged files of a run that will not commit.

        A staging folder that still holds the commit marker is left alone: its publish was
        interrupted (^C mid-publish) or could not be taken back, so part of the run may already be
        visible, and only `recover` (at the next run) can make that whole again. Deleting the staged
        files here would leave that part published for ever.
        """
        try:
            if self.fs.exists(posixpath.join(self.staging, COMMIT_MARKER)):
                log.warning("run %s was partly published; the next run finishes its commit", self.run_id)
                return
            if self.fs.exists(self.staging):
                self.fs.rm(self.staging, recursive=True)
        except Exception as exc:  # noqa: BLE001 - cleanup must never mask the original failure
            log.warning("could not remove staging %s: %s", self.staging, exc)


def _publish(fs: fsspec.AbstractFileSystem, staging: str, moves: list[list[str]]) -> None:
    """Move the staged files into place, in order, then drop the staging folder.

    Idempotent, so that `recover` can run it again after a crash at any point. Once every file is
    in place the run is published: failing to remove the staging folder afterwards is only logged
    (the next run's `recover` removes it).
    """
    for src, dst in moves:
        if fs.exists(src):
            _makedirs(fs, posixpath.dirname(dst))
            fs.mv(src, dst)
        elif not fs.exists(dst):
            raise OutputError(f"commit of {staging} lost {src}: neither staged nor published")
    try:
        fs.rm(staging, recursive=True)
    except Exception as exc:  # noqa: BLE001 - the run is published; leftovers are cleaned up later
        log.warning("run published, but its staging folder %s could not be removed: %s", staging, exc)


def _roll_back(fs: fsspec.AbstractFileSystem, marker_path: str, moves: list[list[str]]) -> list[str]:
    """Undo a publish that failed with an error; returns the published paths it could not take back.

    Files go back into staging in the reverse of the publish order (``runs``, then ``videos``,
    then the rows that hang off them), so that even a partial roll-back never shows a video
    without its rows. The commit marker is removed only when everything is back, and then the
    writer's `abort` drops staging; otherwise the marker stays, and `recover` completes the
    publish at the next run (roll forward), which is the other consistent outcome.
    """
    left = []
    for src, dst in reversed(moves):
        try:
            if fs.exists(dst):
                if fs.exists(src):  # copied, but the staged original was not deleted yet
                    fs.rm_file(dst)
                else:
                    _makedirs(fs, posixpath.dirname(src))
                    fs.mv(dst, src)
        except Exception as exc:  # noqa: BLE001 - keep taking back what can be taken back
            log.error("could not take back %s after a failed publish: %s", dst, exc)
            left.append(dst)
    if not left:
        try:
            fs.rm_file(marker_path)
        except Exception as exc:  # noqa: BLE001 - staged files are all there: a roll-forward is still right
            log.error("could not remove the commit marker %s after taking the run back: %s", marker_path, exc)
    return left


def recover(output: str, storage_options: Mapping[str, Any] | None = None, stale_after_s: float = 24 * 3600) -> list[str]:
    """Finish commits that a crash interrupted; drop staging of runs that never committed.

    Uncommitted staging younger than `stale_after_s` is left alone: it may belong to a run that is
    still going on elsewhere. Returns the run ids whose commit was finished here.
    """
    fs, root = filesystem(output, storage_options)
    with _storage(output, storage_options, "looking for interrupted commits", fs, root):
        _require_location(fs, root, output)
        return _recover(fs, root, stale_after_s)


def _recover(fs: fsspec.AbstractFileSystem, root: str, stale_after_s: float) -> list[str]:
    staging_root = posixpath.join(root, STAGING)
    finished: list[str] = []
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
    output: str, table: str, storage_options: Mapping[str, Any] | None = None, columns: list[str] | None = None,
    runs: Iterable[str] | None = None,
) -> pa.Table:
    """Committed rows of one table (empty, with the right schema, when nothing is committed).

    `runs` keeps the rows of those runs only, and reads no other run's folder (the partitions are
    pruned before any file is opened)."""
    fs, root = filesystem(output, storage_options)
    folder = posixpath.join(root, table)
    schema = TABLES[table]
    with _storage(output, storage_options, f"reading table {table!r}", fs, root):
        if not fs.exists(folder) or not fs.find(folder):
            empty = schema.empty_table()
            return empty.select(columns) if columns else empty
        dataset = pads.dataset(folder, filesystem=fs, format="parquet", partitioning="hive", schema=schema)
        where = pads.field("run_id").isin(sorted(set(runs))) if runs is not None else None
        return dataset.to_table(columns=columns, filter=where)


_COMMIT_FILE = re.compile(r"^part-c(\d{4,})-\d+\.parquet$")


def read_commits(
    output: str, table: str, commits: Iterable[tuple[str, int]], storage_options: Mapping[str, Any] | None = None,
    columns: list[str] | None = None, batch_rows: int = 65_536,
) -> Iterator[tuple[tuple[str, int], pa.RecordBatch]]:
    """The rows one table gained in each of `commits` ((run_id, commit_index)), batch by batch,
    each with its commit: what a reader that keeps up commit by commit needs, without re-reading
    a long run's earlier commits or holding a table of millions of vectors at once. Files named
    before commits were numbered (`part-NNNNN.parquet`) count as their run's commit 0."""
    fs, root = filesystem(output, storage_options)
    schema = TABLES[table]
    by_run: dict[str, set[int]] = {}
    for run_id, commit_index in commits:
        by_run.setdefault(run_id, set()).add(int(commit_index))
    with _storage(output, storage_options, f"reading table {table!r}", fs, root):
        for run_id, wanted in sorted(by_run.items()):
            folder = posixpath.join(root, table, f"run_id={run_id}")
            try:
                names = sorted(posixpath.basename(p) for p in fs.ls(folder, detail=False))
            except FileNotFoundError:
                continue
            for commit_index in sorted(wanted):
                files = [posixpath.join(folder, n) for n in names if n.endswith(".parquet")
                         and int((_COMMIT_FILE.match(n) or [None, 0])[1]) == commit_index]
                if not files:
                    continue
                dataset = pads.dataset(files, filesystem=fs, format="parquet", schema=schema)
                for batch in dataset.to_batches(columns=columns, batch_size=batch_rows):
                    yield (run_id, commit_index), batch


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
