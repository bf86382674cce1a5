"""The read-only SQL sandbox over a committed index: `open_index` and the `Index` it returns.

The eight tables are DuckDB views over the Parquet files of each Delta table's current version,
as its transaction log lists them (`pipeline.store.TableStore.files`; never a glob: files a
killed commit left, or that compaction replaced, are not in the log). The views apply the commit
rule of `pipeline.store.commit`: a `videos` row shows only when `runs` holds its commit, a child
row only when its video shows. `latest_videos` is, per source `uri`, its newest ok run; a source
whose newest record is `removed` (deleted from SOURCE, seen by `nightly`) is not in it.

- `model`: every view keeps the runs of that model only (removals count for every model), so a
  trial with another model never hides the production results.
- `as_of`: the `runs` table at that Delta version (or timestamp) decides what is visible, so the
  index reads as it was then; the other tables are read at their latest version, which holds
  every row that was visible then (rows are only ever appended; `maintain` removes leftovers
  that were never visible).

An OUTPUT of the pre-Delta layout is refused, naming `pixelrefer migrate`.

Read-only by construction, in two independent layers:

1. Every user statement is parsed with DuckDB's own parser; only a single `SELECT`-kind statement
   (SELECT, WITH, FROM-first, VALUES, DESCRIBE, SHOW, SUMMARIZE) is accepted. Writes, COPY, ATTACH,
   INSTALL/LOAD, SET, PRAGMA, EXPLAIN (EXPLAIN ANALYZE runs its statement) are refused.
2. The connection itself cannot touch anything else: `allowed_paths` is set to the data files
   the Delta logs list (not the table folders, which hold each `_delta_log`), then
   `enable_external_access=false` and `lock_configuration=true`. So even a SELECT such as
   `read_csv('/etc/passwd')` or `read_json('OUTPUT/videos/_delta_log/...')` is refused by DuckDB.

Remote OUTPUT (`s3://...`) is read through the fsspec filesystem registered with DuckDB
(`register_filesystem`), because DuckDB's httpfs extension cannot be downloaded offline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import shutil
import tempfile
from typing import Any, Mapping

import duckdb
import fsspec
import pyarrow as pa

from jobs.query_errors import RefusedQuery, UsageError, VideoNotFound, duckdb_errors
from jobs.query_views import ViewSource, table_views
from jobs.query_search import DEFAULT_SEARCH_LIMIT, LABEL_SQL, MACROS, SEARCH_SQL, TERMS_SQL, search_params
from jobs.query_video import CLIPS_SQL, OBJECTS_SQL, RUNS_SQL, VideoResult
from schemas.tables import TABLES

DEFAULT_BATCH_ROWS = 2048


# --------------------------------------------------------------------------------------------
# Where OUTPUT is, and how DuckDB should see it.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OutputLocation:
    """OUTPUT resolved once: the fsspec filesystem, its root, and the paths DuckDB must use."""

    url: str
    fs: fsspec.AbstractFileSystem
    root: str  # path inside `fs`, no protocol, no trailing slash
    duckdb_root: str  # what DuckDB opens: an absolute local path, or protocol://root
    remote: bool
    storage_options: Mapping[str, Any]

    def table_dir(self, table: str) -> str:
        """The folder of a committed table, with a trailing slash (DuckDB's allowed_directories)."""
        return f"{self.duckdb_root}/{table}/"


def resolve_output(output: str, storage_options: Mapping[str, Any] | None = None) -> OutputLocation:
    """Resolve a local path or fsspec URL.

    fsspec's cached filesystem instance is reused (a new S3 client per open costs a session
    setup), but its listing cache is dropped, so an index opened later in a long-lived notebook
    sees the runs committed since.
    """
    options = dict(storage_options or {})
    protocol = output.split("://", 1)[0] if "://" in output else "file"
    remote = protocol not in ("file", "local")
    try:
        fs, root = fsspec.core.url_to_fs(output, **options)
        fs.invalidate_cache()
    except (ImportError, ValueError, TypeError) as exc:
        raise UsageError(f"cannot open OUTPUT {output!r}: {exc}") from exc
    root = root.rstrip("/") or "/"
    duckdb_root = f"{protocol}://{root}" if remote else root
    return OutputLocation(output, fs, root, duckdb_root.rstrip("/"), remote, options)


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """`--storage-options` is a JSON object passed to fsspec (credentials, endpoint_url, ...)."""
    from pipeline.config import IndexConfig

    try:
        return IndexConfig.parse_storage_options(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


# --------------------------------------------------------------------------------------------
# The read-only guard.
# --------------------------------------------------------------------------------------------


def check_read_only(con: duckdb.DuckDBPyConnection, query: str) -> None:
    """Accept exactly one SELECT-kind statement, judged by DuckDB's own parser.

    This is the first of two layers; the locked connection (see `Index._lock`) is the second.
    """
    try:
        statements = con.extract_statements(query)
    except duckdb.ParserException as exc:
        raise UsageError(f"SQL syntax error: {str(exc).strip()}") from exc
    except (duckdb.Error, ValueError) as exc:  # a statement kind this client does not know
        raise RefusedQuery(f"refused: only read-only SELECT queries are allowed ({exc})") from exc
    if not statements:
        raise UsageError("the query is empty")
    if len(statements) > 1:
        raise RefusedQuery("refused: give one SELECT statement at a time")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise RefusedQuery(
            f"refused: {kind.name} statements are not allowed; the index is read-only "
            "(use SELECT, WITH, FROM, DESCRIBE, SHOW or SUMMARIZE)"
        )


# --------------------------------------------------------------------------------------------
# The index.
# --------------------------------------------------------------------------------------------

class Index:
    """A read-only DuckDB view of one OUTPUT. Use `open_index`; close it (or use `with`)."""

    def __init__(self, location: OutputLocation, model: str | None = None,
                 as_of: int | dt.datetime | None = None) -> None:
        self.location = location
        self.model, self.as_of = model, as_of
        self.versions: dict[tuple[str, int], dict[str, Any]] = {}
        self._tempdir = tempfile.mkdtemp(prefix="pixelrefer-query-")
        self.con = duckdb.connect(
            config={
                # Never reach for the network to fetch an extension; fail fast instead.
                "autoinstall_known_extensions": False,
                "autoload_known_extensions": False,
                # Spill into a private folder, not the user's current directory.
                "temp_directory": self._tempdir,
            }
        )
        try:
            self._create_views()
            self._lock()
        except BaseException:
            self.close()
            raise

    # -- setup -------------------------------------------------------------------------------

    def _create_views(self) -> None:
        source = ViewSource.open(self.location.url, self.location.storage_options, as_of=self.as_of)
        self.versions = source.runs_versions
        self._files = sorted({f for files in source.files.values() for f in files})
        if self.location.remote:
            self.con.register_filesystem(self.location.fs)
        with duckdb_errors():
            for name, schema in TABLES.items():
                self.con.register(f"_empty_{name}", schema.empty_table())
            for sql in table_views(source, self.model):
                self.con.execute(sql)
            for macro in MACROS:
                self.con.execute(macro)

    def _lock(self) -> None:
        """Second layer of read-only: DuckDB itself refuses any other file, extension or setting."""
        # The data files the logs list, not the table folders: those hold the _delta_log too.
        self.con.execute("SET allowed_paths = $paths", {"paths": self._files})
        self.con.execute("SET enable_external_access = false")
        self.con.execute("SET lock_configuration = true")

    # -- public API --------------------------------------------------------------------------

    def reader(
        self, query: str, params: Mapping[str, Any] | None = None, batch_rows: int = DEFAULT_BATCH_ROWS
    ) -> pa.RecordBatchReader:
        """Stream the result of a user's read-only query in record batches."""
        check_read_only(self.con, query)
        with duckdb_errors():
            return self.con.sql(query, params=dict(params) if params else None).to_arrow_reader(batch_rows)

    def sql(self, query: str, params: Mapping[str, Any] | None = None) -> pa.Table:
        """Run a read-only query and return the whole result as a pyarrow Table."""
        with duckdb_errors():
            return self.reader(query, params).read_all()

    @property
    def notes(self) -> list[str]:
        """Lines a command should show the user about how OUTPUT was read (stderr, not the result)."""
        notes = []
        if self.as_of is not None:
            notes.append(f"note: reading OUTPUT as of {self.as_of} (runs table version "
                         f"{max((v['version'] for v in self.versions.values()), default='?')})")
        if self.model is not None:
            notes.append(f"note: runs of model {self.model} only")
        return notes

    def runs(self) -> pa.Table:
        """One row per committed run: when, with which model, videos ok / failed, clips, video-hours,
        and `version`: the `runs` table version of its last commit (what `--as-of` takes)."""
        table = self._internal(RUNS_SQL)
        last: dict[str, int] = {}
        for (run_id, _), info in self.versions.items():
            last[run_id] = max(last.get(run_id, -1), int(info["version"]))
        versions = pa.array([last.get(r) for r in table.column("run_id").to_pylist()], pa.int64())
        return table.append_column("version", versions)

    def video(self, ref: str, run_id: str | None = None) -> VideoResult:
        """Everything about one video, by video_id, unique video_id prefix or source URI.

        Without `run_id`, the latest run whose status is ok (a video re-indexed with another model
        shows its newest result); if it never indexed ok, its latest failed run (with the error).
        Presence spans are computed in DuckDB from the `masks` table, so a 2-hour video's tens of
        thousands of masks never come into Python.
        """
        runs = self._video_runs(ref)
        if run_id is not None:
            chosen = next((r for r in runs if r["run_id"] == run_id), None)
            if chosen is None:
                known = ", ".join(r["run_id"] for r in runs)
                raise VideoNotFound(f"video {ref!r} has no run {run_id!r} (its runs: {known})")
        else:
            chosen = next((r for r in runs if r["status"] == "ok"), runs[0])
        params = {"vid": chosen["video_id"], "run": chosen["run_id"]}
        where = "WHERE run_id = $run AND video_id = $vid"  # run_id first: prunes other runs' files
        return VideoResult(
            video=chosen,
            runs=[
                {k: r[k] for k in ("run_id", "status", "model", "tracker", "indexed_at", "error")}
                for r in runs
                if r["video_id"] == chosen["video_id"]
            ],
            clips=self._internal(CLIPS_SQL, params),
            objects=self._internal(OBJECTS_SQL, params),
            captions=self._internal(
                f"SELECT * FROM captions {where} ORDER BY clip_index NULLS LAST, object_id, ts_start", params
            ),
            qa=self._internal(
                f"SELECT * FROM qa {where} ORDER BY clip_index NULLS LAST, ts_start, object_ids, question", params
            ),
        )

    def search(self, text: str, limit: int = DEFAULT_SEARCH_LIMIT) -> pa.Table:
        """Objects whose captions or answers match `text`, best first (BM25, see jobs.query_search)."""
        terms = self._internal(TERMS_SQL, {"text": text}).column("terms")[0].as_py()
        if not terms:
            raise UsageError(f"--text {text!r} has no searchable words (stop words and punctuation are ignored)")
        if limit < 1:
            raise UsageError("--limit must be at least 1")
        return self._internal(SEARCH_SQL, search_params(terms, limit))

    def labelled(self, label: str, limit: int = DEFAULT_SEARCH_LIMIT, video: str | None = None) -> pa.Table:
        """Objects labelled `label` (`objects.label`: a concept, or PixelRefer's category), by video and time."""
        if not label.strip():
            raise UsageError("--label needs a label, e.g. --label person")
        if limit < 1:
            raise UsageError("--limit must be at least 1")
        return self._internal(LABEL_SQL, {"label": label, "limit": limit, "video": video})

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.con.close()
        shutil.rmtree(self._tempdir, ignore_errors=True)

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers -----------------------------------------------------------------------------

    def _internal(self, query: str, params: Mapping[str, Any] | None = None) -> pa.Table:
        """Our own fixed queries: no statement check needed, same locked connection."""
        with duckdb_errors():
            return self.con.sql(query, params=dict(params) if params else None).to_arrow_table()

    def _video_runs(self, ref: str) -> list[dict[str, Any]]:
        """All `videos` rows of the video `ref` names, latest first."""
        order = "ORDER BY indexed_at DESC NULLS LAST, run_id DESC"
        uris = _uri_candidates(ref)
        rows = self._internal(
            f"SELECT * FROM videos WHERE video_id = $ref OR list_contains($uris, uri) {order}",
            {"ref": ref, "uris": uris},
        ).to_pylist()
        if rows:
            # A URI re-indexed after its content changed has several video_ids: take the newest.
            newest = rows[0]["video_id"]
            return [r for r in rows if r["video_id"] == newest]
        ids = self._internal(
            "SELECT DISTINCT video_id FROM videos WHERE starts_with(video_id, $ref) ORDER BY video_id LIMIT 6",
            {"ref": ref},
        ).column("video_id").to_pylist()
        if len(ids) > 1:
            raise VideoNotFound(f"video id prefix {ref!r} is ambiguous: {', '.join(ids[:5])}, ...")
        if not ids:
            raise VideoNotFound(
                f"no video {ref!r} in OUTPUT (looked up by video_id, video_id prefix and uri); "
                "list them with: --sql \"SELECT video_id, uri FROM latest_videos\""
            )
        return self._internal(f"SELECT * FROM videos WHERE video_id = $id {order}", {"id": ids[0]}).to_pylist()


def _uri_candidates(ref: str) -> list[str]:
    """A user may name a local source by relative path; stored URIs are absolute or file:// URLs."""
    candidates = [ref]
    if "://" not in ref:
        absolute = os.path.abspath(os.path.expanduser(ref))
        candidates += [absolute, f"file://{absolute}"]
    elif ref.startswith("file://"):
        candidates.append(ref[len("file://") :])
    return candidates


def open_index(output: str, storage_options: Mapping[str, Any] | None = None, *, model: str | None = None,
               as_of: int | dt.datetime | None = None) -> Index:
    """Open OUTPUT (local path or fsspec URL) for read-only queries (`model`, `as_of`: see the
    module docstring).

    >>> idx = open_index("s3://bucket/index", {"profile": "prod"})   # doctest: +SKIP
    >>> idx.sql("SELECT count(*) FROM objects")                         # doctest: +SKIP
    """
    return Index(resolve_output(output, storage_options), model=model, as_of=as_of)

