"""Benchmark: sampling frames with decord, PyAV and torchcodec, against a full ffmpeg decode.

    python -m bench.decode [--json FILE] [--quick]

Videos are made here with `pipeline.samples.make_video` (H.264, 25 fps, GOP 250 like a camera):
480p and 1080p, 10 s and 120 s. The 120 s files are the 10 s clip repeated 12 times by stream
copy, because make_video holds every raw frame in memory (120 s of 1080p would be 22 GB); a stream
copy keeps the encoder's GOP structure and gives exact, continuous timestamps. Shapes cross the
frame at 36 px per frame (1080p), so a frame one step early or late is told apart from the right
one by where the shapes are.

For each video and each sampling mode (1 frame per second; 16 frames uniformly spaced) every
decoder samples the same frames (chosen by `pipeline.decode.sampling.select_frames` on the exact PTS), and
the run reports wall time, sampled frames per second and the ratio to a full decode of the same
file by ``ffmpeg -i FILE -f null -`` measured in the same run (below 1: sampling is cheaper than
decoding everything). A result is *correct* when every timestamp equals the demuxer's PTS and every
frame shows the shapes where the ground truth puts them at that timestamp. ``sample_video`` is the
production path (child process, ffprobe, PTS index, decord), run on the 10 s clips, where its
per-video overhead shows most.
The isolation figures at the end: starting a decode child, a round trip to a warm one, and the
transfer rate of frames from the child.

Timings are single runs on a shared machine; the synthetic clips have static backgrounds and a low
bitrate (about 0.4 Mbit/s at 1080p), so absolute frames/s are higher than with camera footage,
while the ratios between decoders carry over.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

from bench.machine import describe
from pipeline.decode import backends, isolation, sampling
from pipeline.decode.probe import Probe, demux_index
from pipeline.samples import GroundTruth, Shape, make_video

FPS = 25.0
GOP = 250
CLIP_S = 10.0
COLORS = ((230, 30, 30), (30, 200, 30), (40, 60, 240), (240, 220, 20), (220, 40, 220), (30, 220, 220))


@dataclasses.dataclass
class BenchVideo:
    name: str
    path: str
    truth: GroundTruth  # of the 10 s clip; the 120 s file repeats it
    duration_s: float


def _shapes(width: int) -> list[Shape]:
    """Six rectangles crossing the frame one after another, so one is always in view."""
    s = width / 1920
    shapes = []
    for i, color in enumerate(COLORS):
        shapes.append(
            Shape(
                color=color,
                size=(int(260 * s), int(340 * s)),
                start_xy=(-340 * s, (80 + 120 * i) * s),
                velocity=(900 * s, (60 if i % 2 else -40) * s),
                start_s=1.7 * i,
                end_s=1.7 * i + 2.6,
            )
        )
    return shapes


def make_bench_videos(folder: str, quick: bool) -> list[BenchVideo]:
    sizes = [("480p", 854, 480)] if quick else [("480p", 854, 480), ("1080p", 1920, 1080)]
    videos = []
    for label, width, height in sizes:
        clip = os.path.join(folder, f"{label}_10s.mp4")
        truth = make_video(clip, width=width, height=height, fps=FPS, duration_s=CLIP_S, shapes=_shapes(width), gop=GOP)
        videos.append(BenchVideo(f"{label} 10s", clip, truth, CLIP_S))
        if quick:
            continue
        looped = os.path.join(folder, f"{label}_120s.mp4")
        subprocess.run(
            ["ffmpeg", "-v", "error", "-y", "-stream_loop", "11", "-i", clip, "-c", "copy", looped], check=True
        )
        videos.append(BenchVideo(f"{label} 120s", looped, truth, 12 * CLIP_S))
    return videos


# ------------------------------------------------------------------ correctness


def _score(frame: np.ndarray, truth: GroundTruth, t: float) -> float | None:
    """Sum over visible shapes of IoU(pixels of the shape's colour, the shape's box at t)."""
    total, seen_any = 0.0, False
    for shape in truth.shapes:
        box = shape.box_at(t, truth.width, truth.height)
        if box is None:
            continue
        seen_any = True
        x0, y0, x1, y1 = box
        seen = np.abs(frame.astype(np.int16) - np.asarray(shape.color, dtype=np.int16)).sum(axis=-1) < 90
        inter = int(seen[y0:y1, x0:x1].sum())
        union = int(seen.sum()) + (x1 - x0) * (y1 - y0) - inter
        total += inter / union if union else 0.0
    return total if seen_any else None


def content_matches(frame: np.ndarray, truth: GroundTruth, t: float) -> bool:
    """True when the frame fits time t better than the frames just before and after it."""
    local = round(t % CLIP_S, 6)
    step = 1.0 / FPS
    here = _score(frame, truth, local)
    if here is None:
        return True  # nothing in view: nothing to tell frames apart
    for other in (local - step, local + step):
        if 0 <= other < CLIP_S:
            there = _score(frame, truth, other)
            if there is not None and there >= here:
                return False
    return here > 0.5


def is_correct(frames: np.ndarray, stamps: np.ndarray, expected: np.ndarray, truth: GroundTruth) -> bool:
    if frames.shape[0] != expected.size or not np.allclose(stamps, expected, atol=1e-3):
        return False
    return all(content_matches(f, truth, float(t)) for f, t in zip(frames, expected))


# ------------------------------------------------------------------ decoders


def run_decord(path: str, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import decord

    reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=0)
    stamps = reader.get_frame_timestamp(positions.tolist())[:, 0].astype(np.float64)
    return reader.get_batch(positions.tolist()).asnumpy(), stamps


def run_pyav(path: str, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The project's PyAV sampler (seek to the key frame, decode forward skipping unreferenced
    frames that are not wanted), PTS index included."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        probe = Probe(stream.index, stream.width, stream.height, 0, None, None, stream.codec_context.name)
    index = demux_index(path, probe, path)
    out = backends.decode_pyav(path, probe, index, positions, probe.width, probe.height)
    return np.stack(out.frames), index.times[np.asarray(out.positions)]


def run_torchcodec(path: str, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from torchcodec.decoders import VideoDecoder

    decoder = VideoDecoder(path, seek_mode="exact", num_ffmpeg_threads=0, dimension_order="NHWC")
    batch = decoder.get_frames_at(positions.tolist())
    return batch.data.numpy(), batch.pts_seconds.numpy().astype(np.float64)


def run_sample_video(mode: str) -> Callable[[str, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    def run(path: str, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if mode == "1fps":
            result = sampling.sample_video(path, fps=1.0, max_frames=10**6, timeout_s=600)
        else:
            result = sampling.sample_video(path, num_frames=16, timeout_s=600)
        return result.frames, result.timestamps

    return run


def decoder_versions() -> dict[str, str]:
    versions: dict[str, str] = {"python": platform.python_version(), "numpy": np.__version__}
    for name in ("decord", "av", "torchcodec", "torch"):
        try:
            module = __import__(name)
            versions[name] = str(getattr(module, "__version__", "?"))
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            versions[name] = f"unavailable: {type(exc).__name__}: {exc}"[:200]
    try:
        import av

        versions["av_libavcodec"] = ".".join(map(str, av.library_versions["libavcodec"]))
    except Exception:  # noqa: BLE001
        pass
    first = subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True).stdout.splitlines()
    versions["ffmpeg_cli"] = first[0] if first else "?"
    return versions


# ------------------------------------------------------------------ isolation overhead


def measure_isolation(path: str) -> dict[str, float]:
    """What running decoders in a child process costs, next to decoding in this process."""
    figures: dict[str, float] = {}
    isolation.shutdown_workers()
    start = time.perf_counter()
    worker = isolation._Worker()
    figures["isolation_worker_start_s"] = time.perf_counter() - start
    worker.close()
    isolation.call_isolated(time.sleep, 0, timeout_s=60, label="warm-up")
    trips = []
    for _ in range(20):
        start = time.perf_counter()
        isolation.call_isolated(time.sleep, 0, timeout_s=60, label="round trip")
        trips.append(time.perf_counter() - start)
    figures["isolation_roundtrip_ms"] = float(np.median(trips) * 1000)
    shape = (16, 1080, 1920, 3)
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        frames = isolation.call_isolated(np.ones, shape, np.uint8, timeout_s=120, label="transfer")
        rates.append(frames.nbytes / (time.perf_counter() - start) / 1e9)
        del frames
    figures["isolation_transfer_GB_per_s"] = max(rates)
    request = sampling._Request(path, None, 1.0, None, 64, None, None)
    backends.load_decoders()
    # Minimum of several runs: on a shared machine that is the closest to the intrinsic cost.
    in_process, isolated = [], []
    for _ in range(5):
        start = time.perf_counter()
        sampling._sample_request(request)
        in_process.append(time.perf_counter() - start)
        start = time.perf_counter()
        sampling.sample_video(path, fps=1.0)
        isolated.append(time.perf_counter() - start)
    figures["sample_video_in_process_s"] = min(in_process)
    figures["sample_video_isolated_s"] = min(isolated)
    figures["isolation_per_video_overhead_s"] = figures["sample_video_isolated_s"] - figures["sample_video_in_process_s"]
    import ffmpeg

    probes = []
    for _ in range(5):
        start = time.perf_counter()
        ffmpeg.probe(path)
        probes.append(time.perf_counter() - start)
    figures["ffprobe_per_call_s"] = min(probes)
    return figures


# ------------------------------------------------------------------ main


def full_decode_s(path: str) -> float:
    start = time.perf_counter()
    subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-i", path, "-f", "null", "-"], check=True)
    return time.perf_counter() - start


def _key(*parts: str) -> str:
    return "_".join(p.replace(" ", "_").replace(".", "") for p in parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the figures as one flat JSON object to this file")
    parser.add_argument("--quick", action="store_true", help="480p 10 s only (a smoke run)")
    args = parser.parse_args(argv)

    began = time.perf_counter()
    info = describe()
    versions = decoder_versions()
    figures: dict[str, Any] = {f"machine_{k}": v for k, v in info.items()}
    figures.update({f"version_{k}": v for k, v in versions.items()})
    decoders: dict[str, Callable | None] = {"decord": run_decord, "pyav": run_pyav, "torchcodec": run_torchcodec}
    skipped: dict[str, str] = {}
    if versions["torchcodec"].startswith("unavailable"):
        skipped["torchcodec"] = versions["torchcodec"]
        decoders["torchcodec"] = None
    rows: list[tuple] = []
    folder = tempfile.mkdtemp(prefix="bench-decode-")
    try:
        made = time.perf_counter()
        videos = make_bench_videos(folder, args.quick)
        figures["make_videos_s"] = time.perf_counter() - made
        figures.update(measure_isolation(videos[0].path))
        for video in videos:
            full = full_decode_s(video.path)
            probe = Probe(0, video.truth.width, video.truth.height, 0, None, None, "h264")
            index = demux_index(video.path, probe, video.path)
            total = len(index.times)
            figures[_key("ffmpeg_full", video.name, "s")] = full
            figures[_key("ffmpeg_full", video.name, "frames_per_s")] = total / full
            rows.append((video.name, "full", total, "ffmpeg -f null", full, total / full, 1.0, "-"))
            for mode in ("1fps", "16 frames"):
                if mode == "1fps":
                    positions = sampling.select_frames(index.times, fps=1.0, max_frames=10**6)
                else:
                    positions = sampling.select_frames(index.times, num_frames=16)
                expected = index.times[positions]
                runners = dict(decoders)
                if video.duration_s <= CLIP_S:  # its overhead is per video: the short clips show it
                    runners["sample_video"] = run_sample_video("1fps" if mode == "1fps" else "16")
                for name, runner in runners.items():
                    key = _key(name, video.name, mode)
                    if runner is None:
                        rows.append((video.name, mode, len(positions), name, None, None, None, skipped[name]))
                        continue
                    try:
                        start = time.perf_counter()
                        frames, stamps = runner(video.path, positions)
                        elapsed = time.perf_counter() - start
                    except Exception as exc:  # noqa: BLE001 - a decoder that fails is a result
                        rows.append((video.name, mode, len(positions), name, None, None, None, f"failed: {exc}"[:80]))
                        figures[key + "_error"] = str(exc)[:300]
                        continue
                    correct = is_correct(np.asarray(frames), np.asarray(stamps), expected, video.truth)
                    del frames
                    figures[key + "_s"] = elapsed
                    figures[key + "_frames_per_s"] = len(positions) / elapsed
                    figures[key + "_ratio_to_full_decode"] = elapsed / full
                    figures[key + "_correct"] = correct
                    fps = len(positions) / elapsed
                    rows.append((video.name, mode, len(positions), name, elapsed, fps, elapsed / full, correct))
                    print(f"  {video.name:10} {mode:9} {name:12} {elapsed:7.2f} s  correct={correct}", file=sys.stderr)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        isolation.shutdown_workers()

    # Fastest correct decoder: the lowest total time over all videos and modes, counting only
    # decoders that were correct everywhere (sample_video is the production wrapper, not a decoder).
    totals: dict[str, float] = {}
    for name in decoders:
        keys = [k for k in figures if k.startswith(name + "_") and k.endswith("_s") and not k.endswith("frames_per_s")]
        flags = [figures[k[: -len("_s")] + "_correct"] for k in keys]
        if keys and all(flags):
            totals[name] = sum(figures[k] for k in keys)
    fastest = min(totals, key=totals.get) if totals else None
    figures["fastest_correct_decoder"] = fastest
    for name, value in totals.items():
        figures[f"total_s_{name}"] = value
    figures["bench_wall_s"] = time.perf_counter() - began

    print(f"\nmachine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB; {versions['ffmpeg_cli']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if k not in ("ffmpeg_cli",)))
    header = ("video", "mode", "frames", "decoder", "seconds", "frames/s", "x full decode", "correct")
    print("\n| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for video, mode, count, name, seconds, fps, ratio, correct in rows:
        cells = [
            video,
            mode,
            str(count),
            name,
            f"{seconds:.2f}" if seconds is not None else "-",
            f"{fps:.1f}" if fps is not None else "-",
            f"{ratio:.2f}" if ratio is not None else "-",
            str(correct),
        ]
        print("| " + " | ".join(cells) + " |")
    print("\nisolation (decode child process):")
    for key in (
        "isolation_worker_start_s",
        "isolation_roundtrip_ms",
        "isolation_transfer_GB_per_s",
        "sample_video_in_process_s",
        "sample_video_isolated_s",
        "isolation_per_video_overhead_s",
        "ffprobe_per_call_s",
    ):
        print(f"  {key}: {figures[key]:.4g}")
    print(f"\nfastest correct decoder: {fastest} (total seconds: "
          + ", ".join(f"{k} {v:.1f}" for k, v in sorted(totals.items(), key=lambda kv: kv[1])) + ")")
    print(f"bench wall time: {figures['bench_wall_s']:.0f} s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
