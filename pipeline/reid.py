"""One object, one id: tracks of a video merged by appearance across shot cuts and re-entries.

Linking (`pipeline.linking`) keeps an id only while masks overlap on a shared frame, so an object
seen on both sides of a cut, or one that leaves the frame and comes back, ends up as two tracks.
This joins them after linking, on the driver, from small records: per track the frames where it is
visible, its concept label and its appearance (the L2-normalised mean of the vectors the referrer
pooled inside its masks, one per clip: `models.referrer.appearance_of`).

The rule, in time order of each track's first frame (the way a tracker's re-id gallery grows): a
track joins the earlier object it resembles most, if
  * their cosine is at least `threshold` (`DEFAULT_THRESHOLD`),
  * no frame shows both (two things visible at the same moment are two things),
  * their concept labels do not differ, and they do not carry two different prompted ids;
else it starts an object of its own. An object's appearance is the mean of its tracks', so a chain of
small drifts cannot walk it into another object. The score that merged a track is kept
(`tracklets.reid_score`), so a user can see, and undo, every merge.

A merged object keeps the id of its first track; a track that starts its object keeps its own id.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

#: Cosine above which two tracks are one object. Not measured on real weights here (the tests run
#: random tiny models): the tower's mean-pooled features share a large common component, so
#: unrelated regions already score well above 0, and a wrong merge (two people become one) costs
#: more than a missed one (today's behaviour), so the bar sits high. Re-check it with
#: `python -m bench.reid --pairs FILE` on labelled clips when real weights are at hand.
DEFAULT_THRESHOLD = 0.8
#: With the random tiny referrer (`--model tiny`) every region looks alike to the tower (cosines of
#: ~0.95 between different shapes), so the only honest merge is the same pixels: near 1, not 1,
#: for the float noise of batching.
TINY_THRESHOLD = 0.9999


@dataclasses.dataclass(frozen=True)
class Track:
    """One linked track of a video, as re-identification sees it."""

    track_id: int
    frames: frozenset[int]  # video-wide sampled frame indices where it has a mask
    vector: np.ndarray | None  # L2-normalised appearance, None when the referrer gave none
    label: str | None = None  # concept label (SAM 3); None for discovered objects
    prompt_id: int | None = None  # the user's id of a prompted track


@dataclasses.dataclass(frozen=True)
class Merge:
    """Where a track went: its object's id and the cosine that put it there (None: it starts it)."""

    object_id: int
    score: float | None


def unit(vector: np.ndarray | Sequence[float]) -> np.ndarray | None:
    """The L2-normalised float32 vector, None for a zero or non-finite one."""
    v = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(v))
    if not np.isfinite(norm) or norm == 0.0:
        return None
    return v / norm


def mean_vector(vectors: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray | None:
    """The normalised (weighted) mean of some vectors, None when there are none."""
    if not vectors:
        return None
    stacked = np.stack([np.asarray(v, dtype=np.float32) for v in vectors])
    w = np.ones(len(vectors), dtype=np.float32) if weights is None else np.asarray(weights, dtype=np.float32)
    return unit((stacked * w[:, None]).sum(axis=0))


@dataclasses.dataclass(eq=False)
class _Object:
    track_ids: list[int]
    frames: set[int]
    label: str | None
    prompt_id: int | None
    total: np.ndarray | None = None  # the frame-weighted sum of its tracks' vectors
    row: int | None = None  # its row of `_Gallery.means` once it has a vector

    def accepts(self, track: Track) -> bool:
        if self.frames & track.frames:
            return False
        if self.label and track.label and self.label != track.label:
            return False
        return not (self.prompt_id is not None and track.prompt_id is not None and self.prompt_id != track.prompt_id)


class _Gallery:
    """The objects so far and their mean vectors as rows of one matrix, so a track is scored against
    all of them in one product (a 2-hour video with a cut every few seconds has thousands of tracks)."""

    def __init__(self) -> None:
        self.objects: list[_Object] = []
        self.means = np.zeros((0, 0), dtype=np.float32)
        self.scored: list[_Object] = []  # row -> its object

    def ranked(self, vector: np.ndarray) -> list[tuple[float, _Object]]:
        if not self.scored:
            return []
        scores = self.means[: len(self.scored)] @ vector
        order = np.argsort(-scores, kind="stable")  # ties: the earlier object
        return [(float(scores[r]), self.scored[r]) for r in order]

    def add(self, obj: _Object, track: Track) -> None:
        if not obj.track_ids:
            self.objects.append(obj)
        obj.track_ids.append(track.track_id)
        obj.frames |= track.frames
        obj.label = obj.label or track.label
        obj.prompt_id = obj.prompt_id if obj.prompt_id is not None else track.prompt_id
        if track.vector is None:
            return
        weighted = track.vector * float(max(len(track.frames), 1))
        first = obj.total is None
        obj.total = weighted if first else obj.total + weighted
        mean = unit(obj.total)
        if first:
            if len(self.scored) == self.means.shape[0]:
                grown = np.zeros((max(16, 2 * len(self.scored)), track.vector.shape[0]), dtype=np.float32)
                if self.scored:
                    grown[: len(self.scored)] = self.means[: len(self.scored)]
                self.means = grown
            obj.row = len(self.scored)
            self.scored.append(obj)
        self.means[obj.row] = mean if mean is not None else 0.0


def reidentify(tracks: Sequence[Track], threshold: float = DEFAULT_THRESHOLD) -> dict[int, Merge]:
    """track_id -> its object's id and merge score, for every track (see the module docstring).

    Deterministic: tracks are taken by first frame, then id; ties between objects go to the earlier.
    """
    order = sorted(tracks, key=lambda t: (min(t.frames, default=-1), t.track_id))
    gallery = _Gallery()
    out: dict[int, Merge] = {}
    for track in order:
        best, best_score = None, None
        if track.vector is not None:
            for score, obj in gallery.ranked(track.vector):
                if score < threshold:
                    break
                if obj.accepts(track):
                    best, best_score = obj, score
                    break
        if best is None:
            best = _Object([], set(), track.label, track.prompt_id)
        gallery.add(best, track)
        out[track.track_id] = Merge(best.track_ids[0], best_score)
    for obj in gallery.objects:  # a prompted object keeps the user's id wherever in it the prompt came
        if obj.prompt_id is not None:
            for tid in obj.track_ids:
                out[tid] = Merge(obj.prompt_id, out[tid].score)
    return out


def track_vectors(per_clip: Mapping[int, Mapping[int, np.ndarray]], weights: Mapping[tuple[int, int], int]
                  ) -> dict[int, np.ndarray]:
    """track_id -> its appearance: the mean of its per-clip vectors ({clip: {track_id: vector}}),
    each weighted by its frames in that clip (`weights[(clip, track_id)]`), so a clip where the
    object is seen once counts less than one where it stays."""
    gathered: dict[int, tuple[list[np.ndarray], list[float]]] = {}
    for clip, vectors in per_clip.items():
        for tid, vec in vectors.items():
            vs, ws = gathered.setdefault(tid, ([], []))
            vs.append(vec)
            ws.append(float(max(weights.get((clip, tid), 1), 1)))
    out = {}
    for tid, (vs, ws) in gathered.items():
        mean = mean_vector(vs, ws)
        if mean is not None:
            out[tid] = mean
    return out
