"""What re-identification costs, and how well its threshold separates objects with real weights.

    python -m bench.reid cost [--model tiny] [--clips 16] [--objects 4] [--frames 8]
    python -m bench.reid similar [--tracklets 200000] [--dim 1152] [--queries 5]
    python -m bench.reid pairs OUTPUT LABELS.csv

`cost`: the three places re-identification adds work, each measured alone on this machine.
  * referrer: the appearance phase (`phase_s_referrer_appearance`: a masked mean of tower features
    the region tokens are pooled from anyway) over `clips` synthetic clips of `objects` objects
    with `frames` masked frames each, against the stage's whole time on the same batch: seconds
    per object-clip and its share of the referrer;
  * driver: `assemble` of a synthetic one-hour video (1 frame/s, 30-s clips, 8 objects that leave
    and come back every clip) with re-identification against without: seconds per video-hour;
  * storage: bytes of the `tracklets` vectors per million objects, for the model's tower width
    (Parquet, as written) and as float32 in memory, plus an exact `--similar-to` over them (DuckDB).
`similar`: `--similar-to` through the search folder's appearance dataset (`pipeline.search.appearance`)
  at a larger size: `tracklets` random unit vectors (8 objects a video, 2 tracklets an object)
  written in the dataset's layout and indexed as a sync does (IVF_PQ from `ANN_MIN_ROWS` rows);
  times the training, `AppearanceIndex.nearest_objects` (the part that replaces the exact
  statement; the CLI adds the asked object's lookup in DuckDB) and the exact DuckDB statement over
  the same vectors in Parquet, with the share of the exact top 10 objects the index returns
  (random vectors are the worst case for IVF_PQ).
`pairs`: for an index of a labelled clip set made with real weights (any `--reid`), LABELS.csv
  names the identity of tracklets (`video_id,clip_index,track_id,identity`); prints the cosine of
  same-identity and different-identity tracklet pairs (percentiles) and, for candidate thresholds,
  the share of same-identity pairs merged and of different-identity pairs wrongly merged. Use it to
  re-check `pipeline.reid.DEFAULT_THRESHOLD` whenever the referrer's weights change.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np

CANDIDATE_THRESHOLDS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    enc = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in enc["size"]], "counts": enc["counts"].decode("ascii")}


def referrer_cost(model: str, clips: int, objects: int, frames: int) -> dict[str, Any]:
    """Seconds of the appearance phase per object-clip, and its share of the referrer's time."""
    from actors.columns import rows_to_batch
    from actors.referrer import ReferrerStage

    stage = ReferrerStage(model, max_new_tokens=8, object_frames=frames)
    rng = np.random.default_rng(0)
    h, w = 240, 320
    rows = []
    for c in range(clips):
        pixels = rng.integers(0, 256, (frames, h, w, 3), dtype=np.uint8)
        tracks = []
        for k in range(objects):
            track = []
            for f in range(frames):
                mask = np.zeros((h, w), dtype=bool)
                y, x = 20 + 45 * (k % 4), 10 + 6 * f + 70 * (k // 4)
                mask[y:y + 40, x:x + 50] = True
                track.append({"frame_index": f, "ts": float(f), "rle": _rle(mask)})
            tracks.append({"object_id": k, "source": "auto", "frames": track})
        rows.append({"video_id": f"v{c}", "frames": pixels, "timestamps": np.arange(frames, dtype=float),
                     "tracks_json": json.dumps(tracks), "questions_json": "[]", "error": ""})
    stage(rows_to_batch(rows[:1]))  # warm up
    started = time.perf_counter()
    out = stage(rows_to_batch(rows))
    total = time.perf_counter() - started
    appearance = float(np.sum(out["phase_s_referrer_appearance"]))
    n = clips * objects
    return {"model": model, "object_clips": n, "frames_per_object": frames,
            "appearance_s_per_object_clip": appearance / n, "referrer_s_per_object_clip": total / n,
            "appearance_share_of_referrer": appearance / total if total else None,
            "dim": int(stage.referrer.config.vision.hidden_size)}


def _synthetic_video(dim: int, hours: float = 1.0, objects: int = 8, clip_s: int = 30):
    """A VideoAssembly of `hours` at 1 frame/s, every object seen in the first half of every clip
    and rediscovered in the next (new local ids at every cut: the case re-identification is for)."""
    from actors.columns import times_to_column
    from actors.referrer import encode_vector
    from pipeline.assemble import VideoAssembly

    rng = np.random.default_rng(1)
    looks = rng.normal(size=(objects, dim)).astype(np.float32)
    seconds = int(hours * 3600)
    clips = seconds // clip_s
    meta = {"duration_s": float(seconds), "fps": 25.0, "width": 320, "height": 240, "num_frames": seconds * 25,
            "sampled_fps": 1.0, "thinned": False, "num_clips": clips, "prompted": False}
    video = VideoAssembly(video_id="v", uri="/v.mp4", run_id="r", size_bytes=1, etag=None, meta=meta)
    masks = {k: _rle(_box(k)) for k in range(objects)}
    for c in range(clips):
        times = [float(c * clip_s + i) for i in range(clip_s)]
        tracks = [{"object_id": k, "source": "auto", "frames": [
            {"frame_index": i, "ts": times[i], "rle": masks[k], "bbox": [0, 0, 1, 1], "area": 1, "score": 1.0}
            for i in range(clip_s // 2)]} for k in range(objects)]
        vectors = [{"object_id": k, "dim": dim,
                    "vector": encode_vector(looks[k] + 0.1 * rng.normal(size=dim).astype(np.float32))}
                   for k in range(objects)]
        video.add({
            "clip_index": c, "num_owned": clip_s, "timestamps": times_to_column(times), "error": "", "note": "",
            "clip_json": json.dumps({"ts_start": times[0], "ts_end": times[-1] + 1, "boundary": "shot",
                                     "shared": False}),
            "tracks_json": json.dumps(tracks), "qa_json": "[]", "appearance_json": json.dumps(vectors),
            "captions_json": json.dumps([{"object_id": k, "caption": "x", "ts_start": times[0], "ts_end": times[-1],
                                          "num_tokens": 1} for k in range(objects)]),
        })
    return video


def _box(k: int) -> np.ndarray:
    mask = np.zeros((240, 320), dtype=bool)
    mask[10 + 25 * k: 30 + 25 * k, 10:60] = True
    return mask


def driver_cost(dim: int) -> dict[str, Any]:
    """`assemble` of one synthetic video-hour with and without re-identification."""
    from pipeline.assemble import assemble

    video = _synthetic_video(dim)
    out = {}
    for reid in (False, True):
        started = time.perf_counter()
        done = assemble(video, mode="lite", model="m", tracker="t", indexed_at=dt.datetime.now(dt.timezone.utc),
                        track_frames=8, reid=reid)
        out[f"assemble_s_reid_{'on' if reid else 'off'}"] = time.perf_counter() - started
        out[f"objects_reid_{'on' if reid else 'off'}"] = len(done.tables["objects"])
    out["added_driver_s_per_video_hour"] = out["assemble_s_reid_on"] - out["assemble_s_reid_off"]
    out["tracklets_per_video_hour"] = len(done.tables["tracklets"])
    return out


def storage_cost(dim: int, tracklets_per_object: float = 1.0, sample_objects: int = 20_000) -> dict[str, Any]:
    """Bytes of vectors per million objects (Parquet as written, float32 in memory), and one exact
    `--similar-to`-style ranking over `sample_objects` of them in DuckDB."""
    import duckdb
    import pyarrow as pa
    import pyarrow.parquet as pq

    from schemas.tables import to_table

    rng = np.random.default_rng(2)
    n = int(sample_objects * tracklets_per_object)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    table = to_table("tracklets", pa.table({
        "video_id": pa.array([f"v{i // 8}" for i in range(n)]), "clip_index": pa.array(np.zeros(n, np.int32)),
        "track_id": pa.array(np.arange(n, dtype=np.int32) % 8), "object_id": pa.array(np.arange(n, dtype=np.int32) % 8),
        "reid_score": pa.nulls(n, pa.float32()), "first_ts": pa.array(np.zeros(n)), "last_ts": pa.array(np.ones(n)),
        "num_frames": pa.array(np.full(n, 15, np.int32)), "model": pa.array(["m"] * n),
        "dim": pa.array(np.full(n, dim, np.int32)),
        "vector": pa.array(list(vectors), type=pa.list_(pa.float32())), "run_id": pa.array(["r"] * n),
    }))
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "t.parquet")
        pq.write_table(table, path)
        size = os.path.getsize(path)
        con = duckdb.connect()
        query = vectors[0].tolist()
        started = time.perf_counter()
        con.execute(f"SELECT video_id, object_id, max(array_cosine_similarity(CAST(vector AS FLOAT[{dim}]), "
                    f"CAST($q AS FLOAT[{dim}]))) AS s FROM read_parquet('{path}') GROUP BY ALL "
                    "ORDER BY s DESC LIMIT 10",
                    {"q": query}).fetchall()
        ranked_s = time.perf_counter() - started
    per_million = 1_000_000 / sample_objects
    return {"dim": dim, "tracklets_per_object": tracklets_per_object,
            "parquet_bytes_per_million_objects": int(size * per_million),
            "float32_bytes_per_million_objects": int(1_000_000 * tracklets_per_object * dim * 4),
            "exact_similar_to_s": ranked_s, "exact_similar_to_objects": sample_objects,
            "exact_similar_to_s_per_million_objects": ranked_s * per_million}


def pairs(output: str, labels_csv: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Same- and different-identity cosines of the labelled tracklets of an index."""
    from pipeline.store.commit import read_visible

    with open(labels_csv, newline="") as f:
        labels = {(r["video_id"], int(r["clip_index"]), int(r["track_id"])): r["identity"] for r in csv.DictReader(f)}
    rows = read_visible(output, "tracklets", storage_options).to_pylist()
    picked = [(labels[(r["video_id"], r["clip_index"], r["track_id"])], r) for r in rows
              if r["vector"] is not None and (r["video_id"], r["clip_index"], r["track_id"]) in labels]
    if len(picked) < 2:
        raise SystemExit(f"{labels_csv}: fewer than two of its tracklets have vectors in {output}")
    vectors = np.stack([np.asarray(r["vector"], np.float32) for _, r in picked])
    ids = [who for who, _ in picked]
    tracks = [(r["video_id"], r["track_id"]) for _, r in picked]
    cos = vectors @ vectors.T
    same, diff = [], []
    for i in range(len(picked)):
        for j in range(i + 1, len(picked)):
            if tracks[i] == tracks[j]:
                continue  # one track's clips: linking joined them already
            (same if ids[i] == ids[j] else diff).append(float(cos[i, j]))
    pct = (1, 5, 25, 50, 75, 95, 99)

    def spread(values: list[float]) -> dict[str, float] | None:
        return {f"p{p}": float(np.percentile(values, p)) for p in pct} if values else None

    table = [{"threshold": t, "same_merged": float(np.mean(np.array(same) >= t)) if same else None,
              "different_merged": float(np.mean(np.array(diff) >= t)) if diff else None} for t in CANDIDATE_THRESHOLDS]
    return {"tracklets": len(picked), "identities": len(set(ids)), "same_pairs": len(same),
            "different_pairs": len(diff),
            "same_cosine": spread(same), "different_cosine": spread(diff), "thresholds": table}


#: The narrower re-ranking the `similar` bench also measures (`--like`'s; the appearance index's own
#: is `pipeline.search.appearance.REFINE`).
NARROW_REFINE = 4


def _objects(found: Any) -> set[tuple[str, int]]:
    return set(zip(found.column("video_id").to_pylist(), found.column("object_id").to_pylist()))


def similar_cost(tracklets: int, dim: int, queries: int = 5) -> dict[str, Any]:
    """`--similar-to` through the appearance dataset against exact DuckDB at `tracklets` (see `similar`)."""
    import duckdb
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.search.appearance import SCALAR, AppearanceIndex
    from pipeline.search.index import _lance, _maintain

    rng = np.random.default_rng(5)
    n = int(tracklets)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(n)
    table = pa.table({
        "video_id": pa.array([f"v{i // 16:07d}" for i in ids]), "run_id": pa.array(["r"] * n),
        "commit": pa.array(["r/0"] * n), "object_id": pa.array((ids // 2 % 8).astype(np.int32)),
        "clip_index": pa.array((ids % 2).astype(np.int32)), "track_id": pa.array((ids // 2 % 8).astype(np.int32)),
        "model": pa.array(["m"] * n), "dim": pa.array(np.full(n, dim, np.int32)), "label": pa.array(["person"] * n),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)})
    result: dict[str, Any] = {"tracklets": n, "dim": dim, "objects": n // 2}
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        dataset = _lance().write_dataset(table, os.path.join(folder, "appearance.lance"))
        result["write_s"] = time.perf_counter() - started
        started = time.perf_counter()
        result["ann"] = _maintain(dataset, n, dim, None, None, scalar=SCALAR, text=False) is not None
        result["index_s"] = time.perf_counter() - started
        looks = AppearanceIndex(_lance().dataset(os.path.join(folder, "appearance.lance")), {"dim": dim})
        path = os.path.join(folder, "t.parquet")
        pq.write_table(table.drop_columns(["vector"]).append_column(
            "vector", pa.array(list(vectors), type=pa.list_(pa.float32()))), path)
        con = duckdb.connect()
        index_s, exact_s, recall, narrow_s, narrow_recall = [], [], [], [], []
        for q in range(queries):
            query = vectors[q * 9973 % n]
            started = time.perf_counter()
            found = looks.nearest_objects(query, "m", 10, exclude=("v-none", -1))
            index_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            exact = con.execute(
                f"SELECT video_id, object_id, max(array_cosine_similarity(CAST(vector AS FLOAT[{dim}]), "
                f"CAST($q AS FLOAT[{dim}]))) AS s FROM read_parquet('{path}') GROUP BY ALL ORDER BY s DESC LIMIT 10",
                {"q": query.tolist()}).fetchall()
            exact_s.append(time.perf_counter() - started)
            truth = {(v, o) for v, o, _ in exact}
            recall.append(len(_objects(found) & truth) / 10)
            started = time.perf_counter()
            narrow = looks.nearest_objects(query, "m", 10, exclude=("v-none", -1), refine_factor=NARROW_REFINE)
            narrow_s.append(time.perf_counter() - started)
            narrow_recall.append(len(_objects(narrow) & truth) / 10)
    result.update({"similar_to_index_s": float(np.median(index_s)), "similar_to_exact_s": float(np.median(exact_s)),
                   "recall_at_10": float(np.mean(recall)), "queries": queries,
                   f"similar_to_index_s_refine_{NARROW_REFINE}": float(np.median(narrow_s)),
                   f"recall_at_10_refine_{NARROW_REFINE}": float(np.mean(narrow_recall))})
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reid", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    cost = sub.add_parser("cost")
    cost.add_argument("--model", default="tiny")
    cost.add_argument("--clips", type=int, default=16)
    cost.add_argument("--objects", type=int, default=4)
    cost.add_argument("--frames", type=int, default=8)
    cost.add_argument("--dim", type=int, default=1152,
                      help="tower width for the storage numbers (1152: PixelRefer's VL3-SigLIP-NaViT)")
    cost.add_argument("--similar-objects", type=int, default=20_000)
    similar = sub.add_parser("similar")
    similar.add_argument("--tracklets", type=int, default=200_000)
    similar.add_argument("--dim", type=int, default=1152)
    similar.add_argument("--queries", type=int, default=5)
    labelled = sub.add_parser("pairs")
    labelled.add_argument("output")
    labelled.add_argument("labels")
    args = parser.parse_args(argv)
    if args.mode == "pairs":
        result = pairs(args.output, args.labels)
    elif args.mode == "similar":
        result = similar_cost(args.tracklets, args.dim, args.queries)
    else:
        result = {"referrer": referrer_cost(args.model, args.clips, args.objects, args.frames),
                  "driver": driver_cost(args.dim),
                  "storage": storage_cost(args.dim, sample_objects=args.similar_objects)}
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
