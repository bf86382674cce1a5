"""A run's commit over eight Delta tables, and what a reader may see of it.

Delta commits one table atomically; a run commit spans eight. The order and the rule that make
that safe:

1. The child tables are appended first, each in one Delta commit: `clips`, `objects`, `masks`,
   `captions`, `qa`, `embeddings`.
2. Then `videos`: its rows carry the run's `run_id` and `commit_index`.
3. Then `runs`: one row for this commit. **This append is the commit point.**

A `videos` row is visible only when `runs` holds its (`run_id`, `commit_index`); a child row only
when its (`video_id`, `run_id`) is a visible video (`embeddings` by its `text_run_id`, and only
once its own run has a `runs` row). Every reader applies that rule: the DuckDB views
(`jobs.query_sql`), `visible_videos` here, the search index. So a run killed anywhere before step 3
leaves rows that no reader sees; the same command run again indexes those videos afresh (their
rows were never visible, so they are not "indexed"), and `pixelrefer maintain` deletes the
leftovers once they are older than the retention.

What is still not atomic across tables: a reader that bypasses the rule (reading one table's
files with another tool) sees appended child rows of a commit that has not reached `runs` yet, and
the leftovers of a killed commit until `maintain` removes them.

A commit that fails with an error raises `OutputError` and leaves nothing visible, for the same
reason. Each append is idempotent per (run, commit) within a process: a retried commit does not
append a table twice (`Transaction` ids are not used because a rerun is a new run anyway).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline.store.location import OutputError
from pipeline.store.tables import TableStore
from schemas.tables import TABLES, to_table

log = logging.getLogger(__name__)

#: Children first, then `videos`, then `runs` (the commit point); see the module docstring.
PUBLISH_ORDER = ("clips", "objects", "masks", "captions", "qa", "embeddings", "tracklets", "videos", "runs")
if sorted(PUBLISH_ORDER) != sorted(TABLES) or PUBLISH_ORDER[-2:] != ("videos", "runs"):
    raise RuntimeError(f"PUBLISH_ORDER {PUBLISH_ORDER} must name every table of schemas.tables.TABLES "
                       f"({sorted(TABLES)}) once, with videos and runs last")


#: Run ids name commits and claims: plain characters only.
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise OutputError(f"invalid run id {run_id!r}: use letters, digits, '.', '_' and '-' only")
    return run_id


def commit_key(run_id: str, commit_index: int) -> str:
    """One commit as "run_id/commit_index" (run ids have no '/'): in commit metadata and the search index."""
    return f"{run_id}/{int(commit_index)}"


def split_commit(key: str) -> tuple[str, int]:
    run_id, commit_index = key.rsplit("/", 1)
    return run_id, int(commit_index)


class RunWriter:
    """Buffers validated rows per table; `commit` appends them in `PUBLISH_ORDER`."""

    def __init__(self, store: TableStore, run_id: str, commit_index: int = 0) -> None:
        self.store = store
        self.run_id = check_run_id(run_id)
        self.commit_index = int(commit_index)
        self._buffers: dict[str, list[pa.Table]] = {name: [] for name in TABLES}
        self.rows_written: dict[str, int] = {name: 0 for name in TABLES}
        self.versions: dict[str, int] = {}
        store.require_location()

    @property
    def key(self) -> str:
        return commit_key(self.run_id, self.commit_index)

    def add(self, table: str, rows: Iterable[Mapping[str, Any]] | pa.Table) -> None:
        """Validate a batch against its schema now, so a bad row fails before anything is appended."""
        if not isinstance(rows, pa.Table):
            rows = list(rows)
        if len(rows):
            self._buffers[table].append(to_table(table, rows))

    def commit(self, when: dt.datetime | None = None) -> dict[str, int]:
        """Append every buffered table, the commit point last. Returns rows written per table.

        `videos` rows get this commit's `commit_index` and its time as `indexed_at` (what orders
        "latest" for a source), and the `runs` row the `embeddings` version this commit made."""
        when = when or dt.datetime.now(dt.timezone.utc)
        for table in PUBLISH_ORDER:
            buffered = self._buffers[table]
            if not buffered or table in self.versions:
                continue
            data = pa.concat_tables(buffered)
            if table == "videos":
                data = _set(data, "commit_index", pa.array([self.commit_index] * data.num_rows, pa.int32()))
                data = _set(data, "indexed_at", pa.array([when] * data.num_rows, pa.timestamp("us", tz="UTC")))
            if table == "runs":
                version = self.versions.get("embeddings")
                data = _set(data, "embeddings_version", pa.array([version] * data.num_rows, pa.int64()))
            self.versions[table] = self.store.append(table, data, commit=self.key)
            self.rows_written[table] += data.num_rows
        self._buffers = {name: [] for name in TABLES}
        return dict(self.rows_written)

    def abort(self) -> None:
        """Forget buffered rows. Tables appended already stay invisible (no `runs` row)."""
        self._buffers = {name: [] for name in TABLES}


def _set(table: pa.Table, column: str, values: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(column), table.schema.field(column), values)


# --------------------------------------------------------------------------------------------
# What a reader may see.
# --------------------------------------------------------------------------------------------


def committed_keys(store: TableStore, runs_version: int | dt.datetime | None = None) -> set[tuple[str, int]]:
    """The (run_id, commit_index) of every commit point (at `runs_version`, default the latest)."""
    runs = store.read("runs", columns=["run_id", "commit_index"], version=runs_version)
    return {(r, int(c or 0)) for r, c in zip(runs.column("run_id").to_pylist(), runs.column("commit_index").to_pylist())}


def visible_videos(store: TableStore, columns: list[str] | None = None, filter: Any = None,
                   runs_version: int | dt.datetime | None = None,
                   keys: set[tuple[str, int]] | None = None) -> pa.Table:
    """`videos` rows whose commit reached `runs`: what every reader counts as indexed. `keys`: the
    `committed_keys` a caller has read already (the `runs` table is then not read again)."""
    wanted = list(dict.fromkeys([*(columns or TABLES["videos"].names), "run_id", "commit_index"]))
    videos = store.read("videos", columns=wanted, filter=filter)
    keys = committed_keys(store, runs_version) if keys is None else keys
    mask = [(r, int(c or 0)) in keys for r, c in zip(videos.column("run_id").to_pylist(),
                                                      videos.column("commit_index").to_pylist())]
    visible = videos.filter(pa.array(mask, pa.bool_()))
    return visible.select(columns) if columns else visible


def latest_by_uri(videos: pa.Table, model: str | None = None) -> dict[str, dict[str, Any]]:
    """Per source `uri`, its newest `ok` or `removed` row (newest commit first), the rule of the
    `latest_videos` view; a uri whose newest such row is `removed` is left out. `model` keeps
    that model's ok rows only (a removal counts for every model)."""
    best: dict[str, tuple[Any, dict[str, Any]]] = {}
    never = dt.datetime.min.replace(tzinfo=dt.timezone.utc)
    for row in videos.to_pylist():
        if row["status"] not in ("ok", "removed"):
            continue
        if model is not None and row["status"] == "ok" and row.get("model") != model:
            continue
        key = (row["indexed_at"] or never, row["run_id"])
        if row["uri"] not in best or key > best[row["uri"]][0]:
            best[row["uri"]] = (key, row)
    return {uri: row for uri, (_, row) in best.items() if row["status"] == "ok"}


def indexed_video_ids(store: TableStore, model: str, tracker: str, include_failed: bool = True) -> set[str]:
    """Videos that already have a visible row for this model and tracker: a rerun skips them."""
    videos = visible_videos(store, ["video_id", "status", "model", "tracker"],
                            filter=(pc.field("model") == model) & (pc.field("tracker") == tracker))
    return {r["video_id"] for r in videos.to_pylist()
            if r["status"] == "ok" or (include_failed and r["status"] == "failed")}


def retry_counts(store: TableStore, model: str, tracker: str) -> dict[str, int]:
    """How many committed runs of this model and tracker lost each video to a worker crash."""
    runs = store.read("runs", columns=["model", "tracker", "retry_video_ids"],
                      filter=(pads.field("model") == model) & (pads.field("tracker") == tracker))
    counts: dict[str, int] = {}
    for ids in runs.column("retry_video_ids").to_pylist():
        for video_id in ids or []:
            counts[video_id] = counts.get(video_id, 0) + 1
    return counts


class Visible:
    """Which (video, run) pairs and which runs a reader sees, read once (the `runs` table and the
    visible `videos` keys) and then applied to as many child tables as a caller reads."""

    def __init__(self, store: TableStore) -> None:
        self.store = store
        keys = committed_keys(store)
        self.runs = {r for r, _ in keys}
        videos = visible_videos(store, ["video_id", "run_id"], keys=keys)
        self.videos = set(zip(videos.column("video_id").to_pylist(), videos.column("run_id").to_pylist()))

    def rows(self, table: str, columns: list[str] | None = None) -> pa.Table:
        """Rows of a child table whose video is visible (`embeddings`: by its `text_run_id`, and
        only once its own run committed); see the module docstring."""
        run_column = "text_run_id" if table == "embeddings" else "run_id"
        wanted = [*(columns or TABLES[table].names), "video_id", run_column]
        if table == "embeddings":
            wanted.append("run_id")
        rows = self.store.read(table, columns=list(dict.fromkeys(wanted)))
        keep = [(v, r) in self.videos
                for v, r in zip(rows.column("video_id").to_pylist(), rows.column(run_column).to_pylist())]
        if table == "embeddings":
            keep = [k and r in self.runs for k, r in zip(keep, rows.column("run_id").to_pylist())]
        rows = rows.filter(pa.array(keep, pa.bool_()))
        return rows.select(columns) if columns else rows


def visible_rows(store: TableStore, table: str, columns: list[str] | None = None) -> pa.Table:
    """One child table's visible rows (`Visible` for several tables at once)."""
    return Visible(store).rows(table, columns)


def read_visible(output: str, table: str, storage_options: Mapping[str, Any] | None = None,
                 columns: list[str] | None = None) -> pa.Table:
    """What a reader sees of one table (the visibility rule applied): for notebooks and tests."""
    store = TableStore(output, storage_options)
    if table == "runs":
        return store.read("runs", columns=columns)
    if table == "videos":
        return visible_videos(store, columns)
    return visible_rows(store, table, columns)
