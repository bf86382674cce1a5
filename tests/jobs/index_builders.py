"""The committed test indexes of `tests/jobs`: their rows, and writers that lay them out as the index job does.

Layout: the Delta tables of `pipeline.store` (one append per run, table and commit), plus the
leftovers of a killed commit (tables appended, no `runs` row) that no query may ever see. Source videos are real H.264 files from
pipeline.samples with known masks, and the `masks` rows are built from those ground-truth masks
(COCO RLE), so a report's overlays can be checked pixel by pixel.

The index holds:
- video "a" indexed by three runs: RUN1 (ok, model tiny), RUN2 (ok, newer, model tiny-b, committed
  in two commits) and RUN3 (newest, failed). The default view of "a" must be RUN2.
- video "b" indexed once (RUN1, ok); video "c" failed in RUN1 (its file never existed).
Each 2 s video is sampled every second frame (0.0, 0.2, ..., 1.8) and split into two 1 s clips.
Objects 1 and 2 are seen in both clips (a caption per clip plus a whole-track caption); object 3
of "a" enters at 1.0 s, in clip 1 only. Object 2 of "b" has no mask at 1.2 s (a tracker miss), so
its presence breaks there. RUN1's id is all digits, which is what makes DuckDB guess a numeric hive
partition type.

Two more shapes are built here: `write_pre_delta_index` writes the same index in the layout
before Delta tables (`run_id=` folders, no log; what `pixelrefer migrate` converts), and
`long_index` is a 2-hour video sampled at 1 fps (7,200 frames, 240 clips, 8 objects).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pycocotools import mask as mask_utils

from pipeline.samples import GroundTruth, Shape
from pipeline.store import TableStore
from pipeline.store.commit import PUBLISH_ORDER
from schemas.tables import to_table

RUN1, RUN2, RUN3 = "1700000000", "run-2024-02", "run-2024-03"
STAGED_RUN = "run-2024-04"
BUCKET = "pixelrefer-test"
CLIP_SECONDS = 1.0
MISSED = {"b": (2, 1.2)}  # video -> (object_id, ts): the tracker lost the object on that frame

SHAPES_B = (
    Shape(color=(30, 200, 60), size=(24, 40), start_xy=(100, 80), velocity=(-25, 0)),
    Shape(color=(200, 40, 200), size=(26, 26), start_xy=(20, 20), velocity=(10, 10), kind="ellipse"),
)
LABELS = {1: "truck", 2: "ball", 3: "box"}

# (run, video) -> {(object_id, clip_index or None for the whole track): caption}
CAPTIONS = {
    (RUN1, "a"): {
        (1, 0): "a red truck driving to the right",
        (1, 1): "the truck keeps going",
        (1, None): "a red vehicle crossing the scene",
        (2, 0): "a blue ball rolling to the left",
        (2, 1): "the blue ball slows down",
        (2, None): "a blue ball rolling across",
        (3, 1): "a small yellow box that appears after one second",
    },
    (RUN2, "a"): {
        (1, 0): "a red truck with a red cabin moving right",
        (1, 1): "the truck reaches the middle of the road",
        (1, None): "a red truck that drives from the left edge to the middle",
        (2, 0): "a blue sphere moving left",
        (2, 1): "a blue sphere drifting up",
        (2, None): "a blue sphere that moves left and up",
        (3, 1): "a yellow square falling slowly",
    },
    (RUN1, "b"): {
        (1, 0): "a green car parked by the road",
        (1, 1): "the green car rolls backwards",
        (1, None): "a green car by the road",
        (2, 0): "a purple ball bouncing",
        (2, 1): "a purple ball flying off",
        (2, None): "a purple disc bouncing away",
    },
}
# (run, video) -> [(object_ids, question, answer, clip_index or None for the whole video)]
QA = {
    (RUN1, "a"): [([1], "What vehicle is this?", "a red truck", 0), ([2, 3], "Do they touch?", "no", 1)],
    (RUN2, "a"): [
        ([1], "What color is the truck?", "red", 0),
        ([1, 2], "Which one is faster?", "the red truck is faster than the blue ball", 1),
    ],
    (RUN1, "b"): [([1], "What is it?", "a green car", 0), ([], "Is it daytime?", "yes", None)],
}


@dataclasses.dataclass
class IndexInfo:
    """What a test needs to know about an index it did not build itself."""

    output: str
    storage_options: dict[str, Any] | None
    uris: dict[str, str]
    video_ids: dict[str, str]
    truths: dict[str, GroundTruth]
    fs: Any
    root: str  # path inside fs

    def cli(self) -> list[str]:
        """OUTPUT plus --storage-options, ready for argv."""
        import json

        args = [self.output]
        if self.storage_options:
            args += ["--storage-options", json.dumps(self.storage_options)]
        return args


def video_id_for(uri: str) -> str:
    return hashlib.sha1(uri.encode()).hexdigest()[:16]


def rle_of(mask: np.ndarray) -> dict[str, Any]:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def bbox_of(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def sampled_times(truth: GroundTruth) -> list[float]:
    """Every second decoded frame, like an index run at half the frame rate."""
    return truth.timestamps[::2]


def duration_of(truth: GroundTruth) -> float:
    return round(truth.timestamps[-1] + 0.1, 6)


def clip_of(t: float, truth: GroundTruth) -> int:
    return min(int(t // CLIP_SECONDS), clip_count(truth) - 1)


def clip_count(truth: GroundTruth) -> int:
    return max(1, int(np.ceil(duration_of(truth) / CLIP_SECONDS - 1e-9)))


def seen_times(truth: GroundTruth, name: str, object_id: int) -> list[float]:
    """Sampled times where the object has a mask (the ground truth minus the scripted miss)."""
    return [t for t in sampled_times(truth)
            if truth.mask(object_id - 1, t) is not None and MISSED.get(name) != (object_id, t)]  # fmt: skip


def clip_rows(truth: GroundTruth, video_id: str, run_id: str) -> list[dict[str, Any]]:
    n = clip_count(truth)
    sampled = sampled_times(truth)
    return [
        {"video_id": video_id, "clip_index": i, "ts_start": i * CLIP_SECONDS,
         "ts_end": duration_of(truth) if i == n - 1 else (i + 1) * CLIP_SECONDS,
         "boundary": "end" if i == n - 1 else "window",
         "num_sampled": sum(1 for t in sampled if clip_of(t, truth) == i), "status": "ok", "error": None,
         "run_id": run_id}
        for i in range(n)
    ]  # fmt: skip


def object_and_mask_rows(truth: GroundTruth, name: str, video_id: str, run_id: str) -> tuple[list, list]:
    """One `objects` row per shape (object_id = shape index + 1) and one `masks` row per frame it is seen."""
    objects, masks = [], []
    sampled = sampled_times(truth)
    for object_id in range(1, len(truth.shapes) + 1):
        seen = seen_times(truth, name, object_id)
        for t in seen:
            mask = truth.mask(object_id - 1, t)
            masks.append(
                {"video_id": video_id, "object_id": object_id, "clip_index": clip_of(t, truth),
                 "frame_index": sampled.index(t), "ts": t, "bbox": bbox_of(mask), "area": int(mask.sum()),
                 "score": 0.9, "rle": rle_of(mask), "run_id": run_id}
            )  # fmt: skip
        objects.append(
            {"video_id": video_id, "object_id": object_id, "source": "auto", "label": LABELS.get(object_id),
             "first_ts": seen[0], "last_ts": seen[-1], "num_frames": len(seen), "run_id": run_id}
        )  # fmt: skip
    return objects, masks


def video_row(name: str, uri: str, run_id: str, truth: GroundTruth | None, when: dt.datetime, model: str,
              status: str = "ok", error: str | None = None) -> dict[str, Any]:  # fmt: skip
    return {
        "video_id": video_id_for(uri), "uri": uri, "size_bytes": 1000, "etag": f"etag-{name}",
        "duration_s": duration_of(truth) if truth else None, "fps": 10.0 if truth else None,
        "width": truth.width if truth else None, "height": truth.height if truth else None,
        "num_frames": len(truth.timestamps) if truth else None,
        "sampled_ts": sampled_times(truth) if truth else [], "sampled_fps": 5.0 if truth else None,
        "clips": clip_count(truth) if truth and status == "ok" else 0, "status": status, "error": error,
        "model": model, "tracker": "tiny", "run_id": run_id, "indexed_at": when,
    }  # fmt: skip


def caption_rows(run_id: str, name: str, video_id: str, truth: GroundTruth, model: str) -> list[dict[str, Any]]:
    rows = []
    for (object_id, clip), text in CAPTIONS.get((run_id, name), {}).items():
        seen = [t for t in seen_times(truth, name, object_id) if clip is None or clip_of(t, truth) == clip]
        rows.append(
            {"video_id": video_id, "object_id": object_id, "clip_index": clip, "ts_start": seen[0],
             "ts_end": seen[-1], "caption": text, "mode": "lite", "model": model, "num_tokens": len(text.split()),
             "run_id": run_id}
        )  # fmt: skip
    return rows


def qa_rows(run_id: str, name: str, video_id: str, truth: GroundTruth, model: str) -> list[dict[str, Any]]:
    spans = {c["clip_index"]: (c["ts_start"], c["ts_end"]) for c in clip_rows(truth, video_id, run_id)}
    return [
        {"video_id": video_id, "object_ids": ids, "clip_index": clip,
         "ts_start": spans[clip][0] if clip is not None else 0.0,
         "ts_end": spans[clip][1] if clip is not None else duration_of(truth), "question": q, "answer": a,
         "mode": "lite", "model": model, "run_id": run_id}
        for ids, q, a, clip in QA.get((run_id, name), [])
    ]  # fmt: skip


def run_rows(run_id: str, commits: int, when: dt.datetime, tables: dict[str, list]) -> list[dict[str, Any]]:
    """One `runs` row per commit; the counts go to the last commit (what matters is one row each)."""
    ok = [v for v in tables["videos"] if v["status"] == "ok"]
    rows = []
    for c in range(commits):
        last = c == commits - 1
        rows.append(
            {"run_id": run_id, "commit_index": c, "command": "index", "source": "/videos", "model": "tiny",
             "tracker": "tiny", "mode": "lite", "started_at": when, "ended_at": when + dt.timedelta(minutes=c + 1),
             "status": "committed", "videos_listed": len(tables["videos"]), "videos_skipped": 0,
             "videos_ok": len(ok) if last else 0, "videos_failed": (len(tables["videos"]) - len(ok)) if last else 0,
             "videos_quarantined": 0, "clips": len(tables["clips"]) if last else 0,
             "video_seconds": sum(v["duration_s"] for v in ok) if last else 0.0,
             "objects": len(tables["objects"]) if last else 0, "captions": len(tables["captions"]) if last else 0,
             "answers": len(tables["qa"]) if last else 0, "retry_video_ids": []}
        )  # fmt: skip
    return rows


def empty_run() -> dict[str, list[dict[str, Any]]]:
    """Every table, empty (`tracklets` stays so: the shared index reads like one made before them)."""
    return {name: [] for name in PUBLISH_ORDER}


def index_tables(uris: dict[str, str], truths: dict[str, GroundTruth]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """{run_id: {table: rows}} for the whole index described in the module docstring."""
    t0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    runs = {r: empty_run() for r in (RUN1, RUN2, RUN3)}
    plan = [(RUN1, "a", "tiny", t0), (RUN1, "b", "tiny", t0), (RUN2, "a", "tiny-b", t0 + dt.timedelta(days=31))]
    for run_id, name, model, when in plan:
        vid = video_id_for(uris[name])
        tables = runs[run_id]
        tables["videos"].append(video_row(name, uris[name], run_id, truths[name], when, model))
        tables["clips"] += clip_rows(truths[name], vid, run_id)
        objects, masks = object_and_mask_rows(truths[name], name, vid, run_id)
        tables["objects"] += objects
        tables["masks"] += masks
        tables["captions"] += caption_rows(run_id, name, vid, truths[name], model)
        tables["qa"] += qa_rows(run_id, name, vid, truths[name], model)
    runs[RUN1]["videos"].append(
        video_row("c", uris["c"], RUN1, None, t0, "tiny", status="failed", error="moov atom not found")
    )
    runs[RUN3]["videos"].append(
        video_row("a", uris["a"], RUN3, truths["a"], t0 + dt.timedelta(days=60), "tiny-c", "failed", "out of memory")
    )
    for run_id, commits, when in ((RUN1, 1, t0), (RUN2, 2, t0 + dt.timedelta(days=31)),
                                  (RUN3, 1, t0 + dt.timedelta(days=60))):  # fmt: skip
        runs[run_id]["runs"] = run_rows(run_id, commits, when, runs[run_id])
    return runs


def write_index(output: str, runs: dict[str, dict[str, list[dict[str, Any]]]],
                storage_options: dict[str, Any] | None = None, committed: bool = True) -> None:
    """Append each run's tables through `TableStore` in the commit order (children, videos, runs).

    `runs` rows go to the commit of their own index; every other row to commit 0 (videos get
    `commit_index` 0). Rows keep their own `indexed_at`. `committed=False` leaves out the `runs`
    rows: the leftovers of a killed commit."""
    store = TableStore(output, storage_options)
    for run_id, tables in runs.items():
        for name in PUBLISH_ORDER:
            rows = [{**r, "commit_index": r.get("commit_index") or 0} if name == "videos" else r
                    for r in tables.get(name, [])]
            if name == "runs" and not committed:
                continue
            commits: dict[int, list[dict[str, Any]]] = {}
            for row in rows:
                commits.setdefault((row["commit_index"] or 0) if name == "runs" else 0, []).append(row)
            for commit, part in sorted(commits.items()):
                store.append(name, to_table(name, part), commit=f"{run_id}/{commit}")


# --------------------------------------------------------------------------------------------
# The pre-Delta layout (the former pipeline.sink): what `pixelrefer migrate` converts.
# --------------------------------------------------------------------------------------------


def write_pre_delta_index(fs: Any, root: str, runs: dict[str, dict[str, list[dict[str, Any]]]]) -> None:
    """OUTPUT/<table>/run_id=<run>/part-cCCCC-00000.parquet, one file per run commit (`runs` rows by
    their `commit_index`, every other row in commit 0), with the pre-Delta schemas; no `_delta_log`."""
    from pipeline.store.migrate import old_schema

    for run_id, tables in runs.items():
        for name, rows in tables.items():
            commits: dict[int, list[dict[str, Any]]] = {}
            for row in rows:
                commits.setdefault((row.get("commit_index") or 0) if name == "runs" else 0, []).append(row)
            for commit, part in sorted(commits.items()):
                folder = f"{root}/{name}/run_id={run_id}"
                fs.makedirs(folder, exist_ok=True)
                table = pa.Table.from_pylist(part, schema=old_schema(name))
                pq.write_table(table, f"{folder}/part-c{commit:04d}-00000.parquet", filesystem=fs)


def write_staging(output: str, truth: GroundTruth, uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """A killed commit (newer than all): its rows are appended, its `runs` row is not: visible to nobody."""
    when = dt.datetime(2024, 4, 1, tzinfo=dt.timezone.utc)
    vid = video_id_for(uri + "#staged")
    objects, masks = object_and_mask_rows(truth, "a", vid, STAGED_RUN)
    staged = {STAGED_RUN: {
        **empty_run(), "videos": [video_row("staged", uri + "#staged", STAGED_RUN, truth, when, "staged-model")],
        "clips": clip_rows(truth, vid, STAGED_RUN), "objects": objects, "masks": masks,
    }}  # fmt: skip
    write_index(output, staged, storage_options, committed=False)


def build_index(fs: Any, root: str, output: str, uris: dict[str, str], truths: dict[str, GroundTruth],
                storage_options: dict[str, Any] | None = None, pre_delta: bool = False) -> IndexInfo:  # fmt: skip
    if pre_delta:
        write_pre_delta_index(fs, root, index_tables(uris, truths))
    else:
        write_index(output, index_tables(uris, truths), storage_options)
        write_staging(output, truths["a"], uris["a"], storage_options)
    return IndexInfo(
        output=output, storage_options=storage_options, uris=uris,
        video_ids={k: video_id_for(v) for k, v in uris.items()}, truths=truths, fs=fs, root=root,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# A 2-hour video at 1 fps: 7,200 sampled frames, 240 clips of 30 s, 8 objects.
# --------------------------------------------------------------------------------------------

LONG_SECONDS = 7200
LONG_CLIP_SECONDS = 30
LONG_OBJECTS = 8
LONG_FAILED_CLIP = 100  # 3000-3030 s did not decode: no masks there, every object's presence breaks
LONG_FIRST = {k: 600 * (k - 1) + 5 for k in range(1, LONG_OBJECTS + 1)}  # object k enters at this second
LONG_RUN = "run-long"
LONG_ZEBRA = (5, 200)  # (object, clip) whose caption alone mentions a zebra


def long_tables(uri: str, width: int, height: int) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """The rows a run over the 2-hour video writes (masks: one small box per object, reused)."""
    vid = video_id_for(uri)
    when = dt.datetime(2024, 5, 1, tzinfo=dt.timezone.utc)
    n_clips = LONG_SECONDS // LONG_CLIP_SECONDS
    tables = empty_run()
    tables["videos"].append(
        {"video_id": vid, "uri": uri, "size_bytes": 1, "etag": "long", "duration_s": float(LONG_SECONDS), "fps": 1.0,
         "width": width, "height": height, "num_frames": LONG_SECONDS, "sampled_ts": [float(t) for t in range(LONG_SECONDS)],
         "sampled_fps": 1.0, "clips": n_clips, "status": "ok", "error": "1 of 240 clips failed: clip 100",
         "model": "tiny", "tracker": "tiny", "run_id": LONG_RUN, "indexed_at": when}
    )  # fmt: skip
    for c in range(n_clips):
        failed = c == LONG_FAILED_CLIP
        tables["clips"].append(
            {"video_id": vid, "clip_index": c, "ts_start": float(c * LONG_CLIP_SECONDS),
             "ts_end": float((c + 1) * LONG_CLIP_SECONDS), "boundary": "end" if c == n_clips - 1 else
             ("shot" if c % 7 == 3 else "window"), "num_sampled": LONG_CLIP_SECONDS,
             "status": "failed" if failed else "ok", "error": "invalid NAL unit" if failed else None,
             "run_id": LONG_RUN}
        )  # fmt: skip
    for k in range(1, LONG_OBJECTS + 1):
        box = np.zeros((height, width), bool)
        x0 = 2 + 7 * (k - 1)
        box[4 : 4 + 10, x0 : x0 + 6] = True
        rle, bbox = rle_of(box), bbox_of(box)
        seen = [t for t in range(LONG_FIRST[k], LONG_SECONDS) if t // LONG_CLIP_SECONDS != LONG_FAILED_CLIP]
        tables["masks"] += [
            {"video_id": vid, "object_id": k, "clip_index": t // LONG_CLIP_SECONDS, "frame_index": t, "ts": float(t),
             "bbox": bbox, "area": int(box.sum()), "score": 0.8, "rle": rle, "run_id": LONG_RUN}
            for t in seen
        ]  # fmt: skip
        tables["objects"].append(
            {"video_id": vid, "object_id": k, "source": "auto", "label": f"thing{k}", "first_ts": float(seen[0]),
             "last_ts": float(seen[-1]), "num_frames": len(seen), "run_id": LONG_RUN}
        )  # fmt: skip
        clips = sorted({t // LONG_CLIP_SECONDS for t in seen})
        for c in clips:
            in_clip = [t for t in seen if t // LONG_CLIP_SECONDS == c]
            text = "a zebra crossing the street" if (k, c) == LONG_ZEBRA else f"thing {k} standing still"
            tables["captions"].append(
                {"video_id": vid, "object_id": k, "clip_index": c, "ts_start": float(in_clip[0]),
                 "ts_end": float(in_clip[-1]), "caption": text, "mode": "lite", "model": "tiny", "num_tokens": 4,
                 "run_id": LONG_RUN}
            )  # fmt: skip
        tables["captions"].append(
            {"video_id": vid, "object_id": k, "clip_index": None, "ts_start": float(seen[0]), "ts_end": float(seen[-1]),
             "caption": f"thing {k} over the whole video", "mode": "lite", "model": "tiny", "num_tokens": 6,
             "run_id": LONG_RUN}
        )  # fmt: skip
    tables["qa"].append(
        {"video_id": vid, "object_ids": [1], "clip_index": 0, "ts_start": 0.0, "ts_end": 30.0,
         "question": "What is <region> doing?", "answer": "standing", "mode": "lite", "model": "tiny",
         "run_id": LONG_RUN}
    )  # fmt: skip
    tables["runs"] = run_rows(LONG_RUN, 3, when, tables)
    return {LONG_RUN: tables}
