"""Helpers shared by the model tests (a plain module: tests/ has no packages)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

PARITY = Path(__file__).resolve().parents[1] / "fixtures" / "parity"
LITE_FIXTURE = PARITY / "lite-tiny"
FULL_FIXTURE = PARITY / "full-tiny"


def make_video(
    num_frames: int = 4,
    height: int = 96,
    width: int = 128,
    num_objects: int = 2,
    seed: int = 0,
    skip: dict[int, set[int]] | None = None,
):
    """Textured noise frames with textured moving rectangles; returns frames, timestamps, objects.

    ``skip[k]`` lists frames where object k has no mask (absent from its mapping).
    """
    rng = np.random.RandomState(seed)
    base = (rng.rand(height, width, 3) * 255).astype(np.uint8)
    frames = [base.copy() for _ in range(num_frames)]
    objects: list[dict[int, np.ndarray]] = []
    for k in range(num_objects):
        masks: dict[int, np.ndarray] = {}
        h, w = 18 + 6 * k, 24 + 4 * k
        for f in range(num_frames):
            if skip and f in skip.get(k, set()):
                continue
            r = min(height - h, 8 + 20 * k + 3 * f)
            c = min(width - w, 10 + 25 * k + 5 * f)
            m = np.zeros((height, width), dtype=bool)
            m[r : r + h, c : c + w] = True
            colour = rng.randint(0, 255, 3)
            tex = np.clip(colour + rng.randint(-60, 60, size=(height, width, 3)), 0, 255).astype(np.uint8)
            frames[f][m] = tex[m]
            masks[f] = m
        objects.append(masks)
    timestamps = [0.5 * f for f in range(num_frames)]
    return frames, timestamps, objects
