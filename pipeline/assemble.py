"""A video's finished clips -> rows of the output tables, and the request for its whole-track captions.

Runs on the driver over small records (ids, timestamps, COCO RLEs, captions): the pixels stayed in
the workers. The pieces a video is made of arrive in any order; `VideoAssembly` holds them until the
last clip is in, then links tracks across clips (`pipeline.linking`), joins the tracks of one
object across shot cuts and re-entries by appearance (`pipeline.reid`) and numbers frames video-wide.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
from typing import Any, Mapping

import numpy as np

from actors.columns import times_column
from actors.labels import vote
from actors.referrer import decode_vector
from actors.requests import spread_frames
from pipeline.linking import ClipTracks, LinkBreak, link_objects
from pipeline.reid import DEFAULT_THRESHOLD, Merge, Track, reidentify, track_vectors, unit

MAX_BREAK_NOTES = 5  # a note is read by a person; the rest are counted


def loads(value: Any, default: Any) -> Any:
    """A JSON column; Ray Data turns an all-empty string column into NaN floats, hence the care."""
    if isinstance(value, str) and value:
        return json.loads(value)
    return default


def text(value: Any) -> str | None:
    """A string column's value, None when empty (see `loads`)."""
    if isinstance(value, str) and value:
        return value
    return None


def number(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@dataclasses.dataclass
class VideoAssembly:
    """The clips of one video as they come back from the graph."""

    video_id: str
    uri: str
    run_id: str
    size_bytes: int | None
    etag: str | None
    meta: dict[str, Any]  # duration_s, fps, width, height, num_frames, sampled_fps, thinned, num_clips, prompted
    clips: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)
    error: str | None = None  # the whole video failed before it was split (probe, planning)

    @property
    def complete(self) -> bool:
        """Failed, or every clip in. A long video's first clip rows leave planning before its clip count is
        known (`pipeline.segments`): they say ``num_clips: null``, and the video waits for a row that says it."""
        if self.error is not None:
            return True
        total = self.meta.get("num_clips")
        return total is not None and len(self.clips) >= int(total)

    def learn(self, meta: Mapping[str, Any]) -> bool:
        """Take a row's `video_json`: the whole plan replaces a partial one (the duration, frame count,
        note and clip count a segmented plan knows only at its end). True when the clip count became known."""
        if meta.get("num_clips") is None or self.meta.get("num_clips") is not None:
            return False
        self.meta = dict(meta)
        return True

    @property
    def duration_s(self) -> float:
        return number(self.meta.get("duration_s")) or 0.0

    def add(self, row: Mapping[str, Any]) -> None:
        clip = loads(row.get("clip_json"), {})
        error = text(row.get("error"))
        timestamps = times_column(row.get("timestamps")).tolist()
        num_owned = int(row.get("num_owned", -1))
        if num_owned < 0:
            num_owned = len(timestamps)
        self.clips[int(row["clip_index"])] = {
            "ts_start": clip.get("ts_start"), "ts_end": clip.get("ts_end"), "boundary": clip.get("boundary"),
            "shared": bool(clip.get("shared")) and len(timestamps) > num_owned,
            "error": error, "note": text(row.get("note")),
            "timestamps": timestamps[:num_owned] if not error else [], "num_owned": 0 if error else num_owned,
            "tracks": [] if error else loads(row.get("tracks_json"), []),
            "captions": [] if error else loads(row.get("captions_json"), []),
            "qa": [] if error else loads(row.get("qa_json"), []),
            "appearance": {} if error else appearance(row.get("appearance_json")),
        }


def appearance(column: Any) -> dict[int, np.ndarray]:
    """A clip's `appearance_json`: local object id -> its vector (a bad entry is left out, not fatal:
    that object is then only never re-identified)."""
    out = {}
    for entry in loads(column, []):
        try:
            vector = decode_vector(entry["vector"])
        except (KeyError, TypeError, ValueError):
            continue
        vector = unit(vector) if vector.shape[0] == int(entry.get("dim", -1)) else None
        if vector is not None:
            out[int(entry["object_id"])] = vector
    return out


@dataclasses.dataclass
class Assembled:
    """One video's rows for every table, and what its whole-track captions need (or None)."""

    tables: dict[str, list[dict[str, Any]]]
    track_request: dict[str, Any] | None
    ok: bool
    error: str | None
    frames: int
    clips: int


def assemble(video: VideoAssembly, *, mode: str, model: str, tracker: str, indexed_at: dt.datetime,
             track_frames: int | None, reid: bool = True, reid_threshold: float = DEFAULT_THRESHOLD) -> Assembled:
    """Link, re-identify, number and explode one complete video into table rows.

    With `reid` off, objects are the linked tracks (no `tracklets` rows): the behaviour before
    re-identification."""
    base = {"video_id": video.video_id, "run_id": video.run_id}
    meta = video.meta
    order = sorted(video.clips)
    ok_clips = [i for i in order if not video.clips[i]["error"]]
    error = video.error
    if error is None and not ok_clips:
        first = video.clips[order[0]]["error"] if order else None
        error = f"no clip could be decoded or tracked ({first})" if first else "no clip could be decoded"
    offsets: dict[int, int] = {}
    sampled: list[float] = []
    for i in order:
        offsets[i] = len(sampled)
        sampled += video.clips[i]["timestamps"]
    links = link_objects(
        [ClipTracks(i, video.clips[i]["tracks"], video.clips[i]["num_owned"], video.clips[i]["shared"],
                    video.clips[i]["boundary"] or "end", ok=not video.clips[i]["error"]) for i in order],
        prompted=bool(meta.get("prompted")),
    )
    ids = links.ids
    tracklets: list[dict[str, Any]] = []
    if reid and error is None:
        merges = _reidentify(video, order, offsets, ids, reid_threshold)
        tracklets = _tracklet_rows(video, order, ids, merges, base, model)
        ids = {key: merges[tid].object_id for key, tid in ids.items()}
    clips_rows, masks, captions, qa = [], [], [], []
    objects: dict[int, dict[str, Any]] = {}
    owned_frames: dict[int, list[tuple[int, dict]]] = {}
    clip_sets: dict[int, set[int]] = {}
    for i in order:
        clip = video.clips[i]
        clips_rows.append({
            **base, "clip_index": i, "ts_start": number(clip["ts_start"]), "ts_end": number(clip["ts_end"]),
            "boundary": clip["boundary"], "num_sampled": clip["num_owned"],
            "status": "failed" if clip["error"] else "ok", "error": clip["error"] or clip["note"],
        })
        for t in clip["tracks"]:
            gid = ids.get((i, int(t["object_id"])))
            if gid is None:
                continue
            obj = objects.setdefault(gid, {"source": t.get("source") or "auto", "categories": []})
            if t.get("source") == "prompt":
                obj["source"] = "prompt"
            if t.get("label") and not obj.get("label"):  # a concept's: linking kept one per id
                obj["label"], obj["source"] = str(t["label"]), "concept"
            for f in t["frames"]:
                if f["frame_index"] >= clip["num_owned"]:
                    continue
                frame_index = offsets[i] + int(f["frame_index"])
                masks.append({
                    **base, "object_id": gid, "clip_index": i, "frame_index": frame_index, "ts": float(f["ts"]),
                    "bbox": f.get("bbox"), "area": f.get("area"), "score": f.get("score"), "rle": f["rle"],
                })
                owned_frames.setdefault(gid, []).append((frame_index, f))
                clip_sets.setdefault(gid, set()).add(i)
        for c in clip["captions"]:
            gid = ids.get((i, int(c["object_id"])))
            if gid is not None:
                c = dict(c)
                if gid in objects:
                    objects[gid]["categories"].append(c.get("category"))
                c.pop("category", None)
                captions.append({**base, **c, "object_id": gid, "clip_index": i, "mode": mode, "model": model})
        for a in clip["qa"]:
            gids = [ids.get((i, int(o))) for o in a["object_ids"]]
            if all(g is not None for g in gids):
                qa.append({**base, **a, "object_ids": gids, "clip_index": i, "mode": mode, "model": model})
    object_rows = []
    for gid in sorted(objects):
        frames = owned_frames.get(gid, [])
        ts = [float(f["ts"]) for _, f in frames]
        object_rows.append({
            **base, "object_id": gid, "source": objects[gid]["source"],
            "label": objects[gid].get("label") or vote(objects[gid]["categories"]),
            "first_ts": min(ts) if ts else None, "last_ts": max(ts) if ts else None, "num_frames": len(frames),
        })
    video_row = {
        **base, "uri": video.uri, "size_bytes": video.size_bytes, "etag": video.etag,
        "duration_s": number(meta.get("duration_s")), "fps": number(meta.get("fps")),
        "width": meta.get("width"), "height": meta.get("height"), "num_frames": meta.get("num_frames"),
        "sampled_ts": [] if error else sampled, "sampled_fps": number(meta.get("sampled_fps")),
        "clips": len(order) or None, "status": "failed" if error else "ok",
        "error": error or _note(video, order, links.breaks),
        "model": model, "tracker": tracker, "indexed_at": indexed_at,
    }
    labels = {row["object_id"]: row["label"] for row in object_rows}
    request = None if error else _track_request(video, objects, owned_frames, clip_sets, track_frames, labels)
    return Assembled(
        tables={"videos": [video_row], "clips": clips_rows, "objects": object_rows, "masks": masks,
                "captions": captions, "qa": qa, "tracklets": tracklets},
        track_request=request, ok=error is None, error=error, frames=len(sampled), clips=len(order),
    )


def _owned(video: VideoAssembly, order: list[int], offsets: Mapping[int, int], ids: Mapping[tuple[int, int], int]
           ) -> dict[tuple[int, int], list[tuple[int, float]]]:
    """(clip, track id) -> the (video-wide frame index, ts) of the clip's own frames where it has a mask."""
    out: dict[tuple[int, int], list[tuple[int, float]]] = {}
    for i in order:
        clip = video.clips[i]
        for t in clip["tracks"]:
            tid = ids.get((i, int(t["object_id"])))
            if tid is None:
                continue
            seen = out.setdefault((i, tid), [])
            seen += [(offsets[i] + int(f["frame_index"]), float(f["ts"])) for f in t["frames"]
                     if f["frame_index"] < clip["num_owned"]]
    return out


def _reidentify(video: VideoAssembly, order: list[int], offsets: Mapping[int, int],
                ids: Mapping[tuple[int, int], int], threshold: float) -> dict[int, Merge]:
    """Linked track id -> its object after re-identification (`pipeline.reid`)."""
    owned = _owned(video, order, offsets, ids)
    per_clip: dict[int, dict[int, np.ndarray]] = {}
    labels: dict[int, str] = {}
    prompts: dict[int, int] = {}
    for i in order:
        for t in video.clips[i]["tracks"]:
            local = int(t["object_id"])
            tid = ids.get((i, local))
            if tid is None:
                continue
            vector = video.clips[i].get("appearance", {}).get(local)
            if vector is not None and owned.get((i, tid)):
                per_clip.setdefault(i, {})[tid] = vector
            if t.get("label"):
                labels.setdefault(tid, str(t["label"]))
            if t.get("source") == "prompt":
                prompts[tid] = tid  # linking gave a prompted track the user's id
    vectors = track_vectors(per_clip, {key: len(frames) for key, frames in owned.items()})
    frames: dict[int, set[int]] = {}
    for (_, tid), seen in owned.items():
        frames.setdefault(tid, set()).update(f for f, _ in seen)
    tracks = [Track(tid, frozenset(frames.get(tid, ())), vectors.get(tid), labels.get(tid), prompts.get(tid))
              for tid in sorted(set(ids.values()))]
    return reidentify(tracks, threshold)


def _tracklet_rows(video: VideoAssembly, order: list[int], ids: Mapping[tuple[int, int], int],
                   merges: Mapping[int, Merge], base: Mapping[str, Any], model: str) -> list[dict[str, Any]]:
    """One `tracklets` row per (clip, linked track) with a mask in the clip's own frames."""
    rows = []
    owned = _owned(video, order, {i: 0 for i in order}, ids)
    for i in order:
        clip = video.clips[i]
        for t in clip["tracks"]:
            local = int(t["object_id"])
            tid = ids.get((i, local))
            seen = owned.get((i, tid)) if tid is not None else None
            if not seen:
                continue
            vector = clip.get("appearance", {}).get(local)
            ts = [s for _, s in seen]
            merge = merges[tid]
            rows.append({
                **base, "clip_index": i, "track_id": tid, "object_id": merge.object_id, "reid_score": merge.score,
                "first_ts": min(ts), "last_ts": max(ts), "num_frames": len(seen),
                "model": model, "dim": None if vector is None else int(vector.shape[0]),
                "vector": None if vector is None else vector.tolist(),
            })
    return rows


def _note(video: VideoAssembly, order: list[int], breaks: list[LinkBreak]) -> str | None:
    """For an `ok` video: what went wrong in part of it (failed clips, decoder notes, prompted objects
    whose link across a clip boundary failed, thinning)."""
    parts = []
    failed = [i for i in order if video.clips[i]["error"]]
    if failed:
        first = video.clips[failed[0]]["error"]
        parts.append(f"{len(failed)} of {len(order)} clips failed (clip {', '.join(map(str, failed[:10]))}"
                     f"{', ...' if len(failed) > 10 else ''}): {first}")
    notes = [video.clips[i]["note"] for i in order if video.clips[i]["note"] and not video.clips[i]["error"]]
    if notes:
        parts.append(notes[0])
    if breaks:
        parts += [b.describe() for b in breaks[:MAX_BREAK_NOTES]]
        if len(breaks) > MAX_BREAK_NOTES:
            parts.append(f"{len(breaks) - MAX_BREAK_NOTES} more prompted-object links failed")
    if video.meta.get("thinned"):
        parts.append(f"thinned to {float(video.meta['sampled_fps']):.4g} frames/s by --max-frames")
    return "; ".join(parts) or None


def _track_request(video: VideoAssembly, objects: Mapping[int, Any], owned_frames: Mapping[int, list],
                   clip_sets: Mapping[int, set[int]], k: int | None, labels: Mapping[int, str | None]
                   ) -> dict[str, Any] | None:
    """K masked frames spread over each object seen in more than one clip, as one row for the referrer
    (with each object's label, so that the referrer does not ask its category again)."""
    chosen: dict[int, list[tuple[int, dict]]] = {}
    for gid in sorted(objects):
        if len(clip_sets.get(gid, ())) < 2:
            continue
        by_index = dict(owned_frames[gid])
        chosen[gid] = [(i, by_index[i]) for i in spread_frames(list(by_index), k)]
    if not chosen:
        return None
    frame_ts = sorted({(i, float(f["ts"])) for picks in chosen.values() for i, f in picks})
    position = {i: n for n, (i, _) in enumerate(frame_ts)}
    tracks = [
        {"object_id": gid, "source": objects[gid]["source"], "label": labels.get(gid),
         "frames": [{**f, "frame_index": position[i]} for i, f in picks]}
        for gid, picks in chosen.items()
    ]
    spans = {gid: (min(float(f["ts"]) for _, f in owned_frames[gid]), max(float(f["ts"]) for _, f in owned_frames[gid]))
             for gid in chosen}
    return {"timestamps": [t for _, t in frame_ts], "tracks": tracks, "spans": spans}


def track_captions(video_id: str, run_id: str, row: Mapping[str, Any], spans: Mapping[int, tuple[float, float]], *,
                   mode: str, model: str) -> list[dict[str, Any]]:
    """Rows of the whole-track captions that came back for a video (clip_index null, the track's span)."""
    out = []
    for c in loads(row.get("captions_json"), []):
        c = {k: v for k, v in c.items() if k != "category"}
        start, end = spans.get(int(c["object_id"]), (c.get("ts_start"), c.get("ts_end")))
        out.append({"video_id": video_id, "run_id": run_id, **c, "clip_index": None, "ts_start": start,
                    "ts_end": end, "mode": mode, "model": model})
    return out
