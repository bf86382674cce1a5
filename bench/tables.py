"""Benchmark of OUTPUT's tables as an index grows commit by commit: Delta before and after
`pixelrefer maintain`, beside the pre-Delta layout.

    python -m bench.tables [--commits 300] [--videos 3] [--at 100 500 1000 2000] [--repeats 3]
                           [--dir DIR] [--json FILE]

A synthetic index grows by `--commits` run commits (one nightly run each) of `--videos` videos,
each video with 4 objects, 20 masks, 4 captions and 4 64-d embeddings, written through
`pipeline.store.commit.RunWriter` as an index run writes them (`commit_ms`: its mean time per
commit over the stretch before each checkpoint). The same rows are written in the pre-Delta layout
(`<table>/run_id=<id>/part-c0000-00000.parquet`). At each checkpoint (`--at`), as medians of
`--repeats` runs after a warm-up:

- `delta`: the growing Delta tables as they are (one file per table per commit): active files per
  table and the time of `query --label` (`open_index` + `Index.labelled`), `query --video`
  (`Index.video`), the exact `--like` statement (`like_sql` with a fixed query vector: the embedder's
  time is left out) and a run's start-up (`indexed_video_ids` + `retry_counts`);
- `maintained`: the same on a copy of those tables after `maintain(retain_hours=0)`, with its time;
- `legacy`: DuckDB's `read_parquet('<table>/**/*.parquet', hive_partitioning=true)` over the old
  layout for the same label and video lookups, and a `pyarrow.dataset` read of all of `videos` (what
  the old run start did).

Each query opens its tables afresh, as one `pixelrefer query` process does.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from bench.machine import describe, median_s
from schemas.tables import to_table

LABELS = ("person", "car", "dog", "bicycle", "bus", "cat", "truck", "bird", "bench", "zebra")
RARE = "zebra"  # one object in 40
DIM = 64
MODEL, TRACKER = "bench-model", "bench-tracker"
CHILD_TABLES = ("objects", "masks", "captions", "embeddings")
T0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
RLE = {"size": [48, 64], "counts": "0`0"}


def commit_rows(commit: int, videos: int, rng: np.random.Generator) -> tuple[str, dict[str, list[dict[str, Any]]]]:
    """The rows of one run commit: `videos` videos and their objects, masks, captions, embeddings."""
    run = f"bench-{commit:05d}"
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in ("videos", *CHILD_TABLES, "runs")}
    when = T0 + dt.timedelta(hours=commit)
    for v in range(videos):
        vid = f"{commit:05d}-{v:02d}"
        rows["videos"].append({"video_id": vid, "uri": f"/videos/{vid}.mp4", "size_bytes": 1_000_000, "etag": vid,
                               "duration_s": 10.0, "fps": 25.0, "width": 64, "height": 48, "num_frames": 250,
                               "sampled_ts": [float(t) for t in range(5)], "sampled_fps": 0.5, "clips": 1,
                               "status": "ok", "model": MODEL, "tracker": TRACKER, "run_id": run,
                               "indexed_at": when, "commit_index": 0})
        for o in range(1, 5):
            label = RARE if (commit * videos + v) % 10 == 0 and o == 1 else LABELS[(commit + v + o) % (len(LABELS) - 1)]
            base = {"video_id": vid, "object_id": o, "run_id": run}
            rows["objects"].append({**base, "source": "auto", "label": label, "first_ts": 0.0, "last_ts": 8.0,
                                    "num_frames": 5})
            rows["masks"] += [{**base, "clip_index": 0, "frame_index": f, "ts": 2.0 * f, "bbox": [1.0, 1.0, 9.0, 9.0],
                               "area": 64, "score": 0.9, "rle": RLE} for f in range(5)]
            text = f"a {label} seen in video {vid}"
            rows["captions"].append({**base, "clip_index": 0, "ts_start": 0.0, "ts_end": 8.0, "caption": text,
                                     "mode": "lite", "model": MODEL, "num_tokens": len(text.split())})
            vector = rng.standard_normal(DIM).astype(np.float32)
            rows["embeddings"].append({**base, "kind": "caption", "object_ids": None, "clip_index": 0,
                                       "ts_start": 0.0, "ts_end": 8.0, "text": text, "embedder": "bench-64",
                                       "dim": DIM, "vector": (vector / np.linalg.norm(vector)).tolist(),
                                       "text_run_id": run})
    rows["runs"].append({"run_id": run, "commit_index": 0, "command": "nightly", "source": "/videos", "model": MODEL,
                         "tracker": TRACKER, "mode": "lite", "started_at": when, "ended_at": when,
                         "status": "committed", "videos_listed": videos, "videos_skipped": 0, "videos_ok": videos,
                         "videos_failed": 0, "videos_quarantined": 0, "clips": videos, "video_seconds": 10.0 * videos,
                         "objects": 4 * videos, "captions": 4 * videos, "answers": 0, "retry_video_ids": []})
    return run, rows


def write_delta(store: Any, run: str, rows: dict[str, list[dict[str, Any]]], when: dt.datetime) -> None:
    from pipeline.store.commit import RunWriter

    writer = RunWriter(store, run, 0)
    for table, batch in rows.items():
        writer.add(table, batch)
    writer.commit(when)


def write_legacy(root: Path, run: str, rows: dict[str, list[dict[str, Any]]]) -> None:
    for table, batch in rows.items():
        folder = root / table / f"run_id={run}"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(to_table(table, batch).drop_columns(["run_id"]), folder / "part-c0000-00000.parquet",
                       compression="zstd")


def delta_timings(output: str, video_id: str, repeats: int) -> dict[str, Any]:
    """Files per table and the query and start-up times over the Delta tables at `output`."""
    from jobs.query_like import like_params, like_sql
    from jobs.query_search import TERMS_SQL
    from jobs.query_sql import open_index
    from pipeline.store import TableStore
    from pipeline.store.commit import PUBLISH_ORDER, indexed_video_ids, retry_counts

    store = TableStore(output)
    vector = np.random.default_rng(7).standard_normal(DIM).astype(np.float32)
    vector = (vector / np.linalg.norm(vector)).tolist()

    def label() -> None:
        with open_index(output) as index:
            assert index.labelled(RARE).num_rows

    def video() -> None:
        with open_index(output) as index:
            index.video(video_id)

    def like() -> None:
        with open_index(output) as index:
            terms = index.sql(TERMS_SQL, {"text": f"a {RARE} crossing"}).column("terms")[0].as_py() or []
            assert index.sql(like_sql(DIM, bm25=bool(terms), video=False, label=False),
                             like_params(vector, "bench-64", terms, 10)).num_rows

    def start() -> None:
        store_now = TableStore(output)
        indexed_video_ids(store_now, MODEL, TRACKER)
        retry_counts(store_now, MODEL, TRACKER)

    return {"files": {t: len(store.files(t)) for t in PUBLISH_ORDER},
            "label_s": median_s(label, repeats), "video_s": median_s(video, repeats),
            "like_exact_s": median_s(like, repeats), "start_s": median_s(start, repeats)}


def legacy_timings(root: Path, video_id: str, repeats: int) -> dict[str, Any]:
    """The old layout read as the pre-Delta query and run start read it."""
    import duckdb

    def scan(table: str) -> str:
        return f"read_parquet('{root}/{table}/**/*.parquet', hive_partitioning=true, union_by_name=true)"

    def label() -> None:
        con = duckdb.connect()
        sql = (f"SELECT o.video_id, o.object_id, o.first_ts, o.last_ts FROM {scan('objects')} o "
               f"JOIN {scan('videos')} v USING (video_id, run_id) WHERE v.status = 'ok' AND lower(o.label) = $label "
               "ORDER BY o.video_id, o.object_id LIMIT 100")
        assert con.sql(sql, params={"label": RARE}).to_arrow_table().num_rows
        con.close()

    def video() -> None:
        con = duckdb.connect()
        for table in ("videos", "objects", "masks", "captions"):
            con.sql(f"SELECT * FROM {scan(table)} WHERE video_id = $v", params={"v": video_id}).to_arrow_table()
        con.close()

    def start() -> None:
        pads.dataset(root / "videos", format="parquet", partitioning="hive").to_table()

    files = {t: sum(1 for _ in (root / t).glob("*/*.parquet")) for t in ("videos", *CHILD_TABLES, "runs")}
    return {"files": files, "label_s": median_s(label, repeats), "video_s": median_s(video, repeats),
            "start_s": median_s(start, repeats)}


def checkpoint(work: Path, delta: Path, legacy: Path, commits: int, video_id: str, repeats: int) -> dict[str, Any]:
    from pipeline.store import TableStore
    from pipeline.store.maintain import maintain

    out: dict[str, Any] = {"commits": commits, "delta": delta_timings(str(delta), video_id, repeats)}
    copy = work / f"maintained-{commits}"
    shutil.copytree(delta, copy)
    started = time.perf_counter()
    maintain(TableStore(str(copy)), retain_hours=0)
    out["maintain_s"] = round(time.perf_counter() - started, 2)
    out["maintained"] = delta_timings(str(copy), video_id, repeats)
    shutil.rmtree(copy)
    out["legacy"] = legacy_timings(legacy, video_id, repeats)
    return out


def run(commits: int, videos: int, at: list[int], repeats: int, work: Path,
        say: Callable[[str], None]) -> dict[str, Any]:
    from pipeline.store import TableStore

    delta, legacy = work / "delta", work / "legacy"
    legacy.mkdir(parents=True, exist_ok=True)
    store = TableStore(str(delta))
    rng = np.random.default_rng(0)
    marks = sorted({n for n in at if n <= commits} | {commits})
    results, spent, since = [], 0.0, 0
    for c in range(commits):
        run_id, rows = commit_rows(c, videos, rng)
        started = time.perf_counter()
        write_delta(store, run_id, rows, T0 + dt.timedelta(hours=c))
        spent += time.perf_counter() - started
        write_legacy(legacy, run_id, rows)
        if c + 1 in marks:
            point = checkpoint(work, delta, legacy, c + 1, f"{c // 2:05d}-00", repeats)
            point["commit_ms"] = round(1000 * spent / (c + 1 - since), 1)
            spent, since = 0.0, c + 1
            results.append(point)
            say(summary_line(point))
    return {"commits": commits, "videos_per_commit": videos, "repeats": repeats, "checkpoints": results,
            "machine": describe("deltalake", "duckdb", "pyarrow")}


def summary_line(point: dict[str, Any]) -> str:
    d, m, old = point["delta"], point["maintained"], point["legacy"]
    return (f"{point['commits']:>5} commits  commit {point['commit_ms']:>6.1f} ms  files/table delta "
            f"{d['files']['objects']:>5} -> {m['files']['objects']} maintained (maintain {point['maintain_s']} s)  "
            f"label {d['label_s']:.3f}/{m['label_s']:.3f}/{old['label_s']:.3f} s  "
            f"video {d['video_s']:.3f}/{m['video_s']:.3f}/{old['video_s']:.3f} s  "
            f"like {d['like_exact_s']:.3f}/{m['like_exact_s']:.3f} s  "
            f"start {d['start_s']:.3f}/{m['start_s']:.3f}/{old['start_s']:.3f} s  (delta/maintained/legacy)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tables", description=__doc__.split("\n\n")[0])
    parser.add_argument("--commits", type=int, default=300, help="run commits to grow the index by (default 300)")
    parser.add_argument("--videos", type=int, default=3, help="videos per commit (default 3)")
    parser.add_argument("--at", type=int, nargs="+", default=[100, 500, 1000, 2000],
                        help="checkpoints, in commits (the last commit is always one)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    if args.commits < 1 or args.videos < 1:
        parser.error("--commits and --videos must be at least 1")
    work = args.dir or Path(tempfile.mkdtemp(prefix="bench-tables-"))
    try:
        result = run(args.commits, args.videos, args.at, args.repeats, work,
                     lambda line: print(line, file=sys.stderr, flush=True))
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
