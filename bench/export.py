"""Benchmark of `pixelrefer export` on a 2-hour video: time and peak memory per format.

    python -m bench.export [--seconds 7200] [--objects 20] [--fps 1] [--dir DIR] [--json FILE]

A synthetic index of one video (`--seconds` long, 1280x720, sampled at `--fps`, `--objects`
objects present the whole time: 144,000 mask rows at the defaults) is written through
`RunWriter` as an index run commits it. Masks are COCO RLE of ellipses made with pycocotools
(a pool of 64 shapes, reused, so that making the index takes seconds; their RLE strings have the
length of real 720p object masks). Each format is then exported by `pixelrefer export` in a
process of its own, and timed there: `seconds` (wall), `peak_rss_mib` (the process's high-water
mark, `VmHWM`) and `baseline_rss_mib` (the same once the libraries an export uses are imported,
before the export), so the export's own memory is the difference. `output_mib` is what it wrote.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from bench.machine import describe
from pipeline.store import TableStore
from pipeline.store.commit import RunWriter

WIDTH, HEIGHT = 1280, 720
RUN = "bench-export"
VIDEO = "bench2hour0000001"
FORMATS = {"ytvis": "export.json", "mots": "mots", "mot": "mot", "cvat": "cvat"}

# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forking parent (this bench,
# which held the index's rows), VmHWM belongs to the new process's own memory map.
CHILD = """
import sys, time
import deltalake, pyarrow.dataset, pycocotools.mask, PIL.Image, pipeline.export, pipeline.evaluate
from jobs.cli import main
def hwm():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
base = hwm()
t0 = time.perf_counter()
code = main(sys.argv[1:])
print("BENCH", code, time.perf_counter() - t0, base, hwm())
"""


def mask_pool(count: int = 64) -> list[tuple[dict[str, Any], list[float], int]]:
    """(rle, xyxy bbox, area) of ellipses of 60-260 px at varied places in a 720p frame."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    pool = []
    for _ in range(count):
        rx, ry = rng.integers(30, 130, 2)
        cx, cy = rng.integers(140, WIDTH - 140), rng.integers(140, HEIGHT - 140)
        mask = (((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1).astype(np.uint8)
        rle = mask_utils.encode(np.asfortranarray(mask))
        pool.append(({"size": [HEIGHT, WIDTH], "counts": rle["counts"].decode()},
                     [float(cx - rx), float(cy - ry), float(cx + rx), float(cy + ry)], int(mask.sum())))
    return pool


def write_index(output: str, seconds: int, objects: int, fps: float) -> int:
    times = [k / fps for k in range(int(seconds * fps))]
    pool = mask_pool()
    writer = RunWriter(TableStore(output), RUN)
    when = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    writer.add("videos", [{
        "video_id": VIDEO, "uri": "s3://bench/two-hours.mp4", "size_bytes": 1, "etag": "x",
        "duration_s": float(seconds),
        "fps": 30.0, "width": WIDTH, "height": HEIGHT, "num_frames": int(seconds * 30), "sampled_ts": times,
        "sampled_fps": fps, "clips": seconds // 30, "status": "ok", "error": None, "model": "bench", "tracker": "bench",
        "run_id": RUN, "indexed_at": when}])  # fmt: skip
    writer.add("objects", [{"video_id": VIDEO, "object_id": k, "source": "auto", "label": f"thing{k % 5}",
                            "first_ts": 0.0, "last_ts": times[-1], "num_frames": len(times), "run_id": RUN}
                           for k in range(1, objects + 1)])  # fmt: skip
    rows = 0
    for start in range(0, len(times), 600):  # a commit's masks arrive clip by clip
        batch = []
        for k in range(start, min(start + 600, len(times))):
            for obj in range(1, objects + 1):
                rle, bbox, area = pool[(obj * 7 + k // 30) % len(pool)]
                batch.append({"video_id": VIDEO, "object_id": obj, "clip_index": int(times[k] // 30), "frame_index": k,
                              "ts": times[k], "bbox": bbox, "area": area, "score": 0.9, "rle": rle, "run_id": RUN})
        writer.add("masks", batch)
        rows += len(batch)
    writer.add("runs", [{"run_id": RUN, "commit_index": 0, "command": "index", "status": "committed",
                         "retry_video_ids": []}])
    writer.commit(when)
    return rows


def export_once(output: str, fmt: str, out: Path) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-c", CHILD, "export", output, "--format", fmt, "--out", str(out)],
                          capture_output=True, text=True, check=True)
    line = next(line for line in done.stdout.splitlines() if line.startswith("BENCH"))
    _, code, seconds, base, peak = line.split()
    assert code == "0", done.stderr
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if out.is_dir() else out.stat().st_size
    return {"seconds": round(float(seconds), 2), "baseline_rss_mib": round(int(base) / 1024, 1),
            "peak_rss_mib": round(int(peak) / 1024, 1), "output_mib": round(size / 2**20, 1)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=7200)
    parser.add_argument("--objects", type=int, default=20)
    parser.add_argument("--fps", type=float, default=1.0)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        output = str(Path(folder) / "index")
        t0 = time.perf_counter()
        rows = write_index(output, args.seconds, args.objects, args.fps)
        figures: dict[str, Any] = {
            "machine": describe("deltalake", "pyarrow", "pycocotools", "pillow"),
            "index": {"seconds": args.seconds, "objects": args.objects, "fps": args.fps, "mask_rows": rows,
                      "build_seconds": round(time.perf_counter() - t0, 1)},
            "formats": {},
        }
        for fmt in args.formats:
            figures["formats"][fmt] = export_once(output, fmt, Path(folder) / FORMATS[fmt])
            print(fmt, figures["formats"][fmt], flush=True)
    print(json.dumps(figures, indent=1))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
