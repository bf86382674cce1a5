"""Synthetic videos with moving shapes whose ground truth is known.

The demo, the tests and the benchmarks all need real encoded video files (H.264 in MP4) that exist
on no server, so the project makes them itself. Frames are drawn with numpy and piped to Debian's
ffmpeg through ffmpeg-python, the same binary the decoder's fallback uses, so nothing here needs a
codec that the machine lacks.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence

import ffmpeg
import numpy as np


@dataclasses.dataclass(frozen=True)
class Shape:
    """A solid shape moving in a straight line; visible from `start_s` to `end_s` (seconds)."""

    color: tuple[int, int, int]
    size: tuple[int, int]  # (h, w) in pixels
    start_xy: tuple[float, float]  # top-left (x, y) at start_s
    velocity: tuple[float, float] = (0.0, 0.0)  # pixels per second
    start_s: float = 0.0
    end_s: float = float("inf")
    kind: str = "rect"  # "rect" or "ellipse"

    def box_at(self, t: float, width: int, height: int) -> tuple[int, int, int, int] | None:
        """Clipped (x0, y0, x1, y1) box, exclusive end, or None when absent or off-frame."""
        if not (self.start_s <= t < self.end_s):
            return None
        dt = t - self.start_s
        x0 = int(round(self.start_xy[0] + self.velocity[0] * dt))
        y0 = int(round(self.start_xy[1] + self.velocity[1] * dt))
        x1, y1 = x0 + self.size[1], y0 + self.size[0]
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
        if x1 <= x0 or y1 <= y0:
            return None
        return x0, y0, x1, y1


@dataclasses.dataclass
class GroundTruth:
    """Per encoded frame: its presentation time and each shape's mask (None when absent)."""

    path: str
    width: int
    height: int
    timestamps: list[float]
    shapes: list[Shape]

    def mask(self, shape_index: int, t: float) -> np.ndarray | None:
        return _shape_mask(self.shapes[shape_index], t, self.width, self.height)


DEFAULT_SHAPES: tuple[Shape, ...] = (
    Shape(color=(220, 40, 40), size=(28, 36), start_xy=(10, 20), velocity=(30, 5)),
    Shape(color=(40, 80, 230), size=(30, 30), start_xy=(110, 70), velocity=(-20, -8), kind="ellipse"),
    Shape(color=(240, 220, 30), size=(20, 26), start_xy=(70, 15), velocity=(0, 12), start_s=1.0),
)


def _shape_mask(shape: Shape, t: float, width: int, height: int) -> np.ndarray | None:
    box = shape.box_at(t, width, height)
    if box is None:
        return None
    mask = np.zeros((height, width), dtype=bool)
    x0, y0, x1, y1 = box
    if shape.kind == "rect":
        mask[y0:y1, x0:x1] = True
    else:
        dt = t - shape.start_s
        cx = shape.start_xy[0] + shape.velocity[0] * dt + shape.size[1] / 2
        cy = shape.start_xy[1] + shape.velocity[1] * dt + shape.size[0] / 2
        yy, xx = np.mgrid[0:height, 0:width]
        inside = ((xx + 0.5 - cx) / (shape.size[1] / 2)) ** 2 + ((yy + 0.5 - cy) / (shape.size[0] / 2)) ** 2 <= 1
        mask[inside] = True
    return mask if mask.any() else None


def render_frame(shapes: Sequence[Shape], t: float, width: int, height: int, background: np.ndarray) -> np.ndarray:
    frame = background.copy()
    for shape in shapes:
        mask = _shape_mask(shape, t, width, height)
        if mask is not None:
            frame[mask] = shape.color
    return frame


def _background(width: int, height: int, seed: int) -> np.ndarray:
    """Smooth low-contrast texture: flat backgrounds make H.264 trivially small and unrealistic."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(70, 150, size=(height // 8 + 2, width // 8 + 2, 3)).astype(np.uint8)
    return np.repeat(np.repeat(coarse, 8, axis=0), 8, axis=1)[:height, :width].copy()


def frame_times(fps: float, duration_s: float, vfr: bool) -> list[float]:
    """Presentation times of the frames to encode.

    With `vfr`, the first half runs at `fps` and the second half at `fps / 3`, so a decoder that
    guesses times as `index / fps` is visibly wrong.
    """
    if not vfr:
        return [i / fps for i in range(int(round(duration_s * fps)))]
    half = duration_s / 2
    times = [i / fps for i in range(int(round(half * fps)))]
    slow = fps / 3
    times += [half + i / slow for i in range(int(round(half * slow)))]
    return times


def make_video(
    path: str | os.PathLike,
    *,
    width: int = 160,
    height: int = 120,
    fps: float = 10.0,
    duration_s: float = 3.0,
    shapes: Sequence[Shape] = DEFAULT_SHAPES,
    vfr: bool = False,
    seed: int = 0,
    gop: int | None = None,
) -> GroundTruth:
    """Encode an H.264 MP4 of moving shapes and return its ground truth.

    Frame times are written as exact presentation timestamps (millisecond timebase), so the
    ground truth and the decoder's PTS agree to the millisecond.
    """
    path = str(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    times = frame_times(fps, duration_s, vfr)
    background = _background(width, height, seed)
    raw = b"".join(render_frame(shapes, t, width, height, background).tobytes() for t in times)
    millis = [int(round(t * 1000)) for t in times]
    # setpts from a per-frame lookup keeps exact, possibly irregular, timestamps.
    expr = "+".join(f"eq(N,{i})*{ms}" for i, ms in enumerate(millis)) if vfr else f"N*{1000 / fps}"
    stream = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", r=fps)
    stream = stream.filter("settb", "1/1000").filter("setpts", f"{expr}")
    out_args = {"vcodec": "libx264", "pix_fmt": "yuv420p", "preset": "veryfast", "video_track_timescale": 1000}
    if vfr:
        out_args["fps_mode"] = "passthrough"
    if gop:
        out_args["g"] = gop
    (
        ffmpeg.output(stream, path, **out_args)
        .global_args("-loglevel", "error")
        .overwrite_output()
        .run(input=raw, capture_stdout=True, capture_stderr=True)
    )
    return GroundTruth(path=path, width=width, height=height, timestamps=[m / 1000 for m in millis], shapes=list(shapes))


def make_sample_videos(folder: str | os.PathLike, count: int = 3) -> list[GroundTruth]:
    """The demo's sample set: a few short clips with different motion, one at a variable frame rate."""
    folder = Path(folder)
    truths = []
    for i in range(count):
        shift = 12 * i
        shapes = [
            dataclasses.replace(s, start_xy=(s.start_xy[0] + shift, s.start_xy[1])) for s in DEFAULT_SHAPES[: 2 + i % 2]
        ]
        truths.append(
            make_video(folder / f"sample_{i:02d}.mp4", shapes=shapes, seed=i, vfr=(i == count - 1), duration_s=4.0)
        )
    return truths


def make_long_video(path: str | os.PathLike, duration_s: float, *, segment_s: float = 60.0, width: int = 160,
                    height: int = 120, fps: float = 10.0, seed: int = 0,
                    shapes: Sequence[Shape] = DEFAULT_SHAPES[:2]) -> str:
    """An hours-long MP4 made of one rendered segment played again and again (stream copy, no re-encode).

    Rendering every frame of a 2-hour video in numpy would hold gigabytes; a segment of `segment_s`
    repeated by ffmpeg's `-stream_loop` costs seconds and a few megabytes of disk per hour, and the
    same content at two lengths is what a long-video benchmark wants to compare.
    """
    path = str(path)
    repeats = max(1, int(round(duration_s / segment_s)))
    segment = f"{path}.segment.mp4"
    make_video(segment, width=width, height=height, fps=fps, duration_s=segment_s, shapes=shapes, seed=seed,
               gop=int(fps * 2))
    try:
        (
            ffmpeg.input(segment, stream_loop=repeats - 1)
            .output(path, c="copy", t=repeats * segment_s, movflags="+faststart")
            .global_args("-loglevel", "error")
            .overwrite_output()
            .run(capture_stdout=True, capture_stderr=True)
        )
    finally:
        Path(segment).unlink(missing_ok=True)
    return path
