"""What the referrer is asked about a clip: which frames of each object it sees, and which questions.

Pure functions of the tracks and the user's question specs, shared by the tracker stage (which ships
only the frames these select), the referrer stage and the driver's whole-track requests.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

REGION = "<region>"


def expand_questions(specs: Sequence[dict], object_ids: Sequence[int]) -> tuple[list[tuple[str, list[int]]], list[str]]:
    """Turn question specs into (question, object ids) pairs for this video's objects.

    One placeholder and no explicit objects: asked of every object. k placeholders and no explicit
    objects: the first k objects. Returns the pairs and a list of readable reasons for skipped ones.
    """
    pairs: list[tuple[str, list[int]]] = []
    skipped: list[str] = []
    known = list(object_ids)
    for spec in specs:
        question, explicit = spec["question"], spec.get("objects")
        count = question.count(REGION)
        if explicit is not None:
            missing = [o for o in explicit if o not in known]
            if missing:
                skipped.append(f"question {question!r}: objects {missing} were not tracked")
                continue
            pairs.append((question, list(explicit)))
        elif count == 1:
            pairs += [(question, [o]) for o in known]
        elif len(known) >= count:
            pairs.append((question, known[:count]))
        else:
            skipped.append(f"question {question!r}: needs {count} objects, video has {len(known)}")
    return pairs, skipped


def spread_frames(frame_indices: Sequence[int], limit: int | None) -> list[int]:
    """At most ``limit`` of an object's frames, evenly spread: its first and last among them (for a
    ``limit`` of 1, its middle frame).

    Lite spends one 32-token entry in the prompt and three tower images on every frame an object is
    masked in, so a track over all sampled frames costs about that many times a single mask
    (``bench.referrer``: 20 masks vs 1). Keeping the track's ends keeps the caption's time span.
    """
    ordered = sorted(frame_indices)
    if limit is None or len(ordered) <= limit:
        return ordered
    if limit == 1:
        return [ordered[len(ordered) // 2]]
    picks = np.linspace(0, len(ordered) - 1, limit).round().astype(int)
    return [ordered[i] for i in sorted(set(picks.tolist()))]


def owned_tracks(tracks: str | list[dict[str, Any]], owned: int | None) -> list[dict[str, Any]]:
    """A clip row's tracks (its `tracks_json`, or the tracks already parsed) restricted to the
    clip's own frames, the first `owned` (None or negative, as `num_owned` says for rows that are
    not clips: all of them).

    The frame after them is the next clip's first frame, sampled only to link tracks across the
    boundary; it is captioned there. A track with no own frame is dropped.
    """
    if isinstance(tracks, str):
        tracks = json.loads(tracks or "[]")
    if owned is None or owned < 0:
        return list(tracks)
    tracks = [{**t, "frames": [f for f in t["frames"] if f["frame_index"] < owned]} for t in tracks]
    return [t for t in tracks if t["frames"]]


def shown_frames(tracks: Sequence[dict[str, Any]], limit: int | None) -> dict[int, list[int]]:
    """Per object id, the frame indices the referrer shows it on (`spread_frames` of its track)."""
    return {int(t["object_id"]): spread_frames([f["frame_index"] for f in t["frames"]], limit) for t in tracks}
