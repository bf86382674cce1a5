"""The search index of an OUTPUT: what `--like` reads instead of scanning every vector.

The `embeddings` table stays the record of every vector. Ranking it exactly means reading all of
it per query: 25 s at a million captions (`bench.search`), most of it BM25 re-tokenizing every
caption. This index is a copy of the passages of each video's latest ok run in a Lance dataset
(`OUTPUT/_search/passages.lance`) with two indexes Lance keeps on object storage beside the data:

- IVF_PQ over the vectors (cosine), once there are `ANN_MIN_ROWS` passages; below that Lance
  compares every vector, which is exact and takes milliseconds at that size;
- an inverted index over the text (lower-cased, English stop words dropped, stemmed), which Lance
  scores with BM25.

Lance, not DuckDB's `vss`: the `duckdb-extension-vss` wheel exists only for DuckDB 1.5 (the lock
has 2.0), and its HNSW index lives in a DuckDB database file, not beside Parquet on object storage.
FAISS would need a second store for the rows and a hand-made BM25 side.

`sync` brings the copy up to date from the committed tables; it is idempotent and cheap when
nothing changed. It runs after every commit of an index run and in `pixelrefer embed`. What it has
seen is the set of (run, commit) of the `runs` table, written last to `_search/state.json`; a query
uses the index only when that set equals the `runs` table's, so a stale index is never read (the
query then ranks exactly; `SearchIndex.open` says why). A sync reads only what the commits it has
not seen appended: each commit's vectors from the `embeddings` change feed at the version its
`runs` row names (`runs.embeddings_version`), so a long run's earlier commits are never read again.
It replaces any rows of those commits that a sync stopped half-way left, and deletes the passages
that are no longer their source's latest ok run (a re-indexed or replaced file, a removed one).
When the feed of an old version is gone (vacuumed), it rebuilds from the tables.

One sync at a time per OUTPUT: a sync holds a claim (`pipeline.store.claims`) on the index while
it runs; a second waits for it. A state that cannot be read because the store failed is an error
(the index is kept); only a missing state, or one that is not valid JSON, means "rebuild".
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import logging
import os
import posixpath
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.storage_errors import redact, redact_url
from pipeline.store.commit import commit_key, committed_keys, split_commit, visible_videos
from pipeline.store.location import OutputError, UnsupportedStore, filesystem, object_store_options, rust_url
from pipeline.store.tables import TableError, TableStore

os.environ.setdefault("LANCE_LOG", "error")  # Lance's Rust logger: its notices are not the user's business

log = logging.getLogger(__name__)

SEARCH_FOLDER = "_search"
DATASET = "passages.lance"
STATE = "state.json"
#: Passages from which the vectors get an IVF_PQ index; below it, exact search is as fast.
ANN_MIN_ROWS = 65_536
#: IVF lists are sized to about this many vectors (Lance's guidance is a few thousand).
ROWS_PER_PARTITION = 4_096
#: The lists are trained again once the passages are this many times those they were trained on.
ANN_RETRAIN_GROWTH = 4
#: Dimensions per PQ sub-vector: 256-d vectors keep 32 bytes each (32 MB a million).
DIMS_PER_SUB_VECTOR = 8
#: Fragments after which a sync compacts the dataset (each sync appends at least one).
COMPACT_AFTER_FRAGMENTS = 64
#: Versions older than this are removed after a sync (a query opens the latest version).
KEEP_VERSIONS = dt.timedelta(hours=1)
FTS_OPTIONS = {"base_tokenizer": "simple", "language": "English", "stem": True, "remove_stop_words": True,
               "lower_case": True, "with_position": False}
#: The dataset's columns and indexes as this code writes them; a state of another version is rebuilt.
LAYOUT_VERSION = 1
SCALAR_INDEXES = {"video_id": "BTREE", "labels": "LABEL_LIST"}
COLUMNS = ("video_id", "text_run_id", "kind", "object_ids", "clip_index", "ts_start", "ts_end", "text", "labels")


class SearchIndexError(OutputError):
    """The search index cannot be read or written (the tables themselves are unaffected)."""


class SearchIndexUnsupported(SearchIndexError):
    """OUTPUT is on a store, or has options, the search index cannot use: `--like` ranks exactly."""


def _lance() -> Any:
    """Lance, imported only where a search index is touched (it is heavy: a Rust runtime).

    Lance warns at every fork of the process after its import. The only forks a pipeline driver
    makes after a sync are subprocesses that exec at once (Ray starting its processes), which never
    call into Lance, so that warning is noise here and is silenced, by its text, for them alone."""
    warnings.filterwarnings("ignore", message="lance is not fork-safe", category=UserWarning)
    import lance

    return lance


@dataclass(frozen=True)
class SearchLocation:
    """Where the Lance dataset of an OUTPUT lives, in the URL and options Lance itself takes."""

    uri: str
    options: dict[str, str]

    @classmethod
    def of(cls, output: str, storage_options: Mapping[str, Any] | None = None,
           dataset: str = DATASET) -> "SearchLocation":
        """Local folders and S3 (s3fs's options translated to Lance's); other stores raise, since
        their fsspec options have no faithful translation, and `--like` then ranks exactly."""
        fs, root = filesystem(output, storage_options)
        try:
            return cls(rust_url(fs, posixpath.join(root, SEARCH_FOLDER, dataset)),
                       object_store_options(fs, storage_options))
        except UnsupportedStore as exc:
            raise SearchIndexUnsupported(f"no search index: {exc}") from exc


def lance_s3_options(options: Mapping[str, Any]) -> dict[str, str]:
    """s3fs's storage options as Lance's (object_store's; `pipeline.store.location`)."""
    import fsspec

    try:
        return object_store_options(fsspec.filesystem("s3", skip_instance_cache=True), options)
    except UnsupportedStore as exc:
        raise SearchIndexUnsupported(str(exc)) from exc


def committed(output: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """The index's commits as sorted `commit_key`s: what a sync has seen."""
    return _commit_keys(committed_keys(TableStore(output, storage_options)))


def _commit_keys(keys: Iterable[tuple[str, int]]) -> list[str]:
    return sorted(commit_key(run_id, commit_index) for run_id, commit_index in keys)


def _state_path(output: str, storage_options: Mapping[str, Any] | None, name: str = STATE) -> tuple[Any, str]:
    fs, root = filesystem(output, storage_options)
    return fs, posixpath.join(root, SEARCH_FOLDER, name)


def read_state(output: str, storage_options: Mapping[str, Any] | None = None,
               name: str = STATE) -> dict[str, Any] | None:
    """What the last sync wrote (None: never synced, unreadable, or written for another layout of
    the dataset, `LAYOUT_VERSION`: the next sync rebuilds it)."""
    fs, path = _state_path(output, storage_options, name)
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        return None
    except OSError as exc:  # the store failed: not the same as no state; never rebuild on it
        raise SearchIndexError(redact(f"the search index state of OUTPUT {redact_url(output)!r} could not be read "
                                      f"({type(exc).__name__}: {exc}); the index is kept, try again",
                                      storage_options)) from exc
    try:
        state = json.loads(raw)
    except ValueError as exc:
        log.warning("search index state %s is not valid JSON (%s): it will be rebuilt", path, exc)
        return None
    return state if isinstance(state, dict) and state.get("layout") == LAYOUT_VERSION else None


def current_runs(videos: pa.Table) -> dict[str, str]:
    """video_id -> run, for each source's latest ok run (`pipeline.store.commit.latest_by_uri`, the
    rule of the `latest_videos` view): passages of any other (video, run) are stale."""
    from pipeline.store.commit import latest_by_uri

    return {row["video_id"]: row["run_id"] for row in latest_by_uri(videos).values()}


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _in(column: str, values: Iterable[str]) -> str:
    return f"{column} IN ({', '.join(_quote(v) for v in sorted(set(values)))})"


def sub_vectors(dim: int) -> int:
    """PQ sub-vectors for `dim`: about one per `DIMS_PER_SUB_VECTOR` dims, and a divisor of dim."""
    target = max(1, dim // DIMS_PER_SUB_VECTOR)
    return max(d for d in range(1, target + 1) if dim % d == 0)


@dataclass
class SyncResult:
    rows: int = 0
    added: int = 0
    removed: int = 0
    ann: bool = False
    up_to_date: bool = False
    seconds: float = 0.0
    steps: dict[str, float] = field(default_factory=dict)
    then: Any = None


def passages(embeddings: pa.Table, labels: Mapping[tuple[str, str, int], str], dim: int, commit: str) -> pa.Table:
    """Embeddings rows as the dataset's rows: captions get `object_ids` [object_id] (one column
    for both kinds), each passage the lower-cased labels of its objects (`--label` filters on
    them inside the search), the vector a fixed-size list (what Lance indexes), and `commit` the
    "run/commit" that wrote it (what a sync replaces)."""
    ids = [[r["object_id"]] if r["kind"] == "caption" else list(r["object_ids"] or [])
           for r in embeddings.select(["kind", "object_id", "object_ids"]).to_pylist()]
    video, text_run = embeddings.column("video_id").to_pylist(), embeddings.column("text_run_id").to_pylist()
    row_labels = [sorted({labels[(v, t, o)] for o in objs if (v, t, o) in labels})
                  for v, t, objs in zip(video, text_run, ids)]
    flat = pc.list_flatten(embeddings.column("vector").combine_chunks())
    return pa.table({
        "video_id": embeddings.column("video_id"), "text_run_id": embeddings.column("text_run_id"),
        "commit": pa.array([commit] * embeddings.num_rows, pa.string()), "kind": embeddings.column("kind"),
        "object_ids": pa.array(ids, pa.list_(pa.int32())), "clip_index": embeddings.column("clip_index"),
        "ts_start": embeddings.column("ts_start"), "ts_end": embeddings.column("ts_end"),
        "text": embeddings.column("text"), "labels": pa.array(row_labels, pa.list_(pa.string())),
        "vector": pa.FixedSizeListArray.from_arrays(flat.cast(pa.float32()), dim),
    })


def _labels(store: TableStore, runs: Iterable[str]) -> dict[tuple[str, str, int], str]:
    objects = store.read("objects", columns=["video_id", "run_id", "object_id", "label"],
                         filter=pc.field("run_id").isin(sorted(set(runs))))
    return {(r["video_id"], r["run_id"], r["object_id"]): r["label"].strip().lower()
            for r in objects.to_pylist() if r["label"] and r["label"].strip()}


def sync(output: str, storage_options: Mapping[str, Any] | None = None, *, rebuild: bool = False,
         progress: Callable[[str], None] | None = None, then: Callable[..., Any] | None = None) -> SyncResult:
    """Bring OUTPUT's search index up to date with its committed tables (see the module docstring).

    The new passages stream from Parquet into Lance in batches, so a rebuild over millions of
    vectors holds one batch at a time, not the table. Lance's own errors (it does its own I/O)
    become `SearchIndexError` naming OUTPUT, without credentials. `then(store, rebuild, progress)`
    runs after, under the same claim (another dataset of the folder, `pipeline.search.appearance`);
    what it returns is the result's `then`."""
    try:
        return _sync(output, storage_options, rebuild=rebuild, progress=progress, then=then)
    except OutputError:
        raise
    except (OSError, ValueError, RuntimeError) as exc:
        raise SearchIndexError(redact(f"the search index of OUTPUT {redact_url(output)!r} could not be updated "
                                      f"({type(exc).__name__}: {exc}); the tables are unaffected",
                                      storage_options)) from exc


def _sync(output: str, storage_options: Mapping[str, Any] | None, *, rebuild: bool,
          progress: Callable[[str], None] | None, then: Callable[..., Any] | None = None) -> SyncResult:
    from pipeline.store.claims import SyncLock

    options = dict(storage_options or {})
    location = SearchLocation.of(output, options)
    store = TableStore(output, options)
    with SyncLock(store, wait_s=SYNC_WAIT_S):
        result = _sync_locked(store, location, rebuild=rebuild, progress=progress)
        if then is not None:
            result.then = then(store, rebuild, progress)
        return result


#: How long a sync waits for another one of the same OUTPUT to finish.
SYNC_WAIT_S = 600.0


def _sync_locked(store: TableStore, location: SearchLocation, *, rebuild: bool,
                 progress: Callable[[str], None] | None) -> SyncResult:
    lance = _lance()
    output, options = store.output, store.storage_options
    started = time.perf_counter()
    result = SyncResult()
    keys = committed_keys(store)
    commits = _commit_keys(keys)
    state = None if rebuild else read_state(output, options)
    dataset = None
    if state is not None:
        try:
            dataset = lance.dataset(location.uri, storage_options=location.options)
        except ValueError:
            state = None  # the state outlived its dataset: start again
    if state is not None and dataset is not None and state.get("commits") == commits:
        return SyncResult(rows=int(state.get("rows", 0)), ann=bool(state.get("ann")), up_to_date=True,
                          seconds=time.perf_counter() - started)
    videos = visible_videos(store, ["video_id", "uri", "status", "model", "run_id", "commit_index", "indexed_at"],
                            keys=keys)
    current = current_runs(videos)
    seen = set(state["commits"]) if state else set()
    new_commits = [c for c in commits if c not in seen]
    kind = (state.get("embedder"), state.get("dim")) if state and state.get("dim") else None
    versions = _embedding_versions(store, new_commits) if state is not None else {}
    if state is not None and any(v is not None and not _feed_readable(store, v) for v in versions.values()):
        log.warning("the change feed of an older embeddings version is gone (vacuumed): rebuilding the search index")
        state, dataset = None, None
    if state is None:
        _remove_dataset(output, options)  # whatever is there was not recorded as synced: start again
    result.steps["read_s"] = time.perf_counter() - started

    step = time.perf_counter()
    before = 0
    if dataset is not None:
        before = dataset.count_rows()
        if new_commits:
            clauses = [_in("commit", new_commits)]  # a sync that stopped half-way left them
            clauses += _stale_clauses(videos, new_commits, current)
            dataset.delete(" OR ".join(clauses))
        result.removed = before - dataset.count_rows()
    new = _NewPassages(store, versions if state is not None else None, current, kind, set(commits))
    batches = iter(new)
    first = next(batches, None)
    if first is not None:
        reader = pa.RecordBatchReader.from_batches(first.schema, itertools.chain([first], batches))
        dataset = lance.write_dataset(reader, location.uri, mode="append" if dataset is not None else "create",
                                      storage_options=location.options)
    kind = new.kind
    result.added = dataset.count_rows() - (before - result.removed) if dataset is not None else 0
    result.steps["write_s"] = time.perf_counter() - step

    step = time.perf_counter()
    ann_rows = None
    if dataset is not None:
        result.rows = dataset.count_rows()
        ann_rows = _maintain(dataset, result.rows, kind[1] if kind else 0, progress,
                             state.get("ann_rows") if state else None)
        result.ann = ann_rows is not None
    result.steps["index_s"] = time.perf_counter() - step
    _write_state(output, options, {
        "layout": LAYOUT_VERSION, "commits": commits, "embedder": kind[0] if kind else None,
        "dim": kind[1] if kind else None, "rows": result.rows, "ann": result.ann, "ann_rows": ann_rows,
        "synced_at": dt.datetime.now(dt.timezone.utc).isoformat()})
    result.seconds = time.perf_counter() - started
    return result


def _write_state(output: str, options: Mapping[str, Any], state: Mapping[str, Any], name: str = STATE) -> None:
    """Write the state whole: a temporary sibling renamed over it on local folders (one PUT on S3
    is atomic already), so a reader never finds half a state."""
    fs, path = _state_path(output, options, name)
    data = json.dumps(state).encode()
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)  # a sync that found nothing to write yet
        tmp = f"{path}.tmp-{os.getpid()}"
        fs.pipe_file(tmp, data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def _embedding_versions(store: TableStore, commits: list[str]) -> dict[str, int | None]:
    """Each new commit's `embeddings` version (from its `runs` row; None: it added no vectors)."""
    if not commits:
        return {}
    runs = store.read("runs", columns=["run_id", "commit_index", "embeddings_version"],
                      filter=pc.field("run_id").isin(sorted({split_commit(c)[0] for c in commits})))
    found = {commit_key(r["run_id"], r["commit_index"] or 0): r["embeddings_version"] for r in runs.to_pylist()}
    return {c: found.get(c) for c in commits}


def _feed_readable(store: TableStore, version: int) -> bool:
    try:
        store.changes("embeddings", version)
        return True
    except TableError:
        return False


def _stale_clauses(videos: pa.Table, commits: list[str], current: Mapping[str, str],
                   run_column: str = "text_run_id") -> list[str]:
    """Deletes for passages the new commits made stale: every other (video, run) of a source they
    indexed ok or recorded as removed. Only those sources can have changed their latest run, so
    a sync reads the new commits' `videos` rows rather than scanning the index."""
    new = {split_commit(c) for c in commits}
    touched = {r["uri"] for r in videos.to_pylist()
               if (r["run_id"], r["commit_index"] or 0) in new and r["status"] in ("ok", "removed")}
    if not touched:
        return []
    ids_of: dict[str, set[str]] = {}
    for row in videos.select(["uri", "video_id"]).to_pylist():
        if row["uri"] in touched:
            ids_of.setdefault(row["uri"], set()).add(row["video_id"])
    clauses = []
    for uri in sorted(touched):
        ids = ids_of[uri]
        keep = [(v, current[v]) for v in ids if v in current]
        clause = _in("video_id", ids)
        if keep:
            video, run = keep[0]
            clause += f" AND NOT (video_id = {_quote(video)} AND {run_column} = {_quote(run)})"
        clauses.append(f"({clause})")
    return clauses



class _NewPassages:
    """The passages to add, batch by batch (iterate once): the vectors each new commit appended
    (`versions`: commit -> embeddings version), or, for a rebuild (`versions` None), every visible
    vector; of those, only the ones of their source's latest ok run. `kind` is the (embedder, dim)
    they hold. A second embedder is refused: a query could not compare its vectors with the others."""

    def __init__(self, store: TableStore, versions: Mapping[str, int | None] | None, current: Mapping[str, str],
                 kind: tuple[str, int] | None, commits: set[str]) -> None:
        self.store, self.versions, self.current, self.kind = store, versions, current, kind
        self.committed_runs = {split_commit(c)[0] for c in commits}
        self.labels: dict[tuple[str, str, int], str] = {}
        self._label_runs: set[str] = set()

    def _labels_of(self, text_runs: set[str]) -> Mapping[tuple[str, str, int], str]:
        """The labels of the objects of `text_runs` (the runs whose text was embedded: a backfill's
        vectors are committed by `embed`, their objects by the index run), read once per run."""
        missing = text_runs - self._label_runs
        if missing:
            self.labels.update(_labels(self.store, missing))
            self._label_runs |= missing
        return self.labels

    def _sources(self) -> Iterator[tuple[str, pa.Table]]:
        if self.versions is None:
            for batch in self.store.batches("embeddings"):
                table = pa.Table.from_batches([batch])
                keep = [r in self.committed_runs for r in table.column("run_id").to_pylist()]
                yield "rebuild/0", table.filter(pa.array(keep, pa.bool_()))
            return
        for commit, version in self.versions.items():
            if version is not None:
                yield commit, self.store.changes("embeddings", int(version))

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        for commit, table in self._sources():
            if not table.num_rows:
                continue
            kinds = {(str(k["embedder"]), int(k["dim"])) for k in table.group_by(["embedder", "dim"]).aggregate([]).to_pylist()}
            self.kind = self.kind or min(kinds)
            if kinds - {self.kind}:
                held = ", ".join(f"{n} ({d}-d)" for n, d in sorted(kinds | {self.kind}))
                raise SearchIndexError(f"OUTPUT {self.store.shown} holds vectors of several embedders ({held}); the "
                                       "search index keeps one")
            want = pa.array([self.current.get(v) for v in table.column("video_id").to_pylist()], pa.string())
            table = table.filter(pc.fill_null(pc.equal(table.column("text_run_id"), want), False))
            if table.num_rows:
                labels = self._labels_of(set(table.column("text_run_id").unique().to_pylist()))
                yield from passages(table, labels, self.kind[1], commit).to_batches()


def _remove_dataset(output: str, options: Mapping[str, Any], dataset: str = DATASET) -> None:
    fs, root = filesystem(output, options)
    path = posixpath.join(root, SEARCH_FOLDER, dataset)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _maintain(dataset: Any, rows: int, dim: int, progress: Callable[[str], None] | None,
              ann_rows: int | None, scalar: Mapping[str, str] = SCALAR_INDEXES, text: bool = True,
              what: str = "passages") -> int | None:
    """Keep every index covering every row. Returns the passages the vector index was trained on
    (None: no ANN index yet).

    New rows join the trained IVF lists (`optimize_indices`), which do not move; once the data has
    grown `ANN_RETRAIN_GROWTH` times past what they were trained on, the lists are trained again
    for the size there is, so they stay about `ROWS_PER_PARTITION` long and a query's probes cover
    a bounded share of the data (retraining at 4x growth costs, over the index's life, about a
    third of one training at its final size)."""
    indexes = {i.field_names[0]: i for i in dataset.describe_indices()}
    if len(dataset.get_fragments()) > COMPACT_AFTER_FRAGMENTS:
        dataset.optimize.compact_files()
    if text and rows and "text" not in indexes:
        dataset.create_scalar_index("text", "INVERTED", **FTS_OPTIONS)
    for column, kind in scalar.items():  # what --video / --label filter on, before the search
        if rows and column not in indexes:
            dataset.create_scalar_index(column, kind)
    if "vector" in indexes and ann_rows is None:
        ann_rows = rows  # a state from before this was recorded: count from now
    train = rows >= ANN_MIN_ROWS and ("vector" not in indexes or rows >= ANN_RETRAIN_GROWTH * (ann_rows or rows))
    if train:
        if progress:
            progress(f"search index: training the vector index over {rows} {what}")
        dataset.create_index("vector", index_type="IVF_PQ", metric="cosine", replace=True,
                             num_partitions=max(1, rows // ROWS_PER_PARTITION), num_sub_vectors=sub_vectors(dim))
        ann_rows = rows
    if indexes:
        dataset.optimize.optimize_indices()
    dataset.cleanup_old_versions(older_than=KEEP_VERSIONS)
    return ann_rows if "vector" in indexes or train else None
