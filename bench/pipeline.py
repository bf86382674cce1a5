"""Benchmark of the index job: the Ray Data graph against a plain single-process loop over the same
stages and data, and the peak memory of a run over 10 vs 100 videos.

    python -m bench.pipeline [--videos 10] [--memory-videos 10 100] [--json FILE]

Equal work: the plain loop runs in a fresh interpreter and its time counts from that process's
start (importing torch and transformers, loading both models, then every video); the Ray job's time
counts from `run_index` on an already started Ray instance (a standing cluster) and so includes its
actors' processes importing the same libraries and loading the same models. The busy share of each
model stage is reported over the whole graph and between the stage's first and last batch.

Peak memory is the largest sum of resident set sizes over the process tree that runs the job
(driver, raylet, workers, actors), sampled every 0.1 s; each memory point runs in a fresh process
so one run's caches do not count towards the other's.
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

import psutil


def make_corpus(folder: Path, count: int, duration_s: float = 3.0) -> Path:
    from pipeline.samples import DEFAULT_SHAPES, make_video

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        path = folder / f"clip_{i:04d}.mp4"
        if not path.exists():
            make_video(path, shapes=DEFAULT_SHAPES[:2], seed=i, duration_s=duration_s)
    return folder


def plain_loop(cfg) -> dict[str, float]:
    """The same stages, one video at a time, in this process: the reference the Ray job must match."""
    import numpy as np

    from actors.referrer import ReferrerStage
    from actors.tracker import TrackerStage
    from pipeline.graph import _video_rows, decode_row, new_run_id
    from pipeline.sources import list_videos

    first = start = time.perf_counter()
    tracker = TrackerStage(model=cfg.tracker, max_objects=cfg.max_objects, keyframe_interval_s=cfg.keyframe_interval_s)
    referrer = ReferrerStage(model=cfg.model, mode=cfg.mode, max_new_tokens=cfg.max_new_tokens)
    setup = time.perf_counter() - start
    rows = _video_rows(cfg, list_videos(cfg.source), new_run_id())
    frames = 0
    start = time.perf_counter()
    for row in rows:
        decoded = decode_row(row, cfg=cfg)
        batch = {k: np.asarray([v] if not isinstance(v, np.ndarray) else [v], dtype=object) for k, v in decoded.items()}
        batch["frames"] = np.empty(1, dtype=object)
        batch["frames"][0] = decoded["frames"]
        batch["timestamps"] = np.empty(1, dtype=object)
        batch["timestamps"][0] = decoded["timestamps"]
        out = referrer(tracker(batch))
        if not out["error"][0]:
            frames += len(decoded["timestamps"])
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds, "setup_s": setup, "total_s": time.perf_counter() - first, "videos": len(rows),
        "frames": frames,
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


def ray_job(cfg) -> dict[str, float]:
    from pipeline.graph import run_index

    start = time.perf_counter()
    summary = run_index(cfg, progress=lambda line: None)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds, "videos": summary.videos_ok + summary.videos_failed, "frames": summary.frames,
        "graph_s": summary.graph_seconds, "utilisation": summary.utilisation(),
        "active": summary.active_utilisation(), "busy_s": dict(summary.busy_seconds),
        "actors": dict(summary.actors),
    }


def _config(source: Path, output: Path):
    from pipeline.config import IndexConfig

    return IndexConfig(source=str(source), output=str(output), fps=2.0, max_new_tokens=16)


def _fresh(folder: Path) -> Path:
    """An empty output folder: a rerun into an old index would skip every video (idempotence)."""
    shutil.rmtree(folder, ignore_errors=True)
    return folder


def peak_rss_of(cmd: list[str]) -> tuple[float, int]:
    """Run `cmd`, sampling the RSS of its whole process tree; returns (peak MiB, exit code)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root = psutil.Process(proc.pid)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            try:
                procs = [root] + root.children(recursive=True)
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                peak = max(peak, total)
            except psutil.Error:
                pass
            time.sleep(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, err = proc.communicate()
    stop.set()
    thread.join()
    if proc.returncode:
        sys.stderr.write(err.decode(errors="replace")[-2000:])
    return peak / 2**20, proc.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=10, help="videos for the Ray vs plain-loop comparison")
    parser.add_argument("--memory-videos", type=int, nargs=2, default=(10, 100), metavar=("SMALL", "LARGE"))
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    bench_start = time.perf_counter()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-pipeline-"))
    corpus = make_corpus(work / f"videos_{args.videos}", args.videos)

    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    plain = plain_loop_process(corpus, work / "out_plain")
    ray_run = ray_job(_config(corpus, _fresh(work / "out_ray")))
    ray.shutdown()

    memory = {}
    memory_s = {}
    for n in args.memory_videos:
        memory_start = time.perf_counter()
        folder = make_corpus(work / f"videos_{n}", n)
        cmd = [sys.executable, "-m", "jobs.cli", "index", str(folder), str(_fresh(work / f"out_mem_{n}")), "--fps", "2", "--max-new-tokens", "16"]
        memory[n], code = peak_rss_of(cmd)
        if code:
            print(f"memory run over {n} videos failed (exit {code})", file=sys.stderr)
        memory_s[n] = time.perf_counter() - memory_start
    small, large = args.memory_videos
    figures = {
        "videos": args.videos,
        "plain_videos_per_s_after_setup": plain["videos"] / plain["seconds"],
        "plain_frames_per_s_after_setup": plain["frames"] / plain["seconds"],
        "ray_videos_per_s": ray_run["videos"] / ray_run["seconds"],
        "ray_frames_per_s": ray_run["frames"] / ray_run["seconds"],
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
        f"peak_rss_mib_{small}_videos": memory.get(small),
        f"peak_rss_mib_{large}_videos": memory.get(large),
        "peak_rss_ratio": (memory[large] / memory[small]) if memory.get(small) and memory.get(large) else None,
        **{f"memory_run_s_{n}_videos": sec for n, sec in memory_s.items()},
        "bench_seconds_total": time.perf_counter() - bench_start,
    }
    print(f"{'figure':<32} value")
    for key, value in figures.items():
        print(f"{key:<32} {value:.3f}" if isinstance(value, float) else f"{key:<32} {value}")
    print(
        "(plain_process_s: a fresh interpreter importing torch, loading both models and running every video;\n"
        " ray_total_s: run_index on a started Ray instance, its actors importing and loading the same;\n"
        " ray_busy_share_<stage>: share of the Ray graph's wall time that stage's actors spent in batches)"
    )
    if args.json_path:
        record = {
            "bench": "pipeline", "when": dt.datetime.now(dt.timezone.utc).isoformat(), "machine": platform.node(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "ray": ray.__version__, **figures,
        }
        Path(args.json_path).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
