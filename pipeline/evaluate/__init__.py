"""`pixelrefer eval`: the index's tracks scored against ground truth with TrackEval
(`groundtruth` reads YTVIS / MOTS files, `scores` matches them to the index by video and time and
runs TrackEval's metrics)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from pipeline.evaluate.groundtruth import GT_FORMATS, read_ground_truth
from pipeline.evaluate.scores import FIELDS, evaluate, match
from pipeline.export.selection import select_videos
from pipeline.store import TableStore


def score(output: str, gt_path: str, fmt: str | None, storage_options: Mapping[str, Any] | None = None,
          videos: Sequence[str] | None = None) -> dict[str, Any]:
    """{"videos": [per-video rows], "overall": row}; rows hold `FIELDS` and frame/track counts."""
    gt_videos = read_ground_truth(gt_path, fmt, dict(storage_options or {}))
    store = TableStore(output, storage_options)
    index_videos = select_videos(store, videos)
    return evaluate(store, match(gt_videos, index_videos, gt_path, selected=bool(videos)))


__all__ = ["FIELDS", "GT_FORMATS", "score"]
