"""Benchmark of the index job: the Ray Data graph against a plain single-process loop over the same
stages and data, the peak memory of a run over 10 vs 100 videos, and a long-video point (the same
content as a 1-minute and a 10-minute video).

    python -m bench.pipeline [--videos 10] [--memory-videos 10 100] [--long-video-seconds 600 7200]
                             [--only {compare,memory,long-video}] [--json FILE]

Equal work: the plain loop runs in a fresh interpreter and its time counts from that process's
start (importing torch and transformers, loading both models, then every video: planned into clips,
each clip decoded, tracked and captioned, the clips linked, the whole-track captions asked, the
tables written); the Ray job's time counts from `run_index` on an already started Ray instance (a
standing cluster) and so includes its actors' processes importing the same libraries and loading the
same models. The busy share of each model stage is reported over the whole graph and between the
stage's first and last batch. Every point uses fixed clip windows (`cuts="none"`): TransNetV2 shot
detection costs ~30 ms a frame on a CPU and would swamp what these points measure (`--long-video-cuts
shot` measures it on the long-video point).

Peak memory is the largest sum of resident set sizes over the process tree that runs the job
(driver, GCS, raylet, workers, actors), sampled every 0.1 s; each memory point runs in a fresh
process so one run's caches do not count towards the other's. Pages of Ray's object store (shared
memory) count in every process that touched them, so the sum overstates what the machine holds;
it does so alike at both sizes of a point.

Long-video point: `pipeline.samples.make_long_video` repeats one rendered 60-s segment (stream copy)
into a 10-minute and a 2-hour video of the same content; each is indexed by `run_index` (tiny
models, `--long-video-fps` frames/s, 30-s clips) in its own fresh process, Ray started there before
the clock starts. Both lengths fill a referrer call (`--clips-per-call`, 16 clips: 20 and 240
clips), so the memory compared is the same steady state; a 1-minute video (2 clips) never holds 16
clips' frames in a call, so against it the 10-minute one measured 1.37x its peak, which was the
call growing, not the video. Targets: wall time ratio <= 1.1x the length ratio (linear or better:
fixed costs such as loading the models are paid once) and peak RSS ratio <= 1.3x (memory bounded
by the clips in flight, not the video's length). The 2-hour run takes tens of minutes on 2 cores
(at 1 frame/s: 7,200 frames through both tiny models); `--long-video-fps 0.25` makes it a quarter.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

#: Targets of the long-video point (the issue's acceptance criteria): wall time at most this many
#: times the length ratio (11x for 10x the video), peak RSS at most this ratio.
LONG_VIDEO_MAX_TIME_FACTOR = 1.1
LONG_VIDEO_MAX_RSS_RATIO = 1.3
POINTS = ("compare", "memory", "long-video", "cross-clip")


def make_corpus(folder: Path, count: int, duration_s: float = 3.0) -> Path:
    from pipeline.samples import DEFAULT_SHAPES, make_video

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        path = folder / f"clip_{i:04d}.mp4"
        if not path.exists():
            make_video(path, shapes=DEFAULT_SHAPES[:2], seed=i, duration_s=duration_s)
    return folder


def plain_loop(cfg) -> dict[str, Any]:
    """The same stages in this process, no Ray: the reference the Ray job must match.

    Each video is planned into clips (`plan_rows`), each clip decoded and tracked one at a time
    (the tracker's Ray batch is one clip too), and the tracked clips captioned `cfg.refer.batch_size`
    at a time, as the referrer actor gets them; the driver's own state (`pipeline.run._Run`) links
    the clips and asks the whole-track captions, which go through the same stages; the tables are
    written at the end. Per-phase seconds come from the same row columns as in the Ray job.
    """
    from actors.columns import rows_to_batch
    from actors.referrer import ReferrerStage
    from actors.tracker import TrackerStage
    from pipeline.graph import referrer_kwargs, tracker_kwargs
    from pipeline.run import _input_rows, _Run, new_run_id
    from pipeline.sources import list_videos
    from pipeline.store import TableStore
    from pipeline.summary import RunSummary
    from pipeline.tasks import decode_row, plan_rows

    first = start = time.perf_counter()
    tracker = TrackerStage(**tracker_kwargs(cfg))
    referrer = ReferrerStage(**referrer_kwargs(cfg))
    setup = time.perf_counter() - start
    run_id = new_run_id()
    videos = list_videos(cfg.source, cfg.storage_options)
    rows = _input_rows(cfg, videos, run_id)
    store = TableStore(cfg.output, cfg.storage_options)
    store.require_location()
    run = _Run(cfg, store, run_id, RunSummary(run_id=run_id, videos_listed=len(videos)), len(videos), lambda line: None)
    clips = 0
    tracked: list[dict[str, Any]] = []
    cpu_start = time.process_time()
    start = time.perf_counter()

    def caption(final: bool = False) -> None:
        while tracked and (final or len(tracked) >= max(1, cfg.refer.batch_size)):
            chunk, tracked[:] = tracked[: max(1, cfg.refer.batch_size)], tracked[max(1, cfg.refer.batch_size):]
            out = referrer(rows_to_batch(chunk))
            for i in range(len(chunk)):
                run.take({k: v[i] for k, v in out.items()})

    def track(row: dict[str, Any]) -> None:
        out = tracker(rows_to_batch([decode_row(row, cfg=cfg)]))
        tracked.append({k: v[0] for k, v in out.items()})
        caption()

    for video in rows:
        for clip in plan_rows(video, cfg=cfg):
            if clip["kind"] == "clip":
                clips += 1
            track(clip)
    caption(final=True)
    track_rows, run.track_rows = run.track_rows, []
    for row in track_rows:
        track(row)
    caption(final=True)
    run.commit(final=True)
    run.search.close()  # the search index sync an index run ends with
    seconds = time.perf_counter() - start
    frames = run.summary.frames
    return {
        "seconds": seconds, "setup_s": setup, "total_s": time.perf_counter() - first, "videos": len(rows),
        "clips": clips, "track_rows": len(track_rows), "frames": frames, "videos_ok": run.summary.videos_ok,
        "busy_s": dict(run.summary.busy_seconds), "phase_s": dict(run.summary.phase_seconds),
        "cpu_s": time.process_time() - cpu_start,
    }


def plain_loop_process(source: Path, output: Path) -> dict[str, float]:
    """`plain_loop` in a fresh interpreter, timed from before it starts to after it exits."""
    code = (
        "import json, sys; from pathlib import Path; from bench.pipeline import _config, plain_loop; "
        f"print(json.dumps(plain_loop(_config(Path({str(source)!r}), Path({str(output)!r})))))"
    )
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"plain loop failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = wall
    return result


def ray_job(cfg) -> dict[str, Any]:
    from pipeline.run import run_index

    start = time.perf_counter()
    summary = run_index(cfg, progress=lambda line: None)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds, "videos": summary.videos_ok + summary.videos_failed, "frames": summary.frames,
        "clips": summary.clips, "graph_s": summary.graph_seconds, "utilisation": summary.utilisation(),
        "active": summary.active_utilisation(), "busy_s": dict(summary.busy_seconds),
        "actors": dict(summary.actors), "phase_s": dict(summary.phase_seconds), "driver_cpu_s": summary.driver_cpu_s,
    }


def _config(source: Path, output: Path):
    from pipeline.config import IndexConfig

    return IndexConfig(source=str(source), output=str(output), fps=2.0, max_new_tokens=16, cuts="none")


def _fresh(folder: Path) -> Path:
    """An empty output folder: a rerun into an old index would skip every video (idempotence)."""
    shutil.rmtree(folder, ignore_errors=True)
    return folder


def peak_rss_of(cmd: list[str], interval_s: float = 0.1) -> dict[str, Any]:
    """Run `cmd`, sampling the RSS of its whole process tree every `interval_s`.

    Returns peak_mib, the process count and the per-process RSS (MiB, by name) at the peak, the
    exit code, the wall seconds and the command's stdout.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    root = psutil.Process(proc.pid)
    peak, at_peak = 0, {}
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak, at_peak
        while not stop.is_set():
            try:
                procs = [root] + root.children(recursive=True)
            except psutil.Error:
                procs = []
            total, parts = 0, {}
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    name = "driver" if p.pid == root.pid else p.name()
                except psutil.Error:
                    continue
                total += rss
                parts[f"{name}[{p.pid}]"] = rss
            if total > peak:
                peak, at_peak = total, parts
            stop.wait(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    stop.set()
    thread.join()
    if proc.returncode:
        sys.stderr.write(err.decode(errors="replace")[-2000:])
    return {
        "peak_mib": peak / 2**20, "processes_at_peak": len(at_peak),
        "at_peak_mib": {k: round(v / 2**20, 1) for k, v in sorted(at_peak.items(), key=lambda kv: -kv[1])},
        "code": proc.returncode, "process_s": wall, "stdout": out.decode(errors="replace"),
    }


# -- the long-video point -----------------------------------------------------------------------


def long_video_run(source: str, output: str, cuts: str = "none", fps: float = 1.0) -> dict[str, Any]:
    """Body of one long-video subprocess: start Ray, then time `run_index` over `source`."""
    from pipeline.config import IndexConfig
    from pipeline.graph import ensure_ray
    from pipeline.run import run_index

    cfg = IndexConfig(source=source, output=output, cuts=cuts, fps=fps)  # tiny models, 30-s clips
    start = time.perf_counter()
    ensure_ray(cfg.address)
    ray_start_s = time.perf_counter() - start
    start = time.perf_counter()
    summary = run_index(cfg, progress=lambda line: None)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds, "ray_start_s": ray_start_s, "graph_s": summary.graph_seconds,
        "video_seconds": summary.video_seconds, "clips": summary.clips, "clips_failed": summary.clips_failed,
        "frames": summary.frames, "videos_ok": summary.videos_ok, "videos_failed": summary.videos_failed,
        "objects": summary.objects, "captions": summary.captions, "busy_s": dict(summary.busy_seconds),
        "clips_per_call": cfg.clips_per_call,
        "failures": summary.failures, "phase_s": dict(summary.phase_seconds), "driver_cpu_s": summary.driver_cpu_s,
    }


def long_video_point(work: Path, durations: tuple[float, float], cuts: str = "none",
                     fps: float = 1.0) -> dict[str, Any]:
    """The same content as a short and a long video, each indexed in a fresh process."""
    from pipeline.samples import make_long_video

    runs = {}
    for duration in durations:
        folder = work / f"long_{duration:g}s"
        folder.mkdir(parents=True, exist_ok=True)
        video = folder / f"long_{duration:g}s.mp4"
        if not video.exists():
            make_long_video(video, duration, segment_s=60.0, width=160, height=120, fps=10.0)
        output = _fresh(work / f"out_long_{duration:g}s_{cuts}")
        code = (
            "import json; from bench.pipeline import long_video_run; "
            f"print(json.dumps(long_video_run({str(folder)!r}, {str(output)!r}, {cuts!r}, {fps!r})))"
        )
        measured = peak_rss_of([sys.executable, "-c", code])
        if measured["code"]:
            raise RuntimeError(f"long-video run over {duration:g} s failed (exit {measured['code']})")
        result = json.loads(measured.pop("stdout").strip().splitlines()[-1])
        runs[duration] = {**result, **measured, "video_bytes": video.stat().st_size}
    short, long = (runs[d] for d in durations)
    tag = {d: f"{d / 60:g}min" for d in durations}
    figures: dict[str, Any] = {
        "long_video_cuts": cuts, "long_video_fps": fps,
        # Like with like: both videos fill a referrer call, or the longer one's peak includes a fuller call.
        "long_video_both_fill_a_call": all(runs[d]["clips"] >= runs[d]["clips_per_call"] for d in durations),
        "long_video_time_ratio": long["seconds"] / short["seconds"],
        "long_video_rss_ratio": long["peak_mib"] / short["peak_mib"],
        "long_video_process_time_ratio": long["process_s"] / short["process_s"],
        "long_video_graph_time_ratio": long["graph_s"] / short["graph_s"] if short["graph_s"] else None,
    }
    for d in durations:
        r = runs[d]
        figures[f"video_hours_per_hour_{tag[d]}"] = r["video_seconds"] / r["seconds"] if r["seconds"] else 0.0
    for d in durations:
        r, t = runs[d], tag[d]
        figures.update({
            f"long_video_run_index_s_{t}": r["seconds"], f"long_video_ray_start_s_{t}": r["ray_start_s"],
            f"long_video_process_s_{t}": r["process_s"], f"long_video_graph_s_{t}": r["graph_s"],
            f"long_video_peak_rss_mib_{t}": r["peak_mib"], f"long_video_processes_at_peak_{t}": r["processes_at_peak"],
            f"long_video_video_s_{t}": r["video_seconds"], f"long_video_clips_{t}": r["clips"],
            f"long_video_clips_failed_{t}": r["clips_failed"], f"long_video_frames_{t}": r["frames"],
            f"long_video_objects_{t}": r["objects"], f"long_video_captions_{t}": r["captions"],
            f"long_video_file_bytes_{t}": r["video_bytes"],
            **{f"long_video_busy_s_{stage}_{t}": sec for stage, sec in r["busy_s"].items()},
            **{f"long_video_phase_s_{name}_{t}": sec for name, sec in sorted(r["phase_s"].items())},
            f"long_video_driver_cpu_share_{t}": r["driver_cpu_s"] / r["seconds"] if r["seconds"] else None,
        })
    figures["long_video_max_time_ratio"] = LONG_VIDEO_MAX_TIME_FACTOR * durations[1] / durations[0]
    figures["long_video_time_ok"] = figures["long_video_time_ratio"] <= figures["long_video_max_time_ratio"]
    figures["long_video_rss_ok"] = figures["long_video_rss_ratio"] <= LONG_VIDEO_MAX_RSS_RATIO
    for d in durations:
        print(f"long video {tag[d]}: RSS at peak by process (MiB): {json.dumps(runs[d]['at_peak_mib'])}", file=sys.stderr)
        for uri, error in runs[d]["failures"]:
            print(f"long video {tag[d]}: failed {uri}: {error}", file=sys.stderr)
    return figures


# -- the command ----------------------------------------------------------------------------------


def compare_point(work: Path, videos: int) -> dict[str, Any]:
    import ray

    corpus = make_corpus(work / f"videos_{videos}", videos)
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        plain = plain_loop_process(corpus, _fresh(work / "out_plain"))
        ray_run = ray_job(_config(corpus, _fresh(work / "out_ray")))
    finally:
        ray.shutdown()
    return {
        "videos": videos,
        "plain_videos_per_s_after_setup": plain["videos"] / plain["seconds"],
        "plain_frames_per_s_after_setup": plain["frames"] / plain["seconds"],
        "ray_videos_per_s": ray_run["videos"] / ray_run["seconds"],
        "ray_frames_per_s": ray_run["frames"] / ray_run["seconds"],
        "plain_clips": plain["clips"],
        "ray_clips": ray_run["clips"],
        "plain_process_s": plain["process_s"],
        "plain_model_setup_s": plain["setup_s"],
        "plain_videos_s": plain["seconds"],
        "ray_total_s": ray_run["seconds"],
        "ray_over_plain_time": ray_run["seconds"] / plain["process_s"],
        "ray_graph_s": ray_run["graph_s"],
        **{f"ray_busy_share_{stage}": share for stage, share in ray_run["utilisation"].items()},
        **{f"ray_busy_share_active_{stage}": share for stage, share in ray_run["active"].items()},
        **{f"ray_busy_s_{stage}": sec for stage, sec in ray_run["busy_s"].items()},
        **{f"ray_actors_{stage}": n for stage, n in ray_run["actors"].items()},
        # Where the time goes: seconds per stage and phase, summed over rows (Ray job, then plain loop).
        **{f"phase_s_{name}": sec for name, sec in sorted(ray_run["phase_s"].items())},
        **{f"plain_phase_s_{name}": sec for name, sec in sorted(plain["phase_s"].items())},
        **{f"ray_over_plain_busy_{stage}": ray_run["busy_s"][stage] / plain["busy_s"][stage]
           for stage in ray_run["busy_s"] if plain["busy_s"].get(stage)},
        "driver_cpu_s": ray_run["driver_cpu_s"],
        "driver_cpu_share": ray_run["driver_cpu_s"] / ray_run["seconds"] if ray_run["seconds"] else None,
    }


def memory_point(work: Path, sizes: tuple[int, int]) -> dict[str, Any]:
    memory, memory_s = {}, {}
    for n in sizes:
        memory_start = time.perf_counter()
        folder = make_corpus(work / f"videos_{n}", n)
        cmd = [sys.executable, "-m", "jobs.cli", "index", str(folder), str(_fresh(work / f"out_mem_{n}")),
               "--fps", "2", "--max-new-tokens", "16", "--cuts", "none"]
        measured = peak_rss_of(cmd)
        memory[n] = measured["peak_mib"]
        if measured["code"]:
            print(f"memory run over {n} videos failed (exit {measured['code']})", file=sys.stderr)
        memory_s[n] = time.perf_counter() - memory_start
    small, large = sizes
    return {
        f"peak_rss_mib_{small}_videos": memory.get(small),
        f"peak_rss_mib_{large}_videos": memory.get(large),
        "peak_rss_ratio": (memory[large] / memory[small]) if memory.get(small) and memory.get(large) else None,
        **{f"memory_run_s_{n}_videos": sec for n, sec in memory_s.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=10, help="videos for the Ray vs plain-loop comparison")
    parser.add_argument("--memory-videos", type=int, nargs=2, default=(10, 100), metavar=("SMALL", "LARGE"))
    parser.add_argument("--long-video-seconds", type=float, nargs=2, default=(600.0, 7200.0), metavar=("SHORT", "LONG"),
                        help="lengths of the long-video point's two videos (same content; both should fill a "
                             "referrer call: at least 16 clips of 30 s)")
    parser.add_argument("--long-video-fps", type=float, default=1.0, help="frames sampled per second on that point")
    parser.add_argument("--long-video-cuts", choices=("none", "shot"), default="none",
                        help="clip boundaries on the long-video point (shot: TransNetV2, ~30 ms a frame on a CPU)")
    parser.add_argument("--cross-clip-videos", type=int, default=50,
                        help="short videos of the cross-clip batching point (bench.cross_clip)")
    parser.add_argument("--only", choices=POINTS, action="append", default=None,
                        help="run only this point (repeatable); default: every point")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)
    points = args.only or list(POINTS)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    bench_start = time.perf_counter()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-pipeline-"))

    figures: dict[str, Any] = {}
    if "compare" in points:
        figures.update(compare_point(work, args.videos))
    if "memory" in points:
        figures.update(memory_point(work, tuple(args.memory_videos)))
    if "cross-clip" in points:
        from bench.cross_clip import cross_clip_point

        figures.update(cross_clip_point(work, args.cross_clip_videos))
    if "long-video" in points:
        figures.update(long_video_point(work, tuple(args.long_video_seconds), args.long_video_cuts, args.long_video_fps))
    figures["bench_seconds_total"] = time.perf_counter() - bench_start

    width = max(32, max(len(k) for k in figures) + 1)
    print(f"{'figure':<{width}} value")
    for key, value in figures.items():
        print(f"{key:<{width}} {value:.3f}" if isinstance(value, float) else f"{key:<{width}} {value}")
    notes = []
    if "compare" in points:
        notes += [
            "plain_process_s: a fresh interpreter importing torch, loading both models and running every video;",
            "ray_total_s: run_index on a started Ray instance, its actors importing and loading the same;",
            "ray_busy_share_<stage>: share of the Ray graph's wall time that stage's actors spent in batches",
        ]
    if "long-video" in points:
        notes += [
            "long_video_time_ratio: run_index wall time, long / short video (Ray started before the clock; "
            f"target <= {LONG_VIDEO_MAX_TIME_FACTOR:g}x the length ratio);",
            "long_video_rss_ratio: peak RSS of the whole process tree, long / short video "
            f"(target <= {LONG_VIDEO_MAX_RSS_RATIO:g}); video_hours_per_hour_*: video seconds / run_index seconds",
        ]
    if notes:
        print("(" + "\n ".join(notes) + ")")
    if args.json_path:
        import ray

        record = {
            "bench": "pipeline", "when": dt.datetime.now(dt.timezone.utc).isoformat(), "machine": platform.node(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "ray": ray.__version__,
            "points": points, **figures,
        }
        Path(args.json_path).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
