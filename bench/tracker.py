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
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


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


def environment() -> dict[str, Any]:
    import torch
    import transformers

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "machine": platform.machine(), "cpu_model": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def measure_in_subprocess(args: argparse.Namespace, objects: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.tracker", "--single", str(objects), "--model", args.model,
           "--frames", str(args.frames), "--size", args.size]
    if args.device:
        cmd += ["--device", args.device]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark for {objects} objects failed:\n{done.stderr[-3000:]}")
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
    parser.add_argument("--single", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    if args.single is not None:
        print(json.dumps(run_single(args.model, args.single, args.frames, width, height, args.device)))
        return 0
    results = [measure_in_subprocess(args, n) for n in args.objects]
    print(render(results, args.frames, args.size))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(flat(results, args), indent=2) + "\n")
        print(f"\nwrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
