"""Checks of what `Referrer.prepare` is given, so that wrong input is an `InputError` naming the
problem before any compute (frames, timestamps, masks, requests)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from .config import REGION_PLACEHOLDER
from .processing_pixelrefer import InputError, count_regions, normalise_mask

if TYPE_CHECKING:
    from .referrer import Request

__all__ = ["check_frames", "check_objects", "check_requests", "check_timestamps"]


def check_frames(frames: Sequence[np.ndarray]) -> list[np.ndarray]:
    if frames is None or len(frames) == 0:
        raise InputError("no frames: at least one HxWx3 uint8 RGB frame is needed")
    out = []
    for i, frame in enumerate(frames):
        if not isinstance(frame, np.ndarray):
            raise InputError(f"frame {i} is a {type(frame).__name__}, not a numpy array")
        if frame.ndim != 3 or frame.shape[2] != 3:
            raise InputError(f"frame {i} has shape {frame.shape}; frames must be HxWx3 RGB")
        if frame.dtype != np.uint8:
            raise InputError(f"frame {i} has dtype {frame.dtype}; frames must be uint8")
        if frame.shape[0] < 2 or frame.shape[1] < 2:
            raise InputError(f"frame {i} of {frame.shape[0]}x{frame.shape[1]} is too small")
        if frame.shape != frames[0].shape:
            raise InputError(
                f"frame {i} is {frame.shape[:2]} but frame 0 is {frames[0].shape[:2]}; all frames must "
                "have the same size"
            )
        out.append(np.ascontiguousarray(frame))
    h, w = out[0].shape[:2]
    if max(h, w) / min(h, w) > 200:
        raise InputError(f"frames of {h}x{w} have an aspect ratio above 200")
    return out


def check_timestamps(timestamps: Sequence[float], n: int) -> list[float]:
    if timestamps is None or len(timestamps) != n:
        raise InputError(f"{0 if timestamps is None else len(timestamps)} timestamps for {n} frames")
    out = []
    for i, t in enumerate(timestamps):
        try:
            value = float(t)
        except (TypeError, ValueError) as exc:
            raise InputError(f"timestamp {i} ({t!r}) is not a number") from exc
        if not math.isfinite(value):
            raise InputError(f"timestamp {i} is {value}")
        out.append(value)
    return out


def check_objects(
    objects: Sequence[Mapping[int, np.ndarray]], frames: list[np.ndarray]
) -> list[dict[int, np.ndarray]]:
    """Validate and normalise masks to 0/1 uint8; empty masks are dropped (object not visible there)."""
    hw = frames[0].shape[:2]
    out: list[dict[int, np.ndarray]] = []
    for k, obj in enumerate(objects):
        if not isinstance(obj, Mapping):
            raise InputError(f"object {k} must map frame index -> mask, got {type(obj).__name__}")
        kept: dict[int, np.ndarray] = {}
        for f, mask in obj.items():
            if isinstance(f, (bool, np.bool_)) or not isinstance(f, (int, np.integer)):
                raise InputError(f"object {k}: frame index {f!r} is not an integer")
            if not 0 <= int(f) < len(frames):
                raise InputError(f"object {k}: mask on frame {int(f)} but there are only {len(frames)} frames")
            m = normalise_mask(mask, hw, f"object {k}, frame {int(f)}")
            if m.any():
                kept[int(f)] = m
        out.append(kept)
    return out


def check_requests(requests: Sequence["Request"], num_objects: int) -> None:
    for i, req in enumerate(requests):
        if not isinstance(req.prompt, str):
            raise InputError(f"request {i}: prompt must be a string")
        indices = list(req.object_indices)
        if not indices:
            raise InputError(f"request {i}: refers to no object")
        if req.max_new_tokens is not None and req.max_new_tokens < 1:
            raise InputError(f"request {i}: max_new_tokens must be >= 1, got {req.max_new_tokens}")
        for k in indices:
            if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or not 0 <= int(k) < num_objects:
                raise InputError(f"request {i}: object index {k!r} is not one of the {num_objects} objects")
        n = count_regions(req.prompt)
        if n != len(indices):
            raise InputError(
                f"request {i}: prompt has {n} {REGION_PLACEHOLDER} but refers to {len(indices)} "
                f"object(s): {req.prompt!r}"
            )
