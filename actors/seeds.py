"""Prompts resolved against a clip's sampled frames: where each object's track starts.

Every check that needs the frames (a frame or time that exists, a box inside the frame, a mask of the
frame's size) happens here, before SAM 2 is called, so a misfit is a readable error naming the prompt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from dataclasses import dataclass

import numpy as np

from actors.prompts import ObjectPrompt
from actors.rle import decode_rle, rle_areas

MAX_OBJECT_ID = 2**31 - 1  # the objects table stores int32 ids


class TrackerInputError(ValueError):
    """A prompt does not fit its video (no such frame or time, box outside the frame, wrong mask size...)."""


@dataclass
class Seed:
    """Where an object's track starts: a prompt (or a discovered mask) on one frame."""

    object_id: int
    source: str  # "prompt" | "auto"
    frame: int
    prompt: ObjectPrompt | None = None
    box: tuple[float, float, float, float] | None = None  # clipped to the frame
    mask_rle: dict | None = None  # mask prompts and discovered objects
    stop: int = 0  # backward tracking covers frames [stop, frame)


def check_frames(frames: Any, timestamps: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """A clip's frames and timestamps as the trackers (SAM 2 and SAM 3) take them, or `TrackerInputError`."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise TrackerInputError(f"frames must be a (T, H, W, 3) uint8 RGB array, got {frames.dtype} {frames.shape}")
    ts = np.asarray(timestamps, dtype=np.float64).reshape(-1)
    if len(ts) != len(frames):
        raise TrackerInputError(f"{len(frames)} frames but {len(ts)} timestamps")
    return frames, ts


def keyframe_indices(timestamps: Sequence[float], interval_s: float) -> list[int]:
    """The first frame, then each first frame at least `interval_s` after the previous keyframe.

    By timestamp, not index: sampled frames of a variable-frame-rate video are unevenly spaced.
    """
    if len(timestamps) == 0:
        return []
    keys, due = [0], float(timestamps[0]) + interval_s
    for i, t in enumerate(timestamps):
        if i and float(t) >= due - 1e-6:
            keys.append(i)
            due = float(t) + interval_s
    return keys


def prompt_frame(prompt: ObjectPrompt, timestamps: np.ndarray, where: str) -> int:
    """The sampled frame a prompt is given on: its `frame`, else the frame nearest its `ts`, else 0.

    A `ts` farther from every sampled frame than the largest sampling gap (at least 0.5 s) is outside
    the video.
    """
    n = len(timestamps)
    if prompt.frame is not None:
        if not 0 <= prompt.frame < n:
            raise TrackerInputError(f"{where}: frame {prompt.frame} does not exist (the video has {n} sampled "
                                    f"frames, 0..{n - 1})")
        return int(prompt.frame)
    if prompt.ts is None:
        return 0
    k = int(np.argmin(np.abs(timestamps - prompt.ts)))
    tolerance = max(0.5, float(np.max(np.diff(timestamps))) if n > 1 else 0.0)
    if abs(float(timestamps[k]) - prompt.ts) > tolerance:
        raise TrackerInputError(f"{where}: ts {prompt.ts:g} s is outside the video (sampled frames span "
                                f"{timestamps[0]:.3f}..{timestamps[-1]:.3f} s)")
    return k


def _check_box(box: tuple[float, float, float, float], height: int, width: int, where: str
               ) -> tuple[float, float, float, float]:
    """The box clipped to the frame; an empty, inverted or fully outside box is an error."""
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        raise TrackerInputError(f"{where}: box {list(box)} has zero area (need x0 < x1 and y0 < y1)")
    cx0, cy0, cx1, cy1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
    if cx1 <= cx0 or cy1 <= cy0:
        raise TrackerInputError(f"{where}: box {list(box)} lies outside the {width}x{height} frame")
    return (cx0, cy0, cx1, cy1)


def _check_points(prompt: ObjectPrompt, height: int, width: int, where: str) -> None:
    if len(prompt.labels) != len(prompt.points):
        raise TrackerInputError(f"{where}: {len(prompt.points)} points but {len(prompt.labels)} labels")
    for x, y in prompt.points:
        if not (0 <= x <= width and 0 <= y <= height):
            raise TrackerInputError(f"{where}: point ({x:g}, {y:g}) lies outside the {width}x{height} frame")
    if prompt.box is None and not any(lab == 1 for lab in prompt.labels):
        raise TrackerInputError(f"{where}: points without a box need at least one positive (label 1) point")


def _check_mask(rle: Mapping, height: int, width: int, where: str) -> dict:
    size = list(rle.get("size", []))
    if size != [height, width]:
        raise TrackerInputError(f"{where}: mask size {size} does not match the frame size [{height}, {width}]")
    try:
        area = int(rle_areas([rle])[0])
        decoded = decode_rle(rle)
    except Exception as exc:  # noqa: BLE001 - pycocotools raises bare exceptions for bad counts
        raise TrackerInputError(f"{where}: mask RLE cannot be decoded: {exc}") from exc
    if decoded.shape != (height, width) or area == 0:
        raise TrackerInputError(f"{where}: mask is empty" if area == 0 else f"{where}: mask RLE is malformed")
    return {"size": [height, width], "counts": rle["counts"]}


def assign_ids(prompts: Sequence[ObjectPrompt]) -> list[int]:
    """User ids as given; the others get the smallest free ids from 1 up."""
    used = {p.object_id for p in prompts if p.object_id is not None}
    for oid in used:
        if not 0 <= oid <= MAX_OBJECT_ID:
            raise TrackerInputError(f"object_id {oid} is out of range (0..{MAX_OBJECT_ID})")
    ids, nxt = [], 1
    for p in prompts:
        if p.object_id is not None:
            ids.append(p.object_id)
            continue
        while nxt in used:
            nxt += 1
        ids.append(nxt)
        used.add(nxt)
    return ids


def resolve_prompts(prompts: Sequence[ObjectPrompt], timestamps: np.ndarray, height: int, width: int) -> list[Seed]:
    """Check every prompt against the video and turn it into a seed; the first misfit raises."""
    seeds: list[Seed] = []
    seen: set[tuple[int, int]] = set()
    for k, (p, oid) in enumerate(zip(prompts, assign_ids(prompts), strict=True)):
        where = f"prompt {k} ({p.kind}, object {oid})"
        frame = prompt_frame(p, timestamps, where)
        if (oid, frame) in seen:
            raise TrackerInputError(f"{where}: object {oid} has two prompts on frame {frame}; combine them")
        seen.add((oid, frame))
        box = _check_box(p.box, height, width, where) if p.box is not None else None
        if p.points:
            _check_points(p, height, width, where)
        mask = _check_mask(p.mask_rle, height, width, where) if p.mask_rle is not None else None
        seeds.append(Seed(object_id=oid, source="prompt", frame=frame, prompt=p, box=box, mask_rle=mask))
    return seeds
