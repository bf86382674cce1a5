"""GPU benchmark at the released models' sizes, random weights: what one GPU-hour indexes.

    bash bench/gpu.sh [--json FILE] [--budget-s 420]          # on a GPU machine (see bench/gpu.sh)
    python -m bench.gpu --smoke [--json FILE]                 # every section at tiny sizes on CPU

Sections (each guarded: one that fails records its error, the others still run; a time budget skips
what would not fit, with a note):

* ``sam2``: SAM 2.1 tiny and large (transformers' Sam2 architecture at the released configs, saved
  and loaded through `models.sam2.load_sam2` like a real folder), `Tracker.track` over 32 frames of
  1280x720 moving boxes prompted by their boxes: frames/s at 1 and 8 objects.
* ``lite2b``, ``lite7b``, ``full2b``: PixelRefer at the released widths and depths (Qwen2.5-1.5B /
  -7B, VL3-SigLIP-NaViT, the released vocabulary size), built in memory on the device: one caption
  of one object masked on 20 frames of 640x360 with 64 new tokens (eos off, so every caption
  decodes all 64), and objects/s at batch 1/16/64 (Lite-2B; 1/16 for 7B); peak GPU memory of each.
* ``loop``: the stages' own code (`TrackerStage`, `ReferrerStage`) as one plain loop over a
  10-minute video at 1 fps in 30-s clips (SAM 2.1-tiny + Lite-2B, automatic discovery, K = 8):
  video-hours per GPU-hour and each stage's busy share. Frames are rendered in memory: decoding is
  CPU work (`bench.decode`), and the GPU machine has no PyAV.

Weights are random, so what the captions say is noise, but every matmul, attention and the vision
tower's token counts are those of the released models. Not measured here: load time from disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

#: The released SAM 2.1 backbones (transformers' Sam2HieraDetConfig defaults are hiera-tiny).
SAM2_LARGE_BACKBONE = {
    "hidden_size": 144, "blocks_per_stage": [2, 6, 36, 4], "embed_dim_per_stage": [144, 288, 576, 1152],
    "num_attention_heads_per_stage": [2, 4, 8, 16], "window_size_per_stage": [8, 4, 16, 8],
    "global_attention_blocks": [23, 33, 43], "window_positional_embedding_background_size": [7, 7],
}


def moving_boxes(count: int, frames: int, width: int, height: int, seed: int = 0):
    """Textured frames with `count` boxes moving on straight lines; per frame, each box (xyxy)."""
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 80, (height, width, 3), dtype=np.uint8)
    side = max(8, min(width, height) // 8)
    starts = rng.integers(0, [max(1, width - side), max(1, height - side)], (count, 2))
    steps = rng.integers(-4, 5, (count, 2))
    colours = rng.integers(100, 255, (count, 3))
    video = np.repeat(background[None], frames, axis=0)
    boxes = np.zeros((frames, count, 4))
    for t in range(frames):
        for k in range(count):
            x, y = np.clip(starts[k] + steps[k] * t, 0, [width - side, height - side])
            video[t, y:y + side, x:x + side] = colours[k]
            boxes[t, k] = (x, y, x + side, y + side)
    return video, np.arange(frames, dtype=np.float64), boxes


def peak_gpu_mib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], repeats: int = 1) -> tuple[float, Any]:
    """Best of `repeats` wall times after the device has finished."""
    best, out = float("inf"), None
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best, out


# -- models ------------------------------------------------------------------------------------------


def sam2_folder(size: str, root: Path, smoke: bool) -> Path:
    """A random SAM 2.1 checkpoint of `size` ("tiny" or "large") saved as the released repos are."""
    from transformers import Sam2VideoConfig, Sam2VideoModel

    from models.sam2 import tiny_checkpoint

    if smoke:
        return tiny_checkpoint()
    folder = root / f"sam2.1-{size}"
    if (folder / "config.json").is_file():
        return folder
    vision = None
    if size == "large":
        vision = {"model_type": "sam2_vision_model", "backbone_config": {"model_type": "sam2_hiera_det_model",
                  **SAM2_LARGE_BACKBONE}, "backbone_channel_list": [1152, 576, 288, 144]}
    config = Sam2VideoConfig(vision_config=vision) if vision else Sam2VideoConfig()
    model = Sam2VideoModel(config)
    model.save_pretrained(folder)
    from transformers import Sam2ImageProcessor, Sam2VideoProcessor
    from transformers.models.sam2_video.video_processing_sam2_video import Sam2VideoVideoProcessor

    Sam2VideoProcessor(image_processor=Sam2ImageProcessor(), video_processor=Sam2VideoVideoProcessor()).save_pretrained(folder)
    return folder


def referrer_at(mode: str, size: str, device: str, dtype: torch.dtype, attn: str, smoke: bool):
    """A `Referrer` with random weights at the released sizes, built in memory (no multi-GB write)."""
    from models.generation import GenerationSettings
    from models.loading import LoadedCheckpoint, build_model, load_tokenizer
    from models.referrer import Referrer
    from models.tiny import TINY_DIMS, build_tokenizer, real_2b_dims, tiny_config

    if smoke:
        dims, vocab = TINY_DIMS, None
    elif size == "2B":
        dims, vocab = real_2b_dims(layers=28, vision_layers=27), 151936
    else:
        dims = dataclasses.replace(real_2b_dims(layers=28, vision_layers=27), hidden=3584, intermediate=18944,
                                   heads=28, kv_heads=4)
        vocab = 152064
    folder = Path(tempfile.mkdtemp(prefix="gpu-bench-tokenizer-"))
    build_tokenizer(folder)
    ids = json.loads((folder / "added_tokens.json").read_text())
    vocab = vocab or ((max(ids.values()) + 1 + 63) // 64) * 64
    config = tiny_config(mode, vocab, ids, dims)
    model = build_model(config, device=torch.device(device), dtype=dtype, attn_implementation=attn, init_weights=True)
    model.requires_grad_(False)
    ckpt = LoadedCheckpoint(model.eval(), load_tokenizer(folder, config), config, folder,
                            GenerationSettings(eos_token_ids=()))  # eos off: every caption decodes all tokens
    return Referrer(ckpt, f"random-{mode}-{size}")


# -- sections ---------------------------------------------------------------------------------------


def section_sam2(ctx: dict[str, Any]) -> dict[str, Any]:
    from actors.tracker import Tracker
    from actors.prompts import ObjectPrompt

    out: dict[str, Any] = {}
    frames_n, (w, h) = (8, (160, 120)) if ctx["smoke"] else (32, (1280, 720))
    for size in ("tiny", "large"):
        tracker = Tracker(str(sam2_folder(size, ctx["root"], ctx["smoke"])), device=ctx["device"],
                          dtype=ctx["dtype"])
        for n in (1, 8):
            video, ts, boxes = moving_boxes(n, frames_n, w, h, seed=n)
            prompts = [ObjectPrompt(box=tuple(float(v) for v in b), frame=0, object_id=k + 1)
                       for k, b in enumerate(boxes[0])]
            tracker.track(video[:2], ts[:2], prompts)  # warm-up
            seconds, _ = timed(lambda: tracker.track(video, ts, prompts))
            out[f"sam2_{size}_fps_{n}obj"] = frames_n / seconds
        out[f"sam2_{size}_peak_gpu_mib"] = peak_gpu_mib()
        del tracker
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out


def _object_requests(count: int, frames_n: int, w: int, h: int):
    """Frames, times, `count` objects masked on every frame, and one caption request per object."""
    from models.referrer import DEFAULT_CAPTION_PROMPT, Request

    video, ts, boxes = moving_boxes(count, frames_n, w, h, seed=count)
    objects = []
    for k in range(count):
        masks = {}
        for t in range(frames_n):
            x0, y0, x1, y1 = (int(v) for v in boxes[t, k])
            m = np.zeros((h, w), dtype=bool)
            m[y0:y1, x0:x1] = True
            masks[t] = m
        objects.append(masks)
    requests = [Request(DEFAULT_CAPTION_PROMPT, [k]) for k in range(count)]
    return list(video), list(ts), objects, requests


def referrer_section(mode: str, size: str, batches: tuple[int, ...]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def run(ctx: dict[str, Any]) -> dict[str, Any]:
        tag = f"{mode}{size.lower()}"
        frames_n, (w, h), tokens = (4, (96, 64), 8) if ctx["smoke"] else (20, (640, 360), 64)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        referrer = referrer_at(mode, size, ctx["device"], ctx["dtype"], ctx["attn"], ctx["smoke"])
        out: dict[str, Any] = {f"{tag}_params_b": sum(p.numel() for p in referrer.model.parameters()) / 1e9}
        one = _object_requests(1, frames_n, w, h)
        referrer.generate(*one, max_new_tokens=2)  # warm-up
        seconds, gens = timed(lambda: referrer.generate(*one, max_new_tokens=tokens, batch_size=1), repeats=2)
        out[f"{tag}_caption_latency_s"] = seconds
        out[f"{tag}_caption_tokens"] = gens[0].num_tokens
        for b in batches:
            many = _object_requests(b, frames_n, w, h)
            seconds, _ = timed(lambda: referrer.generate(*many, max_new_tokens=tokens, batch_size=b))
            out[f"{tag}_objects_per_s_b{b}"] = b / seconds
            out[f"{tag}_s_per_object_b{b}"] = seconds / b
        out[f"{tag}_peak_gpu_mib"] = peak_gpu_mib()
        del referrer
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        return out

    return run


def section_loop(ctx: dict[str, Any]) -> dict[str, Any]:
    """TrackerStage then ReferrerStage over every 30-s clip of a 10-minute, 1 fps video."""
    from actors.columns import times_to_column
    from actors.referrer import ReferrerStage
    from actors.tracker import TrackerStage

    seconds_total, (w, h) = (60, (160, 120)) if ctx["smoke"] else (600, (640, 360))
    clip_s = 30
    tracker = TrackerStage(str(sam2_folder("tiny", ctx["root"], ctx["smoke"])), device=ctx["device"],
                           dtype=ctx["dtype"], max_objects=8, ship_frames="shown", object_frames=8)
    referrer = ReferrerStage(referrer_at("lite", "2B", ctx["device"], ctx["dtype"], ctx["attn"], ctx["smoke"]),
                             max_new_tokens=8 if ctx["smoke"] else 64, object_frames=8)
    video, ts, _ = moving_boxes(4, seconds_total, w, h, seed=7)
    busy = {"tracker": 0.0, "referrer": 0.0}
    start = time.perf_counter()
    pending = []
    for c in range(0, seconds_total, clip_s):
        stop = min(seconds_total, c + clip_s + 1)  # one shared frame with the next clip, as the index does
        row = {"video_id": "v", "kind": "clip", "clip_index": c // clip_s, "error": "", "prompts_json": "",
               "discover": "keyframes", "num_owned": min(clip_s, stop - c), "tracks_json": "",
               "questions_json": "[]", "frames": video[c:stop], "timestamps": times_to_column(ts[c:stop] - c)}
        t = time.perf_counter()
        tracked = tracker(_batch([row]))
        busy["tracker"] += time.perf_counter() - t
        pending.append({k: v[0] for k, v in tracked.items()})
        if len(pending) == 16 or stop >= seconds_total:
            t = time.perf_counter()
            referrer(_batch(pending))
            sync()
            busy["referrer"] += time.perf_counter() - t
            pending = []
    wall = time.perf_counter() - start
    return {
        "loop_video_s": seconds_total, "loop_wall_s": wall,
        "video_hours_per_gpu_hour": seconds_total / wall,
        "busy_share_tracker": busy["tracker"] / wall, "busy_share_referrer": busy["referrer"] / wall,
    }


def _batch(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    out = {}
    for key in rows[0]:
        column = np.empty(len(rows), dtype=object)
        for i, row in enumerate(rows):
            column[i] = row[key]
        out[key] = column
    return out


SECTIONS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "sam2": section_sam2,
    "lite2b": referrer_section("lite", "2B", (1, 16, 64)),
    "full2b": referrer_section("full", "2B", (1,)),
    "loop": section_loop,
    "lite7b": referrer_section("lite", "7B", (1, 16)),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: checks that every section runs")
    parser.add_argument("--json", dest="json_path", default=None)
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip sections that start after this")
    parser.add_argument("--only", action="append", choices=list(SECTIONS), default=None)
    args = parser.parse_args(argv)
    from models.referrer import pick_device

    device, dtype, attn = pick_device("cpu" if args.smoke else None, None)
    root = Path(os.environ.get("GPU_BENCH_DIR") or tempfile.mkdtemp(prefix="gpu-bench-"))
    ctx = {"smoke": args.smoke, "device": str(device), "dtype": dtype, "attn": attn, "root": root}
    import transformers

    record: dict[str, Any] = {
        "bench": "gpu", "smoke": args.smoke, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "dtype": str(dtype).replace("torch.", ""), "attention": attn, "errors": {}, "skipped": [],
    }
    start = time.perf_counter()
    for name in args.only or list(SECTIONS):
        if time.perf_counter() - start > args.budget_s:
            record["skipped"].append(name)
            continue
        t = time.perf_counter()
        try:
            record.update(SECTIONS[name](ctx))
        except Exception as exc:  # noqa: BLE001 - one section's failure must not lose the others' figures
            record["errors"][name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        record[f"section_s_{name}"] = time.perf_counter() - t
        print(json.dumps({k: v for k, v in record.items() if k.startswith(name) or k.startswith("section")}),
              file=sys.stderr, flush=True)
    if record.get("lite2b_caption_latency_s") and record.get("full2b_caption_latency_s"):
        record["full_over_lite_caption_time"] = record["full2b_caption_latency_s"] / record["lite2b_caption_latency_s"]
    if record.get("lite2b_peak_gpu_mib") and record.get("full2b_peak_gpu_mib"):
        record["full_over_lite_peak_gpu_memory"] = record["full2b_peak_gpu_mib"] / record["lite2b_peak_gpu_mib"]
    record["total_s"] = time.perf_counter() - start
    text = json.dumps(record, indent=2, default=str)
    print(text)
    path = args.json_path or (os.path.join(os.environ["OUT"], "gpu-bench.json") if os.environ.get("OUT") else None)
    if path:
        Path(path).write_text(text)
    return 0 if not record["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
