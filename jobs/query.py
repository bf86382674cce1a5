"""Read-only queries over a committed index: `pixelrefer query` and the notebook API.

The four tables (`videos`, `objects`, `captions`, `qa`) are DuckDB views over the committed Parquet
files `OUTPUT/<table>/**/*.parquet` (hive partitioned by `run_id`, so a filter on `run_id` prunes
whole runs). Nothing under `OUTPUT/_staging/` is ever read: the globs only name the table folders,
and after the views exist the connection is locked to exactly those folders.

Read-only by construction, in two independent layers:

1. Every user statement is parsed with DuckDB's own parser; only a single `SELECT`-kind statement
   (SELECT, WITH, FROM-first, VALUES, DESCRIBE, SHOW, SUMMARIZE) is accepted. Writes, COPY, ATTACH,
   INSTALL/LOAD, SET, PRAGMA, EXPLAIN (EXPLAIN ANALYZE runs its statement) are refused.
2. The connection itself cannot touch anything else: `allowed_directories` is set to the table
   folders, then `enable_external_access=false` and `lock_configuration=true`. So even a SELECT
   such as `read_csv('/etc/passwd')` or `read_parquet('OUTPUT/_staging/...')` is refused by DuckDB.

Remote OUTPUT (`s3://...` or any fsspec URL) is read through the fsspec filesystem registered with
DuckDB (`register_filesystem`), because DuckDB's httpfs extension cannot be downloaded offline.

Text search (`--text`) ranks objects with Okapi BM25 computed in SQL (see `search`), because
DuckDB's `fts` extension is not bundled and cannot be installed offline; doing it in SQL keeps it
streaming over remote Parquet and adds no dependency.

Exit codes: 0 success; 1 data problems (no committed run, unknown video, unreadable OUTPUT or
source video); 2 bad input (SQL errors, refused statements, bad options).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import dataclasses
import datetime as dt
import decimal
import json
import math
import os
import posixpath
import shutil
import sys
import tempfile
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TextIO

import duckdb
import fsspec
import pyarrow as pa

from schemas.tables import TABLES

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2

DEFAULT_BATCH_ROWS = 2048
DEFAULT_SEARCH_LIMIT = 20
TABLE_CELL_WIDTH = 60
FORMATS = ("table", "json", "csv")

# BM25 parameters: the usual defaults (Robertson & Zaragoza; Lucene/Elasticsearch use the same).
BM25_K1 = 1.2
BM25_B = 0.75

# Small English stop list: these words carry no signal for "which object is this" searches and
# would otherwise make every caption a weak match for "the red truck".
STOPWORDS = (
    "a", "an", "and", "are", "as", "at", "be", "by", "for", "from", "has", "in", "is", "it", "its",
    "of", "on", "or", "that", "the", "this", "to", "was", "were", "with",
)  # fmt: skip

USER_VIEWS = ("videos", "objects", "captions", "qa", "latest_videos")


# --------------------------------------------------------------------------------------------
# Errors: each carries the exit code, so the CLI prints one line instead of a traceback.
# --------------------------------------------------------------------------------------------


class QueryError(Exception):
    """A problem with the data or the environment (exit 1)."""

    exit_code = EXIT_ERROR


class UsageError(QueryError):
    """A problem with what the user typed (exit 2)."""

    exit_code = EXIT_USAGE


class RefusedQuery(UsageError):
    """A statement that would write, attach, change settings or read outside OUTPUT's tables."""


class NoCommittedRun(QueryError):
    """OUTPUT holds no committed run (maybe only staging data of a crashed or running job)."""


class VideoNotFound(QueryError):
    """No video matches the given id, id prefix or URI."""


def translate_duckdb_error(exc: duckdb.Error) -> QueryError:
    """Map DuckDB's exception classes onto messages that tell the user what to change."""
    message = str(exc).strip()
    if isinstance(exc, duckdb.PermissionException):
        return RefusedQuery(
            "refused: the index is read-only and queries may only read the tables "
            f"{', '.join(USER_VIEWS)} under OUTPUT ({message})"
        )
    if isinstance(exc, duckdb.InvalidInputException) and "configuration has been locked" in message:
        return RefusedQuery(f"refused: settings cannot be changed on a read-only index ({message})")
    if isinstance(exc, duckdb.ParserException):
        return UsageError(f"SQL syntax error: {message}")
    if isinstance(exc, duckdb.CatalogException):
        return UsageError(f"{message}\n(the tables are: {', '.join(USER_VIEWS)})")
    if isinstance(exc, (duckdb.BinderException, duckdb.ConversionException)):
        return UsageError(message)
    if isinstance(exc, duckdb.IOException):
        return QueryError(f"could not read OUTPUT: {message}")
    return QueryError(f"query failed: {message}")


@contextlib.contextmanager
def duckdb_errors() -> Iterator[None]:
    """Re-raise DuckDB errors as QueryError so callers handle one exception family."""
    try:
        yield
    except duckdb.Error as exc:
        raise translate_duckdb_error(exc) from exc


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

    def table_glob(self, table: str) -> str:
        return f"{self.duckdb_root}/{table}/**/*.parquet"


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


def has_parquet(fs: fsspec.AbstractFileSystem, folder: str) -> bool:
    """Whether a table folder holds at least one Parquet file; stops at the first one found.

    Walking top-down touches one run folder on object storage instead of listing every file.
    """
    try:
        if not fs.isdir(folder):
            return False
        for _dirpath, _dirs, files in fs.walk(folder):
            if any(name.endswith(".parquet") for name in files):
                return True
    except FileNotFoundError:
        return False
    return False


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
# Presence spans: shared by `--video` and the report's timeline.
# --------------------------------------------------------------------------------------------


def presence_spans(object_ts: Iterable[float], sampled_ts: Sequence[float] | None) -> list[tuple[float, float]]:
    """Group an object's frame times into spans of consecutive sampled frames.

    An object is "present" between two sampled frames only when it was seen in both; a sampled
    frame where it was not seen ends the span. Without `sampled_ts` its own times are one span.
    """
    seen = sorted({round(float(t), 6) for t in object_ts if t is not None})
    if not seen:
        return []
    if not sampled_ts:
        return [(seen[0], seen[-1])]
    seen_set = set(seen)
    grid = sorted({round(float(t), 6) for t in sampled_ts} | seen_set)
    spans: list[tuple[float, float]] = []
    start: float | None = None
    previous: float | None = None
    for t in grid:
        if t in seen_set:
            start = t if start is None else start
            previous = t
        elif start is not None:
            spans.append((start, previous))  # type: ignore[arg-type]
            start = None
    if start is not None:
        spans.append((start, previous))  # type: ignore[arg-type]
    return spans


# --------------------------------------------------------------------------------------------
# Results of `--video`.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class VideoResult:
    """Everything about one video in one run: its row, objects (with frames), captions and answers."""

    video: dict[str, Any]
    runs: list[dict[str, Any]]  # every run of this video, latest first (status, model, indexed_at)
    objects: pa.Table
    captions: pa.Table
    qa: pa.Table

    @property
    def video_id(self) -> str:
        return self.video["video_id"]

    @property
    def run_id(self) -> str:
        return self.video["run_id"]

    def object_summaries(self) -> list[dict[str, Any]]:
        """Objects without their per-frame masks: id, source, time span(s), frame count."""
        sampled = self.video.get("sampled_ts") or []
        rows = []
        for obj in self.objects.select(["object_id", "source", "first_ts", "last_ts", "frames"]).to_pylist():
            frames = obj.pop("frames") or []
            obj["num_frames"] = len(frames)
            obj["spans"] = [list(s) for s in presence_spans((f["ts"] for f in frames), sampled)]
            rows.append(obj)
        return rows

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready document (masks left out: the report is the place to look at them)."""
        video = {k: v for k, v in self.video.items() if k != "sampled_ts"}
        video["num_sampled"] = len(self.video.get("sampled_ts") or [])
        return {
            "video": video,
            "runs": self.runs,
            "objects": self.object_summaries(),
            "captions": self.captions.to_pylist(),
            "qa": self.qa.to_pylist(),
        }

    def timeline_rows(self) -> list[dict[str, Any]]:
        """One flat list (objects, captions, answers) for CSV, where one header must fit all rows."""
        base = {"video_id": self.video_id, "run_id": self.run_id}
        rows: list[dict[str, Any]] = []
        for obj in self.object_summaries():
            spans = "; ".join(f"{a:g}-{b:g}" for a, b in obj["spans"])
            text = f"{obj['source'] or ''} object, {obj['num_frames']} frames, present {spans}".strip()
            rows.append(
                {**base, "section": "object", "object_ids": str(obj["object_id"]), "ts_start": obj["first_ts"],
                 "ts_end": obj["last_ts"], "question": None, "text": text}
            )  # fmt: skip
        for cap in self.captions.to_pylist():
            rows.append(
                {**base, "section": "caption", "object_ids": str(cap["object_id"]), "ts_start": cap["ts_start"],
                 "ts_end": cap["ts_end"], "question": None, "text": cap["caption"]}
            )  # fmt: skip
        for qa in self.qa.to_pylist():
            ids = " ".join(str(i) for i in qa["object_ids"] or [])
            rows.append(
                {**base, "section": "answer", "object_ids": ids, "ts_start": None, "ts_end": None,
                 "question": qa["question"], "text": qa["answer"]}
            )  # fmt: skip
        return rows


# --------------------------------------------------------------------------------------------
# The index.
# --------------------------------------------------------------------------------------------

_MACROS = (
    # Harman's "S" stemmer (1991): folds plurals so "trucks" finds "truck" without a stemming library.
    r"""CREATE MACRO pr_stem(t) AS CASE
        WHEN length(t) <= 3 THEN t
        WHEN suffix(t, 'ies') AND NOT suffix(t, 'eies') AND NOT suffix(t, 'aies')
            THEN substr(t, 1, length(t) - 3) || 'y'
        WHEN suffix(t, 'es') AND NOT (suffix(t, 'aes') OR suffix(t, 'ees') OR suffix(t, 'oes'))
            THEN substr(t, 1, length(t) - 1)
        WHEN suffix(t, 's') AND NOT (suffix(t, 'us') OR suffix(t, 'ss'))
            THEN substr(t, 1, length(t) - 1)
        ELSE t END""",
    # Lower-case, split on anything but letters/digits (Unicode aware), drop stop words, stem.
    r"""CREATE MACRO pr_terms(s) AS list_transform(
        list_filter(regexp_split_to_array(lower(coalesce(s, '')), '[^\p{L}\p{N}]+'),
                    lambda t: t <> '' AND NOT list_contains(%s, t)),
        lambda t: pr_stem(t))"""
    % ("[" + ", ".join(f"'{w}'" for w in STOPWORDS) + "]"),
)

_LATEST_VIDEOS = """
CREATE VIEW latest_videos AS
SELECT * FROM videos WHERE status = 'ok'
QUALIFY row_number() OVER (PARTITION BY video_id ORDER BY indexed_at DESC NULLS LAST, run_id DESC) = 1
"""

# Okapi BM25 where a document is one object: all its captions plus the answers naming it.
#   score(obj, q) = sum over query terms t of
#       idf(t) * tf(t, obj) * (k1 + 1) / (tf(t, obj) + k1 * (1 - b + b * len(obj) / avg_len))
#   idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))      (Lucene's form: never negative)
# N, avg_len and df count objects of each video's latest ok run only, so a re-indexed video is
# neither counted twice nor shown twice.
_SEARCH_SQL = """
WITH latest AS (SELECT video_id, run_id, uri FROM latest_videos),
texts AS (
    SELECT c.video_id, c.run_id, c.object_id, c.caption AS text
    FROM captions c JOIN latest l ON c.video_id = l.video_id AND c.run_id = l.run_id
    UNION ALL
    SELECT video_id, run_id, object_id, text FROM (
        SELECT q.video_id, q.run_id, unnest(q.object_ids) AS object_id, q.answer AS text
        FROM qa q JOIN latest l ON q.video_id = l.video_id AND q.run_id = l.run_id)
),
tokens AS (SELECT video_id, run_id, object_id, text, pr_terms(text) AS terms FROM texts),
docs AS (
    SELECT video_id, run_id, object_id, sum(len(terms)) AS doc_len,
           arg_max(text, len(list_filter(terms, lambda t: list_contains($q, t)))) AS best_text
    FROM tokens GROUP BY ALL
),
stats AS (SELECT count(*) AS n_docs, avg(doc_len) AS avg_len FROM docs),
tf AS (
    SELECT video_id, run_id, object_id, term, count(*) AS tf
    FROM (SELECT video_id, run_id, object_id, unnest(terms) AS term FROM tokens)
    WHERE list_contains($q, term)
    GROUP BY ALL
),
df AS (SELECT term, count(*) AS df FROM tf GROUP BY term),
scored AS (
    SELECT tf.video_id, tf.run_id, tf.object_id,
           sum(ln(1 + (s.n_docs - df.df + 0.5) / (df.df + 0.5)) * tf.tf * ($k1 + 1)
               / (tf.tf + $k1 * (1 - $b + $b * d.doc_len / s.avg_len))) AS score,
           list(tf.term ORDER BY tf.term) AS matched_terms
    FROM tf JOIN df ON tf.term = df.term
    JOIN docs d ON d.video_id = tf.video_id AND d.run_id = tf.run_id AND d.object_id = tf.object_id
    CROSS JOIN stats s
    GROUP BY tf.video_id, tf.run_id, tf.object_id
)
SELECT s.score, s.video_id, s.object_id, s.run_id, o.first_ts, o.last_ts, s.matched_terms,
       d.best_text AS match, l.uri
FROM scored s
JOIN docs d ON d.video_id = s.video_id AND d.run_id = s.run_id AND d.object_id = s.object_id
JOIN latest l ON l.video_id = s.video_id AND l.run_id = s.run_id
LEFT JOIN (SELECT video_id, run_id, object_id, first_ts, last_ts FROM objects) o
    ON o.video_id = s.video_id AND o.run_id = s.run_id AND o.object_id = s.object_id
ORDER BY s.score DESC, s.video_id, s.object_id
LIMIT $limit
"""


class Index:
    """A read-only DuckDB view of one OUTPUT. Use `open_index`; close it (or use `with`)."""

    def __init__(self, location: OutputLocation) -> None:
        self.location = location
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
        folders = self._table_folders()
        if self.location.remote:
            self.con.register_filesystem(self.location.fs)
        with duckdb_errors():
            for name, schema in TABLES.items():
                if not (name in folders and self._try_file_view(name, schema)):
                    # e.g. no run had questions: an empty table of the right shape, not an error
                    self.con.register(name, schema.empty_table())
            self.con.execute(_LATEST_VIDEOS)
            for macro in _MACROS:
                self.con.execute(macro)

    def _table_folders(self) -> set[str]:
        """Which table folders exist (one listing), after checking that a run has committed."""
        loc = self.location
        try:
            entries = {posixpath.basename(p.rstrip("/")) for p in loc.fs.ls(loc.root, detail=False)}
            committed = "videos" in entries and has_parquet(loc.fs, f"{loc.root}/videos")
        except FileNotFoundError as exc:
            raise NoCommittedRun(f"OUTPUT {loc.url!r} does not exist") from exc
        except Exception as exc:  # OSError, or a storage client's own (e.g. botocore's endpoint errors)
            raise QueryError(f"cannot read OUTPUT {loc.url!r}: {type(exc).__name__}: {exc}") from exc
        if not committed:
            raise NoCommittedRun(
                f"no committed run in OUTPUT {loc.url!r}: {loc.url.rstrip('/')}/videos/ holds no Parquet file "
                "(runs become visible only when they commit; staging data is never read)"
            )
        return entries & set(TABLES)

    def _try_file_view(self, name: str, schema: pa.Schema) -> bool:
        """Create the view over the table's files; False when the folder holds no Parquet file."""
        try:
            self.con.execute(self._table_view_sql(name, schema))
            return True
        except duckdb.IOException as exc:
            if "no files found" in str(exc).lower():
                return False
            raise

    def _table_view_sql(self, name: str, schema: pa.Schema) -> str:
        """A view listing the schema's columns once, so the hive `run_id` never appears twice.

        `hive_types` pins `run_id` to VARCHAR: DuckDB would otherwise guess BIGINT for a run id
        made of digits and clash with the string column inside the files.
        """
        columns = ", ".join(f'"{field.name}"' for field in schema)
        glob = self.location.table_glob(name).replace("'", "''")
        return (
            f'CREATE VIEW "{name}" AS SELECT {columns} FROM read_parquet(\'{glob}\', '
            "hive_partitioning = true, hive_types = {'run_id': VARCHAR})"
        )

    def _lock(self) -> None:
        """Second layer of read-only: DuckDB itself refuses any other file, extension or setting."""
        allowed = [self.location.table_dir(name) for name in TABLES]
        self.con.execute("SET allowed_directories = $dirs", {"dirs": allowed})
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

    def runs(self) -> pa.Table:
        """One row per committed run: when, with which model, how many videos ok / failed."""
        return self._internal(
            """SELECT run_id, min(indexed_at) AS indexed_at, string_agg(DISTINCT model, ', ') AS model,
                      count(*) FILTER (WHERE status = 'ok') AS videos_ok,
                      count(*) FILTER (WHERE status = 'failed') AS videos_failed
               FROM videos GROUP BY run_id ORDER BY indexed_at NULLS LAST, run_id"""
        )

    def video(self, ref: str, run_id: str | None = None) -> VideoResult:
        """Everything about one video, by video_id, unique video_id prefix or source URI.

        Without `run_id`, the latest run whose status is ok (a video re-indexed with another model
        shows its newest result); if it never indexed ok, its latest failed run (with the error).
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
            objects=self._internal(f"SELECT * FROM objects {where} ORDER BY object_id", params),
            captions=self._internal(f"SELECT * FROM captions {where} ORDER BY object_id, ts_start", params),
            qa=self._internal(f"SELECT * FROM qa {where}", params),
        )

    def search(self, text: str, limit: int = DEFAULT_SEARCH_LIMIT) -> pa.Table:
        """Objects whose captions or answers match `text`, best first (BM25, see _SEARCH_SQL)."""
        terms = self._internal("SELECT pr_terms($text) AS terms", {"text": text}).column("terms")[0].as_py()
        terms = sorted(set(terms or []))
        if not terms:
            raise UsageError(f"--text {text!r} has no searchable words (stop words and punctuation are ignored)")
        if limit < 1:
            raise UsageError("--limit must be at least 1")
        params = {"q": terms, "k1": BM25_K1, "b": BM25_B, "limit": limit}
        return self._internal(_SEARCH_SQL, params)

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


def open_index(output: str, storage_options: Mapping[str, Any] | None = None) -> Index:
    """Open OUTPUT (local path or fsspec URL) for read-only queries.

    >>> idx = open_index("s3://bucket/index", {"profile": "prod"})   # doctest: +SKIP
    >>> idx.sql("SELECT count(*) FROM objects")                         # doctest: +SKIP
    """
    return Index(resolve_output(output, storage_options))


# --------------------------------------------------------------------------------------------
# Output formats (streaming).
# --------------------------------------------------------------------------------------------


def to_jsonable(value: Any) -> Any:
    """Plain JSON values: timestamps as ISO 8601, bytes as base64, NaN/inf as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, pa.MonthDayNano):  # DuckDB's INTERVAL, e.g. `ended_at - started_at`
        interval = _interval(value)
        return interval.total_seconds() if isinstance(interval, dt.timedelta) else interval
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        # pyarrow gives maps as lists of (key, value) pairs; keep them as lists.
        return [to_jsonable(v) for v in value]
    return value


def _interval(value: "pa.MonthDayNano") -> dt.timedelta | str:
    """A timedelta when the interval has no months (their length varies), else ISO 8601 text."""
    delta = dt.timedelta(days=value.days, microseconds=value.nanoseconds / 1000)
    if not value.months:
        return delta
    return f"P{value.months}M{value.days}DT{value.nanoseconds / 1e9:g}S"


def _cell_text(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, pa.MonthDayNano):
        return str(_interval(value))
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(to_jsonable(value), ensure_ascii=False)
    if isinstance(value, dt.datetime):
        return value.isoformat(sep=" ")
    return str(value).replace("\n", " ")


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _batches(reader: pa.RecordBatchReader | pa.Table) -> Iterator[pa.RecordBatch]:
    """Batches as they arrive; an error met mid-stream (a file unreadable) becomes a QueryError."""
    with duckdb_errors():
        if isinstance(reader, pa.Table):
            yield from reader.to_batches()
            return
        try:
            yield from reader
        except pa.ArrowException as exc:  # DuckDB errors can surface through the Arrow stream
            raise QueryError(f"query failed while reading: {exc}") from exc


def write_table_format(reader: pa.RecordBatchReader | pa.Table, out: TextIO) -> int:
    """Aligned text columns. Widths come from the first batch so output can start immediately."""
    schema = reader.schema
    numeric = [pa.types.is_integer(f.type) or pa.types.is_floating(f.type) for f in schema]
    widths: list[int] | None = None
    count = 0
    for batch in _batches(reader):
        rows = [[_clip(_cell_text(v), TABLE_CELL_WIDTH) for v in row.values()] for row in batch.to_pylist()]
        if widths is None:
            widths = [max([len(f.name)] + [len(r[i]) for r in rows]) for i, f in enumerate(schema)]
            _write_row([f.name for f in schema], widths, [False] * len(widths), out)
            out.write("  ".join("-" * w for w in widths).rstrip() + "\n")
        for row in rows:
            _write_row(row, widths, numeric, out)
        count += len(rows)
    if widths is None:  # no rows at all: still show the header
        widths = [len(f.name) for f in schema]
        _write_row([f.name for f in schema], widths, [False] * len(widths), out)
    out.write(f"({count} row{'s' if count != 1 else ''})\n")
    return count


def _write_row(cells: Sequence[str], widths: Sequence[int], right: Sequence[bool], out: TextIO) -> None:
    parts = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)]
    out.write("  ".join(parts).rstrip() + "\n")


def write_json_format(reader: pa.RecordBatchReader | pa.Table, out: TextIO) -> int:
    """JSON Lines: one object per row, written as each batch arrives (pipe into `jq -s` for an array)."""
    count = 0
    for batch in _batches(reader):
        for row in batch.to_pylist():
            out.write(json.dumps(to_jsonable(row), ensure_ascii=False) + "\n")
            count += 1
    return count


def write_csv_format(reader: pa.RecordBatchReader | pa.Table, out: TextIO) -> int:
    """CSV with a header; nested values (lists, structs) are written as JSON text in their cell."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(reader.schema.names)
    count = 0
    for batch in _batches(reader):
        for row in batch.to_pylist():
            writer.writerow([_csv_cell(v) for v in row.values()])
            count += 1
    return count


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, pa.MonthDayNano):
        return to_jsonable(value)
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(to_jsonable(value), ensure_ascii=False)
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return value


WRITERS: dict[str, Callable[[pa.RecordBatchReader | pa.Table, TextIO], int]] = {
    "table": write_table_format,
    "json": write_json_format,
    "csv": write_csv_format,
}


def write_video(result: VideoResult, fmt: str, out: TextIO) -> None:
    """`--video` output: sections for people (table), one document (json), one flat table (csv)."""
    if fmt == "json":
        out.write(json.dumps(to_jsonable(result.to_dict()), ensure_ascii=False, indent=2) + "\n")
        return
    if fmt == "csv":
        write_csv_format(pa.Table.from_pylist(result.timeline_rows(), schema=_TIMELINE_SCHEMA), out)
        return
    doc = result.to_dict()
    video = doc["video"]
    out.write(f"video {video['video_id']}  ({video['uri']})\n")
    for key in ("status", "error", "run_id", "model", "tracker", "indexed_at", "duration_s", "width", "height"):
        if video.get(key) is not None:
            out.write(f"  {key:<11} {_cell_text(video[key])}\n")
    if len(doc["runs"]) > 1:
        others = ", ".join(f"{r['run_id']} ({r['status']}, {r['model']})" for r in doc["runs"])
        out.write(f"  runs        {others}\n")
    sections = (
        ("objects", doc["objects"], ["object_id", "source", "first_ts", "last_ts", "num_frames", "spans"]),
        ("captions", doc["captions"], ["object_id", "ts_start", "ts_end", "caption"]),
        ("answers", doc["qa"], ["object_ids", "question", "answer"]),
    )
    for title, rows, columns in sections:
        out.write(f"\n{title}:\n")
        table = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows]) if rows else None
        write_table_format(table if table is not None else pa.table({c: [] for c in columns}), out)


_TIMELINE_SCHEMA = pa.schema(
    [
        ("section", pa.string()),
        ("video_id", pa.string()),
        ("run_id", pa.string()),
        ("object_ids", pa.string()),
        ("ts_start", pa.float64()),
        ("ts_end", pa.float64()),
        ("question", pa.string()),
        ("text", pa.string()),
    ]
)


# --------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """OUTPUT and its credentials: shared by `query` and `report`."""
    parser.add_argument("output", metavar="OUTPUT", help="index folder or fsspec URL (s3://bucket/index)")
    parser.add_argument(
        "--storage-options",
        metavar="JSON",
        default=None,
        help='fsspec options for OUTPUT and remote source videos, e.g. \'{"profile": "prod"}\'',
    )


def add_query_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `pixelrefer query` (added to the lead's subparser)."""
    add_common_arguments(parser)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--sql",
        metavar="SQL",
        help="read-only SQL over videos, objects, captions, qa (and latest_videos: latest ok run per video)",
    )
    mode.add_argument("--video", metavar="ID|URI", help="everything about one video (video_id, id prefix or uri)")
    mode.add_argument("--text", metavar="WORDS", help="objects whose captions or answers match, best first")
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format (json is JSON Lines)")
    parser.add_argument("--limit", type=int, default=DEFAULT_SEARCH_LIMIT, help="--text: number of results")
    parser.add_argument("--run", metavar="RUN_ID", default=None, help="--video: show this run, not the latest")


def query_main(args: argparse.Namespace) -> int:
    """`pixelrefer query`: returns the exit code; errors go to stderr as one message."""
    return run_cli("query", lambda: _query(args))


def _query(args: argparse.Namespace) -> None:
    storage_options = parse_storage_options(args.storage_options)
    out = sys.stdout
    with open_index(args.output, storage_options) as index:
        writer = WRITERS[args.format]
        if args.sql is not None:
            writer(index.reader(args.sql), out)
        elif args.video is not None:
            write_video(index.video(args.video, run_id=args.run), args.format, out)
        elif args.text is not None:
            writer(index.search(args.text, args.limit), out)
        else:
            writer(index.runs(), out)
    out.flush()


def run_cli(prog: str, body: Callable[[], None]) -> int:
    """Run a command body: known errors become one stderr line and an exit code, never a traceback.

    Set PIXELREFER_DEBUG=1 to see the traceback of an unexpected error.
    """
    try:
        body()
        return EXIT_OK
    except QueryError as exc:
        print(f"pixelrefer {prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except duckdb.Error as exc:
        err = translate_duckdb_error(exc)
        print(f"pixelrefer {prog}: error: {err}", file=sys.stderr)
        return err.exit_code
    except BrokenPipeError:
        # `pixelrefer query ... | head`: the reader left; stop quietly like other Unix tools.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        print(f"pixelrefer {prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI promise: a message, not a traceback
        if os.environ.get("PIXELREFER_DEBUG"):
            raise
        print(f"pixelrefer {prog}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m jobs.query OUTPUT ...`: the same command without the umbrella CLI."""
    parser = argparse.ArgumentParser(prog="pixelrefer query", description=__doc__.split("\n\n")[0])
    add_query_arguments(parser)
    return query_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
