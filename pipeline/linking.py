"""Objects that keep one id across the clips of a video.

Clips are tracked independently (in parallel, on any actor), so each clip numbers its objects from
scratch. Adjacent clips share one sampled frame: the clip before tracks its objects onto the next
clip's first frame, where the clip after discovers (or is prompted with) its own. Linking is then a
pure function of each adjacent pair: mask IoU on that shared frame, matched greedily from the best
pair down, above `min_iou`. It reads only the small per-clip track records (ids and COCO RLEs, through
pycocotools), never pixels, and needs no clip to wait for another.

Shot cuts: a clip that ends at a detected cut ('shot' boundary) is never linked to the next one.
The shared frame then shows a different shot, and the clip before has tracked its objects onto it
blindly, so an overlap there says nothing about identity. An object seen on both sides of a cut gets
two ids; re-identifying it needs appearance features, which this pipeline does not compute.

Concepts (SAM 3): a track found by a concept carries its `label`; two tracks with different labels
are never linked, however their masks overlap ("person" on a "bicycle"), so a label holds for the
whole of an object's id.

Prompted videos: after the clip of a user's prompt, later clips discover objects on their first frame
only to continue the prompted ones; a component of linked tracks that holds no prompted object is
dropped, so a prompted video indexes exactly the objects the user asked for.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils

DEFAULT_MIN_IOU = 0.5


@dataclasses.dataclass
class ClipTracks:
    """What linking needs of one clip: its tracks (local ids) and how it ends."""

    clip_index: int
    tracks: list[Mapping]  # {"object_id", "source", "frames": [{"frame_index", "rle", ...}]}
    num_owned: int  # frames [0, num_owned) are the clip's; frame num_owned (if sampled) is the next clip's first
    shared: bool  # the clip sampled the next clip's first frame
    boundary: str  # how the clip ends: 'shot', 'window' or 'end'
    ok: bool = True


def _coco(rle: Mapping) -> dict:
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].encode("ascii")}


def _masks_on(tracks: Sequence[Mapping], frame_index: int) -> dict[int, dict]:
    out = {}
    for t in tracks:
        for f in t["frames"]:
            if f["frame_index"] == frame_index:
                out[int(t["object_id"])] = _coco(f["rle"])
    return out


def _labels(tracks: Sequence[Mapping]) -> dict[int, str]:
    return {int(t["object_id"]): str(t["label"]) for t in tracks if t.get("label")}


def boundary_links(before: ClipTracks, after: ClipTracks, min_iou: float = DEFAULT_MIN_IOU) -> list[tuple[int, int]]:
    """(local id in `before`, local id in `after`) pairs that are the same object."""
    if not (before.ok and after.ok and before.shared) or before.boundary == "shot":
        return []
    left = _masks_on(before.tracks, before.num_owned)
    right = _masks_on(after.tracks, 0)
    if not left or not right:
        return []
    lids, rids = sorted(left), sorted(right)
    ious = np.asarray(mask_utils.iou([left[i] for i in lids], [right[j] for j in rids], [0] * len(rids)), dtype=float)
    ious = ious.reshape(len(lids), len(rids))
    left_label, right_label = _labels(before.tracks), _labels(after.tracks)
    for a, i in enumerate(lids):
        for b, j in enumerate(rids):
            if left_label.get(i) and right_label.get(j) and left_label[i] != right_label[j]:
                ious[a, b] = 0.0
    pairs: list[tuple[int, int]] = []
    used_l: set[int] = set()
    used_r: set[int] = set()
    for flat in np.argsort(-ious, axis=None, kind="stable"):
        a, b = divmod(int(flat), len(rids))
        if ious[a, b] < min_iou:
            break
        if a in used_l or b in used_r:
            continue
        used_l.add(a)
        used_r.add(b)
        pairs.append((lids[a], rids[b]))
    return pairs


def link_video(clips: Sequence[ClipTracks], *, prompted: bool, min_iou: float = DEFAULT_MIN_IOU
               ) -> dict[tuple[int, int], int]:
    """Global object ids: {(clip_index, local id): id}. Tracks missing from the result are dropped.

    Ids are deterministic: a component with a prompted object keeps the user's id; the others are
    numbered after the largest prompted id, in order of first appearance (clip, then local id).
    Two prompted objects are never merged, even if their masks coincide on a shared frame.
    """
    ordered = sorted(clips, key=lambda c: c.clip_index)
    parent: dict[tuple[int, int], tuple[int, int]] = {}
    prompt_id: dict[tuple[int, int], int] = {}

    def find(x: tuple[int, int]) -> tuple[int, int]:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for clip in ordered:
        for t in clip.tracks:
            key = (clip.clip_index, int(t["object_id"]))
            parent[key] = key
            if t.get("source") == "prompt":
                prompt_id[key] = int(t["object_id"])
    for before, after in zip(ordered, ordered[1:]):
        if after.clip_index != before.clip_index + 1:
            continue
        for a, b in boundary_links(before, after, min_iou):
            ra, rb = find((before.clip_index, a)), find((after.clip_index, b))
            if ra == rb:
                continue
            if ra in prompt_id and rb in prompt_id and prompt_id[ra] != prompt_id[rb]:
                continue
            keep, gone = (rb, ra) if rb in prompt_id and ra not in prompt_id else (ra, rb)
            parent[gone] = keep
    first_key: dict[tuple[int, int], tuple[int, int]] = {}
    for key in sorted(parent):
        first_key.setdefault(find(key), key)
    roots = sorted(first_key, key=first_key.__getitem__)
    fresh = max(prompt_id.values(), default=-1) + 1
    ids: dict[tuple[int, int], int] = {}
    for root in roots:
        if root in prompt_id:
            ids[root] = prompt_id[root]
        elif not prompted:
            ids[root] = fresh
            fresh += 1
    return {key: ids[find(key)] for key in parent if find(key) in ids}
