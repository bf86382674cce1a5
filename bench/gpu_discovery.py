"""`bench.gpu`'s discovery section: what one keyframe's automatic discovery costs at the released
SAM 2.1 sizes, and what the "changed" schedule's check costs beside it.

* ``discovery``: `actors.discovery.Sam2Discoverer` (the tracker's own mask generation: the image
  embedding once, then a grid of point prompts through the mask decoder in batches of 64, then
  filtering and NMS) on an 854x480 frame of `bench.gpu_loop.Scene`, with SAM 2.1 hiera-tiny and
  -large at random weights (`bench.gpu_models.sam2_folder`): seconds per keyframe with SAM's
  32 x 32 point grid (`discovery_{size}_s_per_keyframe`) and with a coarser 16 x 16 one
  (`..._coarse`; the smoke run uses 2 and 1 points a side, or the CPU would take minutes),
  the GPU-seconds per video-hour that searching every keyframe costs at the index's default of one
  keyframe every 2 s (`discovery_{size}_s_per_video_hour_every`), and the proposals kept. Then
  `discovery_check_s_per_keyframe`: the schedule's decision (`DiscoveryGate.due`, on the CPU) on
  the same frame with 8 tracked objects, which "changed" pays on every keyframe it skips.

Random weights cost what the released ones cost in the forward passes (same shapes); what they do
not reproduce is how many proposals pass the quality filters, which sets the cost of the RLE and
NMS steps after them (`discovery_{size}_proposals` says how many did). `bench.stages` gives how
many keyframes "changed" searches per video-hour: multiply.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from bench.gpu_loop import Scene
from bench.gpu_models import peak_gpu_mib, release, reset_peak, sam2_folder, timed
from bench.gpu_sections import FRAME_HW, SMOKE_HW

#: Keyframes per video-hour at the index's default `keyframe_interval_s` (2 s).
KEYFRAMES_PER_HOUR = 3600 / 2.0


def section_discovery(ctx: Any) -> dict[str, Any]:
    """Seconds per keyframe of SAM 2.1 tiny and large mask generation, and of the schedule's check."""
    h, w = SMOKE_HW if ctx.smoke else FRAME_HW
    scene = Scene(w, h, count=8, seed=5)
    frame = scene.frame(0.0)
    grids = (2, 1) if ctx.smoke else (32, 16)
    out: dict[str, Any] = {"discovery_check_s_per_keyframe": _check_seconds(scene),
                           "discovery_points_per_side": grids[0], "discovery_points_per_side_coarse": grids[1]}
    for size in ("tiny", "large"):
        if time.perf_counter() > ctx.deadline:
            ctx.note(f"discovery {size}: skipped, the time budget ran out")
            continue
        out.update(_discovery_size(ctx, size, frame, grids))
        release()
    return out


def _discovery_size(ctx: Any, size: str, frame: np.ndarray, grids: tuple[int, int]) -> dict[str, Any]:
    from actors.discovery import Sam2Discoverer
    from models.sam2 import load_sam2

    reset_peak()
    bundle = load_sam2(str(sam2_folder(size, ctx.root, ctx.smoke)), device=ctx.device, dtype=ctx.dtype)
    out: dict[str, Any] = {}
    for grid, tag in zip(grids, ("", "_coarse"), strict=True):
        discover = Sam2Discoverer(bundle, points_per_side=grid)
        if not ctx.smoke:
            discover(frame)  # warm-up: kernels, allocator
        seconds, proposals = timed(lambda: discover(frame), repeats=1 if ctx.smoke else 2)
        out[f"discovery_{size}_s_per_keyframe{tag}"] = seconds
        out[f"discovery_{size}_proposals{tag}"] = len(proposals)
    out[f"discovery_{size}_s_per_video_hour_every"] = out[f"discovery_{size}_s_per_keyframe"] * KEYFRAMES_PER_HOUR
    out[f"discovery_{size}_peak_gpu_mib"] = peak_gpu_mib()
    return out


def _check_seconds(scene: Scene, repeats: int = 5) -> float:
    """The "changed" schedule's decision on a keyframe where the scene's 8 boxes are tracked (CPU)."""
    from actors.discovery_schedule import DiscoveryGate, DiscoverySchedule
    from actors.rle import encode_masks

    first, later = scene.frame(0.0), scene.frame(2.0)
    gate = DiscoveryGate(DiscoverySchedule("changed"), first.shape[0], first.shape[1])
    gate.ran(first, dict(enumerate(encode_masks(np.stack(scene.masks(0.0))))))
    tracked = dict(enumerate(encode_masks(np.stack(scene.masks(2.0)))))
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        gate.due(later, tracked)
        best = min(best, time.perf_counter() - started)
    return best
