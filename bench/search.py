"""Benchmark of `pixelrefer query --like`: latency over 100k and 1M stored 256-d embeddings.

    python -m bench.search [--sizes 100000 1000000] [--repeats 5] [--vectors wordllama|random]
                           [--dir DIR] [--json FILE]

For each size N it writes a synthetic index in the real table layout (the Delta tables of
`pipeline.store`, committed by `RunWriter` as one run commit, every table validated by
`schemas.tables`): N captions of N/100 videos (10 objects x 10 clips each) with short everyday
sentences, and their 256-d vectors: WordLlama's own (default; what an index holds, so ANN recall
means something) or random unit vectors. Then it builds the search index as an index run's last
commit does (`pipeline.search.index.sync`: `sync_s`, with IVF_PQ from 65,536 passages) and times one
more commit of 12,000 passages on top (`sync_commit_s`). Then, as medians of `--repeats` runs after
one warm-up:

With `--grow-step N` the index is written N passages a commit instead, each commit synced as an
index run syncs it (`grow_syncs`: the time of each, and where the IVF lists were trained again).

- `like_s`: `search_like` end to end, as `--like` runs it (the words embedded with WordLlama, the
  search index's nearest passages and BM25 passages, fused in DuckDB);
- `like_label_s` / `like_video_s`: the same narrowed by `--label worker` (a tenth of the objects)
  or `--video` (one video of the N/100);
- `like_exact_s`: the same with `--exact` (every vector ranked in SQL, BM25 over every text);
- `exact_sql_s` / `dense_sql_s`: that exact statement alone, and without its BM25 half;
- `bm25_s`: `--text` on the same words.

Recall: `dense_recall_at_10` is the share of the search index's 10 nearest objects (an object
counts with its best passage) whose exact cosine, computed in numpy over all vectors, reaches the
exact 10th best: tie-aware, since synthetic captions repeat. Averaged over `QUERIES`, for the
default IVF lists probed and, in `nprobes_sweep`, for others with the time of the nearest-passage
search alone. `--vectors random` is the worst case for any IVF index (no clusters to find).
`top10_agreement` is the overlap of `--like`'s top 10 objects with `--exact`'s for the first
query: below 1 also where they tie, and because the two BM25 sides differ (module `jobs.query_like`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from bench.machine import describe, median_s

import numpy as np
import pyarrow as pa

RUN = "run-bench"
DIM = 256
ROWS_PER_FILE = 100_000
OBJECTS_PER_VIDEO = 10
CLIPS_PER_VIDEO = 10
QUERY = "a person carrying a ladder"
QUERIES = (QUERY, "someone walking a dog in the park", "a car parked near the shop at night",
           "a child playing with a ball", "a woman pushing a cart in the rain", "a bird sitting on the fence",
           "a cyclist crossing a bridge", "a worker painting the door")
DETAILS = ("", "slowly", "quickly", "again", "alone", "together", "briefly", "in the distance", "up close", "calmly",
           "at dawn", "at dusk", "in the shade", "in bright light", "from the left", "from the right")
COMMIT_ROWS = 12_000
NPROBES_SWEEP = (16, 32, 64, 128, 256)
LABEL = "worker"  # a tenth of the objects
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
    parts = [*WORDS.values(), DETAILS]
    picks = [rng.integers(0, len(v), count) for v in parts]
    return [" ".join(parts[k][picks[k][i]] for k in range(len(parts))).strip() for i in range(count)]


def _vectors(texts: list[str], kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "wordllama":
        from models.embedders import load_embedder

        return np.ascontiguousarray(load_embedder("wordllama").embed(texts), np.float32)
    vectors = rng.standard_normal((len(texts), DIM), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def write_index(root: Path, n: int, seed: int = 0, vectors: str = "wordllama", run: str = RUN,
                first_video: int = 0) -> dict[str, Any]:
    """The synthetic index of `n` captions (and their vectors), committed as run `run`; returns its size on disk."""
    from pipeline.store import TableStore
    from pipeline.store.commit import RunWriter

    writer = RunWriter(TableStore(str(root)), run, commit_index=0)
    rng = np.random.default_rng(seed)
    per_video = OBJECTS_PER_VIDEO * CLIPS_PER_VIDEO
    videos = max(1, n // per_video)
    when = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)

    def write(table: str, data: pa.Table, part: int) -> None:
        writer.add(table, data)  # validated now, appended (zstd) by the commit below

    vids = [f"video-{v:07d}" for v in range(first_video, first_video + videos)]
    write("videos", pa.Table.from_pylist([
        {"video_id": v, "uri": f"s3://bucket/videos/{v}.mp4", "size_bytes": 1, "etag": v, "duration_s": 300.0,
         "fps": 25.0, "width": 640, "height": 360, "num_frames": 7500, "sampled_ts": [], "sampled_fps": 1.0,
         "clips": CLIPS_PER_VIDEO, "status": "ok", "error": None, "model": "bench", "tracker": "bench", "run_id": run,
         "commit_index": 0,
         "indexed_at": when} for v in vids]), 0)
    objects = pa.table({
        "video_id": np.repeat(vids, OBJECTS_PER_VIDEO), "object_id": np.tile(np.arange(OBJECTS_PER_VIDEO, dtype=np.int32), videos),
        "source": ["auto"] * (videos * OBJECTS_PER_VIDEO),
        "label": [WORDS["who"][i % len(WORDS["who"])].split()[-1] for i in range(videos * OBJECTS_PER_VIDEO)],
        "first_ts": np.zeros(videos * OBJECTS_PER_VIDEO), "last_ts": np.full(videos * OBJECTS_PER_VIDEO, 300.0),
        "num_frames": np.full(videos * OBJECTS_PER_VIDEO, 300, np.int32), "run_id": [run] * (videos * OBJECTS_PER_VIDEO),
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
                                    "num_tokens": np.full(count, 8, np.int32), "run_id": [run] * count}), part)
        embedded = _vectors(texts, vectors, rng)
        offsets = pa.array(np.arange(0, count * DIM + 1, DIM, dtype=np.int32))
        write("embeddings", pa.table({
            **common, "kind": ["caption"] * count, "object_ids": pa.nulls(count, pa.list_(pa.int32())), "text": texts,
            "embedder": ["wordllama-l2_supercat_256"] * count, "dim": np.full(count, DIM, np.int32),
            "vector": pa.ListArray.from_arrays(offsets, pa.array(embedded.reshape(-1))),
            "text_run_id": [run] * count, "run_id": [run] * count,
        }), part)
    write("runs", pa.Table.from_pylist([{
        "run_id": run, "commit_index": 0, "command": "index", "source": "s3://bucket/videos", "model": "bench",
        "tracker": "bench", "mode": "lite", "started_at": when, "ended_at": when, "status": "committed",
        "videos_listed": videos, "videos_skipped": 0, "videos_ok": videos, "videos_failed": 0, "videos_quarantined": 0,
        "clips": videos * CLIPS_PER_VIDEO, "video_seconds": videos * 300.0, "objects": videos * OBJECTS_PER_VIDEO,
        "captions": total, "answers": 0, "retry_video_ids": [], "embeddings_version": None}]), 0)
    writer.commit(when)
    size = sum(f.stat().st_size for f in root.rglob("*.parquet"))
    embeddings = sum(f.stat().st_size for f in (root / "embeddings").rglob("*.parquet"))
    return {"videos": videos, "captions": total, "index_mb": round(size / 2**20, 1),
            "embeddings_mb": round(embeddings / 2**20, 1)}


def _exact_best(root: Path, queries: list[np.ndarray]) -> list[dict[tuple[str, int], float]]:
    """Every object's exact best cosine to each query (its best passage), in numpy over all vectors."""
    from pipeline.store import TableStore

    table = TableStore(str(root)).read("embeddings", columns=["video_id", "object_id", "vector"])
    vectors = pc_flat(table.column("vector")).reshape(table.num_rows, DIM)
    videos, objects = table.column("video_id").to_pylist(), table.column("object_id").to_pylist()
    out = []
    for q in queries:
        best: dict[tuple[str, int], float] = {}
        sims = vectors @ q
        for i in np.argsort(-sims, kind="stable")[:5000]:
            best.setdefault((videos[i], objects[i]), float(sims[i]))
        out.append(best)
    return out


def pc_flat(column: pa.ChunkedArray) -> np.ndarray:
    import pyarrow.compute as pc

    return pc.list_flatten(column.combine_chunks()).to_numpy(zero_copy_only=False).astype(np.float32)


def grow(root: Path, total: int, step: int, vectors: str) -> dict[str, Any]:
    """The index of `total` passages written `step` at a time, each a run of its own, with the
    search index synced after each as an index run does: the time of every sync, and where the
    IVF lists were trained (`pipeline.search.index._maintain`)."""
    from pipeline.search.index import read_state, sync

    syncs, layout = [], {}
    for i, start in enumerate(range(0, total, step)):
        layout = write_index(root, min(step, total - start), seed=100 + i, vectors=vectors, run=f"run-grow-{i:04d}",
                             first_video=start // (OBJECTS_PER_VIDEO * CLIPS_PER_VIDEO))
        before = (read_state(str(root)) or {}).get("ann_rows")
        started = time.perf_counter()
        result = sync(str(root))
        after = (read_state(str(root)) or {}).get("ann_rows")
        syncs.append({"rows": result.rows, "sync_s": round(time.perf_counter() - started, 2),
                      "trained": after is not None and after != before})
        print(f"  commit {i}: {result.rows} passages, synced in {syncs[-1]['sync_s']} s"
              f"{' (IVF lists trained)' if syncs[-1]['trained'] else ''}", file=sys.stderr)
    size = sum(f.stat().st_size for f in root.rglob("*.parquet"))
    layout.update(captions=total, index_mb=round(size / 2**20, 1))
    return {"layout": layout, "grow_step": step, "grow_syncs": syncs}


def measure(root: Path, repeats: int, vectors: str) -> dict[str, Any]:
    from jobs.query_like import open_search, like_params, like_sql, query_vector, search_like
    from jobs.query_search import TERMS_SQL
    from jobs.query_sql import open_index
    from models.embedders import load_embedder
    from pipeline.search.index import sync
    from pipeline.search.reader import NPROBES

    started = time.perf_counter()
    built = sync(str(root))
    sync_s = time.perf_counter() - started
    figures: dict[str, Any] = {"sync_s": round(sync_s, 2), "sync_steps": {k: round(v, 2) for k, v in built.steps.items()},
                               "ann": built.ann, "search_rows": built.rows}
    write_index(root, COMMIT_ROWS, seed=1, vectors=vectors, run="run-bench-commit", first_video=10**6)
    started = time.perf_counter()
    sync(str(root))
    figures["sync_commit_s"] = round(time.perf_counter() - started, 2)
    with open_index(str(root)) as index:
        assert open_search(index) is not None, "the search index should be up to date"
        started = time.perf_counter()
        vector, name, dim = query_vector(index, QUERY, None)
        figures["first_query_vector_s"] = round(time.perf_counter() - started, 3)
        terms = index.sql(TERMS_SQL, {"text": QUERY}).column("terms")[0].as_py()
        sql, params = like_sql(dim, bm25=True, video=False, label=False), like_params(vector, name, terms, 10)
        dense_sql, dense_params = like_sql(dim, bm25=False, video=False, label=False), like_params(vector, name, [], 10)
        figures.update({
            "like_s": median_s(lambda: search_like(index, QUERY, 10), repeats),
            "like_label_s": median_s(lambda: search_like(index, QUERY, 10, label=LABEL), repeats),
            "like_video_s": median_s(lambda: search_like(index, QUERY, 10, video="video-0000042"), repeats),
            "like_exact_s": median_s(lambda: search_like(index, QUERY, 10, exact=True), max(1, repeats // 2)),
            "exact_sql_s": median_s(lambda: index.sql(sql, params), max(1, repeats // 2)),
            "dense_sql_s": median_s(lambda: index.sql(dense_sql, dense_params), max(1, repeats // 2)),
            "bm25_s": median_s(lambda: index.search(QUERY, 10), max(1, repeats // 2)),
        })
        fast = search_like(index, QUERY, 10).to_pylist()
        exact = search_like(index, QUERY, 10, exact=True).to_pylist()
        key = lambda r: (r["video_id"], r["object_id"])  # noqa: E731
        figures["top10_agreement"] = len({key(r) for r in fast} & {key(r) for r in exact}) / max(1, len(exact))
        figures["top_text"] = fast[0]["text"] if fast else None
        search = open_search(index)
        embedder = load_embedder("wordllama")
        qvs = [np.asarray(v, np.float32) for v in embedder.embed(list(QUERIES))]
        truth = _exact_best(root, qvs)
        sweep = {}
        for nprobes in NPROBES_SWEEP:
            recalls, times = [], []
            for q, best in zip(qvs, truth):
                tenth = sorted(best.values(), reverse=True)[9]
                started = time.perf_counter()
                rows = search.nearest(q, 1000, nprobes=nprobes).to_pylist()
                times.append(time.perf_counter() - started)
                got: list[tuple[str, int]] = []
                for row in rows:
                    for obj in row["object_ids"]:
                        if (row["video_id"], obj) not in got:
                            got.append((row["video_id"], obj))
                # tie-aware: an object counts when its exact best cosine reaches the exact 10th best
                recalls.append(sum(best.get(o, -1.0) >= tenth - 1e-5 for o in got[:10]) / 10)
            sweep[nprobes] = {"recall_at_10": round(float(np.mean(recalls)), 3),
                              "nearest_s": round(statistics.median(times), 4)}
        figures["nprobes_sweep"] = sweep
        figures["dense_recall_at_10"] = sweep[NPROBES]["recall_at_10"]
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.search", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="embeddings stored")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure (the median is reported)")
    parser.add_argument("--vectors", choices=("wordllama", "random"), default="wordllama",
                        help="the stored vectors: WordLlama's, of the synthetic captions (default), or random")
    parser.add_argument("--grow-step", type=int, default=None, metavar="N",
                        help="build each index commit by commit, N passages a commit, syncing the search index "
                             "after each as an index run does (default: one write, one sync)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the indexes (default: a temp folder)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    out: dict[str, Any] = {"bench": "search", "query": QUERY, "dim": DIM, "repeats": args.repeats,
                           "vectors": args.vectors}
    with tempfile.TemporaryDirectory(prefix="bench-search-", dir=args.dir) as tmp:
        for n in args.sizes:
            root = Path(tmp) / f"index-{n}"
            started = time.perf_counter()
            grown = grow(root, n, args.grow_step, args.vectors) if args.grow_step else None
            layout = grown.pop("layout") if grown else write_index(root, n, vectors=args.vectors)
            print(f"{n:>9} embeddings: wrote {layout['index_mb']} MB in {time.perf_counter() - started:.1f} s",
                  file=sys.stderr)
            figures = measure(root, args.repeats, args.vectors)
            if grown:
                figures.update(grown)
            out[f"n{n}"] = {**layout, **figures}
            print(f"{n:>9} embeddings: search index built in {figures['sync_s']:.1f} s, a commit synced in "
                  f"{figures['sync_commit_s']:.1f} s; --like {figures['like_s']:.3f} s (--exact "
                  f"{figures['like_exact_s']:.3f} s, --text {figures['bm25_s']:.3f} s); dense recall@10 "
                  f"{figures['dense_recall_at_10']:.3f}, top-10 agreement {figures['top10_agreement']:.2f}",
                  file=sys.stderr)
    out.update(describe("duckdb", "pylance", "wordllama"))
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
