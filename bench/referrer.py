"""Benchmark of the referrer: PixelRefer-Lite vs full PixelRefer, measured FLOPs and wall time, batching,
and the inference optimisations of ``models.perf``.

    python -m bench.referrer [--json FILE] [--threads 2] [--repeats 3] [--new-tokens 16] [--quick]

Why: DESIGN.md's efficiency claims (Lite ~50-100x cheaper than full; batching) were so far only
computed analytically (``bench.flops``). This bench runs the real code path (``Referrer.generate``:
crops, vision tower, object tokens, OCI / projector, prefill and greedy decode) on the same 20-frame
video and the same objects in both modes and measures:

* **FLOPs** with ``torch.utils.flop_counter.FlopCounterMode`` over the whole ``generate`` call, split
  into vision tower / object tokens (OCI, ``feat_linear``) / projector / LLM prefill / LLM decode. The
  models are loaded with **eager attention** for these runs: on CPU FlopCounterMode does not count
  ``scaled_dot_product_attention`` (it would miss every attention matmul); eager attention is plain
  matmuls, so they are counted. Hardware FLOPs (2 per multiply-add). The analytic prefill count of
  ``models.flops`` (paper formula, x2) is printed next to the measured one as a cross-check.
* **Wall time** per object with the production default (sdpa attention, all optimisations on): median
  of ``--repeats`` runs on a shared 2-core machine (``--threads`` torch threads, default 2).
* **Batching** (Lite): objects/s for 16 objects' captions asked in one call with ``batch_size`` 1, 4 and
  16 vs one call per object (one at a time); at the 2B widths batch 16 only, to keep the bench short.
  The greedy ids of every batched run are compared with the one-at-a-time ids.
* **Frames per object** (2B widths, Lite): one object tracked over the 20 frames, shown all of them or
  K = 8, 4, 1 evenly spread (``actors.requests.spread_frames``, the index job's ``--object-frames K``).
* **Optimisations**: the same call with ``PerfOptions.baseline()`` (transformers' ``generate``, nothing
  shared, upstream's k-means expressions) vs the defaults; the greedy ids are compared (must be equal).
  Lite: 4 objects x (caption + question); full: 8 captions (tiny) / 4 captions (2B widths).

Runtime: about 6 minutes on a quiet 2-vCPU machine (about 30 s more on the first run, which creates
and caches the 2B-width checkpoints; peak RSS about 10 GB, in the 480p run); ``--quick`` (tiny only)
about 1.5 minutes. On a shared machine other processes can slow the small-op-bound tiny runs by 10x
(two OpenMP threads waiting on a busy core), so the run keeps to ``--budget-s``: past half of it every
stage times one repeat, past 60% the optional stages (optimisations, batching at the 2B widths, frames
per object) are skipped; the JSON says which, and records the load average before and after.

Models: the built-in ``tiny`` checkpoints, and checkpoints with the released 2B widths (Qwen2.5-1.5B:
hidden 1536, 12 heads, 2 KV heads, intermediate 8960; VL3-SigLIP-NaViT: hidden 1152, 16 heads,
intermediate 4304, patch 14) but 2 LLM and 2 tower layers and random weights, created through the same
config classes and loaded through the normal loader (``models.tiny.real_2b_dims``; the tiny tokenizer's
vocabulary). Their measured FLOPs are also scaled to the released depth (28 LLM / 27 tower layers:
decoder and tower-encoder FLOPs x14 / x13.5, the rest as measured), which is exact for the per-layer parts.

Settings: 20 frames of 320x240 (a textured background that pans 3 px per frame with sensor noise, so
that full's frame-difference compression keeps about every token, as on camera footage) with moving
textured objects. "1 mask": each object has a mask on frame 10 only; "20 masks": on every frame (what
the pipeline gives for a tracked object). Every request decodes exactly ``--new-tokens`` tokens (eos is
disabled: random weights would stop at random places, and equal work makes modes and batch sizes
comparable). One caption request per object, the pipeline's default caption prompt.

Paper scale: the 2B-width checkpoints once more on 20 frames of 854x480, "1 mask" only, one timed run.
Full's vision tokens grow with the frame size up to the released per-frame budget, which 480p already
fills (7800 frame tokens after compression, the paper counts ~7185); Lite's do not grow. This is the
run that compares with the paper's ~100x (its figure counts the LLM only); the 320x240 runs
understate full's cost.

Not measured here: GPU (no GPU on this machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from models import decoding
from models.flops import LLMDims, llm_macs, released_dims
from models.perf import PerfOptions
from models.referrer import DEFAULT_CAPTION_PROMPT, Referrer, Request
from models.tiny import TINY_DIMS, CheckpointDims, real_2b_dims, tiny_checkpoint

NUM_FRAMES = 20
HEIGHT, WIDTH = 240, 320
MASK_FRAME = 10
REAL_LLM_LAYERS, REAL_VISION_LAYERS = 28, 27
QUESTION = "What is <region> doing?"
#: Full's frame tokens for HC-STVG's 20 frames in the paper's setting (DESIGN.md, bench.flops).
PAPER_VISION_TOKENS = 7185
#: Frame size of the paper-scale run: from about 480p up, full's frames fill the released per-frame
#: pixel budget (``max_pixels // 20``), so its frame tokens (7800 here) stop growing with resolution.
PAPER_HW = (480, 854)
PAPER_LABEL = "2B-w/2L@480p"


# ---------------------------------------------------------------------------------------------------
# Input
# ---------------------------------------------------------------------------------------------------
def synthetic_video(
    num_objects: int, *, num_frames: int = NUM_FRAMES, height: int = HEIGHT, width: int = WIDTH, seed: int = 0
) -> tuple[list[np.ndarray], list[float], list[dict[int, np.ndarray]]]:
    """Frames, timestamps (2 fps) and per-object masks on every frame (see the module docstring)."""
    rng = np.random.default_rng(seed)
    pan = 3
    small = rng.integers(0, 256, (height // 4 + 1, (width + pan * num_frames) // 4 + 1, 3), dtype=np.uint8)
    background = np.kron(small, np.ones((4, 4, 1), dtype=np.uint8))[:height, : width + pan * num_frames]
    frames = []
    for f in range(num_frames):
        noise = rng.integers(-6, 7, (height, width, 3))
        frames.append(np.clip(background[:, f * pan : f * pan + width].astype(int) + noise, 0, 255).astype(np.uint8))
    objects: list[dict[int, np.ndarray]] = []
    cols = int(np.ceil(np.sqrt(num_objects)))
    for k in range(num_objects):
        h, w = int(rng.integers(24, 64)), int(rng.integers(24, 72))
        cell_h, cell_w = height // cols, width // cols
        r0 = (k // cols) * cell_h + int(rng.integers(0, max(1, cell_h - h // 2)))
        c0 = (k % cols) * cell_w + int(rng.integers(0, max(1, cell_w - w // 2)))
        dr, dc = rng.integers(-2, 3), rng.integers(-3, 4)
        colour = rng.integers(0, 256, 3)
        masks = {}
        yy, xx = np.mgrid[:height, :width]
        for f in range(num_frames):
            r = int(np.clip(r0 + dr * f, 0, height - h))
            c = int(np.clip(c0 + dc * f, 0, width - w))
            m = ((yy - r - h / 2) / (h / 2)) ** 2 + ((xx - c - w / 2) / (w / 2)) ** 2 <= 1.0
            tex = np.clip(colour + rng.integers(-40, 41, (height, width, 3)), 0, 255).astype(np.uint8)
            frames[f][m] = tex[m]
            masks[f] = m
        objects.append(masks)
    return frames, [0.5 * f for f in range(num_frames)], objects


def one_mask(objects: Sequence[dict[int, np.ndarray]]) -> list[dict[int, np.ndarray]]:
    return [{MASK_FRAME: o[MASK_FRAME]} for o in objects]


# ---------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------
def load(mode: str, dims: CheckpointDims, *, attn: str | None = None, perf: PerfOptions | None = None) -> Referrer:
    """A referrer on a generated checkpoint (cached on disk), with eos disabled (see the docstring)."""
    path = tiny_checkpoint(mode, dims=dims)  # type: ignore[arg-type]
    r = Referrer.from_pretrained(str(path), mode=mode, attn_implementation=attn, perf=perf)
    r.generation = dataclasses.replace(r.generation, eos_token_ids=())
    return r


# ---------------------------------------------------------------------------------------------------
# Measurement helpers
# ---------------------------------------------------------------------------------------------------
def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float], Any]:
    """Median wall seconds of ``repeats`` runs (after gc), all samples, and the last result."""
    samples, out = [], None
    for _ in range(max(1, repeats)):
        gc.collect()
        t = time.perf_counter()
        out = fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples), samples, out


@contextmanager
def _patched(obj: Any, name: str, wrapper: Callable[[Callable], Callable]) -> Iterator[None]:
    own = name in vars(obj)
    original = getattr(obj, name)
    setattr(obj, name, wrapper(original))
    try:
        yield
    finally:
        if own:
            setattr(obj, name, original)
        else:
            delattr(obj, name)


def measure_flops(referrer: Referrer, frames, times, objects, requests, new_tokens: int) -> dict[str, Any]:
    """FlopCounterMode over one ``generate`` call, split by stage, plus the shapes the stages saw."""
    from torch.utils.flop_counter import FlopCounterMode

    model = referrer.model
    buckets = {"vision": 0, "object_tokens": 0, "projector": 0, "prefill": 0, "decode": 0, "lm_head": 0}
    shapes: dict[str, Any] = {"patches": [], "llm_lengths": [], "image_tokens": [], "prefill_tokens": 0}
    counter = FlopCounterMode(display=False)

    def bucket(name: str) -> Callable[[Callable], Callable]:
        def wrap(fn: Callable) -> Callable:
            def inner(*args, **kwargs):
                before = counter.get_total_flops()
                out = fn(*args, **kwargs)
                buckets[name] += counter.get_total_flops() - before
                return out

            return inner

        return wrap

    def forward_wrap(fn: Callable) -> Callable:
        def inner(llm, embeds, mask, positions, cache):
            before = counter.get_total_flops()
            out = fn(llm, embeds, mask, positions, cache)
            phase = "prefill" if embeds.shape[1] > 1 else "decode"
            buckets[phase] += counter.get_total_flops() - before
            if phase == "prefill":
                shapes["prefill_tokens"] += int(mask[:, -embeds.shape[1] :].sum())
            return out

        return inner

    def encode_wrap(fn: Callable) -> Callable:
        def inner(images):
            shapes["patches"] += [len(im.patches) for im in images]
            return bucket("vision")(fn)(images)

        return inner

    def decode_wrap(fn: Callable) -> Callable:
        def inner(llm, items, **kw):
            shapes["llm_lengths"] += [int(x.ids.shape[0]) for x in items]
            image_id = referrer.config.image_token_index
            shapes["image_tokens"] += [int((x.ids == image_id).sum()) if image_id is not None else 0 for x in items]
            return fn(llm, items, **kw)

        return inner

    with (
        _patched(model, "encode_images", encode_wrap),
        _patched(model, "object_tokens", bucket("object_tokens")),
        _patched(model.projector, "forward", bucket("projector")),
        _patched(model.llm.lm_head, "forward", bucket("lm_head")),
        _patched(decoding, "_forward", forward_wrap),
        _patched(decoding, "greedy_decode", decode_wrap),
        counter,
    ):
        referrer.generate(frames, times, objects, requests, max_new_tokens=new_tokens, batch_size=16)
    total = counter.get_total_flops()
    counts = counter.get_flop_counts()
    vision_encoder = sum(counts.get("VideoLlama3VisionModel.encoder", {}).values())
    out: dict[str, Any] = {f"flops_{k}": v for k, v in buckets.items()}
    out["flops_total"] = total
    out["flops_other"] = total - sum(buckets.values())
    out["flops_vision_encoder_layers"] = vision_encoder
    out["vision_patches"] = int(sum(shapes["patches"]))
    out["vision_images"] = len(shapes["patches"])
    out["llm_tokens"] = int(sum(shapes["llm_lengths"]))
    out["llm_vision_tokens"] = int(sum(shapes["image_tokens"])) if referrer.mode == "full" else 0
    out["prefill_tokens"] = int(shapes["prefill_tokens"])
    text = referrer.config.text
    dims = LLMDims(
        hidden=text["hidden_size"],
        layers=text["num_hidden_layers"],
        heads=text["num_attention_heads"],
        kv_heads=text["num_key_value_heads"],
        intermediate=text["intermediate_size"],
    )
    out["flops_prefill_analytic"] = sum(2 * llm_macs(dims, n) for n in shapes["llm_lengths"])
    return out


def scale_to_released_depth(f: dict[str, Any], llm_layers: int, vision_layers: int) -> float:
    """Measured FLOPs with the decoder and the tower's encoder layers scaled to 28 / 27 layers."""
    llm = f["flops_prefill"] + f["flops_decode"]
    vis_layers = f["flops_vision_encoder_layers"]
    rest = f["flops_total"] - llm - vis_layers
    return rest + llm * REAL_LLM_LAYERS / llm_layers + vis_layers * REAL_VISION_LAYERS / vision_layers


# ---------------------------------------------------------------------------------------------------
# The runs
# ---------------------------------------------------------------------------------------------------
def lite_vs_full(
    label: str,
    dims: CheckpointDims,
    figures: dict[str, Any],
    rows: list[list[str]],
    *,
    repeats: int,
    new_tokens: int,
    hw: tuple[int, int] = (HEIGHT, WIDTH),
    settings_wanted: Sequence[str] = ("mask1", "mask20"),
) -> None:
    """Measured FLOPs (eager) and wall time (sdpa) per object, one caption request per call."""
    frames, times, objects = synthetic_video(1, seed=1, height=hw[0], width=hw[1])
    settings = {k: v for k, v in {"mask1": one_mask(objects), "mask20": objects}.items() if k in settings_wanted}
    req = [Request(DEFAULT_CAPTION_PROMPT, [0])]
    for mode in ("lite", "full"):
        eager = load(mode, dims, attn="eager")
        prod = load(mode, dims)
        for setting, objs in settings.items():
            key = f"{label}.{mode}.{setting}"
            f = measure_flops(eager, frames, times, objs, req, new_tokens)
            wall, samples, _ = timed(
                lambda: prod.generate(frames, times, objs, req, max_new_tokens=new_tokens), repeats
            )
            for k, v in f.items():
                figures[f"{key}.{k}"] = v
            depth = scale_to_released_depth(f, dims.layers, dims.vision_layers) if dims != TINY_DIMS else None
            figures[f"{key}.flops_released_depth"] = depth
            figures[f"{key}.wall_s_per_object"] = wall
            figures[f"{key}.wall_samples"] = samples
            rows.append(
                [
                    label,
                    f"{hw[1]}x{hw[0]}",
                    setting,
                    mode,
                    str(f["llm_tokens"]),
                    str(f["vision_patches"]),
                    _g(f["flops_vision"]),
                    _g(f["flops_object_tokens"] + f["flops_projector"]),
                    _g(f["flops_prefill"]),
                    _g(f["flops_prefill_analytic"]),
                    _g(f["flops_decode"] + f["flops_lm_head"]),
                    _g(f["flops_total"]),
                    "-" if depth is None else _g(depth),
                    f"{wall:.3f}",
                ]
            )
        del eager, prod
        gc.collect()
    for setting in settings:
        full, lite = (f"{label}.full.{setting}", f"{label}.lite.{setting}")
        for k in (full, lite):
            figures[f"{k}.flops_llm"] = figures[f"{k}.flops_prefill"] + figures[f"{k}.flops_decode"]
        for what in ("flops_total", "flops_prefill", "flops_llm", "flops_released_depth", "wall_s_per_object"):
            a, b = figures[f"{full}.{what}"], figures[f"{lite}.{what}"]
            figures[f"{label}.{setting}.full_over_lite.{what}"] = None if a is None or b is None else a / b
        if dims != TINY_DIMS:
            # The measured prefill equals models.flops exactly (printed side by side), so the analytic
            # count carries the measured token counts to the paper's setting: 28 layers, and full with
            # PAPER_VISION_TOKENS frame tokens instead of this video's.
            llm = released_dims("2B").llm
            full_n = figures[f"{full}.llm_tokens"] - figures[f"{full}.llm_vision_tokens"] + PAPER_VISION_TOKENS
            figures[f"{label}.{setting}.full_over_lite.llm_prefill_at_paper_vision_tokens_analytic"] = llm_macs(
                llm, full_n
            ) / llm_macs(llm, figures[f"{lite}.llm_tokens"])


def object_frames(
    label: str, dims: CheckpointDims, figures: dict[str, Any], rows: list[list[str]], *, repeats: int, new_tokens: int
) -> None:
    """Lite's cost per object when the index job shows it K of a 20-frame track (``--object-frames``)."""
    from actors.requests import spread_frames

    frames, times, objects = synthetic_video(1, seed=1)
    eager, prod = load("lite", dims, attn="eager"), load("lite", dims)
    req = [Request(DEFAULT_CAPTION_PROMPT, [0])]
    for k in (None, 8, 4, 1):
        objs = [{i: o[i] for i in spread_frames(list(o), k)} for o in objects]
        f = measure_flops(eager, frames, times, objs, req, new_tokens)
        depth = scale_to_released_depth(f, dims.layers, dims.vision_layers)
        wall, samples, _ = timed(lambda: prod.generate(frames, times, objs, req, max_new_tokens=new_tokens), repeats)
        key = f"{label}.lite.object_frames_{k or 'all'}"
        figures[f"{key}.llm_tokens"] = f["llm_tokens"]
        figures[f"{key}.flops_released_depth"] = depth
        figures[f"{key}.wall_s_per_object"] = wall
        figures[f"{key}.wall_samples"] = samples
        rows.append([label, "all (20)" if k is None else str(k), str(f["llm_tokens"]), _g(depth), f"{wall:.2f}"])


def batching(
    label: str,
    dims: CheckpointDims,
    mode: str,
    setting: str,
    num_objects: int,
    batch_sizes: Sequence[int],
    figures: dict[str, Any],
    rows: list[list[str]],
    *,
    repeats: int,
    new_tokens: int,
) -> None:
    """Objects/s for ``num_objects`` captions in one call per batch size, vs one call per object."""
    frames, times, objects = synthetic_video(num_objects, seed=2)
    objs = one_mask(objects) if setting == "mask1" else objects
    r = load(mode, dims)
    reqs = [Request(DEFAULT_CAPTION_PROMPT, [k]) for k in range(num_objects)]
    if dims == TINY_DIMS:
        r.generate(frames, times, objs, reqs[:1], max_new_tokens=2)  # warm-up (allocator, lazy imports)
    key = f"{label}.{mode}.{setting}.batching"

    def one_at_a_time():
        return [r.generate(frames, times, objs, [q], max_new_tokens=new_tokens)[0] for q in reqs]

    wall, samples, single = timed(one_at_a_time, repeats)
    figures[f"{key}.one_at_a_time.objects_per_s"] = num_objects / wall
    figures[f"{key}.one_at_a_time.wall_samples"] = samples
    rows.append([label, mode, setting, "one at a time", f"{wall:.2f}", f"{num_objects / wall:.2f}", "1.00"])
    base = num_objects / wall
    for bs in batch_sizes:
        wall_b, samples_b, out = timed(
            lambda: r.generate(frames, times, objs, reqs, max_new_tokens=new_tokens, batch_size=bs), repeats
        )
        same = [g.token_ids for g in out] == [g.token_ids for g in single]
        figures[f"{key}.batch{bs}.objects_per_s"] = num_objects / wall_b
        figures[f"{key}.batch{bs}.wall_samples"] = samples_b
        figures[f"{key}.batch{bs}.speedup_vs_one_at_a_time"] = (num_objects / wall_b) / base
        figures[f"{key}.batch{bs}.ids_equal_one_at_a_time"] = same
        rows.append(
            [label, mode, setting, f"batch_size {bs}", f"{wall_b:.2f}", f"{num_objects / wall_b:.2f}",
             f"{(num_objects / wall_b) / base:.2f}" + ("" if same else " (ids differ!)")]
        )


def optimisations(
    label: str,
    dims: CheckpointDims,
    mode: str,
    setting: str,
    num_objects: int,
    with_question: bool,
    figures: dict[str, Any],
    rows: list[list[str]],
    *,
    repeats: int,
    new_tokens: int,
) -> None:
    """One call (all objects, batch 16) with every optimisation off vs on; greedy ids must be equal."""
    frames, times, objects = synthetic_video(num_objects, seed=3)
    objs = one_mask(objects) if setting == "mask1" else objects
    reqs = [Request(DEFAULT_CAPTION_PROMPT, [k]) for k in range(num_objects)]
    if with_question:
        reqs += [Request(QUESTION, [k]) for k in range(num_objects)]
    key = f"{label}.{mode}.{setting}.optimisations"
    results = {}
    for name, perf in (("baseline", PerfOptions.baseline()), ("optimised", PerfOptions())):
        r = load(mode, dims, perf=perf)
        if dims == TINY_DIMS:
            r.generate(frames, times, objs, reqs[:1], max_new_tokens=2)
        wall, samples, out = timed(
            lambda: r.generate(frames, times, objs, reqs, max_new_tokens=new_tokens, batch_size=16), repeats
        )
        results[name] = (wall, [g.token_ids for g in out])
        figures[f"{key}.{name}.wall_s"] = wall
        figures[f"{key}.{name}.wall_samples"] = samples
    same = results["baseline"][1] == results["optimised"][1]
    speedup = results["baseline"][0] / results["optimised"][0]
    figures[f"{key}.speedup"] = speedup
    figures[f"{key}.ids_equal"] = same
    rows.append(
        [label, mode, setting, f"{len(reqs)} requests", f"{results['baseline'][0]:.2f}",
         f"{results['optimised'][0]:.2f}", f"{speedup:.2f}", "yes" if same else "NO"]
    )


# ---------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------
def _g(flops: float) -> str:
    return f"{flops / 1e9:.2f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), "-" * len(line(header))] + [line(r) for r in rows])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.referrer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the figures as one flat JSON object to this file")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats for the tiny models (median; 3)")
    parser.add_argument("--repeats-2b", type=int, default=2, help="timed repeats at 2B widths (2)")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens decoded per request (16)")
    parser.add_argument("--quick", action="store_true", help="tiny models only")
    parser.add_argument("--skip-tiny", action="store_true", help="2B-width runs only")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=540.0,
        help="time budget (540): past half of it repeats drop to 1, past 60%% optional stages are skipped",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    torch.set_grad_enabled(False)
    load_before = os.getloadavg()
    started = time.perf_counter()
    figures: dict[str, Any] = {}
    cmp_rows: list[list[str]] = []
    batch_rows: list[list[str]] = []
    opt_rows: list[list[str]] = []
    frames_rows: list[list[str]] = []
    big = real_2b_dims()
    kw = dict(new_tokens=args.new_tokens)

    skipped: list[str] = []
    reduced: list[str] = []

    def elapsed() -> float:
        return time.perf_counter() - started

    def reps(n: int, name: str) -> int:
        """Repeats for a stage: 1 once half the time budget is gone (the machine is shared and busy)."""
        if n > 1 and elapsed() > 0.5 * args.budget_s:
            reduced.append(name)
            return 1
        return n

    def stage(name: str, fn: Callable[[int], None], repeats: int, *, optional: bool = False) -> None:
        if optional and elapsed() > 0.6 * args.budget_s:
            skipped.append(name)
            print(f"[{elapsed():6.1f} s] {name} skipped (time budget)", file=sys.stderr)
            return
        t = time.perf_counter()
        fn(reps(repeats, name))
        figures[f"bench_seconds.{name}"] = time.perf_counter() - t
        print(f"[{elapsed():6.1f} s] {name} done", file=sys.stderr)

    # Essential stages first; the optional ones are skipped when the budget is running out.
    tiny = [] if args.skip_tiny else ["tiny"]
    if tiny:
        stage("tiny.lite_vs_full", lambda n: lite_vs_full("tiny", TINY_DIMS, figures, cmp_rows, repeats=n, **kw),
              args.repeats)
        for setting in ("mask1", "mask20"):
            stage(
                f"tiny.lite.{setting}.batching",
                lambda n, s=setting: batching(
                    "tiny", TINY_DIMS, "lite", s, 16, (1, 4, 16), figures, batch_rows, repeats=n, **kw
                ),
                args.repeats,
            )
    if not args.quick:
        stage("2b.lite_vs_full", lambda n: lite_vs_full("2B-w/2L", big, figures, cmp_rows, repeats=n, **kw),
              args.repeats_2b)
    if not args.quick:
        stage(
            "2b.lite_vs_full.480p",
            lambda n: lite_vs_full(
                PAPER_LABEL, big, figures, cmp_rows, repeats=1, hw=PAPER_HW, settings_wanted=("mask1",), **kw
            ),
            1,
        )
    if tiny:
        stage(
            "tiny.lite.optimisations",
            lambda n: optimisations("tiny", TINY_DIMS, "lite", "mask20", 4, True, figures, opt_rows, repeats=n, **kw),
            args.repeats,
            optional=True,
        )
        stage(
            "tiny.full.optimisations",
            lambda n: optimisations("tiny", TINY_DIMS, "full", "mask20", 8, False, figures, opt_rows, repeats=n, **kw),
            args.repeats,
            optional=True,
        )
    if not args.quick:
        stage(
            "2b.lite.mask1.batching",
            lambda n: batching("2B-w/2L", big, "lite", "mask1", 16, (16,), figures, batch_rows, repeats=n, **kw),
            args.repeats_2b,
            optional=True,
        )
        stage(
            "2b.full.optimisations",
            lambda n: optimisations("2B-w/2L", big, "full", "mask1", 4, False, figures, opt_rows, repeats=n, **kw),
            args.repeats_2b,
            optional=True,
        )
        stage(
            "2b.lite.object_frames",
            lambda n: object_frames("2B-w/2L", big, figures, frames_rows, repeats=n, **kw),
            args.repeats_2b,
            optional=True,
        )
    total = time.perf_counter() - started
    figures["bench_seconds.total"] = total

    print(
        "Lite vs full, one object per call, 20 frames "
        "(GFLOPs = 1e9 hardware FLOPs, FlopCounterMode, eager attention; wall: sdpa, median)"
    )
    print(_table(
        ["model", "frames", "masks", "mode", "LLM tok", "patches", "vision", "obj+proj", "prefill", "prefill(analytic)",
         "decode+head", "total", "total@28/27L", "wall s/obj"],
        cmp_rows,
    ))
    labels = tiny + ([] if args.quick else ["2B-w/2L", PAPER_LABEL])
    print()
    for label in labels:
        for setting in ("mask1", "mask20"):
            p = f"{label}.{setting}.full_over_lite"
            if p + ".flops_total" not in figures:
                continue
            depth = figures[p + ".flops_released_depth"]
            print(
                f"{label} {setting}: full/lite measured FLOPs total {figures[p + '.flops_total']:.1f}x, LLM prefill "
                f"{figures[p + '.flops_prefill']:.1f}x, LLM prefill+decode {figures[p + '.flops_llm']:.1f}x"
                + ("" if depth is None else f", total at released depth {depth:.1f}x")
                + f"; wall per object {figures[p + '.wall_s_per_object']:.2f}x"
            )
            paper = figures.get(p + ".llm_prefill_at_paper_vision_tokens_analytic")
            if paper is not None:
                print(
                    f"  (full sees {figures[f'{label}.full.{setting}.llm_vision_tokens']} frame tokens here; with the "
                    f"paper's {PAPER_VISION_TOKENS} the LLM prefill ratio would be {paper:.0f}x, models.flops)"
                )
    print()
    print("Batching: objects/s, captions of 16 objects (one call per batch size vs one call per object)")
    print(_table(["model", "mode", "masks", "how", "wall s", "objects/s", "x one-at-a-time"], batch_rows))
    if frames_rows:
        print()
        print("Lite, one object tracked over 20 frames of 320x240, shown K of them (index --object-frames K)")
        print(_table(["model", "K", "LLM tok", "GFLOPs@28/27L", "wall s/obj"], frames_rows))
    print()
    print("Optimisations: PerfOptions.baseline() vs defaults, one call, batch 16 (greedy ids compared)")
    print(_table(["model", "mode", "masks", "requests", "baseline s", "optimised s", "speedup", "ids equal"], opt_rows))
    load_after = os.getloadavg()
    if skipped or reduced:
        print(f"time budget: skipped {skipped or 'nothing'}; repeats reduced to 1 for {reduced or 'nothing'}")
    print(
        f"\n{args.new_tokens} new tokens per request, torch threads {args.threads}; total {total:.0f} s; "
        f"1-min load average {load_before[0]:.1f} before, {load_after[0]:.1f} after (other processes disturb timings)"
    )

    if args.json:
        doc = dict(figures)
        doc["machine"] = {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_before": list(load_before),
            "loadavg_after": list(load_after),
        }
        import transformers

        doc["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
        doc["settings"] = {
            "threads": args.threads,
            "repeats_tiny": args.repeats,
            "repeats_2b": args.repeats_2b,
            "new_tokens": args.new_tokens,
            "frames": NUM_FRAMES,
            "frame_hw": [HEIGHT, WIDTH],
            "paper_scale_frame_hw": list(PAPER_HW),
            "mask1_frame": MASK_FRAME,
            "flops_attention": "eager (FlopCounterMode does not count sdpa on CPU)",
            "wall_attention": "sdpa",
            "dims_2b": dataclasses.asdict(big),
            "quick": args.quick,
            "budget_s": args.budget_s,
            "skipped_stages": skipped,
            "stages_with_repeats_reduced_to_1": reduced,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1, default=float) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
