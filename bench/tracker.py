"""Benchmark of the SAM 2 tracker: frames/s and peak memory of tracking N objects over M frames.

    python -m bench.tracker [--model tiny] [--frames 32] [--objects 1 4 16] [--size 320x240]
                            [--device cpu|cuda] [--threads T] [--json FILE]

Each N runs in a fresh process (`--single N`), so that one run's allocator caches and one-time
kernel set-up do not count towards another's peak. In that process a short warm-up track comes
first, then the timed `Tracker.track` over M frames of N moving boxes, each prompted by its box on
frame 0. Peak memory is the process's resident set size, sampled every 5 ms, with its growth
during the timed run (the rest is the interpreter, torch and the model), and on CUDA
`torch.cuda.max_memory_allocated`. Timings on a machine shared with other jobs are noisy; on a small
shared CPU `--threads 1` avoids OpenMP threads spin-waiting on each other.

SAM 3 against SAM 2: `--sam3 tiny-sam3` (or a SAM 3 folder or hub id) also times the concept tracker
(`actors.concepts.ConceptTracker`, finding `--concepts` by name) on the same frames, each N in its own
process as well, with the same peak-memory figures per clip; `--sam3-full` times the full-size SAM 3
architecture (the default `Sam3VideoConfig`, random weights made to detect as tiny's are, not saved)
on `--sam3-full-frames` frames, skipped past `--sam3-full-timeout` seconds.

    python -m bench.tracker --threads 1 --frames 8 --objects 1 4 --sam3 tiny-sam3 [--sam3-full] --json FILE
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.machine import describe


def moving_boxes(count: int, frames: int, width: int, height: int, seed: int = 0):
    """Frames of `count` coloured boxes bouncing around, their timestamps, and each box on frame 0."""
    from pipeline.samples import Shape, render_frame

    rng = np.random.default_rng(seed)
    side = max(8, min(width, height) // 8)
    shapes = [Shape(color=tuple(int(c) for c in rng.integers(40, 255, 3)), size=(side, side),
                    start_xy=(float(rng.integers(0, width - side)), float(rng.integers(0, height - side))),
                    velocity=(float(rng.uniform(-20, 20)), float(rng.uniform(-20, 20))), kind="rect")
              for _ in range(count)]
    background = np.full((height, width, 3), 110, np.uint8)
    times = [i / 10.0 for i in range(frames)]
    # Keep every box inside the frame: reflect the motion at the borders.
    video = np.stack([render_frame([_bounce(s, t, width, height) for s in shapes], 0.0, width, height, background)
                      for t in times])
    boxes = [_bounce(s, 0.0, width, height).box_at(0.0, width, height) for s in shapes]
    return video, np.asarray(times), boxes


def _bounce(shape, t: float, width: int, height: int):
    """The shape moved to its position at time t, reflected off the frame borders, as a static shape."""
    import dataclasses

    def fold(pos: float, span: float) -> float:
        period = 2 * span
        p = pos % period
        return p if p <= span else period - p

    x = fold(shape.start_xy[0] + shape.velocity[0] * t, width - shape.size[1])
    y = fold(shape.start_xy[1] + shape.velocity[1] * t, height - shape.size[0])
    return dataclasses.replace(shape, start_xy=(x, y), velocity=(0.0, 0.0))


class PeakRss:
    """Samples this process's resident set size in a thread and keeps the maximum."""

    def __init__(self, interval_s: float = 0.005) -> None:
        import psutil

        self.proc, self.interval, self.peak = psutil.Process(), interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRss:
        self.before = self.peak = self.proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def run_single(model: str, objects: int, frames: int, width: int, height: int, device: str | None) -> dict[str, Any]:
    """One measurement in this process: track `objects` boxes over `frames` frames."""
    import torch

    from actors.prompts import ObjectPrompt
    from actors.tracker import Tracker

    started = time.perf_counter()
    tracker = Tracker(model, device=device)
    load_s = time.perf_counter() - started
    video, times, boxes = moving_boxes(objects, frames, width, height)
    prompts = [ObjectPrompt(box=tuple(float(v) for v in b)) for b in boxes]
    tracker.track(video[:2], times[:2], prompts[:1])  # warm-up: kernel selection, lazy imports
    cuda = tracker.bundle.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with PeakRss() as rss:
        started = time.perf_counter()
        tracks = tracker.track(video, times, prompts)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    return {
        "objects": objects, "frames": frames, "seconds": seconds, "fps": frames / seconds,
        "ms_per_frame": 1000 * seconds / frames, "object_frames_per_s": objects * frames / seconds,
        "peak_rss_mb": rss.peak / 2**20, "rss_growth_mb": (rss.peak - rss.before) / 2**20,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "max_state_frames": tracker.last_stats["max_state_frames"], "tracked_objects": len(tracks),
        "load_s": load_s, "model": tracker.name, "device": str(tracker.bundle.device),
        "dtype": str(tracker.bundle.dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
    }


def _measure_track(track: Any, cuda: bool) -> tuple[Any, float, PeakRss]:
    """Run `track()` once under the RSS sampler (and CUDA peak statistics): result, seconds, sampler."""
    import torch

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with PeakRss() as rss:
        started = time.perf_counter()
        result = track()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    return result, seconds, rss


def run_single_sam3(model: str, objects: int, frames: int, width: int, height: int, device: str | None,
                    concepts: list[str], bundle: Any = None, warm_up: bool = True) -> dict[str, Any]:
    """The concept tracker on the frames `run_single` tracks: find `concepts` over `frames` frames."""
    import torch

    from actors.concepts import ConceptTracker

    started = time.perf_counter()
    tracker = ConceptTracker(model, device=device, bundle=bundle)
    load_s = time.perf_counter() - started
    video, times, _ = moving_boxes(objects, frames, width, height)
    if warm_up:
        tracker.track(video[:1], times[:1], concepts)  # kernel selection, lazy imports
    tracker.times.take()
    cuda = tracker.bundle.device.type == "cuda"
    tracks, seconds, rss = _measure_track(lambda: tracker.track(video, times, concepts), cuda)
    return {
        "objects": objects, "frames": frames, "seconds": seconds, "fps": frames / seconds,
        "ms_per_frame": 1000 * seconds / frames, "peak_rss_mb": rss.peak / 2**20,
        "rss_growth_mb": (rss.peak - rss.before) / 2**20,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "max_state_frames": tracker.last_stats["max_state_frames"], "tracked_objects": len(tracks),
        "phase_s": {k: round(v, 4) for k, v in tracker.times.take().items()}, "concepts": concepts,
        "load_s": load_s, "model": tracker.name, "device": str(tracker.bundle.device),
        "dtype": str(tracker.bundle.dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
    }


def run_single_sam3_full(frames: int, width: int, height: int, device: str | None,
                         concepts: list[str]) -> dict[str, Any]:
    """The full-size SAM 3 architecture with random weights (built here, not saved) on `frames` frames."""
    import torch
    from transformers import Sam3VideoConfig, Sam3VideoModel

    from models.sam2 import resolve_device
    from models.sam3 import Sam3Bundle, make_detectable, tiny_processor

    dev, dt = resolve_device(device)
    started = time.perf_counter()
    config = Sam3VideoConfig()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = make_detectable(Sam3VideoModel(config)).to(dev, dt).eval()
    bundle = Sam3Bundle(name="sam3-full-size-random", path=Path("."), model=model,
                        processor=tiny_processor(config.image_size), device=dev, dtype=dt)
    build_s = time.perf_counter() - started
    # No warm-up: on a CPU one full-size frame takes minutes, and its first-call overhead is noise.
    out = run_single_sam3("", 2, frames, width, height, device, concepts, bundle=bundle, warm_up=False)
    out.update(build_s=build_s, params_m=sum(p.numel() for p in model.parameters()) / 1e6,
               image_size=config.image_size)
    return out


def environment() -> dict[str, Any]:
    import torch

    return {**describe("torch", "transformers"),
            "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def measure_in_subprocess(args: argparse.Namespace, objects: int, kind: str = "sam2",
                          timeout: float | None = None) -> dict[str, Any] | None:
    """One measurement in a fresh process; `kind` sam2, sam3 or sam3-full. None when it timed out."""
    flag = {"sam2": "--single", "sam3": "--single-sam3", "sam3-full": "--single-sam3-full"}[kind]
    cmd = [sys.executable, "-m", "bench.tracker", flag, str(objects), "--model", args.model,
           "--frames", str(args.sam3_full_frames if kind == "sam3-full" else args.frames), "--size", args.size,
           "--concepts", args.concepts]
    if args.sam3:
        cmd += ["--sam3", args.sam3]
    if args.device:
        cmd += ["--device", args.device]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    if done.returncode != 0:
        raise RuntimeError(f"{kind} benchmark for {objects} objects failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def render(results: Sequence[dict[str, Any]], frames: int, size: str) -> str:
    first = results[0]
    lines = [f"SAM 2 tracker {first['model']} on {first['device']} ({first['dtype']}, {first['threads']} threads), "
             f"{frames} frames of {size}",
             f"{'objects':>7} {'frames/s':>9} {'ms/frame':>9} {'obj-frames/s':>13} {'peak RSS MB':>12} "
             f"{'RSS growth MB':>14} {'peak GPU MB':>12} {'state frames':>13}"]
    for r in results:
        gpu = f"{r['peak_gpu_mb']:.0f}" if r["peak_gpu_mb"] is not None else "-"
        lines.append(f"{r['objects']:>7} {r['fps']:>9.2f} {r['ms_per_frame']:>9.1f} {r['object_frames_per_s']:>13.1f} "
                     f"{r['peak_rss_mb']:>12.0f} {r['rss_growth_mb']:>14.1f} {gpu:>12} {r['max_state_frames']:>13}")
    return "\n".join(lines)


def render_sam3(results: Sequence[dict[str, Any]], sam2: Sequence[dict[str, Any]], full: dict[str, Any] | None,
                 args: argparse.Namespace) -> str:
    """The concept tracker's lines, with its cost per frame relative to SAM 2's on the same frames."""
    lines = []
    if results:
        first = results[0]
        lines += [f"SAM 3 concept tracker {first['model']} on {first['device']} ({first['dtype']}), "
                  f"concepts {', '.join(first['concepts'])}, same frames",
                  f"{'boxes':>7} {'ms/frame':>9} {'x SAM 2':>8} {'found':>6} {'peak RSS MB':>12} {'RSS growth MB':>14} "
                  f"{'peak GPU MB':>12}  phases (s)"]
        for r, base in zip(results, sam2, strict=True):
            gpu = f"{r['peak_gpu_mb']:.0f}" if r["peak_gpu_mb"] is not None else "-"
            ratio = r["ms_per_frame"] / base["ms_per_frame"]
            phases = " ".join(f"{k}={v:.3f}" for k, v in r["phase_s"].items())
            lines.append(f"{r['objects']:>7} {r['ms_per_frame']:>9.1f} {ratio:>8.2f} {r['tracked_objects']:>6} "
                         f"{r['peak_rss_mb']:>12.0f} {r['rss_growth_mb']:>14.1f} {gpu:>12}  {phases}")
    if args.sam3_full:
        if full is None:
            lines.append(f"full-size SAM 3: skipped, over {args.sam3_full_timeout:.0f} s")
        else:
            lines.append(f"full-size SAM 3 ({full['params_m']:.0f} M parameters, {full['image_size']} px, random "
                         f"weights) on {full['device']} ({full['dtype']}): {full['ms_per_frame'] / 1000:.2f} s/frame "
                         f"over {full['frames']} frames, peak RSS {full['peak_rss_mb']:.0f} MB, "
                         f"built in {full['build_s']:.0f} s")
    return "\n".join(lines)


def flat_sam3(results: Sequence[dict[str, Any]], sam2: Sequence[dict[str, Any]], full: dict[str, Any] | None,
              args: argparse.Namespace) -> dict[str, Any]:
    """The concept tracker's figures for the flat JSON object, `sam3_` before SAM 2's names."""
    out: dict[str, Any] = {}
    if results:
        out.update(sam3_model=results[0]["model"], sam3_concepts=results[0]["concepts"],
                   sam3_load_s=round(results[0]["load_s"], 3))
    for r, base in zip(results, sam2 if results else [], strict=True):
        n = r["objects"]
        out[f"sam3_ms_per_frame_n{n}"] = round(r["ms_per_frame"], 2)
        out[f"sam3_vs_sam2_per_frame_n{n}"] = round(r["ms_per_frame"] / base["ms_per_frame"], 3)
        out[f"sam3_objects_found_n{n}"] = r["tracked_objects"]
        out[f"sam3_peak_rss_mb_n{n}"] = round(r["peak_rss_mb"], 1)
        out[f"sam3_rss_growth_mb_n{n}"] = round(r["rss_growth_mb"], 1)
        out[f"sam3_peak_gpu_mb_n{n}"] = None if r["peak_gpu_mb"] is None else round(r["peak_gpu_mb"], 1)
        out[f"sam3_max_state_frames_n{n}"] = r["max_state_frames"]
        out[f"sam3_phase_s_n{n}"] = r["phase_s"]
    if args.sam3_full:
        out["sam3_full_s_per_frame"] = None if full is None else round(full["ms_per_frame"] / 1000, 3)
        out["sam3_full_frames"] = args.sam3_full_frames
        if full is not None:
            gpu = None if full["peak_gpu_mb"] is None else round(full["peak_gpu_mb"], 1)
            out.update(sam3_full_peak_rss_mb=round(full["peak_rss_mb"], 1), sam3_full_peak_gpu_mb=gpu,
                       sam3_full_params_m=round(full["params_m"], 1), sam3_full_build_s=round(full["build_s"], 1),
                       sam3_full_phase_s=full["phase_s"])
    return out


def flat(results: Sequence[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """One flat JSON object: named figures per object count, then the machine and versions."""
    first = results[0]
    out: dict[str, Any] = {"bench": "tracker", "model": first["model"], "device": first["device"],
                           "dtype": first["dtype"], "threads": first["threads"], "frames": args.frames,
                           "frame_size": args.size, "load_s": round(first["load_s"], 3)}
    for r in results:
        n = r["objects"]
        out[f"fps_n{n}"] = round(r["fps"], 3)
        out[f"ms_per_frame_n{n}"] = round(r["ms_per_frame"], 2)
        out[f"object_frames_per_s_n{n}"] = round(r["object_frames_per_s"], 2)
        out[f"peak_rss_mb_n{n}"] = round(r["peak_rss_mb"], 1)
        out[f"rss_growth_mb_n{n}"] = round(r["rss_growth_mb"], 1)
        out[f"peak_gpu_mb_n{n}"] = None if r["peak_gpu_mb"] is None else round(r["peak_gpu_mb"], 1)
        out[f"max_state_frames_n{n}"] = r["max_state_frames"]
    out.update(environment())
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tracker", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny, a local SAM 2 folder or a hub id")
    parser.add_argument("--frames", type=int, default=32, help="M: frames to track")
    parser.add_argument("--objects", type=int, nargs="+", default=[1, 4, 16], help="N: objects per run")
    parser.add_argument("--size", default="320x240", help="frame size WxH")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (OMP_NUM_THREADS)")
    parser.add_argument("--json", type=Path, help="also write one flat JSON object of the figures to this file")
    parser.add_argument("--sam3", help="also time this SAM 3 concept tracker (tiny-sam3, a folder or a hub id)")
    parser.add_argument("--concepts", default="person,car", help="what SAM 3 looks for, comma-separated")
    parser.add_argument("--sam3-full", action="store_true", help="also time the full-size SAM 3 architecture")
    parser.add_argument("--sam3-full-frames", type=int, default=1, help="frames for --sam3-full")
    parser.add_argument("--sam3-full-timeout", type=float, default=240.0,
                        help="skip --sam3-full past this many seconds (building the model included)")
    parser.add_argument("--single", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--single-sam3", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--single-sam3-full", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    concepts = [c.strip() for c in args.concepts.split(",") if c.strip()]
    if args.single is not None:
        print(json.dumps(run_single(args.model, args.single, args.frames, width, height, args.device)))
        return 0
    if args.single_sam3 is not None:
        print(json.dumps(run_single_sam3(args.sam3, args.single_sam3, args.frames, width, height, args.device,
                                         concepts)))
        return 0
    if args.single_sam3_full is not None:
        print(json.dumps(run_single_sam3_full(args.frames, width, height, args.device, concepts)))
        return 0
    results = [measure_in_subprocess(args, n) for n in args.objects]
    sam3 = [measure_in_subprocess(args, n, "sam3") for n in args.objects] if args.sam3 else []
    full = measure_in_subprocess(args, 2, "sam3-full", timeout=args.sam3_full_timeout) if args.sam3_full else None
    print(render(results, args.frames, args.size))
    if sam3 or args.sam3_full:
        print(render_sam3(sam3, results, full, args))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        figures = flat(results, args)
        figures.update(flat_sam3(sam3, results, full, args))
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"\nwrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
