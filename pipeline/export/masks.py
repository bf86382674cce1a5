"""A video's `masks` rows, streamed in object order or frame order with bounded memory.

A 2-hour video tracked at 1 frame/s with 20 objects has 144,000 mask rows (RLE strings of a few
hundred bytes to tens of kilobytes each), more than an exporter should hold. The rows are read in
passes: one cheap pass over the (`object_id`, `frame_index`) columns counts the rows per key, the
keys are cut into consecutive ranges of at most `budget_rows` rows, and each range is one filtered
read (`TableStore.batches` with the video, its run and the key range pushed down), sorted and
handed out group by group. Held at once: one range's rows (at most `budget_rows`, or one object's
or one frame's rows when that alone is larger) and the Parquet row group being decoded (the
store writes masks in row groups of `tables.ROW_GROUP_ROWS`, and these reads take no readahead),
never the whole video.

The (`video_id`, `run_id`) filter is the commit rule's: the pair comes from a visible `videos`
row (`selection.select_videos`).
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.export.selection import VideoInfo
from pipeline.store import TableStore

#: Rows held per pass: about 25 MB of typical RLE strings.
BUDGET_ROWS = 50_000
COLUMNS = ["object_id", "frame_index", "ts", "bbox", "area", "score", "rle"]


def _video_filter(video: VideoInfo) -> Any:
    return (pc.field("video_id") == video.video_id) & (pc.field("run_id") == video.run_id)


def _key_counts(store: TableStore, video: VideoInfo, key: str, object_ids: list[int] | None) -> dict[int, int]:
    counts: dict[int, int] = {}
    wanted = _objects_filter(object_ids)
    columns = list(dict.fromkeys([key, "object_id"]))
    for batch in store.batches("masks", columns=columns, filter=_video_filter(video) & wanted, readahead=False):
        values, sizes = np.unique(batch.column(key).to_numpy(zero_copy_only=False), return_counts=True)
        for value, size in zip(values.tolist(), sizes.tolist()):
            counts[value] = counts.get(value, 0) + size
    return counts


def _objects_filter(object_ids: list[int] | None) -> Any:
    return pc.field("object_id").isin(object_ids) if object_ids is not None else pc.scalar(True)


def _ranges(counts: dict[int, int], budget_rows: int) -> list[tuple[int, int]]:
    """Consecutive key ranges [lo, hi] of at most `budget_rows` rows (a single key may exceed it)."""
    ranges: list[tuple[int, int]] = []
    lo = hi = None
    held = 0
    for key in sorted(counts):
        if lo is not None and held + counts[key] > budget_rows:
            ranges.append((lo, hi))
            lo, held = None, 0
        lo = key if lo is None else lo
        hi = key
        held += counts[key]
    if lo is not None:
        ranges.append((lo, hi))
    return ranges


def grouped(store: TableStore, video: VideoInfo, by: str, object_ids: list[int] | None = None,
            budget_rows: int | None = None) -> Iterator[tuple[int, pa.Table]]:
    """(`object_id` or `frame_index`, its rows sorted by the other key), in increasing key order;
    `object_ids`: only these objects (all when None)."""
    if by not in ("object_id", "frame_index"):
        raise ValueError(f"masks are grouped by object_id or frame_index, not {by!r}")
    other = "frame_index" if by == "object_id" else "object_id"
    for lo, hi in _ranges(_key_counts(store, video, by, object_ids), budget_rows or BUDGET_ROWS):
        where = _video_filter(video) & _objects_filter(object_ids) & (pc.field(by) >= lo) & (pc.field(by) <= hi)
        batches = list(store.batches("masks", columns=COLUMNS, filter=where, readahead=False))
        if not batches:
            continue
        rows = pa.Table.from_batches(batches).sort_by([(by, "ascending"), (other, "ascending")])
        keys = rows.column(by).to_numpy()
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        ends = np.r_[starts[1:], len(keys)]
        for start, end in zip(starts.tolist(), ends.tolist()):
            yield int(keys[start]), rows.slice(start, end - start)
        del rows, batches
