"""`pixelrefer migrate`: convert an OUTPUT of the pre-Delta Parquet layout into Delta tables, in place.

The old layout (the former `pipeline.sink`) kept each table as ``<table>/run_id=<id>/part-cCCCC-NNNNN.parquet``
(``part-NNNNN.parquet`` before long runs committed several times: commit 0), staged runs under
``_staging/`` and a derived search index under ``_search/``. The Delta table of a table lives in the
same folder (``<table>/_delta_log`` and unpartitioned data files beside the ``run_id=`` folders), so
the conversion never has to move an old file and never touches one until the very end:

1. Refuse what cannot be converted faithfully, before writing anything: a half-published old run
   (a ``_COMMIT`` marker in ``_staging``; `drop_unfinished` accepts losing it), the first contract
   (masks nested in ``objects.frames``, no ``clips``), files the old writer never wrote.
2. Append each table's old files to its Delta table in batches of many files (bounded memory, few
   Delta commits), children first and ``runs`` last (`PUBLISH_ORDER`), filling the columns schema
   version 2 added: ``videos.commit_index`` from each file's name, ``runs.embeddings_version`` null.
3. Check that every table holds as many rows as its old files, then write ``_MIGRATED`` (the counts)
   and only then delete the ``run_id=`` folders, ``_staging/`` and ``_search/`` (rebuilt by the next
   sync or `pixelrefer embed`), and ``_MIGRATED`` last.

Run again after a crash, it resumes: with ``_MIGRATED`` present it only finishes the deletions; a
table with both a log and old folders was converted (equal counts: kept) or cut mid-write (its Delta
files and log are deleted and it is converted again). Migration appends are tagged ``_migrate/<n>``
(never a run id), so a Delta table that also holds rows of a real run is never deleted: that mix is
refused instead.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Sequence

import pyarrow as pa
import pyarrow.dataset as pads

from pipeline.store.commit import PUBLISH_ORDER, visible_videos
from pipeline.store.location import OutputError
from pipeline.store.tables import COMMIT_PROPERTY, LOG, TableStore
from schemas.tables import TABLES, SchemaError, to_table

log = logging.getLogger(__name__)

#: Commit key prefix of the appends a migration makes: '_' cannot start a run id, so never a run's.
MIGRATION_TAG = "_migrate"
#: Written once every table is converted and counted; its presence means "only deletions are left".
DONE_MARKER = "_MIGRATED"
STAGING = "_staging"
COMMIT_MARKER = "_COMMIT"
SEARCH = "_search"
#: Columns schema version 2 added; the old files do not have them.
NEW_COLUMNS: dict[str, tuple[str, ...]] = {"videos": ("commit_index",), "runs": ("embeddings_version",)}
#: The tables the pre-Delta layout had; those added since (`tracklets`) are created by the first run
#: that writes them, so an old index converts without them and reads them as empty.
LEGACY_TABLES: tuple[str, ...] = tuple(t for t in PUBLISH_ORDER if t != "tracklets")
_PART = re.compile(r"^part-(?:c(\d+)-)?\d+\.parquet$")
_FOOTER_THREADS = 16


def old_schema(table: str) -> pa.Schema:
    """The schema of `table` in the pre-Delta layout: today's minus the columns version 2 added."""
    return pa.schema([f for f in TABLES[table] if f.name not in NEW_COLUMNS.get(table, ())])


@dataclasses.dataclass(frozen=True)
class BatchLimits:
    """How many old files one Delta append takes: few commits for thousands of files, bounded memory."""

    files: int = 256
    rows: int = 250_000
    bytes: int = 64 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class LegacyFile:
    path: str
    run_id: str
    commit_index: int
    rows: int
    size: int
    columns: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True)
class TableCount:
    table: str
    old_rows: int
    new_rows: int
    #: Converted by an earlier `migrate` that stopped before deleting the old folders.
    resumed: bool = False

    def line(self) -> str:
        note = " (converted by the interrupted earlier migrate)" if self.resumed else ""
        return f"{self.table}: {self.old_rows} old rows -> {self.new_rows} Delta rows{note}"


@dataclasses.dataclass
class MigrationReport:
    already_migrated: bool = False
    tables: list[TableCount] = dataclasses.field(default_factory=list)
    #: `videos` rows whose commit has no `runs` row: never committed in the old layout either.
    hidden_videos: int = 0
    dropped_unfinished: list[str] = dataclasses.field(default_factory=list)

    def lines(self, shown: str) -> list[str]:
        if self.already_migrated:
            return [f"OUTPUT {shown!r} is already migrated (every table is a Delta table)"]
        out = [t.line() for t in self.tables]
        if self.hidden_videos:
            out.append(f"note: {self.hidden_videos} videos rows have no runs row for their commit (their run never "
                       "finished committing): they stay invisible, as they were to most readers")
        if self.dropped_unfinished:
            out.append(f"note: dropped the unfinished run(s) {', '.join(self.dropped_unfinished)}: index them again")
        out.append(f"OUTPUT {shown!r} is migrated to Delta tables; the search index is rebuilt by `pixelrefer embed` "
                   "or the next index run")
        return out


@dataclasses.dataclass
class _Plan:
    table: str
    files: list[LegacyFile]

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)


def migrate(store: TableStore, *, drop_unfinished: bool = False, limits: BatchLimits = BatchLimits(),
            progress: Callable[[str], None] | None = None) -> MigrationReport:
    """Convert `store`'s OUTPUT from the pre-Delta layout; see the module docstring for the steps."""
    say = progress or (lambda _msg: None)
    store.require_location()
    fs = store.fs
    legacy = store.legacy_tables()
    marker = store.path(DONE_MARKER)
    with store.guard("reading the migration marker"):
        done = json.loads(fs.cat_file(marker)) if fs.exists(marker) else None
    if done is not None:
        if legacy:
            raise OutputError(f"OUTPUT {store.shown!r}: a finished migration's marker {DONE_MARKER} is there, yet "
                              f"tables {', '.join(legacy)} were written in the pre-Delta layout since (by an older "
                              "pixelrefer); move their run_id=... folders out of OUTPUT, then run migrate again")
        say("the conversion was done by an earlier migrate; deleting the old layout's folders")
        _delete_old(store)
        counts = [TableCount(t, int(o), int(n), resumed=True) for t, (o, n) in done["tables"].items()]
        return MigrationReport(tables=counts, hidden_videos=int(done.get("hidden_videos", 0)),
                               dropped_unfinished=list(done.get("dropped_unfinished", [])))
    delta = [t for t in TABLES if store.exists(t)]
    leftover = [t for t in delta if _run_folders(store, t)]
    if not legacy and not leftover:
        if not delta:
            raise OutputError(f"OUTPUT {store.shown!r} holds no pixelrefer tables (neither Delta tables nor "
                              "run_id=... folders): nothing to migrate; check the path")
        return MigrationReport(already_migrated=True)

    unfinished = unfinished_runs(store)
    if unfinished and not drop_unfinished:
        raise OutputError(
            f"OUTPUT {store.shown!r} holds run(s) {', '.join(unfinished)} that the previous pixelrefer was still "
            f"publishing ({STAGING}/<run>/{COMMIT_MARKER}); finish them by running any index command of that version "
            "on this OUTPUT first, or pass --drop-unfinished to migrate without them (their rows are lost)")
    for table in delta:
        foreign = _foreign_versions(store, table)
        if foreign:
            raise OutputError(
                f"OUTPUT {store.shown!r} mixes layouts: table {table!r} is a Delta table with commits of index runs "
                f"(versions {foreign[:5]}) while {', '.join(legacy + leftover)} still hold(s) pre-Delta run_id=... "
                "folders; move those folders out of OUTPUT (or into a new OUTPUT to migrate there)")

    plans = {t: _plan(store, t) for t in PUBLISH_ORDER if t in legacy or t in leftover}
    _refuse_first_contract(store, plans)

    counts: list[TableCount] = []
    for table in PUBLISH_ORDER:
        if table not in plans:
            continue
        plan = plans[table]
        resumed = False
        if store.exists(table):
            have = _delta_rows(store, table)
            if have == plan.rows:
                resumed = True
            else:
                say(f"{table}: an earlier migrate was cut while writing it ({have} of {plan.rows} rows); converting "
                    "it again")
                _drop_delta(store, table)
        if not resumed:
            say(f"{table}: converting {len(plan.files)} file(s), {plan.rows} rows")
            _convert(store, plan, limits)
        have = _delta_rows(store, table)
        if have != plan.rows:
            raise OutputError(f"OUTPUT {store.shown!r}: table {table!r} has {have} Delta rows after converting "
                              f"{plan.rows} old rows; nothing old was deleted: run migrate again")
        counts.append(TableCount(table, plan.rows, have, resumed))

    hidden = _hidden_videos(store) if "videos" in plans else 0
    summary = {"tables": {c.table: [c.old_rows, c.new_rows] for c in counts}, "hidden_videos": hidden,
               "dropped_unfinished": unfinished}
    with store.guard("writing the migration marker"):
        fs.pipe_file(marker, json.dumps(summary).encode())
    say("every table is converted; deleting the old layout's folders")
    _delete_old(store)
    return MigrationReport(tables=counts, hidden_videos=hidden, dropped_unfinished=unfinished)


def unfinished_runs(store: TableStore) -> list[str]:
    """Old runs whose publish was interrupted: their staging folder still holds its `_COMMIT` marker."""
    with store.guard("looking for unfinished runs"):
        found = store.fs.glob(store.path(STAGING, "*", COMMIT_MARKER))
    return sorted(posixpath.basename(posixpath.dirname(p.rstrip("/"))) for p in found)


# -- reading the old layout ----------------------------------------------------------------------


def _names(store: TableStore, folder: str) -> list[tuple[str, str, str]]:
    """(path, name, type) of the entries of `folder`; none when it is missing."""
    with store.guard("listing the table's folder"):
        if not store.fs.exists(folder):
            return []
        entries = store.fs.ls(folder, detail=True)
    _forget_listings(store)
    return [(e["name"].rstrip("/"), posixpath.basename(e["name"].rstrip("/")), e.get("type", "")) for e in entries]


def _run_folders(store: TableStore, table: str) -> list[str]:
    return sorted(p for p, name, kind in _names(store, store.path(table))
                  if kind == "directory" and name.startswith("run_id="))


def _plan(store: TableStore, table: str) -> _Plan:
    """Every old file of `table`, with its run, commit and row count (from the footers, in parallel)."""
    folder = store.path(table)
    if not store.exists(table):
        loose = [name for _, name, kind in _names(store, folder) if kind != "directory" and name.endswith(".parquet")]
        if loose:
            raise OutputError(f"OUTPUT {store.shown!r}: table {table!r} has Parquet files outside run_id=... folders "
                              f"({', '.join(loose[:3])}), which pixelrefer never wrote; move them out of OUTPUT")
    found: list[tuple[str, int, str]] = []
    with store.guard("listing the table's old files", table):
        for run_folder in _run_folders(store, table):
            run_id = posixpath.basename(run_folder).split("=", 1)[1]
            for path, info in sorted(store.fs.find(run_folder, detail=True).items()):
                if path.endswith(".parquet"):
                    found.append((path, int(info.get("size") or 0), run_id))
    _forget_listings(store)
    if not found:
        return _Plan(table, [])
    dataset = _dataset(store, table, [p for p, _, _ in found])
    with store.guard("reading the old files' footers", table), ThreadPoolExecutor(_FOOTER_THREADS) as pool:
        footers = list(pool.map(_footer, dataset.get_fragments()))
    by_path = dict(footers)
    files = []
    for path, size, run_id in found:
        names, rows = by_path[path]
        _check_columns(store, table, path, names)
        files.append(LegacyFile(path, run_id, _commit_index(store, table, path), rows, size, frozenset(names)))
    return _Plan(table, files)


def _dataset(store: TableStore, table: str, paths: Sequence[str]) -> pads.Dataset:
    """The old files as one dataset: `run_id` typed as a string, from the hive folder where a file lacks it."""
    hive = pads.partitioning(pa.schema([("run_id", pa.string())]), flavor="hive")
    with store.guard("opening the old files", table):
        return pads.dataset(list(paths), schema=old_schema(table), format="parquet", filesystem=store.fs,
                            partitioning=hive, partition_base_dir=store.path(table))


def _footer(fragment: Any) -> tuple[str, tuple[set[str], int]]:
    fragment.ensure_complete_metadata()  # one footer read gives both the columns and the row count
    return fragment.path, (set(fragment.physical_schema.names), int(fragment.metadata.num_rows))


def _forget_listings(store: TableStore) -> None:
    """Drop fsspec's cached listings: delta-rs writes behind its back, and a stale listing of a table's
    folder (s3fs caches them) would hide the `_delta_log` the conversion just created."""
    store.fs.invalidate_cache()


def _check_columns(store: TableStore, table: str, path: str, names: set[str]) -> None:
    if table == "objects" and "frames" in names or table == "videos" and "clips" not in names:
        return  # the first contract: refused as a whole by `_refuse_first_contract`
    schema = old_schema(table)
    extra = sorted(names - set(schema.names))
    missing = sorted(f.name for f in schema if not f.nullable and f.name not in names and f.name != "run_id")
    if extra or missing:
        raise OutputError(f"OUTPUT {store.shown!r}: table {table!r} file {path!r} does not have the pre-Delta "
                          f"schema (unexpected columns {extra}, missing {missing}); it was not written by pixelrefer: "
                          "move it out of OUTPUT, or index the sources into a new OUTPUT")


def _commit_index(store: TableStore, table: str, path: str) -> int:
    match = _PART.match(posixpath.basename(path))
    if match:
        return int(match.group(1) or 0)
    if table == "videos":
        raise OutputError(f"OUTPUT {store.shown!r}: table 'videos' file {path!r} is not named part-cCCCC-NNNNN.parquet "
                          "or part-NNNNN.parquet, so its run commit is unknown; it was not written by pixelrefer")
    return 0


def _refuse_first_contract(store: TableStore, plans: dict[str, _Plan]) -> None:
    """The first contract (masks in `objects.frames`, no `clips`) has no faithful Delta form: refuse it."""
    first: set[str] = set()
    current = {f.run_id for t in ("clips", "masks") if t in plans for f in plans[t].files}
    for table, test in (("objects", lambda n: "frames" in n), ("videos", lambda n: "clips" not in n)):
        if table not in plans:
            continue
        for part in plans[table].files:
            (first if test(part.columns) else current).add(part.run_id)
    if not first:
        return
    run = sorted(first)[0]
    if current - first:
        detail = (f"mixes runs of the first pixelrefer layout (masks in objects.frames, no clips table; e.g. run {run}) "
                  f"with runs of the later one (e.g. run {sorted(current - first)[0]})")
    else:
        detail = f"was written by the first pixelrefer layout (masks in objects.frames, no clips table; e.g. run {run})"
    raise OutputError(f"OUTPUT {store.shown!r} {detail}, which cannot be converted to Delta tables: re-index the "
                      "sources into a new OUTPUT with `pixelrefer index SOURCE NEW_OUTPUT ...`")


# -- writing the Delta tables ----------------------------------------------------------------------


def _batches(files: list[LegacyFile], limits: BatchLimits) -> Iterator[list[LegacyFile]]:
    batch: list[LegacyFile] = []
    for part in files:
        if batch and (len(batch) >= limits.files or sum(f.rows for f in batch) + part.rows > limits.rows
                      or sum(f.size for f in batch) + part.size > limits.bytes):
            yield batch
            batch = []
        batch.append(part)
    if batch:
        yield batch


def _convert(store: TableStore, plan: _Plan, limits: BatchLimits) -> None:
    """Append the old files to the (new, empty) Delta table, one commit per batch of files."""
    table = plan.table
    store.ensure(table)
    schema = old_schema(table)
    for number, batch in enumerate(_batches(plan.files, limits)):
        index = {f.path: f for f in batch}
        parts = []
        dataset = _dataset(store, table, list(index))
        for fragment in dataset.get_fragments():
            try:
                with store.guard("reading an old file", table):
                    rows = fragment.to_table(schema=schema)
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
                raise OutputError(f"OUTPUT {store.shown!r}: table {table!r} file {fragment.path!r} cannot be read "
                                  f"as the pre-Delta schema: {exc}") from exc
            if table == "videos":
                commit = pa.array([index[fragment.path].commit_index] * rows.num_rows, pa.int32())
                rows = rows.append_column(TABLES["videos"].field("commit_index"), commit)
            parts.append(rows)
        data = pa.concat_tables(parts)
        if table == "runs":
            data = data.append_column(TABLES["runs"].field("embeddings_version"), pa.nulls(data.num_rows, pa.int64()))
        try:
            data = to_table(table, data)
        except SchemaError as exc:
            raise OutputError(f"OUTPUT {store.shown!r}: table {table!r}: old rows of run(s) "
                              f"{', '.join(sorted({f.run_id for f in batch}))} do not validate: {exc}") from exc
        store.append(table, data, commit=f"{MIGRATION_TAG}/{number}")


def _delta_rows(store: TableStore, table: str) -> int:
    dataset = store.dataset(table)
    if dataset is None:
        return 0
    with store.guard("counting the table's rows", table):
        return int(dataset.count_rows())


def _foreign_versions(store: TableStore, table: str) -> list[int]:
    """Versions of `table` that neither created it nor were appended by a migration."""
    return sorted(int(e["version"]) for e in store.history(table)
                  if e.get("operation") != "CREATE TABLE"
                  and not str(e.get(COMMIT_PROPERTY) or "").startswith(f"{MIGRATION_TAG}/"))


def _drop_delta(store: TableStore, table: str) -> None:
    """Delete a cut conversion's Delta files, the log last, leaving every `run_id=` folder alone."""
    folder = store.path(table)
    with store.guard("deleting an interrupted conversion", table):
        for path, name, _kind in _names(store, folder):
            if name != LOG and not name.startswith("run_id="):
                store.fs.rm(path, recursive=True)
        store.fs.rm(posixpath.join(folder, LOG), recursive=True)
    store.forget(table)


def _hidden_videos(store: TableStore) -> int:
    total = _delta_rows(store, "videos")
    return total - visible_videos(store, ["video_id"]).num_rows


def _delete_old(store: TableStore) -> None:
    """The last step: the old layout's folders, then the marker that said only this was left."""
    with store.guard("deleting the old layout's folders"):
        for table in TABLES:
            for folder in _run_folders(store, table):
                store.fs.rm(folder, recursive=True)
        for name in (STAGING, SEARCH, DONE_MARKER):
            path = store.path(name)
            if store.fs.exists(path):
                store.fs.rm(path, recursive=True)
