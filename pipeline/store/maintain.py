"""Upkeep of an OUTPUT's tables (`pixelrefer maintain`): leftovers out, small files merged, old files gone.

Every run commit appends at least one Parquet file and one log entry per table it touches, so a
nightly index grows each table by hundreds of small files a year, and every reader (a query, a
run's start-up) pays for opening them all. `maintain` brings each table back to a few files:

1. **Leftovers** of commits that never reached `runs` (a killed run; `pipeline.store.commit`) are
   deleted, conservatively. A run that is writing right now has no `runs` row yet either, so age is
   what tells them apart: a run's rows go only when the newest table version that run appended
   (the commit metadata `pixelrefer.commit` in the table's history) is older than the retention.
   In the child tables only the rows of runs with no `runs` row at all are deleted; a run that
   committed some commits keeps the child rows of its lost commit (invisible, since their
   `videos` rows are gone) because a child row does not say which commit wrote it, and a wrong
   guess would delete committed rows. In `videos`, a row goes when its (run_id, commit_index) is
   not in `runs`. A run not found in the history (its log entries were cleaned up) counts as old
   as the oldest entry left. Nothing is deleted while `runs` is empty or missing: then there is no
   commit to tell a leftover from. `retain_hours=0` deletes a live run's rows too: only use it when
   no run is writing to OUTPUT.
2. **Compaction** (`optimize.compact`) rewrites the small files into few large ones; readers at
   the latest version see the same rows.
3. A **checkpoint**, then **log cleanup** (entries older than the table's log retention, 30 days
   by default), so opening a table reads one Parquet checkpoint instead of thousands of JSON files.
4. **Vacuum**: files no version newer than the retention needs are deleted. A reader (a query, the
   search index reading the change feed of an old `embeddings` version) that holds a version older
   than the retention loses its files: the retention must exceed the longest query and run; the
   search index rebuilds itself when the feed it wants is gone.

Then the search index (Lance) is compacted and its versions older than the retention removed,
under the search-index sync lock so no sync writes meanwhile, and the `_claims` table loses its
expired claims and is compacted and vacuumed the same way.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import random
import time
from typing import Any, Callable, Iterable, Mapping

import pyarrow.compute as pc

from pipeline.store.claims import CLAIMS, SyncLock
from pipeline.store.commit import PUBLISH_ORDER, committed_keys, split_commit
from pipeline.store.location import OutputError
from pipeline.store.tables import COMMIT_PROPERTY, TableError, TableStore, _deltalake, writer_properties

log = logging.getLogger(__name__)

#: Default retention: a week covers the longest run and query, and a weekend without maintenance.
DEFAULT_RETAIN_HOURS = 168
#: Active files per table above which `needs_maintenance` says so (`nightly` then runs `maintain`).
DEFAULT_MAX_FILES = 64
#: Commits that lose a race with another writer are tried again this often.
ATTEMPTS = 8
#: How long maintenance waits for a search-index sync before leaving the index for next time.
SEARCH_LOCK_WAIT_S = 60.0

Progress = Callable[[str], None]


@dataclasses.dataclass
class TableResult:
    """One table before and after: `rows_after == rows_before - leftover_rows` always."""

    table: str
    files_before: int = 0
    files_after: int = 0
    rows_before: int = 0
    rows_after: int = 0
    leftover_rows: int = 0
    leftover_commits: list[str] = dataclasses.field(default_factory=list)
    vacuumed_files: int = 0
    seconds: float = 0.0
    note: str | None = None


@dataclasses.dataclass
class SearchResult:
    """The search index's fragments before and after compaction (None: there is no index)."""

    fragments_before: int = 0
    fragments_after: int = 0
    rows: int = 0
    seconds: float = 0.0
    note: str | None = None


@dataclasses.dataclass
class MaintainResult:
    tables: dict[str, TableResult]
    claims: TableResult | None
    search: SearchResult | None
    retain_hours: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def needs_maintenance(store: TableStore, max_files: int = DEFAULT_MAX_FILES) -> bool:
    """Whether a table has more than `max_files` active files: the cheap check `nightly` makes
    after its final commit, so maintenance runs when reads start to slow down, not on a timer."""
    return any(len(store.files(table)) > max_files for table in PUBLISH_ORDER)


def maintain(store: TableStore, retain_hours: int = DEFAULT_RETAIN_HOURS,
             progress: Progress | None = None) -> MaintainResult:
    """Remove leftovers, compact, checkpoint, clean the log and vacuum every table, then the search
    index and the claims table (see the module docstring for what is deleted and when)."""
    if retain_hours < 0:
        raise OutputError(f"--retain-hours must be 0 or more, not {retain_hours}")
    say = progress or (lambda _: None)
    started = time.perf_counter()
    store.check_layout()
    now = dt.datetime.now(dt.timezone.utc)
    cutoff = now - dt.timedelta(hours=retain_hours)
    keys = committed_keys(store)
    tables: dict[str, TableResult] = {}
    for table in PUBLISH_ORDER:
        if store.exists(table):
            say(f"maintaining table {table}")
            tables[table] = _maintain_table(store, table, keys, cutoff, retain_hours)
    search = _maintain_search(store, retain_hours, say)
    claims = _maintain_claims(store, now, retain_hours, say)
    return MaintainResult(tables=tables, claims=claims, search=search, retain_hours=retain_hours,
                          seconds=time.perf_counter() - started)


# --------------------------------------------------------------------------------------------
# One table.
# --------------------------------------------------------------------------------------------


def _maintain_table(store: TableStore, table: str, keys: set[tuple[str, int]], cutoff: dt.datetime,
                    retain_hours: int) -> TableResult:
    started = time.perf_counter()
    handle = store.open(table)
    start_version = int(handle.version())
    result = TableResult(table, files_before=_file_count(store, table, handle), rows_before=_rows(store, table, handle))
    if table != "runs":
        if keys:
            predicate, result.leftover_commits = _leftovers(store, table, handle, keys, cutoff)
            if predicate:
                metrics = _retry(store, table, "deleting leftover rows", lambda h: h.delete(predicate))
                result.leftover_rows = int(metrics.get("num_deleted_rows") or 0)
        elif result.rows_before:
            result.note = "leftovers kept: `runs` has no commit yet to tell them from committed rows"
    _tidy(store, table, store.open, retain_hours, result)
    handle = store.open(table)
    result.files_after = _file_count(store, table, handle)
    result.rows_after = _rows(store, table, handle)
    appended = _appended_since(store, table, handle, start_version)
    if appended:
        result.note = f"{appended} row(s) appended by a run meanwhile"
    if result.rows_after != result.rows_before - result.leftover_rows + appended:
        raise TableError(f"table {table!r} of OUTPUT {store.shown!r}: maintenance changed its rows from "
                         f"{result.rows_before} to {result.rows_after} (removed {result.leftover_rows} leftovers, "
                         f"{appended} appended meanwhile); restore the version before it from the table's history "
                         "(`DeltaTable.restore`) and report this")
    result.seconds = time.perf_counter() - started
    return result


def _tidy(store: TableStore, table: str, opener: Callable[[str], Any], retain_hours: int,
          result: TableResult) -> None:
    """Compact, checkpoint, clean up the log and vacuum: the steps every table takes alike."""
    _retry(store, table, "compacting", lambda h: h.optimize.compact(writer_properties=writer_properties(table)), opener)
    with store.guard("writing a checkpoint", table):
        handle = opener(table)
        handle.create_checkpoint()
        handle.cleanup_metadata()
    present = _data_files(store, table)
    removed = _retry(store, table, "vacuuming", lambda h: h.vacuum(
        retention_hours=int(retain_hours), enforce_retention_duration=False, dry_run=False), opener)
    result.vacuumed_files = len(present & set(removed or []))


def _data_files(store: TableStore, table: str) -> set[str]:
    """The table's files on storage, relative to its folder: vacuum names every expired file of the
    log, also those an earlier vacuum deleted, so only these count as deleted now."""
    folder = store.path(table).rstrip("/")
    with store.guard("listing the table's folder", table):
        return {p[len(folder) + 1:] for p in store.fs.find(folder) if "/_delta_log/" not in p[len(folder):]}


def _retry(store: TableStore, table: str, action: str, step: Callable[[Any], Any],
           opener: Callable[[str], Any] | None = None) -> Any:
    """Run `step` on a freshly opened table, again when another writer committed first: maintenance
    runs beside index runs, and losing such a race is normal, not a failure."""
    deltalake = _deltalake()
    opener = opener or store.open
    for attempt in range(ATTEMPTS):
        try:
            with store.guard(action, table):
                return step(opener(table))
        except TableError as exc:
            if not isinstance(exc.__cause__, deltalake.exceptions.CommitFailedError) or attempt == ATTEMPTS - 1:
                raise
            log.info("table %s: %s lost a race with another writer; trying again", table, action)
            time.sleep(min(2.0, 0.1 * (attempt + 1)) * random.uniform(0.5, 1.5))
    raise AssertionError("unreachable")


def _file_count(store: TableStore, table: str, handle: Any) -> int:
    with store.guard("listing the table's files", table):
        return len(handle.file_uris())


def _rows(store: TableStore, table: str, handle: Any) -> int:
    """Rows from the files' statistics (delta-rs writes them); a scan only where a file has none."""
    with store.guard("counting the table's rows", table):
        counts = handle.get_add_actions().column("num_records").to_pylist()
        if all(c is not None for c in counts):
            return int(sum(counts))
        return int(handle.to_pyarrow_dataset().count_rows())


def _appended_since(store: TableStore, table: str, handle: Any, version: int) -> int:
    """Rows other writers appended after `version` (maintenance itself only deletes and rewrites)."""
    with store.guard("reading the table's history", table):
        entries = handle.history(max(1, int(handle.version()) - version))
    return sum(int((e.get("operationMetrics") or {}).get("num_added_rows") or 0) for e in entries
               if int(e["version"]) > version and e.get("operation") == "WRITE")


def _commit_times(store: TableStore, table: str, handle: Any) -> tuple[dict[str, dt.datetime], dt.datetime | None]:
    """The newest time each run commit ("run/index") appended to the table, and the oldest entry left."""
    with store.guard("reading the table's history", table):
        history = handle.history()
    times: dict[str, dt.datetime] = {}
    oldest = None
    for entry in history:
        when = dt.datetime.fromtimestamp(int(entry["timestamp"]) / 1000, dt.timezone.utc)
        oldest = when if oldest is None else min(oldest, when)
        key = entry.get(COMMIT_PROPERTY)
        if key:
            times[key] = max(times.get(key, when), when)
    return times, oldest


def _leftovers(store: TableStore, table: str, handle: Any, keys: set[tuple[str, int]],
               cutoff: dt.datetime) -> tuple[str | None, list[str]]:
    """The delete predicate for the table's old leftovers (None: none), and the commits they belong to."""
    runs = {run for run, _ in keys}
    columns = ["run_id", "commit_index"] if table == "videos" else ["run_id"]
    with store.guard("reading the table's runs", table):
        rows = handle.to_pyarrow_dataset().to_table(columns=columns)
    if table == "videos":
        indexes = pc.fill_null(rows.column("commit_index"), 0)
        found = set(zip(rows.column("run_id").to_pylist(), indexes.to_pylist()))
        lost = {(run, int(index)) for run, index in found if (run, int(index)) not in keys}
    else:
        lost = {(run, None) for run in pc.unique(rows.column("run_id")).to_pylist() if run not in runs}
    if not lost:
        return None, []
    times, oldest = _commit_times(store, table, handle)
    by_run: dict[str, dt.datetime] = {}
    for key, when in times.items():
        run, _ = split_commit(key)
        by_run[run] = max(by_run.get(run, when), when)

    def age(run: str, index: int | None) -> dt.datetime | None:
        when = times.get(f"{run}/{index}") if index is not None else by_run.get(run)
        return when if when is not None else oldest

    old = sorted((run, index) for run, index in lost if (when := age(run, index)) is not None and when < cutoff)
    if not old:
        return None, []
    whole = sorted({run for run, index in old if index is None})
    clauses = [f"run_id IN ({', '.join(_quote(r) for r in whole)})"] if whole else []
    for run, index in old:
        if index is not None:
            null = " OR commit_index IS NULL" if index == 0 else ""
            clauses.append(f"(run_id = {_quote(run)} AND (commit_index = {int(index)}{null}))")
    shown = [run if index is None else f"{run}/{index}" for run, index in old]
    log.info("table %s: deleting leftovers of %d uncommitted commit(s): %s", table, len(shown), ", ".join(shown))
    return " OR ".join(clauses), shown


def _quote(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


# --------------------------------------------------------------------------------------------
# The search index and the claims table.
# --------------------------------------------------------------------------------------------


def _maintain_search(store: TableStore, retain_hours: int, say: Progress) -> SearchResult | None:
    """Compact the Lance dataset and drop its old versions, holding the sync lock meanwhile."""
    from pipeline.search.index import DATASET, SEARCH_FOLDER, SearchIndexUnsupported, SearchLocation, _lance

    with store.guard("looking for the search index"):
        if not store.fs.exists(store.path(SEARCH_FOLDER, DATASET)):
            return None
    started = time.perf_counter()
    try:
        location = SearchLocation.of(store.output, store.storage_options)
    except SearchIndexUnsupported as exc:
        return SearchResult(note=str(exc))
    say("maintaining the search index")
    try:
        with SyncLock(store, wait_s=SEARCH_LOCK_WAIT_S):
            dataset = _lance().dataset(location.uri, storage_options=location.options)
            result = SearchResult(fragments_before=len(dataset.get_fragments()))
            dataset.optimize.compact_files()
            dataset.cleanup_old_versions(older_than=dt.timedelta(hours=retain_hours))
            dataset = _lance().dataset(location.uri, storage_options=location.options)
            result.fragments_after = len(dataset.get_fragments())
            result.rows = dataset.count_rows()
    except OutputError as exc:
        return SearchResult(note=f"search index left as it is: {exc}", seconds=time.perf_counter() - started)
    except (OSError, ValueError, RuntimeError) as exc:
        raise OutputError(f"OUTPUT {store.shown!r}: compacting the search index failed ({type(exc).__name__}: "
                          f"{exc}); the tables are maintained, the index is unchanged or compacted") from exc
    result.seconds = time.perf_counter() - started
    return result


def _maintain_claims(store: TableStore, now: dt.datetime, retain_hours: int, say: Progress) -> TableResult | None:
    """Expired claims mean nothing (a claim merge overwrites them), so they go, then the table is tidied."""
    if not store.exists(CLAIMS):
        return None
    say("maintaining the claims table")
    started = time.perf_counter()
    deltalake = _deltalake()

    def opener(_: str) -> Any:
        return deltalake.DeltaTable(store.uri(CLAIMS), storage_options=store.rust_options or None)

    with store.guard("opening the claims table", CLAIMS):
        handle = opener(CLAIMS)
    result = TableResult(CLAIMS, files_before=_file_count(store, CLAIMS, handle), rows_before=_rows(store, CLAIMS, handle))
    metrics = _retry(store, CLAIMS, "deleting expired claims",
                     lambda h: h.delete(f"expires_at < '{now.isoformat()}'"), opener)
    result.leftover_rows = int(metrics.get("num_deleted_rows") or 0)
    _tidy(store, CLAIMS, opener, retain_hours, result)
    with store.guard("opening the claims table", CLAIMS):
        handle = opener(CLAIMS)
    result.files_after = _file_count(store, CLAIMS, handle)
    result.rows_after = _rows(store, CLAIMS, handle)
    result.seconds = time.perf_counter() - started
    return result


def summary_rows(result: MaintainResult) -> Iterable[Mapping[str, Any]]:
    """One row per table for a printed summary (the CLI and the bench)."""
    for item in [*result.tables.values(), *([result.claims] if result.claims else [])]:
        yield {"table": item.table, "files": f"{item.files_before} -> {item.files_after}",
               "rows": f"{item.rows_before} -> {item.rows_after}", "leftovers": item.leftover_rows,
               "vacuumed": item.vacuumed_files, "seconds": round(item.seconds, 2), "note": item.note or ""}
