"""OUTPUT's tables as Delta Lake tables: the one object every writer and reader goes through.

Each table is a Delta table at ``OUTPUT/<table>/`` (data files stay Parquet; the ``_delta_log``
gives atomic commits, versions, conflict detection, compaction and vacuum), written and read with
`deltalake` (delta-rs). `TableStore` opens them, checks that each is one of ours and of a schema
this code reads, and turns every failure (delta-rs's own, the store's) into one `OutputError`
sentence that names the table and what to do, so no caller handles delta-rs or botocore errors.

A table records the schema version that wrote it (table property ``pixelrefer.schema``). A table
without it, or with other columns, is foreign; one with a higher version was written by a newer
pixelrefer: both are refused by name, never read with a guess. An OUTPUT of the pre-Delta layout
(``<table>/run_id=<id>/*.parquet`` with no log) is refused too, naming ``pixelrefer migrate``:
mixing layouts would make its committed rows invisible.
"""

from __future__ import annotations

import datetime as dt
import logging
import posixpath
import re
from typing import Any, Iterator, Mapping

import pyarrow as pa
import pyarrow.dataset as pads

from pipeline import storage_errors
from pipeline.store.location import (
    OutputError, filesystem, object_store_options, require_location, rust_url, storage_guard,
)
from schemas.tables import SCHEMA_VERSION, TABLES

log = logging.getLogger(__name__)

SCHEMA_PROPERTY = "pixelrefer.schema"
#: Commit metadata key naming the run commit ("run_id/commit_index") that wrote a table version.
COMMIT_PROPERTY = "pixelrefer.commit"
#: Tables whose appends a reader follows version by version (the search index reads each new
#: commit's vectors from the Delta change feed, not by re-reading a long run's files).
CHANGE_FEED_TABLES = frozenset({"embeddings"})
#: Rows per Parquet row group where delta-rs's default (a million) is too coarse: a reader of one
#: video's masks (`pipeline.export`) decodes a whole row group's RLE column at a time, and one
#: commit of a 2-hour video is 144,000 mask rows; 16k rows is a few MB of RLE strings.
ROW_GROUP_ROWS = {"masks": 16_384}
LOG = "_delta_log"


def writer_properties(table: str) -> Any:
    """How `table`'s Parquet files are written, by appends and by `maintain`'s compaction alike (a
    compacted file keeps the row groups a reader relies on)."""
    import deltalake

    return deltalake.WriterProperties(compression="ZSTD", max_row_group_size=ROW_GROUP_ROWS.get(table))


class TableError(OutputError):
    """One table cannot be used as it is (damaged, foreign, newer); the message says which and why."""


class LegacyLayout(OutputError):
    """OUTPUT holds tables of the pre-Delta layout: `pixelrefer migrate` converts them."""


def _deltalake() -> Any:
    import deltalake

    return deltalake


class TableStore:
    """The eight tables of one OUTPUT (local folder or S3)."""

    def __init__(self, output: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.output = output
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = filesystem(output, storage_options)
        self.shown = storage_errors.redact_url(output)
        self.rust_options = object_store_options(self.fs, storage_options)
        self._root_url = rust_url(self.fs, self.root)
        self._written: dict[str, Any] = {}  # table -> the handle appends go through (kept up to date)

    # -- where -------------------------------------------------------------------------------

    def uri(self, table: str) -> str:
        return f"{self._root_url}/{table}"

    def path(self, *parts: str) -> str:
        """A path inside OUTPUT for fsspec (the search index's state, the legacy layout's folders)."""
        return posixpath.join(self.root, *parts)

    def guard(self, action: str, table: str | None = None) -> Any:
        """Failures inside become `OutputError`: delta-rs's with the table named, the store's explained."""
        return _Guard(self, action, table)

    # -- layout ------------------------------------------------------------------------------

    def exists(self, table: str) -> bool:
        with self.guard("looking for the table", table):
            return bool(self.fs.exists(self.path(table, LOG)))

    def legacy_tables(self) -> list[str]:
        """Tables of the pre-Delta layout here: a folder with `run_id=` folders or Parquet files, no log."""
        found = []
        with self.guard("looking at its layout"):
            for table in TABLES:
                folder = self.path(table)
                if not self.fs.exists(folder) or self.fs.exists(posixpath.join(folder, LOG)):
                    continue
                names = [n.rstrip("/").rsplit("/", 1)[-1] for n in self.fs.ls(folder, detail=False)]
                if any(n.startswith("run_id=") or n.endswith(".parquet") for n in names):
                    found.append(table)
        return found

    def check_layout(self) -> None:
        """Refuse an OUTPUT of the pre-Delta layout, naming `pixelrefer migrate`."""
        legacy = self.legacy_tables()
        if legacy:
            raise LegacyLayout(
                f"OUTPUT {self.shown!r} holds tables of the pre-Delta layout ({', '.join(legacy)}: run_id=... "
                f"folders without a _delta_log); convert it in place with `pixelrefer migrate {self.shown}` "
                "(nothing is deleted before the converted tables are committed), or give another OUTPUT"
            )

    def require_location(self) -> None:
        with self.guard("opening it"):
            require_location(self.fs, self.root, self.output)

    # -- tables ------------------------------------------------------------------------------

    def open(self, table: str, version: int | dt.datetime | None = None) -> Any | None:
        """The Delta table (None when it does not exist yet), checked to be ours and readable."""
        if not self.exists(table):
            return None
        deltalake = _deltalake()
        with self.guard("opening the table", table):
            handle = deltalake.DeltaTable(self.uri(table), storage_options=self.rust_options or None)
            self._check(table, handle)
            if version is not None:
                handle.load_as_version(version)
        return handle

    def ensure(self, table: str) -> Any:
        """The Delta table, created (empty, with its schema and properties) when missing.

        Two runs creating the same table at once is fine: the loser of the race finds it made."""
        handle = self.open(table)
        if handle is not None:
            return handle
        deltalake = _deltalake()
        config: dict[str, str | None] = {SCHEMA_PROPERTY: str(SCHEMA_VERSION)}
        if table in CHANGE_FEED_TABLES:
            config["delta.enableChangeDataFeed"] = "true"
        with self.guard("creating the table", table):
            try:
                deltalake.DeltaTable.create(self.uri(table), schema=TABLES[table], mode="ignore", configuration=config,
                                            storage_options=self.rust_options or None, raise_if_key_not_exists=False)
            except deltalake.exceptions.DeltaError as exc:
                if not self.exists(table):
                    raise
                log.debug("table %s was created by another writer at the same time (%s)", table, exc)
        handle = self.open(table)
        assert handle is not None
        return handle

    def _check(self, table: str, handle: Any) -> None:
        config = handle.metadata().configuration or {}
        written = config.get(SCHEMA_PROPERTY)
        if written is None:
            raise TableError(f"table {table!r} of OUTPUT {self.shown!r} is a Delta table not written by pixelrefer "
                             f"(no {SCHEMA_PROPERTY} property); give an OUTPUT that holds only pixelrefer's tables")
        if int(written) > SCHEMA_VERSION:
            raise TableError(f"table {table!r} of OUTPUT {self.shown!r} was written by a newer pixelrefer (schema "
                             f"version {written}; this one reads up to {SCHEMA_VERSION}): upgrade pixelrefer")
        have = pa.schema(handle.schema().to_arrow())
        missing = [f.name for f in TABLES[table] if f.name not in have.names]
        if missing:
            raise TableError(f"table {table!r} of OUTPUT {self.shown!r} lacks columns {missing}; it was not written "
                             "by this version of pixelrefer")

    # -- writing -----------------------------------------------------------------------------

    def append(self, table: str, data: pa.Table, commit: str | None = None) -> int:
        """Append `data` in one Delta commit; returns the table version it made.

        `commit` ("run_id/commit_index") is recorded in the commit's metadata, so a reader can find
        the version a run commit wrote (`version_of`)."""
        handle = self._fresh_handle(table)
        deltalake = _deltalake()
        meta = {COMMIT_PROPERTY: commit} if commit else None
        with self.guard("appending to the table", table):
            deltalake.write_deltalake(
                handle, data.cast(TABLES[table]), mode="append",
                commit_properties=deltalake.CommitProperties(custom_metadata=meta, max_commit_retries=50),
                writer_properties=writer_properties(table),
            )
            return self.version_of(table, commit, handle=handle) if commit else int(handle.version())

    def _fresh_handle(self, table: str) -> Any:
        """The handle appends go through, caught up with other writers' commits."""
        handle = self._written.get(table)
        if handle is None:
            handle = self._written[table] = self.ensure(table)
        else:
            with self.guard("reading the table's log", table):
                handle.update_incremental()
        return handle

    def forget(self, table: str) -> None:
        """Drop the kept handle of a table that was deleted and will be created again."""
        self._written.pop(table, None)

    def version_of(self, table: str, commit: str, look_back: int = 512, handle: Any = None) -> int:
        """The version of `table` that `commit` appended, searched among its latest versions in
        growing windows (just after an append it is the newest one, unless others committed since:
        reading a long history costs a request per version on object storage)."""
        handle = handle if handle is not None else self.open(table)
        window = 4
        with self.guard("reading the table's history", table):
            while True:
                for entry in handle.history(window):
                    if entry.get(COMMIT_PROPERTY) == commit:
                        return int(entry["version"])
                if window >= look_back:
                    break
                window *= 8
        raise TableError(f"table {table!r} of OUTPUT {self.shown!r}: commit {commit} is not among its last "
                         f"{look_back} versions")

    # -- reading -----------------------------------------------------------------------------

    def dataset(self, table: str, version: int | dt.datetime | None = None) -> pads.Dataset | None:
        handle = self.open(table, version)
        if handle is None:
            return None
        with self.guard("reading the table", table):
            return handle.to_pyarrow_dataset()

    def read(self, table: str, columns: list[str] | None = None, filter: Any = None,
             version: int | dt.datetime | None = None) -> pa.Table:
        """Rows of one table (empty, with the right schema, when it does not exist yet), cast to the
        schema this code declares (a nested field's name, `element` vs `item`, differs in Delta)."""
        schema = TABLES[table]
        wanted = pa.schema([schema.field(c) for c in columns]) if columns else schema
        dataset = self.dataset(table, version)
        if dataset is None:
            return wanted.empty_table()
        with self.guard("reading the table", table):
            return dataset.to_table(columns=wanted.names, filter=filter).cast(wanted)

    def batches(self, table: str, columns: list[str] | None = None, filter: Any = None,
                batch_rows: int = 65_536, readahead: bool = True) -> Iterator[pa.RecordBatch]:
        """The rows in batches; `readahead=False` decodes one row group at a time instead of
        pyarrow's 16 batches of 4 files ahead (for readers that bound their memory)."""
        schema = TABLES[table]
        wanted = pa.schema([schema.field(c) for c in columns]) if columns else schema
        dataset = self.dataset(table)
        if dataset is None:
            return
        ahead = {} if readahead else {"batch_readahead": 1, "fragment_readahead": 1}
        with self.guard("reading the table", table):
            for batch in dataset.to_batches(columns=wanted.names, filter=filter, batch_size=batch_rows, **ahead):
                yield batch.cast(wanted)

    def changes(self, table: str, version: int) -> pa.Table:
        """The rows version `version` of `table` appended (its change feed), in this code's schema."""
        handle = self.open(table)
        if handle is None:
            return TABLES[table].empty_table()
        with self.guard("reading the table's change feed", table):
            rows = pa.table(handle.load_cdf(starting_version=version, ending_version=version).read_all())
        inserted = pa.compute.equal(rows.column("_change_type").cast(pa.string()), "insert")
        return rows.select(TABLES[table].names).cast(TABLES[table]).filter(inserted)

    def files(self, table: str) -> list[str]:
        """The Parquet files of the table's current version, as URLs (what DuckDB reads)."""
        handle = self.open(table)
        if handle is None:
            return []
        with self.guard("listing the table's files", table):
            return list(handle.file_uris())

    def version(self, table: str) -> int | None:
        handle = self.open(table)
        return None if handle is None else int(handle.version())

    def history(self, table: str, limit: int | None = None) -> list[dict[str, Any]]:
        handle = self.open(table)
        if handle is None:
            return []
        with self.guard("reading the table's history", table):
            return list(handle.history(limit))


class _Guard:
    """`TableStore.guard`: the boundary where delta-rs's and the store's errors become `OutputError`."""

    def __init__(self, store: TableStore, action: str, table: str | None) -> None:
        self.store, self.action, self.table = store, action, table

    def __enter__(self) -> None:
        self._storage = storage_guard(self.store.output, self.store.storage_options, self.action,
                                      self.store.fs, self.store.root)
        self._storage.__enter__()

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> bool:
        try:
            if self._storage.__exit__(kind, exc, tb):
                return True
        except OutputError:
            raise
        if exc is None or isinstance(exc, OutputError) or not _is_delta_error(exc):
            return False
        where = f"table {self.table!r} of OUTPUT {self.store.shown!r}" if self.table else f"OUTPUT {self.store.shown!r}"
        text = storage_errors.redact(_one_line(str(exc)) or type(exc).__name__, self.store.storage_options)
        raise TableError(f"{where}: {self.action} failed: {_advice(exc, text)}") from exc


def _is_delta_error(exc: BaseException) -> bool:
    module = type(exc).__module__ or ""
    return module.startswith(("deltalake", "arro3")) or type(exc).__name__ in (
        "DeltaError", "DeltaProtocolError", "CommitFailedError", "TableNotFoundError", "SchemaMismatchError")


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_XML = re.compile(r"<\?xml.*", re.DOTALL)
_BACKTRACE = re.compile(r"\s+0: (<unknown>|\S+ at ).*$")


def _one_line(text: str, limit: int = 400) -> str:
    """delta-rs's chained, coloured, multi-line error as one short line (no terminal codes, no XML body)."""
    text = _XML.sub("", _ANSI.sub("", text))
    text = " ".join(part.strip(" ↳") for part in text.splitlines() if part.strip(" ↳"))
    text = _BACKTRACE.sub("", text)
    return text if len(text) <= limit else text[:limit] + "..."


def _advice(exc: BaseException, text: str) -> str:
    """delta-rs's words plus what to do, by the kind of failure."""
    name = type(exc).__name__
    lowered = text.lower()
    if any(word in lowered for word in ("accessdenied", "access denied", "forbidden", " 403", "privileges")):
        return f"{text}; the store refused the request (access denied): check the credentials and their permissions"
    if name == "CommitFailedError":
        return (f"{text}; another writer kept committing to the same table at the same moment: run the command "
                "again (nothing of this commit is visible)")
    if "conditional" in lowered or "precondition" in lowered or "not implemented" in lowered:
        return (f"{text}; the store must support conditional writes (If-None-Match) for safe concurrent "
                "commits: AWS S3 and MinIO do")
    if "json error" in lowered or "_delta_log" in lowered or ("pars" in lowered and "parquet" not in lowered):
        return (f"{text}; its _delta_log is damaged or was written by another program: restore the log from a "
                "backup or copy of OUTPUT (committed data files are kept), or index into a new OUTPUT")
    return text
