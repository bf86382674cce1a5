"""`bench.gpu`'s model sections: SAM 2.1 frames/s, and PixelRefer caption latency, batching and memory.

* ``sam2``: `actors.tracker.Tracker.track` (the stage's own tracker) on 32 frames of 854x480
  boxes, prompted with their boxes on the first frame, with SAM 2.1 hiera-tiny and -large
  (`bench.gpu_models.sam2_folder`): frames/s at 1 and 8 objects, peak GPU memory.
* ``lite2b``, ``full2b``, ``lite7b``: `models.referrer.Referrer.generate` at the released sizes,
  one object masked on all 20 frames of 854x480 (the paper's HC-STVG setting, `bench.referrer`'s
  frame size), 64 new tokens (eos off, so every caption decodes all 64): latency of one caption
  and its phases, then objects/s with 16 and 64 objects of the same video in one call (one
  caption each, one LLM batch: no token budget), and peak GPU memory for one caption and overall.

Inputs come from `bench.gpu_loop.Scene` (boxes, rendered in milliseconds) rather than
`bench.referrer.synthetic_video`, which paints a full-frame texture per object per frame: 20 s of
CPU for 64 objects at 480p, a twentieth of the budget.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch

from bench.gpu_models import build_referrer, parameter_count, peak_gpu_mib, release, reset_peak, sam2_folder, timed
from bench.gpu_loop import Scene

#: Frame size of the model sections: `bench.referrer.PAPER_HW` (height, width).
FRAME_HW = (480, 854)
SMOKE_HW = (120, 160)
#: Object boxes' largest side, as a fraction of the frame's height. PixelRefer's tokenizer scales an
#: object's crop so that a small mask still gets ~32 patches' worth of pixels (up to 8x for a 16-px
#: box), so tiny objects cost more, not less; a third of the height (people in HC-STVG's shots are
#: often taller) keeps the crops near their own size.
OBJECT_SIDE = 1 / 3


def section_sam2(ctx: Any) -> dict[str, Any]:
    """Tracking frames/s of SAM 2.1 tiny and large, at 1 and 8 prompted objects."""
    frames_n, (h, w) = (4, SMOKE_HW) if ctx.smoke else (32, FRAME_HW)
    scene = Scene(w, h, count=8, seed=3)
    times = np.arange(frames_n, dtype=np.float64)  # 1 fps, the index's default rate
    video = np.stack([scene.frame(t) for t in times])
    out: dict[str, Any] = {}
    for size in ("tiny", "large"):
        if time.perf_counter() > ctx.deadline:
            ctx.note(f"sam2 {size}: skipped, the time budget ran out")
            continue
        out.update(_sam2_size(ctx, size, video, times, scene.boxes(0.0)))
        release()  # the model went with the helper's frame
    return out


def _sam2_size(ctx: Any, size: str, video: np.ndarray, times: np.ndarray, boxes: np.ndarray) -> dict[str, Any]:
    from actors.prompts import ObjectPrompt
    from actors.tracker import Tracker

    reset_peak()
    started = time.perf_counter()
    tracker = Tracker(str(sam2_folder(size, ctx.root, ctx.smoke)), device=ctx.device, dtype=ctx.dtype, max_objects=8)
    out = {f"sam2_{size}_load_s": time.perf_counter() - started,
           f"sam2_{size}_params_m": parameter_count(tracker.bundle.model) / 1e6}
    for n in (1, 8):
        prompts = [ObjectPrompt(box=tuple(float(v) for v in boxes[k]), frame=0, object_id=k + 1) for k in range(n)]
        tracker.track(video[:2], times[:2], prompts)  # warm-up: kernels, allocator, this object count
        seconds, tracks = timed(lambda: tracker.track(video, times, prompts))
        out[f"sam2_{size}_fps_{n}obj"] = len(video) / seconds
        # With the presence bias every object should be on every frame; less means masks vanished.
        out[f"sam2_{size}_present_frac_{n}obj"] = sum(len(t["frames"]) for t in tracks) / (len(video) * n)
    out[f"sam2_{size}_peak_gpu_mib"] = peak_gpu_mib()
    return out


def _inputs(ctx: Any, count: int) -> tuple[list[np.ndarray], list[float], list[dict[int, np.ndarray]]]:
    """Frames, times and `count` objects masked on every frame (one scene, shared by the sections)."""
    frames_n, (h, w) = (2, SMOKE_HW) if ctx.smoke else (20, FRAME_HW)
    key = ("referrer-inputs", frames_n, h, w)
    if key not in ctx.cache:
        scene = Scene(w, h, count=64, seed=11, side=int(h * OBJECT_SIDE))
        times = [0.5 * f for f in range(frames_n)]  # 2 fps: 20 frames over 10 s
        per_frame = [scene.masks(t) for t in times]
        objects = [{f: per_frame[f][k] for f in range(frames_n)} for k in range(64)]
        ctx.cache[key] = ([scene.frame(t) for t in times], times, objects)
    frames, times, objects = ctx.cache[key]
    return frames, times, objects[:count]


def _generate(referrer: Any, ctx: Any, count: int, tokens: int) -> Callable[[], list[Any]]:
    """One `generate` call captioning `count` objects in one LLM batch; raises on any failed caption."""
    from models.referrer import DEFAULT_CAPTION_PROMPT, Request

    frames, times, objects = _inputs(ctx, count)
    requests = [Request(DEFAULT_CAPTION_PROMPT, [k]) for k in range(count)]

    def call() -> list[Any]:
        gens = referrer.generate(frames, times, objects, requests, max_new_tokens=tokens, batch_size=count,
                                 token_budget=None)
        bad = [g.error for g in gens if g.error]
        if bad:
            raise RuntimeError(f"{len(bad)} of {count} captions failed: {bad[0]}")
        return gens

    return call


def referrer_section(mode: str, size: str, batches: tuple[int, ...] = (16, 64)) -> Callable[[Any], dict[str, Any]]:
    """The section measuring PixelRefer `mode` ("lite" / "full") at released size `size` ("2B" / "7B")."""

    def run(ctx: Any) -> dict[str, Any]:
        tag = f"{mode}{size.lower()}"
        tokens = 8 if ctx.smoke else 64
        reset_peak()
        started = time.perf_counter()
        referrer = build_referrer(mode, size, device=ctx.device, dtype=ctx.dtype, attn=ctx.attn, smoke=ctx.smoke)
        out: dict[str, Any] = {f"{tag}_build_s": time.perf_counter() - started,
                               f"{tag}_params_b": parameter_count(referrer.model) / 1e9,
                               f"{tag}_weights_gib": (torch.cuda.memory_allocated() / 2**30
                                                      if torch.cuda.is_available() else 0.0)}
        one = _generate(referrer, ctx, 1, tokens)
        _generate(referrer, ctx, 1, 2)()  # warm-up: kernels, allocator
        referrer.times.take()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        repeats = 2
        seconds, gens = timed(one, repeats=repeats)
        out[f"{tag}_caption_latency_s"] = seconds
        out[f"{tag}_caption_tokens"] = gens[0].num_tokens
        out[f"{tag}_objects_per_s_b1"] = 1.0 / seconds  # one object in one call: the latency's inverse
        out[f"{tag}_caption_peak_gpu_mib"] = peak_gpu_mib()
        for phase, total in sorted(referrer.times.take().items()):
            out[f"{tag}_caption_phase_s_{phase}"] = total / repeats
        for b in batches:
            if time.perf_counter() > ctx.deadline:
                ctx.note(f"{tag}: batch {b} skipped, the time budget ran out")
                continue
            seconds, _ = timed(_generate(referrer, ctx, b, tokens))
            out[f"{tag}_objects_per_s_b{b}"] = b / seconds
        top = max((b for b in batches if f"{tag}_objects_per_s_b{b}" in out), default=None)
        if top:
            out[f"{tag}_batch_speedup_b{top}"] = out[f"{tag}_objects_per_s_b{top}"] / out[f"{tag}_objects_per_s_b1"]
        out[f"{tag}_peak_gpu_mib"] = peak_gpu_mib()
        return out  # the model goes with this frame; `bench.gpu` releases the cache after each section

    return run
