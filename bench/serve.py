"""Benchmark of `pixelrefer serve`: search latency through the API, and how soon a long video's page
is usable.

    python -m bench.serve [--passages 100000] [--repeats 5] [--objects 300] [--dir DIR] [--json FILE]

- Search: the synthetic index of `bench.search` (N stored caption passages with WordLlama vectors,
  in the real table layout, the search index built by `pipeline.search.index.sync`), served by the
  app in process (Starlette's TestClient: no network, everything else as a browser's request
  meets it). Medians after one warm-up of `GET /api/search?q=...` (`search_s`), narrowed by a
  label (`search_label_s`) and by a video (`search_video_s`), with the JSON encoding included;
  `like_direct_s` is `search_like` called directly on the same index and machine, so the
  difference is what the app adds.
- Long video: a 2-hour video sampled at 1 fps (7,200 frames, 240 clips of 30 s) with `--objects`
  objects, each seen for 10 minutes (so ~`objects` x 600 `masks` rows, 1280x720 COCO RLE), a
  caption per object and clip plus a whole-track one. The video page sends two requests at
  once: the masks of the 30 s around the playhead (with the frame size and duration: enough to
  play with masks) and `GET /api/videos/<id>` (objects with presence spans, the clip timeline,
  captions, answers: the timeline and panel). `page_usable_s`: the masks' latency while the
  document is being built (they run on a second DuckDB cursor); `page_doc_s`: the document on a
  first visit (the server keeps a video's rendered document: `page_doc_cached_s` for a later one;
  the index is read as of its start); `page_masks_s`: the masks alone. The static HTML/JS/CSS are a
  few kB from memory; the video streams by range requests and plays as soon as its first bytes
  arrive. The payload sizes are reported too.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from bench.machine import describe, median_s

LONG_SECONDS = 7200
CLIP_SECONDS = 30
SEEN_SECONDS = 600
WIDTH, HEIGHT = 1280, 720
LONG_RUN = "run-bench-long"


def write_long_video(root: Path, objects: int, seed: int = 0) -> dict[str, Any]:
    """One 2-hour video's run (module docstring), committed as `RunWriter` commits an index run."""
    import cv2
    import pyarrow as pa
    from pycocotools import mask as mask_utils

    from pipeline.store import TableStore
    from pipeline.store.commit import RunWriter
    from schemas.tables import to_table

    rng = np.random.default_rng(seed)
    writer = RunWriter(TableStore(str(root)), LONG_RUN, commit_index=0)
    when = dt.datetime(2024, 6, 1, tzinfo=dt.timezone.utc)
    vid = "long0000000000000"[:16]
    n_clips = LONG_SECONDS // CLIP_SECONDS
    writer.add("videos", to_table("videos", [{
        "video_id": vid, "uri": str(root / "long.mp4"), "size_bytes": 1, "etag": "long", "duration_s": float(LONG_SECONDS),
        "fps": 30.0, "width": WIDTH, "height": HEIGHT, "num_frames": LONG_SECONDS * 30,
        "sampled_ts": [float(t) for t in range(LONG_SECONDS)], "sampled_fps": 1.0, "clips": n_clips, "status": "ok",
        "error": None, "model": "bench", "tracker": "bench", "run_id": LONG_RUN, "commit_index": 0, "indexed_at": when}]))
    writer.add("clips", to_table("clips", [
        {"video_id": vid, "clip_index": c, "ts_start": float(c * CLIP_SECONDS), "ts_end": float((c + 1) * CLIP_SECONDS),
         "boundary": "window", "num_sampled": CLIP_SECONDS, "status": "ok", "error": None, "run_id": LONG_RUN}
        for c in range(n_clips)]))
    shapes = []
    for _ in range(16):  # a few ellipses, reused: the RLE's length is what matters, not its variety
        mask = np.zeros((HEIGHT, WIDTH), np.uint8)
        cx, cy = int(rng.integers(100, WIDTH - 100)), int(rng.integers(100, HEIGHT - 100))
        cv2.ellipse(mask, (cx, cy), (int(rng.integers(20, 90)), int(rng.integers(20, 90))), 0, 0, 360, 1, -1)
        encoded = mask_utils.encode(np.asfortranarray(mask))
        ys, xs = np.nonzero(mask)
        shapes.append(({"size": [HEIGHT, WIDTH], "counts": encoded["counts"].decode("ascii")},
                       [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)], int(mask.sum())))
    object_rows, caption_rows, mask_columns = [], [], {k: [] for k in ("object_id", "clip_index", "frame_index", "ts",
                                                                         "bbox", "area", "rle")}
    for k in range(objects):
        first = int(rng.integers(0, LONG_SECONDS - SEEN_SECONDS))
        seen = range(first, first + SEEN_SECONDS)
        rle, bbox, area = shapes[k % len(shapes)]
        for t in seen:
            for name, value in (("object_id", k), ("clip_index", t // CLIP_SECONDS), ("frame_index", t * 30),
                                ("ts", float(t)), ("bbox", bbox), ("area", area), ("rle", rle)):
                mask_columns[name].append(value)
        object_rows.append({"video_id": vid, "object_id": k, "source": "auto", "label": f"thing{k % 20}",
                            "first_ts": float(first), "last_ts": float(first + SEEN_SECONDS - 1),
                            "num_frames": SEEN_SECONDS, "run_id": LONG_RUN})
        for c in sorted({t // CLIP_SECONDS for t in seen}):
            caption_rows.append({"video_id": vid, "object_id": k, "clip_index": c, "ts_start": float(max(first, c * 30)),
                                 "ts_end": float(min(first + SEEN_SECONDS - 1, c * 30 + 29)),
                                 "caption": f"thing {k} doing something in clip {c}", "mode": "lite", "model": "bench",
                                 "num_tokens": 7, "run_id": LONG_RUN})
        caption_rows.append({"video_id": vid, "object_id": k, "clip_index": None, "ts_start": float(first),
                             "ts_end": float(first + SEEN_SECONDS - 1), "caption": f"thing {k} over ten minutes",
                             "mode": "lite", "model": "bench", "num_tokens": 5, "run_id": LONG_RUN})
    n = len(mask_columns["ts"])
    schema = to_table("masks", []).schema
    masks = pa.table({"video_id": [vid] * n, **mask_columns, "score": np.full(n, 0.9, np.float32),
                      "run_id": [LONG_RUN] * n}).select(schema.names).cast(schema)
    writer.add("masks", masks)
    writer.add("objects", to_table("objects", object_rows))
    writer.add("captions", to_table("captions", caption_rows))
    writer.add("runs", to_table("runs", [{
        "run_id": LONG_RUN, "commit_index": 0, "command": "index", "source": str(root), "model": "bench",
        "tracker": "bench", "mode": "lite", "started_at": when, "ended_at": when, "status": "committed",
        "videos_listed": 1, "videos_skipped": 0, "videos_ok": 1, "videos_failed": 0, "videos_quarantined": 0,
        "clips": n_clips, "video_seconds": float(LONG_SECONDS), "objects": objects, "captions": len(caption_rows),
        "answers": 0, "retry_video_ids": [], "embeddings_version": None}]))
    writer.commit(when)
    return {"video_id": vid, "objects": objects, "masks_rows": n, "captions": len(caption_rows)}


def measure_search(root: Path, passages: int, repeats: int) -> dict[str, Any]:
    from starlette.testclient import TestClient

    from bench.search import LABEL, QUERY, write_index
    from jobs.query_like import search_like
    from jobs.serve.api import ServeIndex
    from jobs.serve.app import build_app
    from pipeline.search.index import sync

    started = time.perf_counter()
    figures: dict[str, Any] = {"index": write_index(root, passages)}
    sync(str(root))
    figures["build_s"] = round(time.perf_counter() - started, 1)
    data = ServeIndex(str(root))
    try:
        client = TestClient(build_app(data), base_url="http://127.0.0.1")

        def get(**params: str) -> Callable[[], None]:
            def run() -> None:
                response = client.get("/api/search", params={"q": QUERY, **params})
                assert response.status_code == 200 and response.json()["mode"] == "like", response.text
            return run

        figures.update(search_s=median_s(get(), repeats), search_label_s=median_s(get(label=LABEL), repeats),
                       search_video_s=median_s(get(video="video-0000042"), repeats),
                       like_direct_s=median_s(lambda: search_like(data.index, QUERY, 20), repeats))
    finally:
        data.close()
    return figures


def measure_long_video(root: Path, objects: int, repeats: int) -> dict[str, Any]:
    from starlette.testclient import TestClient

    from jobs.serve.api import ServeIndex
    from jobs.serve.app import build_app

    figures: dict[str, Any] = {"video": write_long_video(root, objects)}
    vid = figures["video"]["video_id"]
    data = ServeIndex(str(root))
    try:
        client = TestClient(build_app(data), base_url="http://127.0.0.1")
        sizes: dict[str, int] = {}

        def doc(cached: bool = False) -> None:
            if not cached:
                data._docs.clear()  # the server renders a document once per video; time the first visit
            response = client.get(f"/api/videos/{vid}")
            assert response.status_code == 200, response.text
            sizes["doc_kb"] = len(response.content) // 1024

        def window() -> None:
            response = client.get(f"/api/videos/{vid}/masks", params={"start": 3590, "end": 3620})
            assert response.status_code == 200 and response.json()["masks"], response.text
            sizes["masks_kb"] = len(response.content) // 1024

        def both() -> float:
            """The page's first two requests as it sends them, together: the masks' latency meanwhile."""
            builder = threading.Thread(target=doc)
            builder.start()
            time.sleep(0.01)  # the document's request goes first: the worse order for the masks
            started = time.perf_counter()
            window()
            took = time.perf_counter() - started
            builder.join()
            return took

        figures["page_doc_s"] = median_s(doc, repeats)
        figures["page_doc_cached_s"] = median_s(lambda: doc(cached=True), repeats)
        figures["page_masks_s"] = median_s(window, repeats)
        both()
        figures["page_usable_s"] = round(statistics.median(both() for _ in range(repeats)), 4)
        figures.update(sizes)
    finally:
        data.close()
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=100_000, help="stored caption passages (default 100000; 0: skip the search part)")
    parser.add_argument("--objects", type=int, default=300, help="objects of the 2-hour video (default 300)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the indexes (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        figures = {"machine": describe(),
                   "search": measure_search(Path(tmp) / "search", args.passages, args.repeats) if args.passages else None,
                   "long_video": measure_long_video(Path(tmp) / "long", args.objects, args.repeats)}
    text = json.dumps(figures, indent=2, default=str)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
