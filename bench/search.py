"""Benchmark of `pixelrefer query --like`: latency over 100k and 1M stored 256-d embeddings.

    python -m bench.search [--sizes 100000 1000000] [--repeats 5] [--dir DIR] [--json FILE]

For each size N it writes a synthetic index in the real table layout (`OUTPUT/<table>/run_id=<run>/
part-*.parquet`, zstd, 100,000 rows a file as `RunWriter` writes them, every table validated by
`schemas.tables`): N captions of N/100 videos (10 objects x 10 clips each) with short everyday
sentences, and N unit vectors of 256 float32 (random: the cost of ranking does not depend on what
the vectors mean). Then it opens the index as the command does and times, as medians of
`--repeats` runs after one warm-up:

- `like_s`: `search_like` end to end, as `--like` runs it (embedding the words with WordLlama, the
  BM25 terms, and the one fused SQL statement `jobs.query_like.like_sql`);
- `sql_s`: that SQL statement alone, with the same parameters;
- `dense_sql_s`: the same statement without its BM25 half (a query whose words are all stop words),
  i.e. the cosine ranking alone;
- `bm25_s`: `--text` on the same words (the BM25 half as the existing command runs it).

No ANN index is used: every query reads and compares all N vectors.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

RUN = "run-bench"
DIM = 256
ROWS_PER_FILE = 100_000
OBJECTS_PER_VIDEO = 10
CLIPS_PER_VIDEO = 10
QUERY = "a person carrying a ladder"
WORDS = {
    "who": ["a man", "a woman", "a child", "a dog", "a cat", "a worker", "a cyclist", "a red car", "a bus", "a bird"],
    "does": ["carrying", "walking past", "pushing", "looking at", "standing near", "running towards", "holding",
             "sitting on", "cleaning", "painting"],
    "what": ["a ladder", "a bicycle", "a shopping cart", "the window", "a bench", "the door", "a ball", "a box",
             "the fence", "a bag"],
    "where": ["on the street", "in the park", "in a kitchen", "at the station", "by the river", "in the rain",
              "at night", "in a garden", "near the shop", "on a bridge"],
}


def _sentences(count: int, rng: np.random.Generator) -> list[str]:
    picks = [rng.integers(0, len(v), count) for v in WORDS.values()]
    parts = list(WORDS.values())
    return [" ".join(parts[k][picks[k][i]] for k in range(len(parts))) for i in range(count)]


def write_index(root: Path, n: int, seed: int = 0) -> dict[str, Any]:
    """The synthetic index of `n` captions (and their vectors); returns its size on disk."""
    from schemas.tables import to_table

    rng = np.random.default_rng(seed)
    per_video = OBJECTS_PER_VIDEO * CLIPS_PER_VIDEO
    videos = max(1, n // per_video)
    when = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)

    def write(table: str, data: pa.Table, part: int) -> None:
        folder = root / table / f"run_id={RUN}"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(to_table(table, data), folder / f"part-c0000-{part:05d}.parquet", compression="zstd")

    vids = [f"video-{v:07d}" for v in range(videos)]
    write("videos", pa.Table.from_pylist([
        {"video_id": v, "uri": f"s3://bucket/videos/{v}.mp4", "size_bytes": 1, "etag": v, "duration_s": 300.0,
         "fps": 25.0, "width": 640, "height": 360, "num_frames": 7500, "sampled_ts": [], "sampled_fps": 1.0,
         "clips": CLIPS_PER_VIDEO, "status": "ok", "error": None, "model": "bench", "tracker": "bench", "run_id": RUN,
         "indexed_at": when} for v in vids]), 0)
    objects = pa.table({
        "video_id": np.repeat(vids, OBJECTS_PER_VIDEO), "object_id": np.tile(np.arange(OBJECTS_PER_VIDEO, dtype=np.int32), videos),
        "source": ["auto"] * (videos * OBJECTS_PER_VIDEO),
        "label": [WORDS["who"][i % len(WORDS["who"])].split()[-1] for i in range(videos * OBJECTS_PER_VIDEO)],
        "first_ts": np.zeros(videos * OBJECTS_PER_VIDEO), "last_ts": np.full(videos * OBJECTS_PER_VIDEO, 300.0),
        "num_frames": np.full(videos * OBJECTS_PER_VIDEO, 300, np.int32), "run_id": [RUN] * (videos * OBJECTS_PER_VIDEO),
    })
    write("objects", objects, 0)
    total = videos * per_video
    for part, start in enumerate(range(0, total, ROWS_PER_FILE)):
        rows = np.arange(start, min(total, start + ROWS_PER_FILE))
        count = len(rows)
        video = np.asarray(vids)[rows // per_video]
        object_id = ((rows % per_video) // CLIPS_PER_VIDEO).astype(np.int32)
        clip = (rows % CLIPS_PER_VIDEO).astype(np.int32)
        texts = _sentences(count, rng)
        common = {"video_id": video, "object_id": object_id, "clip_index": clip, "ts_start": clip * 30.0,
                  "ts_end": clip * 30.0 + 29.0}
        write("captions", pa.table({**common, "caption": texts, "mode": ["lite"] * count, "model": ["bench"] * count,
                                    "num_tokens": np.full(count, 8, np.int32), "run_id": [RUN] * count}), part)
        vectors = rng.standard_normal((count, DIM), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        offsets = pa.array(np.arange(0, count * DIM + 1, DIM, dtype=np.int32))
        write("embeddings", pa.table({
            **common, "kind": ["caption"] * count, "object_ids": pa.nulls(count, pa.list_(pa.int32())), "text": texts,
            "embedder": ["wordllama-l2_supercat_256"] * count, "dim": np.full(count, DIM, np.int32),
            "vector": pa.ListArray.from_arrays(offsets, pa.array(vectors.reshape(-1))),
            "text_run_id": [RUN] * count, "run_id": [RUN] * count,
        }), part)
    size = sum(f.stat().st_size for f in root.rglob("*.parquet"))
    embeddings = sum(f.stat().st_size for f in (root / "embeddings").rglob("*.parquet"))
    return {"videos": videos, "captions": total, "index_mb": round(size / 2**20, 1),
            "embeddings_mb": round(embeddings / 2**20, 1)}


def _median_s(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up: file metadata and the OS page cache
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times), 4)


def measure(root: Path, repeats: int) -> dict[str, Any]:
    from jobs.query_like import like_params, like_sql, query_vector, search_like
    from jobs.query_search import TERMS_SQL
    from jobs.query_sql import open_index

    with open_index(str(root)) as index:
        started = time.perf_counter()
        vector, name, dim = query_vector(index, QUERY, None)
        first_embed_s = time.perf_counter() - started
        terms = index.sql(TERMS_SQL, {"text": QUERY}).column("terms")[0].as_py()
        sql, params = like_sql(dim, bm25=True, video=False, label=False), like_params(vector, name, terms, 10)
        dense_sql, dense_params = like_sql(dim, bm25=False, video=False, label=False), like_params(vector, name, [], 10)
        top = index.sql(sql, params).to_pylist()
        return {
            "like_s": _median_s(lambda: search_like(index, QUERY, 10), repeats),
            "sql_s": _median_s(lambda: index.sql(sql, params), repeats),
            "dense_sql_s": _median_s(lambda: index.sql(dense_sql, dense_params), repeats),
            "bm25_s": _median_s(lambda: index.search(QUERY, 10), repeats),
            "first_query_vector_s": round(first_embed_s, 3),
            "top_text": top[0]["text"] if top else None,
        }


def environment() -> dict[str, Any]:
    import duckdb

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu_model": cpu, "cpu_count": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
            "python": platform.python_version(), "duckdb": duckdb.__version__,
            "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.search", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="embeddings stored")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure (the median is reported)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the indexes (default: a temp folder)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    out: dict[str, Any] = {"bench": "search", "query": QUERY, "dim": DIM, "repeats": args.repeats}
    with tempfile.TemporaryDirectory(prefix="bench-search-", dir=args.dir) as tmp:
        for n in args.sizes:
            root = Path(tmp) / f"index-{n}"
            started = time.perf_counter()
            layout = write_index(root, n)
            print(f"{n:>9} embeddings: wrote {layout['index_mb']} MB in {time.perf_counter() - started:.1f} s",
                  file=sys.stderr)
            figures = measure(root, args.repeats)
            out[f"n{n}"] = {**layout, **figures}
            print(f"{n:>9} embeddings: --like {figures['like_s']:.3f} s (SQL {figures['sql_s']:.3f} s, cosine "
                  f"only {figures['dense_sql_s']:.3f} s, --text {figures['bm25_s']:.3f} s)", file=sys.stderr)
    out.update(environment())
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
