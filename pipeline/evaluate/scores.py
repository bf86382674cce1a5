"""Tracking scores of the index against ground truth, with TrackEval's metric classes (HOTA,
Identity: IDF1, CLEAR: MOTA and ID switches), class-agnostic (every object one class).

TrackEval's metrics take, per sequence, the ids present at each timestep and a similarity matrix
per timestep; its dataset classes only read folder layouts into that. The data is prepared here
directly (mask IoU from pycocotools, ids renumbered 0..n-1 per video as the metrics require)
rather than writing the layouts to disk and reading them back.

Matching by video and time, and the sampling difference: ground truth is usually annotated at
source frames (every frame, or every k-th), the index tracks a sampled grid (`videos.sampled_ts`,
e.g. 5 of 30 frames per second). Each ground-truth frame is placed at a time (`groundtruth`), and
matched to the sampled frame within half a source frame of it (0.5 / fps seconds). The timesteps
scored are exactly those matches: ground-truth frames between the index's samples are not scored
(the index saw nothing there), nor are sampled frames without ground truth. A sampled frame with no
mask row is scored as "no objects". `frames` (scored) and `gt_frames` in the result show the
difference. A box ground truth (CVAT tracks) is compared with the index's boxes (`masks.bbox`),
by box IoU.

Memory: the ground truth (read whole), and per video its IoU matrices; the index's masks are
streamed by frame (`export.masks`), each frame's compared as it passes.
"""

from __future__ import annotations

import bisect
import logging
from typing import Any, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from pipeline.evaluate.groundtruth import GtVideo
from pipeline.export import masks
from pipeline.export.selection import ExportError, VideoInfo
from pipeline.store import TableStore

log = logging.getLogger(__name__)

#: What is reported of TrackEval's results, and where it is taken from.
FIELDS = ("HOTA", "DetA", "AssA", "IDF1", "IDSW", "MOTA")


def match(gt_videos: Sequence[GtVideo], index_videos: Sequence[VideoInfo], gt_path: str,
          selected: bool) -> list[tuple[GtVideo, VideoInfo]]:
    """Each ground-truth video with its index video, by `video_id` or source file stem. A
    ground-truth video the index lacks is an error (a ground truth of another video set) unless
    `selected` (--video narrowed the index on purpose: the others are then left out)."""
    by_key: dict[str, VideoInfo] = {}
    for video in index_videos:
        by_key.setdefault(video.stem, video)
    for video in index_videos:
        by_key[video.video_id] = video
    pairs = []
    for gt in gt_videos:
        video = by_key.get(gt.key)
        if video is None:
            if selected:
                continue
            raise ExportError(f"ground truth {gt_path!r}: video {gt.key!r} ({gt.where}) is not in the index (by "
                              "video_id or source file name); is this the ground truth of another video set?")
        pairs.append((gt, video))
    if not pairs:
        raise ExportError(f"ground truth {gt_path!r}: none of its videos is among the selected index videos")
    return pairs


def _sampled_index(video: VideoInfo, ref: tuple[str, float]) -> int | None:
    kind, value = ref
    if kind == "sampled":
        return int(value) if 0 <= value < len(video.sampled_ts) else None
    fps = video.fps or video.sampled_fps
    if not fps:
        return None
    t = float(value) / fps if kind == "source" else float(value)
    k = bisect.bisect_left(video.sampled_ts, t)
    best = min((i for i in (k - 1, k) if 0 <= i < len(video.sampled_ts)),
               key=lambda i: abs(video.sampled_ts[i] - t), default=None)
    if best is None or abs(video.sampled_ts[best] - t) > 0.5 / fps + 1e-6:
        return None
    return best


def score_video(store: TableStore, gt: GtVideo, video: VideoInfo) -> tuple[dict[str, Any], dict[str, dict]]:
    """(this video's row, TrackEval's raw results per metric for combining)."""
    from trackeval.metrics import CLEAR, HOTA, Identity

    at: dict[int, dict[int, Any]] = {}
    for frame in gt.frames:
        if frame.ref[0] == "sampled" and frame.ref[1] >= len(video.sampled_ts):
            raise ExportError(f"ground truth {gt.where}: has frames without times beyond the index's "
                              f"{len(video.sampled_ts)} sampled frames of video {video.video_id}; give its frames' "
                              "times (pixelrefer.timestamps) or a ground truth of the sampled frames")
        k = _sampled_index(video, frame.ref)
        if k is not None and k not in at:
            at[k] = frame.objects
    if gt.frames and not at:
        raise ExportError(f"ground truth {gt.where}: none of its {len(gt.frames)} frames falls on one of the index's "
                          f"sampled frames of video {video.video_id} (within half a source frame at "
                          f"{video.fps or video.sampled_fps or 0:g} fps); is it the ground truth of another video?")
    gt_ids: list[np.ndarray] = []
    tracker_ids: list[np.ndarray] = []
    similarity: list[np.ndarray] = []
    scored = sorted(at)
    tracked: dict[int, tuple[list[int], np.ndarray]] = {}  # sampled frame -> (object ids, IoU [gt, tracker])
    for k, rows in masks.grouped(store, video, "frame_index"):
        if k in at:
            if gt.boxes:
                shapes = [[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in rows.column("bbox").to_pylist()]
            else:
                shapes = rows.column("rle").to_pylist()
                _check_size(gt, video, at[k], shapes)
            tracked[k] = (rows.column("object_id").to_pylist(), _iou(list(at[k].values()), shapes, gt.boxes))
    gt_names: dict[int, int] = {}
    tracker_names: dict[int, int] = {}
    for k in scored:
        truth = at[k]
        ids, iou = tracked.pop(k, ([], np.zeros((len(truth), 0))))
        gt_ids.append(np.array([gt_names.setdefault(i, len(gt_names)) for i in truth], int))
        tracker_ids.append(np.array([tracker_names.setdefault(i, len(tracker_names)) for i in ids], int))
        similarity.append(iou)
    data = {
        "num_timesteps": len(scored), "gt_ids": gt_ids, "tracker_ids": tracker_ids, "similarity_scores": similarity,
        "num_gt_ids": len(gt_names), "num_tracker_ids": len(tracker_names),
        "num_gt_dets": int(sum(len(a) for a in gt_ids)), "num_tracker_dets": int(sum(len(a) for a in tracker_ids)),
    }
    quiet = {"PRINT_CONFIG": False}
    raw = {"HOTA": HOTA().eval_sequence(data), "Identity": Identity(quiet).eval_sequence(data),
           "CLEAR": CLEAR(quiet).eval_sequence(data)}
    row = {"video": video.video_id, "gt": gt.key, "frames": len(scored), "gt_frames": len(gt.frames),
           "gt_tracks": len(gt_names), "tracks": len(tracker_names), **summary(raw)}
    return row, raw


def _check_size(gt: GtVideo, video: VideoInfo, truth: dict[int, dict], rles: list[dict]) -> None:
    sizes = {tuple(r["size"]) for r in truth.values()}
    if rles and sizes and sizes != {tuple(rles[0]["size"])}:
        raise ExportError(f"ground truth {gt.where}: masks of size {sorted(sizes)[0]} (h, w) but the index's masks "
                          f"of video {video.video_id} are {tuple(rles[0]['size'])}")


def _iou(truth: list[Any], tracked: list[Any], boxes: bool = False) -> np.ndarray:
    """IoU matrix [ground truth, tracker] (pycocotools' is [detections, ground truth]) of RLE masks,
    or of [x, y, w, h] boxes."""
    if not truth or not tracked:
        return np.zeros((len(truth), len(tracked)))
    if boxes:
        dt, gt = np.asarray(tracked, float), np.asarray(truth, float)
    else:
        dt, gt = ([{"size": [int(v) for v in r["size"]], "counts": r["counts"]} for r in rles]
                  for rles in (tracked, truth))
    return np.asarray(mask_utils.iou(dt, gt, [0] * len(truth)), float).reshape(len(tracked), len(truth)).T


def summary(raw: dict[str, dict]) -> dict[str, float | int]:
    hota = raw["HOTA"]
    return {"HOTA": float(np.mean(hota["HOTA"])), "DetA": float(np.mean(hota["DetA"])),
            "AssA": float(np.mean(hota["AssA"])), "IDF1": float(raw["Identity"]["IDF1"]),
            "IDSW": int(raw["CLEAR"]["IDSW"]), "MOTA": float(raw["CLEAR"]["MOTA"])}


def combine(rows: list[dict[str, Any]], raws: list[dict[str, dict]]) -> dict[str, Any]:
    """The overall row: TrackEval's own combination over sequences (sums of counts, not means)."""
    from trackeval.metrics import CLEAR, HOTA, Identity

    quiet = {"PRINT_CONFIG": False}
    combined = {}
    for name, metric in (("HOTA", HOTA()), ("Identity", Identity(quiet)), ("CLEAR", CLEAR(quiet))):
        combined[name] = metric.combine_sequences({str(i): raw[name] for i, raw in enumerate(raws)})
    return {"video": "overall", "gt": "", "frames": sum(r["frames"] for r in rows),
            "gt_frames": sum(r["gt_frames"] for r in rows), "gt_tracks": sum(r["gt_tracks"] for r in rows),
            "tracks": sum(r["tracks"] for r in rows), **summary(combined)}


def evaluate(store: TableStore, pairs: list[tuple[GtVideo, VideoInfo]]) -> dict[str, Any]:
    rows, raws = [], []
    for gt, video in pairs:
        row, raw = score_video(store, gt, video)
        rows.append(row)
        raws.append(raw)
    return {"videos": rows, "overall": combine(rows, raws)}
