"""The appearance vectors of an OUTPUT in its search folder: what `--similar-to` ranks.

The `tracklets` table is the record of every appearance vector (one per object and clip, pooled by
the referrer). Ranking it exactly reads every vector per query: 0.38 s at 5,000 tracklets, about
76 s a million (`bench/reid.py`). This dataset (`OUTPUT/_search/appearance.lance`) is a copy of the
tracklets of each video's latest ok run, kept beside the passages `--like` reads, by the same
machinery (`pipeline.search.index`): its own state file of the commits it has seen, the same claim
(it syncs right after the passages, inside their sync), rebuilt when its state is missing, read
only when that state's commits equal the `runs` table's. Below `ANN_MIN_ROWS` rows Lance compares
every vector (exact); above, an IVF_PQ index whose candidates are re-ranked on their exact vectors.

The `tracklets` table has no change feed (`runs` records no version of it), so a sync reads, per
commit it has not seen, the tracklets of that commit's ok videos (filtered by run and video id):
a long run's earlier commits are never read again. Only vectors of one width are kept (the first
synced); `--similar-to` for another width ranks exactly.
"""

from __future__ import annotations

import datetime as dt
import itertools
import time
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.search.index import (LAYOUT_VERSION, SearchLocation, SyncResult, _commit_keys, _in, _lance,
                                   _maintain, _quote, _remove_dataset, _stale_clauses, _write_state, current_runs,
                                   read_state, sync)
from pipeline.search.reader import NPROBES, open_current
from pipeline.store.commit import committed_keys, split_commit, visible_videos
from pipeline.store.tables import TableStore

DATASET = "appearance.lance"
STATE = "appearance.json"
SCALAR = {"video_id": "BTREE"}
#: Candidates re-ranked on their exact vectors, as a multiple of those fetched: at 200k random
#: 1152-d tracklets the top 10 objects agree with the exact ranking 0.96 of the time at 32 (0.18 s)
#: against 0.72 at `--like`'s 4 (0.14 s) (`bench.reid similar`; random vectors are the worst case).
REFINE = 32
#: Tracklets fetched per object asked for; multiplied until `top` distinct objects are among them.
CANDIDATES_PER_OBJECT = 8


def sync_search(output: str, storage_options: Mapping[str, Any] | None = None, *, rebuild: bool = False,
                progress: Callable[[str], None] | None = None) -> SyncResult:
    """The passages (`pipeline.search.index.sync`) and then the appearance vectors, under one claim;
    the result's `then` is the appearance dataset's own `SyncResult`."""
    return sync(output, storage_options, rebuild=rebuild, progress=progress, then=sync_appearance)


def sync_appearance(store: TableStore, rebuild: bool = False,
                    progress: Callable[[str], None] | None = None) -> SyncResult:
    """Bring the appearance dataset up to date (the caller holds the search folder's claim)."""
    lance = _lance()
    output, options = store.output, store.storage_options
    started = time.perf_counter()
    location = SearchLocation.of(output, options, DATASET)
    keys = committed_keys(store)
    commits = _commit_keys(keys)
    state = None if rebuild else read_state(output, options, STATE)
    dataset = None
    if state is not None:
        try:
            dataset = lance.dataset(location.uri, storage_options=location.options)
        except ValueError:
            state = None
    if state is not None and dataset is not None and state.get("commits") == commits:
        return SyncResult(rows=int(state.get("rows", 0)), ann=bool(state.get("ann")), up_to_date=True,
                              seconds=time.perf_counter() - started)
    videos = visible_videos(store, ["video_id", "uri", "status", "run_id", "commit_index", "indexed_at"], keys=keys)
    current = current_runs(videos)
    seen = set(state["commits"]) if state else set()
    new_commits = [c for c in commits if c not in seen]
    if state is None:
        _remove_dataset(output, options, DATASET)
    result = SyncResult()
    before = 0
    if dataset is not None:
        before = dataset.count_rows()
        if new_commits:
            clauses = [_in("commit", new_commits), *_stale_clauses(videos, new_commits, current, "run_id")]
            dataset.delete(" OR ".join(clauses))
        result.removed = before - dataset.count_rows()
    dim = int(state["dim"]) if state and state.get("dim") else None
    new = _NewTracklets(store, videos, current, new_commits, dim)
    batches = iter(new)
    first = next(batches, None)
    if first is not None:
        reader = pa.RecordBatchReader.from_batches(first.schema, itertools.chain([first], batches))
        dataset = lance.write_dataset(reader, location.uri, mode="append" if dataset is not None else "create",
                                      storage_options=location.options)
    ann_rows = None
    if dataset is not None:
        result.rows = dataset.count_rows()
        result.added = result.rows - (before - result.removed)
        ann_rows = _maintain(dataset, result.rows, new.dim or 0, progress, state.get("ann_rows") if state else None,
                             scalar=SCALAR, text=False, what="tracklets")
        result.ann = ann_rows is not None
    _write_state(output, options, {
        "layout": LAYOUT_VERSION, "commits": commits, "dim": new.dim, "rows": result.rows, "ann": result.ann,
        "ann_rows": ann_rows, "synced_at": dt.datetime.now(dt.timezone.utc).isoformat()}, STATE)
    result.seconds = time.perf_counter() - started
    return result



class _NewTracklets:
    """The rows to add, commit by commit (iterate once): the tracklets with a vector of each new
    commit's ok videos that are still their source's latest ok run, with their object's label."""

    def __init__(self, store: TableStore, videos: pa.Table, current: Mapping[str, str], commits: list[str],
                 dim: int | None) -> None:
        self.store, self.current, self.commits, self.dim = store, current, commits, dim
        self.ids: dict[tuple[str, int], list[str]] = {}
        for row in videos.select(["video_id", "run_id", "commit_index", "status"]).to_pylist():
            if row["status"] == "ok" and current.get(row["video_id"]) == row["run_id"]:
                self.ids.setdefault((row["run_id"], int(row["commit_index"] or 0)), []).append(row["video_id"])

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        for commit in self.commits:
            run, index = split_commit(commit)
            ids = sorted(self.ids.get((run, index), []))
            if not ids:
                continue
            where = (pc.field("run_id") == run) & pc.field("video_id").isin(ids)
            table = self.store.read("tracklets", filter=where & pc.field("vector").is_valid())
            if not table.num_rows:
                continue
            self.dim = self.dim or int(table.column("dim")[0].as_py())
            table = table.filter(pc.equal(table.column("dim"), self.dim))
            objects = self.store.read("objects", columns=["video_id", "object_id", "label"], filter=where)
            labels = {(r["video_id"], r["object_id"]): (r["label"] or "").strip().lower() or None
                      for r in objects.to_pylist()}
            keys = zip(table.column("video_id").to_pylist(), table.column("object_id").to_pylist())
            flat = pc.list_flatten(table.column("vector").combine_chunks())
            yield from pa.table({
                "video_id": table.column("video_id"), "run_id": table.column("run_id"),
                "commit": pa.array([commit] * table.num_rows, pa.string()),
                "object_id": table.column("object_id"), "clip_index": table.column("clip_index"),
                "track_id": table.column("track_id"), "model": table.column("model"), "dim": table.column("dim"),
                "label": pa.array([labels.get(k) for k in keys], pa.string()),
                "vector": pa.FixedSizeListArray.from_arrays(flat.cast(pa.float32()), self.dim),
            }).to_batches()


class AppearanceIndex:
    """The read side: the objects nearest a vector, each by its best tracklet."""

    def __init__(self, dataset: Any, state: Mapping[str, Any]) -> None:
        self.dataset, self.state = dataset, dict(state)

    @classmethod
    def open(cls, output: str, storage_options: Mapping[str, Any] | None,
             commits: list[str]) -> tuple["AppearanceIndex | None", str | None]:
        dataset, state, why = open_current(output, storage_options, commits, DATASET, STATE)
        return (cls(dataset, state) if dataset is not None else None), why

    def nearest_objects(self, vector: np.ndarray, model: str, top: int, *, exclude: tuple[str, int] | None = None,
                        label: str | None = None, refine_factor: int = REFINE) -> pa.Table:
        """The `top` objects whose best tracklet is nearest `vector` by cosine (of `model`, at the
        dataset's width): video_id, run_id, object_id, similarity, best_clip, tracklets. The nearest
        tracklets are fetched until `top` distinct objects are among them: an object missing then
        has no tracklet as near as the last one found, so the objects found are the top ones."""
        parts = [f"model = {_quote(model)}"]
        if exclude is not None:
            parts.append(f"NOT (video_id = {_quote(exclude[0])} AND object_id = {int(exclude[1])})")
        if label is not None:
            parts.append(f"label = {_quote(label.strip().lower())}")
        where = " AND ".join(parts)
        k = max(64, CANDIDATES_PER_OBJECT * top)
        while True:
            query = {"column": "vector", "q": np.asarray(vector, np.float32), "k": k, "metric": "cosine",
                     "nprobes": NPROBES, "refine_factor": int(refine_factor)}
            found = self.dataset.to_table(nearest=query, filter=where, prefilter=True,
                                          columns=["video_id", "run_id", "object_id", "clip_index", "_distance"],
                                          disable_scoring_autoprojection=True)
            best: dict[tuple[str, str, int], tuple[float, int]] = {}
            for row in found.to_pylist():
                key = (row["video_id"], row["run_id"], row["object_id"])
                if key not in best:  # rows come nearest first
                    best[key] = (1.0 - float(row["_distance"]), int(row["clip_index"]))
            if len(best) >= top or found.num_rows < k:
                break
            k *= 4
        ranked = sorted(best.items(), key=lambda kv: (-kv[1][0], kv[0][0], kv[0][2]))[:top]
        counts = self._tracklets([key for key, _ in ranked], model)
        return pa.table({
            "video_id": pa.array([k[0] for k, _ in ranked], pa.string()),
            "run_id": pa.array([k[1] for k, _ in ranked], pa.string()),
            "object_id": pa.array([k[2] for k, _ in ranked], pa.int32()),
            "similarity": pa.array([v[0] for _, v in ranked], pa.float32()),
            "best_clip": pa.array([v[1] for _, v in ranked], pa.int32()),
            "tracklets": pa.array([counts.get(k, 0) for k, _ in ranked], pa.int64()),
        })

    def _tracklets(self, keys: list[tuple[str, str, int]], model: str) -> dict[tuple[str, str, int], int]:
        """How many tracklets (with a vector of `model`) each object has: what the exact ranking reports."""
        if not keys:
            return {}
        rows = self.dataset.to_table(columns=["video_id", "run_id", "object_id"],
                                     filter=f"{_in('video_id', {k[0] for k in keys})} AND model = {_quote(model)}")
        counts: dict[tuple[str, str, int], int] = {}
        for row in rows.to_pylist():
            key = (row["video_id"], row["run_id"], row["object_id"])
            counts[key] = counts.get(key, 0) + 1
        return counts
