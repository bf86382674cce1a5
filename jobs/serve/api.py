"""What `pixelrefer serve` reads from an index: search, a video's objects and timeline, masks in a
time window, thumbnails. Plain Python values out (the routes in `jobs.serve.app` make them JSON).

One read-only `Index` (`jobs.query_sql`) is opened when the server starts, so the app shows the
index as it was then (restart it to see newer runs); its DuckDB connection is used by one request
at a time (a lock), which is the connection's own rule. Every query goes through the same SQL the
`query` command runs (`--like`, `--text`, `--video`), so the app and the terminal agree.

Nothing a request carries reaches storage as a path: a video is named by its `video_id`, checked
against `VIDEO_ID_RE` and looked up among the latest ok runs, and its source is the `uri` the index
recorded for it.
"""

from __future__ import annotations

import functools
import posixpath
import re
import threading
from collections import OrderedDict
from typing import Any, Callable, Mapping

import numpy as np

from jobs.query_errors import QueryError, UsageError, VideoNotFound
from jobs.query_like import index_embedder, search_like
from jobs.query_search import SEARCH_SQL, TERMS_SQL, search_params
from jobs.query_sql import Index, open_index
from jobs.report import overlays_at
from jobs.report_frames import SourceVideoError, decode_frames, draw_frame, image_bytes, source_options

#: What a video id may look like before it is even looked up (the index's are 16 hex digits).
VIDEO_ID_RE = re.compile(r"^[0-9A-Za-z_-]{1,64}$")
MAX_TOP = 100
#: The longest time window one masks request may ask for: the page asks for a window around the
#: playhead, never a whole video's masks.
MAX_WINDOW_S = 120.0
MAX_QUERY_CHARS = 500
THUMB_WIDTH = 320
FRAME_WIDTH = 960
THUMB_CACHE = 256
DOC_CACHE = 16

VIDEOS_SQL = """
SELECT v.video_id, v.uri, v.duration_s, v.width, v.height, v.fps, v.run_id, v.indexed_at,
       (SELECT count(*) FROM objects o WHERE o.video_id = v.video_id AND o.run_id = v.run_id) AS objects
FROM latest_videos v ORDER BY v.uri
"""
LABELS_SQL = """
SELECT lower(trim(o.label)) AS label, count(*) AS objects
FROM objects o JOIN latest_videos l ON o.video_id = l.video_id AND o.run_id = l.run_id
WHERE o.label IS NOT NULL AND trim(o.label) <> '' GROUP BY ALL ORDER BY objects DESC, label
"""
# The masks of a window: one row per object and sampled time (a clip overlap may store a frame twice).
WINDOW_SQL = """
SELECT object_id, round(ts, 6) AS ts, bbox, rle FROM masks
WHERE run_id = $run AND video_id = $vid AND ts >= $start AND ts <= $end
QUALIFY row_number() OVER (PARTITION BY object_id, round(ts, 6) ORDER BY clip_index NULLS LAST) = 1
ORDER BY ts, object_id
"""
NEAREST_MASK_SQL = """
SELECT round(ts, 6) AS ts FROM masks
WHERE run_id = $run AND video_id = $vid AND object_id = $obj AND ts IS NOT NULL
ORDER BY abs(ts - $t), ts LIMIT 1
"""
BM25_FILTERED_SQL = f"""
SELECT * FROM ({SEARCH_SQL}) s
WHERE ($vid IS NULL OR s.video_id = $vid) AND ($label IS NULL OR lower(trim(s.label)) = lower(trim($label)))
LIMIT $top
"""


class NotFound(QueryError):
    """A video, object or frame the index does not have (HTTP 404)."""


def video_name(uri: str) -> str:
    """What a person calls the video: the file name of its source."""
    return posixpath.basename(uri.rstrip("/")) or uri


def check_video_id(video_id: str) -> str:
    if not VIDEO_ID_RE.match(video_id or ""):
        raise UsageError(f"bad video id {video_id[:80]!r}: expected letters, digits, '-' or '_' (at most 64)")
    return video_id


def parse_float(value: str | None, name: str, default: float | None = None) -> float | None:
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except ValueError:
        raise UsageError(f"parameter {name}={value[:40]!r} is not a number") from None
    if not np.isfinite(number):
        raise UsageError(f"parameter {name}={value[:40]!r} is not a finite number")
    return number


def parse_int(value: str | None, name: str, default: int | None = None, lo: int = 0, hi: int = 2**31 - 1) -> int | None:
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise UsageError(f"parameter {name}={value[:40]!r} is not a whole number") from None
    if not lo <= number <= hi:
        raise UsageError(f"parameter {name}={number} is outside {lo}..{hi}")
    return number


class ServeIndex:
    """The app's one read-only view of OUTPUT (see the module docstring)."""

    def __init__(self, output: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.output = output
        self.storage_options = dict(storage_options or {})
        self.index: Index = open_index(output, self.storage_options)
        self._lock = threading.Lock()
        self._fast = self.index.con.cursor()
        self._fast_lock = threading.Lock()
        self._thumbs: OrderedDict[tuple, bytes] = OrderedDict()
        self._docs: OrderedDict[str, bytes] = OrderedDict()
        self._cache_lock = threading.Lock()  # guards both caches
        with self._lock:
            try:
                index_embedder(self.index)
                self.has_embeddings = True
            except QueryError:  # none (NoEmbeddings), or several embedders' vectors: search by words
                self.has_embeddings = False

    def close(self) -> None:
        self._fast.close()
        self.index.close()

    def _sql(self, query: str, params: Mapping[str, Any] | None = None, fast: bool = False) -> list[dict[str, Any]]:
        """Our fixed queries; `fast` ones (a masks window, one lookup) run on a second cursor of the
        same locked database, so a playhead's masks never wait behind a long video's document."""
        if fast:
            with self._fast_lock:
                return self._fast.sql(query, params=dict(params) if params else None).to_arrow_table().to_pylist()
        with self._lock:
            return self.index._internal(query, params).to_pylist()

    # -- lists -----------------------------------------------------------------------------------

    def videos(self) -> list[dict[str, Any]]:
        rows = self._sql(VIDEOS_SQL)
        return [{**{k: v for k, v in r.items() if k != "uri"}, "name": video_name(r["uri"])} for r in rows]

    def labels(self) -> list[dict[str, Any]]:
        return self._sql(LABELS_SQL)

    @functools.cached_property
    def _latest(self) -> dict[str, dict[str, Any]]:
        """video_id -> its latest ok `videos` row (the only videos the app shows or streams)."""
        with self._lock:
            rows = self.index._internal("SELECT * FROM latest_videos").to_pylist()
        return {r["video_id"]: r for r in rows}

    def video_row(self, video_id: str) -> dict[str, Any]:
        row = self._latest.get(check_video_id(video_id))
        if row is None:
            raise NotFound(f"no video {video_id!r} in this index (only videos with an ok run are shown)")
        return row

    # -- search ----------------------------------------------------------------------------------

    def search(self, q: str, *, mode: str = "auto", label: str | None = None, video: str | None = None,
               top: int = 20) -> dict[str, Any]:
        """`query --like` (hybrid) when the index has embeddings, else `query --text` (BM25); both
        narrowed by label and video. Results keep their rank order; the page groups them by video."""
        q = (q or "").strip()
        if not q:
            raise UsageError("parameter q is empty: give the words to search for")
        if len(q) > MAX_QUERY_CHARS:
            raise UsageError(f"parameter q is longer than {MAX_QUERY_CHARS} characters")
        if mode not in ("auto", "like", "text"):
            raise UsageError(f"parameter mode={mode[:20]!r}: expected auto, like or text")
        if not 1 <= top <= MAX_TOP:
            raise UsageError(f"parameter top must be 1 to {MAX_TOP}")
        label = (label or "").strip() or None
        video_id = self.video_row(video)["video_id"] if video else None
        if mode == "auto":
            mode = "like" if self.has_embeddings else "text"
        notes: list[str] = []
        with self._lock:
            if mode == "like":
                table = search_like(self.index, q, top, video=video_id, label=label, note=notes.append)
                rows = table.to_pylist()
            else:
                terms = self.index._internal(TERMS_SQL, {"text": q}).column("terms")[0].as_py() or []
                if not terms:
                    raise UsageError(f"{q!r} has no searchable words (stop words and punctuation are ignored)")
                params = {**search_params(terms, 2**31 - 1), "vid": video_id, "label": label, "top": top}
                rows = self.index._internal(BM25_FILTERED_SQL, params).to_pylist()
        results = []
        for r in rows:
            results.append({
                "video_id": r["video_id"], "name": video_name(r["uri"]), "object_id": r["object_id"],
                "label": r["label"], "text": r.get("text", r.get("match")), "kind": r.get("kind", r.get("match_kind")),
                "clip_index": r["clip_index"], "ts_start": r["ts_start"], "ts_end": r["ts_end"],
                "score": float(r["score"]),
            })  # fmt: skip
        return {"q": q, "mode": mode, "notes": [n.removeprefix("note: ") for n in notes], "results": results}

    # -- one video -------------------------------------------------------------------------------

    def video(self, video_id: str) -> dict[str, Any]:
        """The `query --video` document of the video's latest ok run, plus its display name and
        sampled times (the stills fallback steps through them)."""
        row = self.video_row(video_id)
        with self._lock:
            result = self.index.video(row["video_id"], run_id=row["run_id"])
        doc = result.to_dict()
        del doc["captions"]  # each is in its clip's entry, or the object's `track_caption`: half the bytes
        doc["video"].pop("uri", None)
        doc["video"]["name"] = video_name(row["uri"])
        doc["sampled_ts"] = [round(t, 6) for t in row.get("sampled_ts") or []]
        return doc

    def video_json(self, video_id: str, render: Callable[[Any], bytes]) -> bytes:
        """`video` rendered once per video: the index is read as of the server's start, so a
        document never changes, and a long video's takes most of a second to build."""
        key = self.video_row(video_id)["video_id"]
        with self._cache_lock:
            if key in self._docs:
                self._docs.move_to_end(key)
                return self._docs[key]
        body = render(self.video(key))
        with self._cache_lock:
            self._docs[key] = body
            while len(self._docs) > DOC_CACHE:
                self._docs.popitem(last=False)
        return body

    def masks(self, video_id: str, start: float, end: float) -> dict[str, Any]:
        """The stored masks of [start, end] (at most MAX_WINDOW_S long), COCO RLE as stored."""
        row = self.video_row(video_id)
        if end < start:
            raise UsageError(f"parameter end={end} is before start={start}")
        if end - start > MAX_WINDOW_S:
            raise UsageError(f"a masks window is at most {MAX_WINDOW_S:g} s long (asked {end - start:g} s)")
        rows = self._sql(WINDOW_SQL, {"run": row["run_id"], "vid": row["video_id"], "start": start - 1e-6,
                                      "end": end + 1e-6}, fast=True)
        times = sorted({round(t, 6) for t in row.get("sampled_ts") or [] if start - 1e-6 <= t <= end + 1e-6})
        masks = []
        for r in rows:
            rle = r["rle"] or {}
            masks.append({"object_id": r["object_id"], "ts": r["ts"], "bbox": r["bbox"],
                          "size": rle.get("size") or [row.get("height"), row.get("width")],
                          "counts": rle.get("counts")})  # fmt: skip
        return {"video_id": row["video_id"], "start": start, "end": end, "width": row.get("width"),
                "height": row.get("height"), "duration_s": row.get("duration_s"), "times": times, "masks": masks}

    def frame_jpeg(self, video_id: str, ts: float, object_id: int | None = None, *, width: int = THUMB_WIDTH) -> bytes:
        """The sampled frame nearest `ts`, drawn as the report draws it: with `object_id`'s mask and
        box (a search thumbnail), or bare (a still under the page's own mask canvas)."""
        row = self.video_row(video_id)
        sampled = [round(t, 6) for t in row.get("sampled_ts") or []]
        if object_id is not None:  # the object's own frame nearest ts (a clip's caption starts before it may enter)
            seen = self._sql(NEAREST_MASK_SQL, {"run": row["run_id"], "vid": row["video_id"], "obj": object_id, "t": ts},
                             fast=True)
            if not seen:
                raise NotFound(f"video {video_id} has no mask of object {object_id}")
            ts = seen[0]["ts"]
        elif sampled:
            ts = min(sampled, key=lambda t: abs(t - ts))
        key = (row["video_id"], ts, object_id, width)
        with self._cache_lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        overlays = []
        if object_id is not None:
            with self._lock:
                found = overlays_at(self.index, row, [ts]).get(ts, [])
            overlays = [o for o in found if o.object_id == object_id]
        uri = row["uri"]
        decoded = decode_frames(uri, [ts], source_options(uri, self.output, self.storage_options), max_side=2 * width)
        if ts not in decoded:
            raise NotFound(f"no frame near {ts:g} s could be decoded from video {video_id}")
        image = draw_frame(decoded[ts][1], overlays, width)
        data, _ = image_bytes(image, "jpeg")
        with self._cache_lock:
            self._thumbs[key] = data
            while len(self._thumbs) > THUMB_CACHE:
                self._thumbs.popitem(last=False)
        return data

    def source(self, video_id: str) -> tuple[str, dict[str, Any]]:
        """The recorded uri of a video and the storage options that open it."""
        row = self.video_row(video_id)
        uri = row["uri"]
        return uri, source_options(uri, self.output, self.storage_options)


def not_found_type() -> tuple[type[Exception], ...]:
    """The errors that mean "no such thing" (404) rather than "bad request" (400)."""
    return (NotFound, VideoNotFound, SourceVideoError)
