"""Which videos an export (or `eval`) reads, and their objects and captions: the default view of
the committed index.

A video is picked as every reader of the default views picks it (`commit.visible_videos` +
`commit.latest_by_uri`): per source `uri`, its newest `ok` row of a committed run. That row names
the one (`video_id`, `run_id`) pair whose child rows are read, so a killed run's leftovers and an
older run of the same video are never exported: the commit rule is applied once here, and the
child-table reads (objects, captions, masks) filter by that pair.

Held in memory: the selected `videos` rows (their `sampled_ts` included) and their `objects` rows;
captions are read one video at a time. Masks never pass through here (`masks.py` streams them).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import pyarrow.compute as pc

from pipeline.store import TableStore
from pipeline.store.commit import latest_by_uri, visible_videos


class ExportError(ValueError):
    """Bad input to `export` / `eval` (unknown video or format, empty selection, unusable ground
    truth): one sentence naming the input and its first problem; the CLI exits 2."""


@dataclasses.dataclass
class ObjectInfo:
    object_id: int
    label: str | None
    source: str | None
    first_ts: float | None
    last_ts: float | None
    num_frames: int


@dataclasses.dataclass
class VideoInfo:
    """One selected video: the committed run whose rows are read, and how its frames are numbered."""

    video_id: str
    run_id: str
    uri: str
    width: int
    height: int
    fps: float | None  # the source's frame rate (`videos.fps`)
    sampled_fps: float | None
    num_frames: int | None  # source frames
    sampled_ts: list[float]  # the sampled grid: `masks.frame_index` indexes it
    objects: list[ObjectInfo]

    def source_frame(self, frame_index: int) -> int:
        """0-based source frame of a sampled frame: round(ts x fps), the frame a player or CVAT shows
        at that time (exact for constant-rate sources; a variable-rate source's `fps` is its mean, so
        use the YTVIS export, which carries the timestamps, for those)."""
        ts = self.sampled_ts[frame_index]
        return int(round(ts * self.fps)) if self.fps else frame_index

    @property
    def frame_count(self) -> int:
        """Source frames (what CVAT's task holds): `num_frames`, or enough to hold the last sample."""
        last = self.source_frame(len(self.sampled_ts) - 1) + 1 if self.sampled_ts else 0
        return max(int(self.num_frames or 0), last)

    @property
    def stem(self) -> str:
        """The source file's name without extension (how a hand-made ground truth may name the video)."""
        name = self.uri.rstrip("/").rsplit("/", 1)[-1]
        return name.rsplit(".", 1)[0] if "." in name else name


def select_videos(store: TableStore, videos: Sequence[str] | None = None, label: str | None = None) -> list[VideoInfo]:
    """The default view's ok videos, narrowed to `videos` (video id, unique id prefix, or uri) and
    to videos with an object labelled `label` (only those objects kept). Raises `ExportError` for
    an unknown video or an empty selection."""
    store.check_layout()
    rows = list(latest_by_uri(visible_videos(store)).values())
    if not rows:
        raise ExportError(f"OUTPUT {store.shown!r} has no committed ok video to read")
    if videos:
        rows = [_find(rows, wanted, store.shown) for wanted in dict.fromkeys(videos)]
    rows.sort(key=lambda r: (r["uri"], r["video_id"]))
    picked = [_video_info(r, _objects(store, r["video_id"], r["run_id"], label)) for r in rows]
    if label is not None:
        picked = [v for v in picked if v.objects]
        if not picked:
            raise ExportError(f"no selected video of OUTPUT {store.shown!r} has an object labelled {label!r}")
    return picked


def _find(rows: list[dict[str, Any]], wanted: str, shown: str) -> dict[str, Any]:
    exact = [r for r in rows if wanted in (r["video_id"], r["uri"])]
    if exact:
        return exact[0]
    prefixed = [r for r in rows if r["video_id"].startswith(wanted)]
    if len(prefixed) == 1:
        return prefixed[0]
    if len(prefixed) > 1:
        raise ExportError(f"--video {wanted!r} matches {len(prefixed)} videos of OUTPUT {shown!r}: give more of the id")
    raise ExportError(f"--video {wanted!r}: no committed ok video of OUTPUT {shown!r} has this id or uri "
                      "(`pixelrefer query OUTPUT --sql \"select video_id, uri from latest_videos\"` lists them)")


def _objects(store: TableStore, video_id: str, run_id: str, label: str | None) -> list[ObjectInfo]:
    table = store.read("objects", columns=["object_id", "label", "source", "first_ts", "last_ts", "num_frames"],
                       filter=(pc.field("video_id") == video_id) & (pc.field("run_id") == run_id))
    objects = [ObjectInfo(int(r["object_id"]), r["label"], r["source"], r["first_ts"], r["last_ts"],
                          int(r["num_frames"] or 0)) for r in table.to_pylist()]
    if label is not None:
        objects = [o for o in objects if (o.label or "").lower() == label.lower()]
    return sorted(objects, key=lambda o: o.object_id)


def _video_info(row: dict[str, Any], objects: list[ObjectInfo]) -> VideoInfo:
    return VideoInfo(
        video_id=row["video_id"], run_id=row["run_id"], uri=row["uri"], width=int(row["width"] or 0),
        height=int(row["height"] or 0), fps=row["fps"], sampled_fps=row["sampled_fps"], num_frames=row["num_frames"],
        sampled_ts=list(row["sampled_ts"] or []), objects=objects,
    )


def captions_of(store: TableStore, video: VideoInfo) -> dict[int, list[dict[str, Any]]]:
    """Per object, its captions in time order (the whole-track one, `clip_index` null, first)."""
    table = store.read("captions", columns=["object_id", "clip_index", "ts_start", "ts_end", "caption"],
                       filter=(pc.field("video_id") == video.video_id) & (pc.field("run_id") == video.run_id))
    out: dict[int, list[dict[str, Any]]] = {}
    for row in table.to_pylist():
        out.setdefault(int(row.pop("object_id")), []).append(row)
    for rows in out.values():
        rows.sort(key=lambda r: (r["clip_index"] is not None, r["clip_index"] or 0))
    return out
