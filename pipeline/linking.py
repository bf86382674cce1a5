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
dropped, so a prompted video indexes exactly the objects the user asked for. That makes one missed
link costly (the object would vanish for the rest of the video), so a prompted object gets two more
chances at a boundary: a track of the same prompt in the next clip (the user prompted it again) is
the same object whatever the masks say, and failing that, the free track of the next clip that
overlaps its last mask best (at least `RESCUE_MIN_IOU`) continues it. Either way an object has at
most one track per clip. Every prompted object that missed its IoU link is reported (`LinkBreak`),
continued or lost, so the video says where its identity rests on less than an IoU match.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils

DEFAULT_MIN_IOU = 0.5
# A weaker overlap than this is as likely a neighbour as the prompted object itself.
RESCUE_MIN_IOU = 0.1

Key = tuple[int, int]  # (clip_index, local id)


@dataclasses.dataclass
class ClipTracks:
    """What linking needs of one clip: its tracks (local ids) and how it ends."""

    clip_index: int
    tracks: list[Mapping]  # {"object_id", "source", "frames": [{"frame_index", "rle", ...}]}
    num_owned: int  # frames [0, num_owned) are the clip's; frame num_owned (if sampled) is the next clip's first
    shared: bool  # the clip sampled the next clip's first frame
    boundary: str  # how the clip ends: 'shot', 'window' or 'end'
    ok: bool = True


@dataclasses.dataclass(frozen=True)
class LinkBreak:
    """A prompted object that reached the end of a clip but matched nothing in the next by mask IoU.

    Linking cannot fail loudly (the video is fine), so this is what the video's note is made of: the
    user asked for this object, and must learn where its track rests on a weaker match or stops.
    """

    object_id: int  # the user's id
    clip_index: int  # the clip it could not be linked into
    best_iou: float  # its best overlap with a free track of that clip (0.0: none overlaps)
    kept: bool  # that track was taken as its continuation

    def describe(self) -> str:
        """One clause of the video's note, naming the object and the clip."""
        head = f"object {self.object_id} not linked into clip {self.clip_index} by mask IoU"
        if self.kept:
            return f"{head}, continued by its best overlap there (IoU {self.best_iou:.2f})"
        return f"{head} (best overlap IoU {self.best_iou:.2f}), not followed after clip {self.clip_index - 1}"


@dataclasses.dataclass
class Links:
    """A video's linking: global ids (`link_video`) and the prompted objects whose IoU link failed."""

    ids: dict[Key, int]
    breaks: list[LinkBreak]


def _coco(rle: Mapping) -> dict:
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].encode("ascii")}


def _mask_at(track: Mapping, frame_index: int) -> dict | None:
    for f in track["frames"]:
        if f["frame_index"] == frame_index:
            return _coco(f["rle"])
    return None


def _masks_on(tracks: Sequence[Mapping], frame_index: int) -> dict[int, dict]:
    out = {}
    for t in tracks:
        mask = _mask_at(t, frame_index)
        if mask is not None:
            out[int(t["object_id"])] = mask
    return out


def _labels(tracks: Sequence[Mapping]) -> dict[int, str]:
    return {int(t["object_id"]): str(t["label"]) for t in tracks if t.get("label")}


def _continuable(before: ClipTracks, after: ClipTracks) -> bool:
    """Whether an object may go on from `before` into `after` at all (adjacent, both tracked, no cut)."""
    return (after.clip_index == before.clip_index + 1 and before.ok and after.ok
            and before.boundary != "shot")


def _iou_table(left: Mapping[int, dict], right: Mapping[int, dict], left_label: Mapping[int, str],
               right_label: Mapping[int, str]) -> tuple[list[int], list[int], np.ndarray]:
    """Mask IoU of every (left, right) pair, 0 where both carry different concept labels."""
    lids, rids = sorted(left), sorted(right)
    if not lids or not rids:
        return lids, rids, np.zeros((len(lids), len(rids)))
    ious = np.asarray(mask_utils.iou([left[i] for i in lids], [right[j] for j in rids], [0] * len(rids)), dtype=float)
    ious = ious.reshape(len(lids), len(rids))
    for a, i in enumerate(lids):
        for b, j in enumerate(rids):
            if left_label.get(i) and right_label.get(j) and left_label[i] != right_label[j]:
                ious[a, b] = 0.0
    return lids, rids, ious


def _greedy(lids: list[int], rids: list[int], ious: np.ndarray, min_iou: float,
            accept: Callable[[int, int], bool]) -> list[tuple[int, int]]:
    """One-to-one pairs from the best IoU down; a pair `accept` refuses leaves both ends free."""
    pairs: list[tuple[int, int]] = []
    used_l: set[int] = set()
    used_r: set[int] = set()
    if not lids or not rids:
        return pairs
    for flat in np.argsort(-ious, axis=None, kind="stable"):
        a, b = divmod(int(flat), len(rids))
        if ious[a, b] < min_iou:
            break
        if a in used_l or b in used_r or not accept(lids[a], rids[b]):
            continue
        used_l.add(a)
        used_r.add(b)
        pairs.append((lids[a], rids[b]))
    return pairs


def boundary_links(before: ClipTracks, after: ClipTracks, min_iou: float = DEFAULT_MIN_IOU) -> list[tuple[int, int]]:
    """(local id in `before`, local id in `after`) pairs that are the same object."""
    if not (before.ok and after.ok and before.shared) or before.boundary == "shot":
        return []
    lids, rids, ious = _iou_table(_masks_on(before.tracks, before.num_owned), _masks_on(after.tracks, 0),
                                  _labels(before.tracks), _labels(after.tracks))
    return _greedy(lids, rids, ious, min_iou, lambda i, j: True)


def _last_mask(track: Mapping, clip: ClipTracks) -> dict | None:
    """The mask to continue a track from: on the shared frame, else on the clip's last own frame
    (the tracker lost it for the shared frame only); None when it left before the clip ended."""
    mask = _mask_at(track, clip.num_owned) if clip.shared else None
    return mask if mask is not None else _mask_at(track, clip.num_owned - 1)


def link_video(clips: Sequence[ClipTracks], *, prompted: bool, min_iou: float = DEFAULT_MIN_IOU
               ) -> dict[tuple[int, int], int]:
    """Global object ids: {(clip_index, local id): id}. Tracks missing from the result are dropped.

    Ids are deterministic: a component with a prompted object keeps the user's id; the others are
    numbered after the largest prompted id, in order of first appearance (clip, then local id).
    Two prompted objects are never merged, even if their masks coincide on a shared frame.
    """
    return link_objects(clips, prompted=prompted, min_iou=min_iou).ids


def link_objects(clips: Sequence[ClipTracks], *, prompted: bool, min_iou: float = DEFAULT_MIN_IOU,
                 rescue_iou: float = RESCUE_MIN_IOU) -> Links:
    """`link_video`'s ids, and in a prompted video the prompted objects whose IoU link failed."""
    ordered = sorted(clips, key=lambda c: c.clip_index)
    parent: dict[Key, Key] = {}
    members: dict[Key, set[int]] = {}  # root -> the clips its component has a track in
    prompt_id: dict[Key, int] = {}
    shadows: set[Key] = set()

    def find(x: Key) -> Key:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def join(x: Key, y: Key) -> bool:
        """Merge two components unless that would give two prompts, or two tracks in a clip, one id.

        A match refused because the prompted side already has a track in the other's clip marks the
        other side a shadow of it (one object discovered twice, say before its second prompt): a
        shadow links no further, lest it take the next clip's continuation from the prompt's track.
        """
        rx, ry = find(x), find(y)
        if rx == ry:
            return True
        if rx in shadows or ry in shadows or (rx in prompt_id and ry in prompt_id):
            return False
        if members[rx] & members[ry]:
            if rx in prompt_id or ry in prompt_id:
                shadows.add(ry if rx in prompt_id else rx)
            return False
        keep, gone = (ry, rx) if ry in prompt_id and rx not in prompt_id else (rx, ry)
        parent[gone] = keep
        members[keep] |= members.pop(gone)
        return True

    for clip in ordered:
        for t in clip.tracks:
            key = (clip.clip_index, int(t["object_id"]))
            parent[key], members[key] = key, {clip.clip_index}
            if t.get("source") == "prompt":
                prompt_id[key] = int(t["object_id"])
    first_prompt: dict[int, Key] = {}
    for key in sorted(prompt_id):  # one prompt, prompted again in a later clip, is one object
        other = first_prompt.setdefault(prompt_id[key], key)
        if other != key:
            parent[key] = other
            members[other] |= members.pop(key)
            del prompt_id[key]
    breaks: list[LinkBreak] = []
    for before, after in zip(ordered, ordered[1:]):
        if not _continuable(before, after):
            continue
        if before.shared:
            lids, rids, ious = _iou_table(_masks_on(before.tracks, before.num_owned), _masks_on(after.tracks, 0),
                                          _labels(before.tracks), _labels(after.tracks))
            _greedy(lids, rids, ious, min_iou,
                    lambda i, j, k=before.clip_index: join((k, i), (k + 1, j)))
        if prompted:
            breaks += _rescue(before, after, rescue_iou, find, join, members, prompt_id, shadows)
    first_key: dict[Key, Key] = {}
    for key in sorted(parent):
        first_key.setdefault(find(key), key)
    roots = sorted(first_key, key=first_key.__getitem__)
    fresh = max(prompt_id.values(), default=-1) + 1
    ids: dict[Key, int] = {}
    for root in roots:
        if root in prompt_id:
            ids[root] = prompt_id[root]
        elif not prompted:
            ids[root] = fresh
            fresh += 1
    return Links({key: ids[find(key)] for key in parent if find(key) in ids}, breaks)


def _rescue(before: ClipTracks, after: ClipTracks, rescue_iou: float, find: Callable[[Key], Key],
            join: Callable[[Key, Key], bool], members: Mapping[Key, set[int]], prompt_id: Mapping[Key, int],
            shadows: set[Key]) -> list[LinkBreak]:
    """Continue each prompted object that reached the end of `before` but has no track in `after`
    with the free track of `after` that overlaps its last mask best; report every such object."""
    waiting: dict[int, dict] = {}
    for t in before.tracks:
        root = find((before.clip_index, int(t["object_id"])))
        if root in prompt_id and after.clip_index not in members[root]:
            mask = _last_mask(t, before)
            if mask is not None:
                waiting[int(t["object_id"])] = mask
    if not waiting:
        return []
    free = {}
    for j, mask in _masks_on(after.tracks, 0).items():
        root = find((after.clip_index, j))
        if root not in prompt_id and root not in shadows and before.clip_index not in members[root]:
            free[j] = mask
    lids, rids, ious = _iou_table(waiting, free, _labels(before.tracks), _labels(after.tracks))
    kept = dict(_greedy(lids, rids, ious, rescue_iou,
                        lambda i, j: join((before.clip_index, i), (after.clip_index, j))))
    out = []
    for a, i in enumerate(lids):
        user_id = prompt_id[find((before.clip_index, i))]
        if i in kept:
            out.append(LinkBreak(user_id, after.clip_index, float(ious[a, rids.index(kept[i])]), True))
        else:
            out.append(LinkBreak(user_id, after.clip_index, float(ious[a].max(initial=0.0)), False))
    return sorted(out, key=lambda b: b.object_id)
