"""Cross-clip batching: the referrer's objects/s when the clips of a Ray batch share LLM batches,
against per-video batching (each call holds one video's clips, as before clips were batched).

    python -m bench.pipeline --only cross-clip [--cross-clip-videos 50]

Equal work in one process: N short test-made videos (3 s, 2 frames/s, one 30-s window each) are
planned, decoded and tracked once with the tiny SAM 2 (`max_objects` 2: many clips with one or two
objects, the case cross-clip batching is for; the index's 64 new tokens and K = 8); then the same tracked rows go through one
`ReferrerStage` twice, timed: one call per video, then `rows_per_call` rows a call. Both ways must
give the same captions (checked: greedy decoding does not depend on batch mates). Target >= 2x.
`<arm>_phase_s_referrer_<phase>` say where each arm's time goes: batching shrinks the LLM phases;
crops, the vision tower and object tokens are per-mask work that a CPU does no faster in a batch.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

#: Clips per referrer call in the cross-clip arm (the referrer's Ray batch size).
ROWS_PER_CALL = 16
TARGET_GAIN = 2.0


def tracked_rows(cfg) -> list[list[dict[str, Any]]]:
    """Every video's clip rows, decoded and tracked, grouped by video."""
    from actors.columns import rows_to_batch
    from actors.tracker import TrackerStage
    from pipeline.graph import tracker_kwargs
    from pipeline.run import _input_rows, new_run_id
    from pipeline.sources import list_videos
    from pipeline.tasks import decode_row, plan_rows

    tracker = TrackerStage(**tracker_kwargs(cfg))
    run_id = new_run_id()
    out = []
    for video in _input_rows(cfg, list_videos(cfg.source, cfg.storage_options), run_id):
        rows = []
        for clip in plan_rows(video, cfg=cfg):
            done = tracker(rows_to_batch([decode_row(clip, cfg=cfg)]))
            rows.append({k: v[0] for k, v in done.items()})
        out.append(rows)
    return out


def cross_clip_point(work: Path, videos: int, rows_per_call: int = ROWS_PER_CALL) -> dict[str, Any]:
    from actors.busy import PHASE_PREFIX
    from actors.columns import rows_to_batch
    from actors.referrer import ReferrerStage
    from actors.requests import owned_tracks
    from bench.pipeline import _fresh, make_corpus
    from pipeline.graph import referrer_kwargs

    from pipeline.config import IndexConfig

    corpus = make_corpus(work / f"videos_{videos}", videos)
    # The index's defaults (64 new tokens, K = 8) but 2 frames/s and at most 2 objects a clip.
    cfg = IndexConfig(source=str(corpus), output=str(_fresh(work / "out_cross_clip")), fps=2.0, cuts="none",
                      max_objects=2)
    start = time.perf_counter()
    by_video = tracked_rows(cfg)
    track_s = time.perf_counter() - start
    rows = [r for video in by_video for r in video]
    objects = sum(len(owned_tracks(r["tracks_json"], int(r["num_owned"]))) for r in rows)
    referrer = ReferrerStage(**referrer_kwargs(cfg))
    referrer(rows_to_batch(rows[:1]))  # warm-up: first-call allocations count in neither arm

    def timed(groups: list[list[dict[str, Any]]], arm: str) -> tuple[float, list[str]]:
        captions: list[str] = []
        start = time.perf_counter()
        for group in groups:
            out = referrer(rows_to_batch(group))
            captions += list(out["captions_json"])
            for key, values in out.items():
                if key.startswith(PHASE_PREFIX + "referrer_"):
                    name = f"{arm}_{key}"
                    phases[name] = phases.get(name, 0.0) + float(values.sum())
        return time.perf_counter() - start, captions

    phases: dict[str, float] = {}
    per_video_s, per_video = timed(by_video, "per_video")
    chunks = [rows[i:i + rows_per_call] for i in range(0, len(rows), rows_per_call)]
    cross_s, cross = timed(chunks, "cross_clip")
    return {
        "cross_clip_videos": videos, "cross_clip_rows": len(rows), "cross_clip_objects": objects,
        "cross_clip_rows_per_call": rows_per_call, "cross_clip_track_s": track_s,
        "per_video_referrer_s": per_video_s, "cross_clip_referrer_s": cross_s,
        "per_video_objects_per_s": objects / per_video_s if per_video_s else None,
        "cross_clip_objects_per_s": objects / cross_s if cross_s else None,
        "cross_clip_batching_gain": per_video_s / cross_s if cross_s else None,
        "cross_clip_identical": per_video == cross,
        "cross_clip_ok": bool(cross_s) and per_video_s / cross_s >= TARGET_GAIN,
        **phases,
    }
