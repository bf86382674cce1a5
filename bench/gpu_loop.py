"""`bench.gpu`'s test video and its ``loop`` section: the index's stages as one plain loop, no Ray.

What the loop runs, per 30-s clip of a 10-minute video sampled at 1 fps (`pipeline.config.IndexConfig`
defaults, `--cuts none`): decode the clip's grid frames plus the next clip's first one, SAM 2 over
them (`actors.tracker.TrackerStage`, automatic discovery on keyframes), then PixelRefer-Lite on
`clips_per_call` tracked clips at a time (`actors.referrer.ReferrerStage`, K frames per object),
with the stages' arguments from `pipeline.graph` as the Ray job passes them. Each stage's wall time
is summed; their shares of the loop's wall time say which stage bounds a GPU. Left out: linking
across clips and the whole-track captions (one more caption per object that spans clips, a few
per cent of the referrer's work), and the Parquet writes.

Why not `pipeline.tasks.plan_rows` / `decode_row` and `pipeline.samples.make_long_video`: the GPU
machine has neither PyAV nor ffmpeg, which they need. So the video is written with OpenCV's
`VideoWriter` (MPEG-4 Part 2, or MJPEG where that encoder is missing), clips are planned with the
pipeline's own pure functions (`pipeline.clips.split_clips`, `sampling_rate`, `assign_grid`), and a
clip is decoded with OpenCV from a seek to its first frame, picking for each grid time the nearest
frame (the earlier on a tie: `pipeline.decode.range_decode`'s rule). The file is constant-rate and made
here, so a frame's time is its index / fps.

Why the discoverer is wrapped: random SAM 2 weights propose noise that never passes SAM's quality
filters, so the loop would find nothing and caption nothing. `KeyedDiscoverer` runs SAM 2's real
mask generation on every keyframe (its cost stays in the tracker's time) and then proposes the
scene's shapes, found by their colours; tracking, captioning and everything after are the stages'.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.gpu_models import build_referrer, sam2_folder, sync

#: Saturated colours, each at least 50 levels from the background's 70..150 in some channel.
COLOURS: tuple[tuple[int, int, int], ...] = (
    (230, 40, 40), (40, 90, 235), (245, 215, 30), (30, 210, 220),
    (200, 60, 220), (250, 140, 20), (250, 250, 250), (20, 20, 20),
)

#: Seconds of clips the loop takes at most (its rates are over the clips done), so that the sections
#: after it keep their share of the budget; 10 minutes of video should take well under this on an H100.
LOOP_MAX_S = 180.0

#: The loop's video: 10 minutes of 854x480 (the paper-scale frame of `bench.referrer`) at 25 fps,
#: so that sampling 1 fps decodes 25 frames per sample, as a broadcast file would.
LOOP_VIDEO = {"duration_s": 600.0, "width": 854, "height": 480, "fps": 25.0, "objects": 4}
SMOKE_VIDEO = {"duration_s": 20.0, "width": 160, "height": 120, "fps": 5.0, "objects": 3}


class Scene:
    """Boxes of distinct colours bouncing around a blocky textured background; a pure function of time,
    so any frame can be rendered (or its boxes known) without keeping the video in memory."""

    def __init__(self, width: int, height: int, count: int, seed: int = 0, side: int | None = None) -> None:
        """`count` boxes whose sides are drawn from [side / 2, side] (default: a sixth of the frame's height)."""
        rng = np.random.default_rng(seed)
        coarse = rng.integers(70, 151, (height // 8 + 2, width // 8 + 2, 3), dtype=np.uint8)
        self.width, self.height = width, height
        self.background = np.repeat(np.repeat(coarse, 8, axis=0), 8, axis=1)[:height, :width].copy()
        side = max(8, side or min(width, height) // 6)
        self.sizes = rng.integers(side // 2, side + 1, (count, 2))  # (w, h)
        self.span = np.maximum(1, np.array([width, height]) - self.sizes)
        self.starts = rng.uniform(0, 1, (count, 2)) * self.span
        speed = max(width, height) / 20  # crosses the frame in ~20 s
        self.velocity = rng.uniform(0.3, 1.0, (count, 2)) * speed * rng.choice([-1, 1], (count, 2))
        self.colours = [COLOURS[k % len(COLOURS)] for k in range(count)]

    def boxes(self, t: float) -> np.ndarray:
        """(count, 4) int xyxy boxes at time t (reflected at the frame's edges)."""
        pos = np.mod(self.starts + self.velocity * t, 2 * self.span)
        pos = np.where(pos > self.span, 2 * self.span - pos, pos).astype(int)
        return np.concatenate([pos, pos + self.sizes], axis=1)

    def frame(self, t: float) -> np.ndarray:
        """The RGB frame at time t (later boxes drawn over earlier ones)."""
        out = self.background.copy()
        for (x0, y0, x1, y1), colour in zip(self.boxes(t), self.colours):
            out[y0:y1, x0:x1] = colour
        return out

    def masks(self, t: float) -> list[np.ndarray]:
        """Each box's (H, W) bool mask at time t (whole boxes: overlaps are not cut out)."""
        out = []
        for x0, y0, x1, y1 in self.boxes(t):
            m = np.zeros((self.height, self.width), dtype=bool)
            m[y0:y1, x0:x1] = True
            out.append(m)
        return out


def write_video(path: Path, scene: Scene, duration_s: float, fps: float) -> Path:
    """Encode the scene with OpenCV (MPEG-4 Part 2 in MP4, else MJPEG in AVI); returns the file written."""
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    for fourcc, suffix in (("mp4v", ".mp4"), ("MJPG", ".avi")):
        target = path.with_suffix(suffix)
        writer = cv2.VideoWriter(str(target), cv2.VideoWriter_fourcc(*fourcc), fps, (scene.width, scene.height))
        if not writer.isOpened():
            continue
        try:
            for i in range(int(round(duration_s * fps))):
                writer.write(np.ascontiguousarray(scene.frame(i / fps)[..., ::-1]))
        finally:
            writer.release()
        return target
    raise RuntimeError("OpenCV has neither an mp4v nor an MJPG encoder here")


def start_video(root: Path, smoke: bool) -> tuple[Future, dict[str, Any]]:
    """Start writing the loop's video in a thread (encoding is CPU work that the GPU sections leave
    idle), so the loop does not wait for it; returns the future path and the video's spec."""
    spec = dict(SMOKE_VIDEO if smoke else LOOP_VIDEO)
    scene = Scene(int(spec["width"]), int(spec["height"]), int(spec["objects"]), seed=7)
    pool = ThreadPoolExecutor(1, thread_name_prefix="gpu-bench-video")
    future = pool.submit(write_video, root / "loop-video", scene, float(spec["duration_s"]), float(spec["fps"]))
    pool.shutdown(wait=False)
    return future, {**spec, "scene": scene}


# -- planning and decoding ----------------------------------------------------------------------------


def probe(path: Path) -> tuple[float, int, int, int]:
    """(fps, frames, width, height) from the container header."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise RuntimeError(f"OpenCV cannot open {path}")
        return (float(cap.get(cv2.CAP_PROP_FPS)), int(cap.get(cv2.CAP_PROP_FRAME_COUNT)),
                int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    finally:
        cap.release()


def plan_clips(duration_s: float, stream_fps: float, cfg: Any) -> list[Any]:
    """The clips of a video as the index plans them with ``--cuts none`` (the pipeline's own rules)."""
    from pipeline.clips import assign_grid, sampling_rate, split_clips

    rate, _, _ = sampling_rate(duration_s, fps=cfg.fps, num_frames=cfg.num_frames, max_frames=cfg.max_frames,
                               stream_fps=stream_fps)
    return assign_grid(split_clips(duration_s, (), cfg.clip_seconds), rate, duration_s)


def decode_times(path: Path, times: Sequence[float], fps: float, frames_total: int) -> tuple[np.ndarray, list[float]]:
    """RGB frames nearest to `times` (earlier on a tie), decoded from a seek to the first of them."""
    import cv2

    wanted = sorted({min(frames_total - 1, max(0, math.floor(t * fps + 0.5 - 1e-9))) for t in times})
    cap = cv2.VideoCapture(str(path))
    got: dict[int, np.ndarray] = {}
    try:
        cap.set(cv2.CAP_PROP_POS_FRAMES, wanted[0])
        keep, position = set(wanted), wanted[0]
        while position <= wanted[-1] and cap.grab():
            if position in keep:
                ok, bgr = cap.retrieve()
                if ok:
                    got[position] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            position += 1
    finally:
        cap.release()
    order = [i for i in wanted if i in got]
    if not order:
        raise RuntimeError(f"{path}: nothing decoded at {times[0]:g}..{times[-1]:g} s")
    return np.stack([got[i] for i in order]), [i / fps for i in order]


# -- discovery ----------------------------------------------------------------------------------------


class KeyedDiscoverer:
    """SAM 2's automatic mask generation for its cost, the scene's shapes (by colour) as its proposals."""

    def __init__(self, inner: Callable[[np.ndarray], Any], colours: Sequence[tuple[int, int, int]],
                 tolerance: int = 40, min_pixels: int = 16) -> None:
        self.inner = inner
        self.colours = np.asarray(colours, dtype=np.int16)
        self.tolerance = tolerance
        self.min_pixels = min_pixels
        self.calls = 0

    def __call__(self, frame: np.ndarray) -> list[Any]:
        from actors.discovery import Candidate

        self.calls += 1
        self.inner(frame)  # the real proposals' work; with random weights what they say is noise
        pixels = np.asarray(frame, dtype=np.int16)
        out = []
        for colour in self.colours:
            mask = np.abs(pixels - colour).max(axis=-1) <= self.tolerance
            if int(mask.sum()) >= self.min_pixels:
                out.append(Candidate(mask=mask, score=0.99))
        return out


# -- the section --------------------------------------------------------------------------------------


def _clip_row(plan: Any, frames: np.ndarray, times: list[float], owned: int) -> dict[str, Any]:
    """A decoded clip row with the columns the stages read (`pipeline.tasks`' names)."""
    from actors.columns import times_to_column

    return {"video_id": "loop-video", "kind": "clip", "clip_index": plan.clip_index, "error": "", "prompts_json": "",
            "discover": "keyframes", "num_owned": owned, "tracks_json": "", "questions_json": "[]",
            "frames": frames, "timestamps": times_to_column(times)}


def section_loop(ctx: Any) -> dict[str, Any]:
    """Decode, track and caption the loop video's clips until done or the budget's deadline."""
    from actors.busy import PHASE_PREFIX
    from actors.columns import rows_to_batch
    from actors.referrer import ReferrerStage
    from actors.tracker import TrackerStage
    from pipeline.config import IndexConfig
    from pipeline.graph import referrer_kwargs, tracker_kwargs

    made = time.perf_counter()
    path = ctx.video.result()  # written in a thread since the start (`start_video`)
    spec = ctx.video_spec
    fps, frames_total, width, height = probe(path)
    duration = frames_total / fps
    # The index's defaults (1 fps, 30-s clips, 8 objects, keyframes every 2 s, K = 8); the smoke run
    # follows fewer objects and searches fewer keyframes (or the CPU would take minutes), in 10-s
    # clips so that its 20 s still make two clips that share a frame and a referrer call.
    smoke = {"max_objects": 2, "keyframe_interval_s": 10.0, "clip_seconds": 10.0} if ctx.smoke else {}
    # Discovery on every keyframe: the "changed" schedule would decide on random weights' masks (noise);
    # its saving is `bench.stages`' calls per video-hour times `bench.gpu_discovery`'s cost per keyframe.
    cfg = IndexConfig(source=str(path), output=str(ctx.root / "loop-out"),
                      tracker=str(sam2_folder("tiny", ctx.root, ctx.smoke)), cuts="none", discovery="every", **smoke)
    plans = plan_clips(duration, fps, cfg)
    tkw = {**tracker_kwargs(cfg), "device": ctx.device, "dtype": ctx.dtype}
    tracker = TrackerStage(**tkw)
    if not hasattr(tracker.tracker, "discover"):
        raise RuntimeError("Tracker has no `discover` attribute any more: update KeyedDiscoverer's hook")
    keyed = KeyedDiscoverer(tracker.tracker.discover, spec["scene"].colours)
    tracker.tracker.discover = keyed
    rkw = {**referrer_kwargs(cfg), "model": build_referrer("lite", "2B", device=ctx.device, dtype=ctx.dtype,
                                                           attn=ctx.attn, smoke=ctx.smoke)}
    if ctx.smoke:
        rkw["max_new_tokens"] = 8
    referrer = ReferrerStage(**rkw)
    setup_s = time.perf_counter() - made

    # Warm-up (first kernels, allocator growth): three frames of the first clip, not timed.
    first = plans[0]
    frames, times = decode_times(path, first.grid_times[:3], fps, frames_total)
    referrer(tracker(rows_to_batch([_clip_row(first, frames, times, len(times))])))
    keyed.calls = 0

    busy = {"decode": 0.0, "tracker": 0.0, "referrer": 0.0}
    phases: dict[str, float] = {}
    counts = {"clips": 0, "objects": 0, "captions": 0, "errors": 0, "video_s": 0.0}
    first_error = ""
    pending: list[dict[str, Any]] = []

    def take(out: dict[str, np.ndarray], stage: str) -> None:
        """Add the stage's per-phase seconds (spread over the batch's rows) to the loop's sums."""
        for key, column in out.items():
            if key.startswith(PHASE_PREFIX + stage):
                name = key[len(PHASE_PREFIX):]
                phases[name] = phases.get(name, 0.0) + float(np.sum(column))

    def refer() -> None:
        nonlocal first_error
        if not pending:
            return
        t = time.perf_counter()
        out = referrer(rows_to_batch(pending))
        sync()
        busy["referrer"] += time.perf_counter() - t
        take(out, "referrer")
        for i in range(len(pending)):
            counts["captions"] += len(json.loads(out["captions_json"][i] or "[]"))
            if out["error"][i]:
                counts["errors"] += 1
                first_error = first_error or str(out["error"][i])
        pending.clear()

    start = time.perf_counter()
    deadline = min(ctx.deadline, start + LOOP_MAX_S)
    stopped_early = False
    for plan in plans:
        if time.perf_counter() > deadline:
            stopped_early = True
            break
        t = time.perf_counter()
        wanted = list(plan.grid_times) + ([plan.shared_time] if plan.shared_time is not None else [])
        frames, times = decode_times(path, wanted, fps, frames_total)
        busy["decode"] += time.perf_counter() - t
        t = time.perf_counter()
        out = tracker(rows_to_batch([_clip_row(plan, frames, times, len(plan.grid_times))]))
        sync()
        busy["tracker"] += time.perf_counter() - t
        take(out, "tracker")
        row = {k: v[0] for k, v in out.items()}
        counts["objects"] += len(json.loads(row["tracks_json"] or "[]"))
        counts["clips"] += 1
        counts["video_s"] += plan.ts_end - plan.ts_start
        pending.append(row)
        if len(pending) >= cfg.clips_per_call:
            refer()
    refer()
    wall = time.perf_counter() - start
    if counts["clips"] == 0:
        raise RuntimeError("no clip fitted in the time budget")
    if counts["captions"] == 0:
        raise RuntimeError(f"the loop captioned nothing ({counts['errors']} clip errors; first: {first_error or '-'})")
    result = {
        "video_hours_per_gpu_hour": counts["video_s"] / wall,
        "busy_share_decode": busy["decode"] / wall, "busy_share_tracker": busy["tracker"] / wall,
        "busy_share_referrer": busy["referrer"] / wall,
        "loop_wall_s": wall, "loop_setup_s": setup_s, "loop_video_s": counts["video_s"], "loop_video_total_s": duration,
        "loop_video_fps": fps, "loop_video_width": width, "loop_video_height": height,
        "loop_clips": counts["clips"], "loop_clips_planned": len(plans), "loop_stopped_early": int(stopped_early),
        "loop_objects_per_clip": counts["objects"] / counts["clips"], "loop_captions": counts["captions"],
        "loop_clip_errors": counts["errors"], "loop_keyframes_searched": keyed.calls,
        "loop_object_frames": cfg.object_frames or 0, "loop_clips_per_referrer_call": cfg.clips_per_call,
        "loop_max_objects": cfg.max_objects, "loop_keyframe_interval_s": cfg.keyframe_interval_s,
        "loop_discovery_every": int(cfg.discovery == "every"),
        "loop_clip_seconds": cfg.clip_seconds,
        **{f"loop_phase_s_{k}": v for k, v in sorted(phases.items())},
    }
    if first_error:
        result["loop_first_error"] = first_error
    return result
