"""The Ray task bodies of the index graph: plan a video into clip rows, decode a clip (or a track's frames).

Every row of the graph has the same columns (Ray Data batches are columnar), whatever its kind:

* `video`: a listed video, before planning (only the planning stage sees it);
* `clip`: one clip of a video, the unit of work from decoding to captioning;
* `track`: the K frames of the objects of a finished video that span several clips, for their
  whole-track captions (built by the driver after linking, fed into the next wave);
* `failed`: a video that could not be planned; it passes through to the driver with its `error`.

Neither body raises: a bad file, clip or prompt becomes the row's `error`, so one video (or one
damaged stretch of one) never takes the job down.
"""

from __future__ import annotations

import functools
import json
import math
import time
import os
import shutil
import tempfile
from typing import Any, Iterator

import numpy as np

from actors.busy import PHASE_PREFIX
from actors.columns import times_to_column
from pipeline.config import IndexConfig

EMPTY_FRAMES = np.zeros((0, 0, 0, 3), dtype=np.uint8)
#: Allowance per frame of the video for the one-pass decode of a file that cannot seek, on top of
#: `decode_timeout_s`: a guard against hangs (a 1080p H.264 frame decodes in a few milliseconds).
WALK_S_PER_FRAME = 0.05

#: Columns every row carries (besides the listing's), with their empty values.
ROW_DEFAULTS: dict[str, Any] = {
    "kind": "video", "clip_index": -1, "clip_json": "", "video_json": "", "discover": "", "num_owned": -1,
    "tracks_json": "", "error": "", "note": "", "concepts_json": "",
    **{f"{PHASE_PREFIX}decode_{phase}": 0.0 for phase in ("probe", "shots", "read")},
}


def video_row(video: Any, run_id: str, prompts_json: str, questions_json: str, concepts_json: str = ""
              ) -> dict[str, Any]:
    """The graph's input row for one listed video (`pipeline.sources.VideoFile`); `concepts_json`: the
    concepts a SAM 3 tracker finds in each of its clips."""
    return {
        **ROW_DEFAULTS, "video_id": video.video_id, "uri": video.uri, "size_bytes": int(video.size_bytes),
        "etag": video.etag or "", "run_id": run_id, "prompts_json": prompts_json, "questions_json": questions_json,
        "concepts_json": concepts_json,
    }


def plan_rows(row: dict[str, Any], *, cfg: IndexConfig) -> Iterator[dict[str, Any]]:
    """`flat_map` body: a `video` row becomes one row per clip (or one `failed` row); others pass.

    A long video's shot pass runs as segment tasks (`pipeline.segments`) and its clip rows leave as
    the segments finish, in order (Ray Data streams a generator's rows), so its first clips start
    while the rest is still being scored. The clips of a video that cannot seek are decoded here, by
    one pass over the file (`walked_rows`), and leave with their frames, one row at a time: decoded
    one task per clip, each would decode from the first frame.
    """
    if row["kind"] != "video":
        yield row
        return
    started = time.perf_counter()
    try:
        header, segments = _segmenting(row, cfg)
    except Exception:  # noqa: BLE001 - one pass reads the header again and says what failed
        header, segments = None, []
    if segments:
        yield from streamed_rows(row, cfg, header, segments, segment_scores(row["uri"], segments, cfg), started)
        return
    rows, plan = _clip_rows(row, cfg, header, started)
    if plan is not None and not plan.seekable:
        yield from walked_rows(rows, plan, cfg)
    else:
        yield from rows


def _segmenting(row: dict[str, Any], cfg: IndexConfig) -> tuple[Any, list]:
    """(header, segments): the container header, and the segments of the shot pass ([] for one pass)."""
    if cfg.cuts != "shot" or row.get("prompts_json"):
        return None, []
    from pipeline.clips import MIN_CLIP_SECONDS, header_duration, read_header
    from pipeline.segments import plan_segments

    header = read_header(row["uri"], cfg.storage_options, cfg.decode_timeout_s)
    if not header.seekable or not header.fps:
        return header, []
    duration, frames, _ = header_duration(header)
    frames = frames or (duration or 0.0) * header.fps
    min_seconds = max(MIN_CLIP_SECONDS, 1 / cfg.fps) if cfg.num_frames is None and cfg.fps else MIN_CLIP_SECONDS
    return header, plan_segments(frames, header.fps, min_seconds=min_seconds, first=cfg.segment_frames[0],
                                 most=cfg.segment_frames[1])


def segment_scores(uri: str, segments: list, cfg: IndexConfig) -> Iterator[Any]:
    """The segments' scores in order: Ray tasks submitted at once (each asks for `cfg.shots`), or, outside
    Ray, one after the other here. Tasks not waited for are cancelled when the caller stops early."""
    from pipeline.clips import SHOT_PASS_S_PER_FRAME
    from pipeline.segments import score_segment

    import ray

    # A guard against hangs, as for the single pass; the last segment's count is the header's, so twice it.
    timeouts = [cfg.decode_timeout_s + SHOT_PASS_S_PER_FRAME * (s.frames * (1 if s.end_s else 2) + 150)
                for s in segments]

    if not ray.is_initialized():
        for s, timeout in zip(segments, timeouts):
            yield score_segment(uri, s.start_s, s.end_s, cfg.storage_options, timeout)
        return
    args = {"num_cpus": cfg.shots.num_cpus, "num_gpus": cfg.shots.num_gpus, "max_retries": cfg.task_retries}
    if cfg.shots.memory:
        args["memory"] = cfg.shots.memory
    task = _remote(score_segment).options(**args)
    refs = [task.remote(uri, s.start_s, s.end_s, cfg.storage_options, t) for s, t in zip(segments, timeouts)]
    try:
        for ref in refs:
            yield ray.get(ref)
    finally:
        for ref in refs:
            try:
                ray.cancel(ref)
            except Exception:  # noqa: BLE001 - finished already
                pass


@functools.lru_cache(maxsize=None)
def _remote(fn: Any) -> Any:
    """`fn` as a Ray remote function, made once per worker (each `ray.remote` call exports it again)."""
    import ray

    return ray.remote(fn)


def streamed_rows(row: dict[str, Any], cfg: IndexConfig, header: Any, segments: list, scores: Iterator[Any],
                  started: float) -> Iterator[dict[str, Any]]:
    """The clip rows of a segmented video, each batch as soon as `pipeline.segments.ClipRelease` frees it.

    Rows before the last segment is in carry ``num_clips: null`` in `video_json` (the driver waits for
    a row that says it); the rows released with the last segment carry the whole plan (duration,
    frames, clips, note). A segment that fails after clips have left fails the rest of the video as
    one clip (a damaged stretch fails its clip only); before that, the video fails as it would in one pass.
    """
    from pipeline.clips import MIN_CLIP_SECONDS, header_duration, sampling_rate
    from pipeline.errors import DecodeError
    from pipeline.segments import ClipRelease

    duration, _, notes = header_duration(header)
    rate, thinned, rate_note = sampling_rate(duration, fps=cfg.fps, num_frames=cfg.num_frames,
                                             max_frames=cfg.max_frames, stream_fps=header.fps)
    if rate_note:
        notes.append(rate_note)
    release = ClipRelease(segments, rate=rate, clip_seconds=cfg.clip_seconds, interval=1 / header.fps,
                          min_seconds=max(MIN_CLIP_SECONDS, 1 / rate), duration=duration)
    meta = {"duration_s": duration, "fps": header.fps, "width": header.width, "height": header.height,
            "num_frames": None, "sampled_fps": rate, "thinned": thinned, "num_clips": None, "prompted": False,
            "note": ""}
    probe_s = time.perf_counter() - started
    spent = 0.0  # shot-pass seconds (the segment tasks' decode + model) not yet spread over released rows
    failure = None
    try:
        for got in scores:
            spent += sum(got.timings.values())
            clips = release.add(got)
            if release.done:
                meta = {**meta, "duration_s": release.duration, "num_frames": release.num_frames,
                        "num_clips": release.num_clips, "note": "; ".join(notes + release.notes)}
            if clips:
                yield from _stream_batch(row, clips, meta, spent, probe_s, first_note=release.done)
                spent = probe_s = 0.0
            if release.done:
                return
    except DecodeError as exc:
        failure = str(exc) if str(exc).startswith(row["uri"]) else f"{row['uri']}: {exc}"
    except Exception as exc:  # noqa: BLE001 - one video's failure, not the job's
        failure = f"planning {row['uri']}: {type(exc).__name__}: {exc}"
    kept, rest = release.fail()
    if not kept:
        yield {**row, "kind": "failed", "error": failure or "planning ended early"}
        return
    meta = {**meta, "num_clips": release.num_clips, "note": "; ".join(notes)}
    yield from _stream_batch(row, kept, meta, spent, probe_s, first_note=False)
    if rest is not None:
        yield {**row, "kind": "clip", "clip_index": rest.clip_index, "video_json": json.dumps(meta), "discover": "",
               "clip_json": json.dumps({"ts_start": rest.ts_start, "ts_end": rest.ts_end, "boundary": rest.boundary,
                                        "grid": [], "shared": False}),
               "error": f"shot detection failed from {rest.ts_start:.1f} s: {failure}"}


def _stream_batch(row: dict[str, Any], clips: list, meta: dict[str, Any], shots_s: float, probe_s: float,
                  first_note: bool) -> Iterator[dict[str, Any]]:
    """Rows of released clips; the planning seconds since the last batch are spread over them (the
    driver sums them), and with the last segment the plan's note rides on the first (`_clip_row`)."""
    share = {f"{PHASE_PREFIX}decode_shots": shots_s / len(clips), f"{PHASE_PREFIX}decode_probe": probe_s / len(clips)}
    video_json = json.dumps(meta)
    for n, clip in enumerate(clips):
        yield {**_clip_row(row, clip, video_json, "keyframes", []), **share,
               "note": meta["note"] if first_note and n == 0 else ""}


def _clip_row(row: dict[str, Any], clip: Any, video_json: str, discover: str, prompts: list) -> dict[str, Any]:
    shared = clip.shared_time is not None
    grid = list(clip.grid_times) + ([clip.shared_time] if shared else [])
    return {
        **row, "kind": "clip", "clip_index": clip.clip_index, "video_json": video_json,
        "clip_json": json.dumps({"ts_start": clip.ts_start, "ts_end": clip.ts_end, "boundary": clip.boundary,
                                 "grid": grid, "shared": shared}),
        "discover": discover, "prompts_json": json.dumps(prompts) if prompts else "",
    }


def _clip_rows(row: dict[str, Any], cfg: IndexConfig, header: Any = None, started: float | None = None
               ) -> tuple[list[dict[str, Any]], Any]:
    """(rows, plan): the clip rows of a `video` row and its `VideoPlan` (None when it failed)."""
    from pipeline.clips import plan_video
    from pipeline.errors import DecodeError

    started = time.perf_counter() if started is None else started
    try:
        plan = plan_video(
            row["uri"], fps=cfg.fps, num_frames=cfg.num_frames, max_frames=cfg.max_frames,
            clip_seconds=cfg.clip_seconds, cuts=cfg.cuts, storage_options=cfg.storage_options,
            timeout_s=cfg.decode_timeout_s, header=header,
        )
    except DecodeError as exc:
        return [{**row, "kind": "failed", "error": str(exc)}], None
    except Exception as exc:  # noqa: BLE001 - an unexpected planner failure is still one video's failure
        return [{**row, "kind": "failed", "error": f"planning {row['uri']}: {type(exc).__name__}: {exc}"}], None
    try:
        by_clip, first_prompted = assign_prompts(row.get("prompts_json") or "", plan)
    except ValueError as exc:
        return [{**row, "kind": "failed", "error": f"prompts: {exc}"}], None
    prompted = first_prompted is not None
    meta = {
        "duration_s": plan.duration_s, "fps": plan.fps, "width": plan.width, "height": plan.height,
        "num_frames": plan.num_frames, "sampled_fps": plan.sampled_fps, "thinned": plan.thinned,
        "num_clips": len(plan.clips), "prompted": prompted, "note": plan.note or "",
    }
    # A video's planning cost, spread over its clips so that the driver's sums come out right.
    share = {f"{PHASE_PREFIX}decode_shots": plan.shots_s / max(1, len(plan.clips)),
             f"{PHASE_PREFIX}decode_probe": (time.perf_counter() - started - plan.shots_s) / max(1, len(plan.clips))}
    video_json = json.dumps(meta)
    rows = []
    for clip in plan.clips:
        # Unprompted: discovery on keyframes. Prompted: nothing before the first prompt; after its
        # clip, discovery on each clip's first frame proposes continuations for linking.
        discover = "keyframes" if not prompted else "first" if clip.clip_index > first_prompted else "none"
        rows.append({
            **_clip_row(row, clip, video_json, discover, by_clip.get(clip.clip_index, [])), **share,
            # The plan's note (a header that under-reports, a stream that cannot seek) rides on the first
            # clip: a clip's note is what reaches the videos row of an ok video (`pipeline.assemble`).
            "note": (plan.note or "") if clip.clip_index == 0 else "",
        })
    return rows, plan


def assign_prompts(prompts_json: str, plan: Any) -> tuple[dict[int, list[dict]], int | None]:
    """User prompts per clip (each seeds the clip its time falls in), and the first prompted clip.

    Ids are assigned video-wide first (the tracker's rule), so a prompted object keeps its id in
    every clip. A prompt given by sampled frame index is placed at that frame's grid time.
    """
    if not prompts_json:
        return {}, None
    from actors.prompts import prompts_from_json
    from actors.seeds import assign_ids

    prompts = prompts_from_json(prompts_json)
    if not prompts:
        return {}, None
    ids = assign_ids(prompts)
    out: dict[int, list[dict]] = {}
    end = plan.clips[-1].ts_end if plan.clips else 0.0
    for k, (p, oid) in enumerate(zip(prompts, ids, strict=True)):
        ts = p.ts if p.ts is not None else plan.grid_time(p.frame or 0)
        clip = next((c for c in plan.clips if c.ts_start <= ts < c.ts_end), None)
        if clip is None and plan.clips and math.isclose(ts, end, abs_tol=0.5):
            clip = plan.clips[-1]
        if clip is None:
            raise ValueError(f"prompt {k} (object {oid}) at {ts:g} s is outside the video (0..{end:g} s)")
        spec = {**p.to_dict(), "object_id": oid, "ts": ts}
        spec.pop("frame", None)
        out.setdefault(clip.clip_index, []).append(spec)
    return out, min(out)


def decode_row(row: dict[str, Any], *, cfg: IndexConfig) -> dict[str, Any]:
    """`map` body: the frames of a clip (its grid, plus the next clip's first frame) or of a track row."""
    from pipeline.errors import DecodeError
    from pipeline.decode.sampling import sample_at, sample_clip

    out = {**row, "frames": EMPTY_FRAMES, "timestamps": "[]"}  # JSON text: see `actors.columns`
    if row["kind"] not in ("clip", "track") or row["error"]:
        return out
    clip = json.loads(row["clip_json"])
    if clip.get("walked"):  # decoded by planning's one pass (`walked_rows`)
        return row
    started = time.perf_counter()
    try:
        if row["kind"] == "clip":
            got = sample_clip(
                row["uri"], ts_start=clip["ts_start"], ts_end=clip["ts_end"], grid_times=clip["grid"],
                shared=clip["shared"], max_side=cfg.max_side, storage_options=cfg.storage_options,
                timeout_s=cfg.decode_timeout_s,
            )
            num_owned = len(got.timestamps) - (1 if got.shared else 0)
        else:
            got = sample_at(row["uri"], clip["timestamps"], max_side=cfg.max_side,
                            storage_options=cfg.storage_options, timeout_s=cfg.decode_timeout_s)
            num_owned = -1
    except DecodeError as exc:
        return {**out, "error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - one clip's failure, not the job's
        return {**out, "error": f"decode {row['uri']} clip {row['clip_index']}: {type(exc).__name__}: {exc}"}
    if len(got.timestamps) == 0:
        return {**out, "error": f"{row['uri']}: no frame could be decoded in {clip.get('ts_start')}..{clip.get('ts_end')} s"}
    return {
        **out, "frames": got.frames, "timestamps": times_to_column(got.timestamps),
        "num_owned": num_owned, "note": join_notes(row.get("note"), got.error),
        f"{PHASE_PREFIX}decode_read": time.perf_counter() - started,
    }


def join_notes(*notes: str | None) -> str:
    """Non-empty notes joined with "; " (a planning note first, then the decoder's)."""
    return "; ".join(n for n in notes if n)


def walked_rows(rows: list[dict[str, Any]], plan: Any, cfg: IndexConfig) -> Iterator[dict[str, Any]]:
    """The clip rows of a video that cannot seek, each with its frames, from one pass over the file.

    The pass runs in a decode child (`pipeline.decode.range_decode.spill_walk`), which writes each clip's
    frames to a scratch folder as it reaches them; the rows then leave one at a time, each file
    deleted as its row goes. The folder holds every sampled frame of the video at once, so a video
    whose frames do not fit the free space fails with that said instead of filling the disk.
    """
    from pipeline.errors import DecodeError
    from pipeline.decode.isolation import call_isolated
    from pipeline.decode.probe import output_size
    from pipeline.decode.range_decode import spill_walk

    uri = rows[0]["uri"]
    groups = [json.loads(r["clip_json"])["grid"] for r in rows]
    folder = tempfile.mkdtemp(prefix="pixelrefer-walk-")
    try:
        width, height = output_size(plan.width, plan.height, cfg.max_side)
        needed, free = sum(map(len, groups)) * width * height * 3, shutil.disk_usage(folder).free
        frames = plan.num_frames or plan.duration_s * (plan.fps or 30.0)
        started = time.perf_counter()
        try:
            if needed > free:
                raise DecodeError(f"{uri}: the file cannot seek, and its {sum(map(len, groups))} sampled frames "
                                  f"({needed / 2**30:.1f} GiB) do not fit the {free / 2**30:.1f} GiB free in "
                                  f"{tempfile.gettempdir()} for its one-pass decode; pass --max-side or sample fewer frames")
            walked = call_isolated(spill_walk, uri, groups, folder, max_side=cfg.max_side,
                                   storage_options=cfg.storage_options, label=uri,
                                   timeout_s=cfg.decode_timeout_s + frames * WALK_S_PER_FRAME)
        except DecodeError as exc:
            for r in rows:
                yield {**r, "error": str(exc)}
            return
        read_s = (time.perf_counter() - started) / len(rows)
        for r, got in zip(rows, walked, strict=True):
            yield _walked_row(r, got, read_s)
            if got["path"]:
                os.remove(got["path"])
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _walked_row(row: dict[str, Any], got: dict[str, Any], read_s: float) -> dict[str, Any]:
    """A clip row with what `spill_walk` got for it, as `decode_row` would have made it."""
    clip = json.loads(row["clip_json"])
    if got["error"]:
        return {**row, "error": f"{row['uri']}: {got['error']}"}
    if not got["path"]:
        reason = "; ".join(got["notes"]) or "the decoder returned nothing"
        return {**row, "error": f"{row['uri']}: no frame could be decoded in {clip['ts_start']}..{clip['ts_end']} s ({reason})"}
    shared = bool(clip["shared"]) and got["answered"][-1] == clip["grid"][-1]
    return {
        **row, "clip_json": json.dumps({**clip, "walked": True}), "frames": np.load(got["path"]),
        "timestamps": times_to_column(np.asarray(got["timestamps"], dtype=np.float64)),
        "num_owned": len(got["timestamps"]) - (1 if shared else 0), "note": join_notes(row.get("note"), *got["notes"]),
        f"{PHASE_PREFIX}decode_read": read_s,
    }
