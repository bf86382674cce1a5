"""The tracking stage: a video's sampled frames in, object tracks (COCO RLE masks and boxes) out.

SAM 2 from transformers does the work: `Sam2VideoModel` with its inference session tracks every
object (several at once in one session), and SAM 2's automatic mask generation (transformers'
`mask-generation` pipeline on a `Sam2Model` that shares the video model's weights) finds objects
when a video has no prompts.

Which objects:

- prompts (`actors.prompts`): boxes, points or masks on a timestamp or frame. Each prompted object
  is tracked forward from its first prompt frame to the end, and backward from it to the start;
  further prompts for the same `object_id` on later frames become extra conditioning frames.
- automatic (no prompts): on keyframes (the first sampled frame, then the first frame at least
  `keyframe_interval_s` later, and so on) SAM 2 proposes masks. Duplicates are removed (IoU; a whole
  replaces its parts), the best `max_objects` by score and area are kept, and a new track starts
  only for a proposal that no live track already covers (mask IoU, or one mask mostly inside the
  other), so objects that enter later are found too. A new track is also followed backward to the
  previous keyframe, where it had not been found yet. At most `max_objects` automatic objects are
  followed at once; one absent for `retire_after_s` leaves the session (its track is kept) and frees
  its place; if it comes back it is found again as a new object.

Bounded memory on long videos: frames are preprocessed `chunk_size` at a time, one session carries
the tracker state across chunks (so ids stay stable and chunking does not change results), and
after every frame the session forgets what SAM 2 will not read again (tracked-frame memories older
than its memory window, processed frames, used inputs, full-resolution logits); only conditioning
(prompt / seed) frames stay, as in SAM 2. Processed frames (and, with `offload_state`, the
memories) live on the CPU and reach the GPU only for the frame being tracked. Masks never leave the
actor: each frame's masks become COCO RLE, areas and boxes at once.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_util

from actors.busy import BusyClock
from actors.columns import times_column
from actors.prompts import ObjectPrompt, PromptsError, prompts_from_json

log = logging.getLogger(__name__)

MAX_OBJECT_ID = 2**31 - 1  # the objects table stores int32 ids


class TrackerInputError(ValueError):
    """A prompt does not fit its video (no such frame or time, box outside the frame, wrong mask size...)."""


# ---------------------------------------------------------------------------------------------
# Masks as COCO RLE (pycocotools does the encoding, areas, boxes and IoU)
# ---------------------------------------------------------------------------------------------


def encode_masks(masks: np.ndarray) -> list[dict]:
    """(N, H, W) bool masks as COCO RLE dicts with string counts (the objects-table form)."""
    if len(masks) == 0:
        return []
    fortran = np.asfortranarray(np.moveaxis(masks.astype(np.uint8, copy=False), 0, -1))
    return [{"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")}
            for r in mask_util.encode(fortran)]


def _coco(rles: Sequence[Mapping]) -> list[dict]:
    """pycocotools wants byte counts; the tables hold strings."""
    return [{"size": list(r["size"]), "counts": r["counts"].encode("ascii") if isinstance(r["counts"], str)
             else r["counts"]} for r in rles]


def decode_rle(rle: Mapping) -> np.ndarray:
    """A COCO RLE dict (string or byte counts) as an (H, W) bool mask."""
    return mask_util.decode(_coco([rle])[0]).astype(bool)


def rle_areas(rles: Sequence[Mapping]) -> np.ndarray:
    return np.asarray(mask_util.area(_coco(rles)), dtype=np.int64) if rles else np.zeros(0, np.int64)


def rle_boxes(rles: Sequence[Mapping]) -> np.ndarray:
    """(N, 4) xyxy boxes in pixels; the far edge is exclusive (x1 = last column + 1), as in COCO."""
    if not rles:
        return np.zeros((0, 4), np.float64)
    xywh = np.asarray(mask_util.toBbox(_coco(rles)), dtype=np.float64).reshape(-1, 4)
    return np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)


def mask_overlaps(a: Sequence[Mapping], b: Sequence[Mapping]) -> tuple[np.ndarray, np.ndarray]:
    """IoU and cover (intersection over the smaller mask's area) between two lists of RLE masks.

    Cover catches what IoU misses: SAM proposes an object and its parts, whose IoU is small while
    one lies inside the other.
    """
    if not a or not b:
        return np.zeros((len(a), len(b))), np.zeros((len(a), len(b)))
    iou = np.asarray(mask_util.iou(_coco(a), _coco(b), [0] * len(b)), dtype=np.float64).reshape(len(a), len(b))
    area_a, area_b = rle_areas(a)[:, None].astype(np.float64), rle_areas(b)[None, :].astype(np.float64)
    inter = iou * (area_a + area_b) / (1.0 + iou)  # from IoU = I / (A + B - I)
    smaller = np.minimum(area_a, area_b)
    cover = np.divide(inter, smaller, out=np.zeros_like(inter), where=smaller > 0)
    return iou, cover


def select_candidates(rles: Sequence[Mapping], scores: Sequence[float], *, max_objects: int, min_area: int = 1,
                      dedupe_iou: float = 0.7, dedupe_cover: float = 0.9) -> list[int]:
    """Indices of the proposals to keep, best first: drop specks, rank, then drop duplicates.

    Rank: score (to 2 decimals, so near-ties go to the larger object), then area. A proposal that
    overlaps a better one by `dedupe_iou` IoU is a duplicate and dropped. Nested proposals (one lies
    `dedupe_cover` inside the other) are an object and its parts, which SAM proposes separately and
    often scores the part higher: the whole replaces its parts, at the best part's rank. At most
    `max_objects` are kept.
    """
    areas = rle_areas(rles)
    order = sorted((k for k in range(len(rles)) if areas[k] >= max(min_area, 1)),
                   key=lambda k: (-round(float(scores[k]), 2), -int(areas[k]), k))
    iou, cover = mask_overlaps(rles, rles)
    kept: list[int] = []
    for k in order:
        dups = [j for j in kept if iou[k, j] >= dedupe_iou or cover[k, j] >= dedupe_cover]
        if not dups:
            kept.append(k)
        elif all(iou[k, j] < dedupe_iou and areas[k] > areas[j] for j in dups):  # k is the whole of parts
            at = kept.index(dups[0])
            kept = [j for j in kept[:at] if j not in dups] + [k] + [j for j in kept[at:] if j not in dups]
    return kept[:max_objects]


def uncovered(candidates: Sequence[Mapping], tracks: Sequence[Mapping], *, match_iou: float = 0.5,
              match_cover: float = 0.9) -> list[int]:
    """Indices of candidates that no track covers (IoU >= match_iou or cover >= match_cover)."""
    iou, cover = mask_overlaps(candidates, tracks)
    if not tracks:
        return list(range(len(candidates)))
    covered = ((iou >= match_iou) | (cover >= match_cover)).any(axis=1)
    return [k for k in range(len(candidates)) if not covered[k]]


# ---------------------------------------------------------------------------------------------
# Prompts resolved against a video
# ---------------------------------------------------------------------------------------------


@dataclass
class Seed:
    """Where an object's track starts: a prompt (or a discovered mask) on one frame."""

    object_id: int
    source: str  # "prompt" | "auto"
    frame: int
    prompt: ObjectPrompt | None = None
    box: tuple[float, float, float, float] | None = None  # clipped to the frame
    mask_rle: dict | None = None  # mask prompts and discovered objects
    stop: int = 0  # backward tracking covers frames [stop, frame)


def keyframe_indices(timestamps: Sequence[float], interval_s: float) -> list[int]:
    """The first frame, then each first frame at least `interval_s` after the previous keyframe.

    By timestamp, not index: sampled frames of a variable-frame-rate video are unevenly spaced.
    """
    if len(timestamps) == 0:
        return []
    keys, due = [0], float(timestamps[0]) + interval_s
    for i, t in enumerate(timestamps):
        if i and float(t) >= due - 1e-6:
            keys.append(i)
            due = float(t) + interval_s
    return keys


def prompt_frame(prompt: ObjectPrompt, timestamps: np.ndarray, where: str) -> int:
    """The sampled frame a prompt is given on: its `frame`, else the frame nearest its `ts`, else 0.

    A `ts` farther from every sampled frame than the largest sampling gap (at least 0.5 s) is outside
    the video.
    """
    n = len(timestamps)
    if prompt.frame is not None:
        if not 0 <= prompt.frame < n:
            raise TrackerInputError(f"{where}: frame {prompt.frame} does not exist (the video has {n} sampled "
                                    f"frames, 0..{n - 1})")
        return int(prompt.frame)
    if prompt.ts is None:
        return 0
    k = int(np.argmin(np.abs(timestamps - prompt.ts)))
    tolerance = max(0.5, float(np.max(np.diff(timestamps))) if n > 1 else 0.0)
    if abs(float(timestamps[k]) - prompt.ts) > tolerance:
        raise TrackerInputError(f"{where}: ts {prompt.ts:g} s is outside the video (sampled frames span "
                                f"{timestamps[0]:.3f}..{timestamps[-1]:.3f} s)")
    return k


def _check_box(box: tuple[float, float, float, float], height: int, width: int, where: str
               ) -> tuple[float, float, float, float]:
    """The box clipped to the frame; an empty, inverted or fully outside box is an error."""
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        raise TrackerInputError(f"{where}: box {list(box)} has zero area (need x0 < x1 and y0 < y1)")
    cx0, cy0, cx1, cy1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
    if cx1 <= cx0 or cy1 <= cy0:
        raise TrackerInputError(f"{where}: box {list(box)} lies outside the {width}x{height} frame")
    return (cx0, cy0, cx1, cy1)


def _check_points(prompt: ObjectPrompt, height: int, width: int, where: str) -> None:
    if len(prompt.labels) != len(prompt.points):
        raise TrackerInputError(f"{where}: {len(prompt.points)} points but {len(prompt.labels)} labels")
    for x, y in prompt.points:
        if not (0 <= x <= width and 0 <= y <= height):
            raise TrackerInputError(f"{where}: point ({x:g}, {y:g}) lies outside the {width}x{height} frame")
    if prompt.box is None and not any(lab == 1 for lab in prompt.labels):
        raise TrackerInputError(f"{where}: points without a box need at least one positive (label 1) point")


def _check_mask(rle: Mapping, height: int, width: int, where: str) -> dict:
    size = list(rle.get("size", []))
    if size != [height, width]:
        raise TrackerInputError(f"{where}: mask size {size} does not match the frame size [{height}, {width}]")
    try:
        area = int(rle_areas([rle])[0])
        decoded = decode_rle(rle)
    except Exception as exc:  # noqa: BLE001 - pycocotools raises bare exceptions for bad counts
        raise TrackerInputError(f"{where}: mask RLE cannot be decoded: {exc}") from exc
    if decoded.shape != (height, width) or area == 0:
        raise TrackerInputError(f"{where}: mask is empty" if area == 0 else f"{where}: mask RLE is malformed")
    return {"size": [height, width], "counts": rle["counts"]}


def assign_ids(prompts: Sequence[ObjectPrompt]) -> list[int]:
    """User ids as given; the others get the smallest free ids from 1 up."""
    used = {p.object_id for p in prompts if p.object_id is not None}
    for oid in used:
        if not 0 <= oid <= MAX_OBJECT_ID:
            raise TrackerInputError(f"object_id {oid} is out of range (0..{MAX_OBJECT_ID})")
    ids, nxt = [], 1
    for p in prompts:
        if p.object_id is not None:
            ids.append(p.object_id)
            continue
        while nxt in used:
            nxt += 1
        ids.append(nxt)
        used.add(nxt)
    return ids


def resolve_prompts(prompts: Sequence[ObjectPrompt], timestamps: np.ndarray, height: int, width: int) -> list[Seed]:
    """Check every prompt against the video and turn it into a seed; the first misfit raises."""
    seeds: list[Seed] = []
    seen: set[tuple[int, int]] = set()
    for k, (p, oid) in enumerate(zip(prompts, assign_ids(prompts), strict=True)):
        where = f"prompt {k} ({p.kind}, object {oid})"
        frame = prompt_frame(p, timestamps, where)
        if (oid, frame) in seen:
            raise TrackerInputError(f"{where}: object {oid} has two prompts on frame {frame}; combine them")
        seen.add((oid, frame))
        box = _check_box(p.box, height, width, where) if p.box is not None else None
        if p.points:
            _check_points(p, height, width, where)
        mask = _check_mask(p.mask_rle, height, width, where) if p.mask_rle is not None else None
        seeds.append(Seed(object_id=oid, source="prompt", frame=frame, prompt=p, box=box, mask_rle=mask))
    return seeds


# ---------------------------------------------------------------------------------------------
# Automatic discovery
# ---------------------------------------------------------------------------------------------


@dataclass
class Candidate:
    """An object proposed on a keyframe: its (H, W) bool mask and a quality score in [0, 1]."""

    mask: np.ndarray
    score: float


Discoverer = Callable[[np.ndarray], Sequence[Candidate]]


class Sam2Discoverer:
    """SAM 2 automatic mask generation on one RGB frame, via transformers' `mask-generation` pipeline.

    The pipeline's own three steps (point-grid preprocessing with the image embedding computed once,
    batched mask prediction with predicted-IoU / stability filtering, box NMS across batches) are
    called directly instead of through `pipeline(...)(image)`: the generic `__call__` walks every
    output, including the run-length lists of every proposed mask, element by element to move it
    between devices, which took 4 of 4.5 s per keyframe on the tiny model.
    """

    def __init__(self, bundle: Any, *, points_per_side: int = 32, points_per_batch: int = 64,
                 pred_iou_thresh: float = 0.88, stability_score_thresh: float = 0.95, nms_iou: float = 0.7) -> None:
        from transformers import pipeline

        self.pipe = pipeline("mask-generation", model=bundle.image_model,
                             image_processor=bundle.processor.image_processor, device=bundle.device)
        self.points_per_side = points_per_side
        self.points_per_batch = points_per_batch
        self.forward_kwargs = {"pred_iou_thresh": pred_iou_thresh, "stability_score_thresh": stability_score_thresh}
        self.nms_iou = nms_iou

    def __call__(self, frame: np.ndarray) -> list[Candidate]:
        from PIL import Image

        outputs = []
        with torch.inference_mode():
            for inputs in self.pipe.preprocess(Image.fromarray(frame), points_per_batch=self.points_per_batch,
                                               points_per_crop=self.points_per_side):
                out = self.pipe._forward(inputs, **self.forward_kwargs)
                out["iou_scores"] = out["iou_scores"].float()  # bf16 scores vs fp32 boxes break torchvision's NMS
                outputs.append(out)
        result = self.pipe.postprocess(outputs, crops_nms_thresh=self.nms_iou)
        return [Candidate(mask=m.cpu().numpy().astype(bool), score=float(s))
                for m, s in zip(result["masks"], result["scores"], strict=True)]


# ---------------------------------------------------------------------------------------------
# One SAM 2 inference session, with the housekeeping transformers leaves to the caller
# ---------------------------------------------------------------------------------------------


@dataclass
class FrameResult:
    """Every object in the session on one frame: ids, RLE masks, areas, xyxy boxes, presence scores."""

    object_ids: list[int]
    rles: list[dict]
    areas: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray


class TrackingSession:
    """A transformers `Sam2VideoInferenceSession` fed one frame at a time, with bounded memory.

    Frames are streamed in (`model(session, frame_idx=i, frame=pixels)`) rather than loaded up front,
    so only the current frame is held. transformers keeps every tracked frame's memory and every
    processed frame for the session's lifetime; `prune` drops what SAM 2 can no longer attend to,
    and `compact` removes finished objects (the session has no way to remove one), both of which
    transformers does not offer.
    """

    def __init__(self, bundle: Any, height: int, width: int, *, offload_state: bool = True) -> None:
        self.bundle = bundle
        self.height, self.width = height, width
        state_device = "cpu" if offload_state else bundle.device
        self.session = bundle.processor.init_video_session(
            inference_device=bundle.device, inference_state_device=state_device, video_storage_device="cpu",
            dtype=bundle.dtype)
        self.session.video_height, self.session.video_width = height, width
        # The vision-feature cache holds only the current frame, which every object reads again:
        # keeping it on the inference device saves one host-to-device copy per object and frame.
        self.session.cache.inference_state_device = bundle.device
        cfg = bundle.model.config
        # Farthest tracked frame SAM 2 reads: num_maskmem - 1 memories, max_object_pointers - 1 pointers.
        self.window = max(int(cfg.num_maskmem), int(cfg.max_object_pointers_in_encoder))

    @property
    def object_ids(self) -> list[int]:
        return list(self.session.obj_ids)

    def add(self, seed: Seed) -> None:
        """Give SAM 2 a seed's prompt (box and/or points, or mask) on its frame.

        The processor *replaces* the session's list of objects with new inputs on every call, so
        objects added one by one before a step would all but the last be taken for tracked objects
        without memory; the list is therefore extended here instead.
        """
        proc, session = self.bundle.processor, self.session
        pending = list(session.obj_with_new_inputs)
        if seed.mask_rle is not None:
            proc.add_inputs_to_inference_session(session, frame_idx=seed.frame, obj_ids=[seed.object_id],
                                                 input_masks=decode_rle(seed.mask_rle))
        else:
            p = seed.prompt
            points = [[[list(pt) for pt in p.points]]] if p.points else None
            labels = [[list(p.labels)]] if p.points else None
            boxes = [[list(seed.box)]] if seed.box is not None else None
            proc.add_inputs_to_inference_session(session, frame_idx=seed.frame, obj_ids=[seed.object_id],
                                                 input_points=points, input_labels=labels, input_boxes=boxes,
                                                 original_size=(self.height, self.width))
        session.obj_with_new_inputs = pending + [seed.object_id] * (seed.object_id not in pending)

    def step(self, frame_idx: int, pixels: torch.Tensor, reverse: bool = False) -> FrameResult:
        """Track every object onto one frame; masks become RLE before leaving this method."""
        with torch.inference_mode():
            out = self.bundle.model(inference_session=self.session, frame_idx=frame_idx, frame=pixels,
                                    reverse=reverse)
            masks = self.bundle.processor.post_process_masks(
                [out.pred_masks], original_sizes=[[self.height, self.width]], binarize=True)[0][:, 0]
            scores = torch.sigmoid(out.object_score_logits.float().reshape(-1)).cpu().numpy()
        rles = encode_masks(masks.cpu().numpy())
        return FrameResult(object_ids=list(out.object_ids), rles=rles, areas=rle_areas(rles), boxes=rle_boxes(rles),
                           scores=scores)

    def prune(self, frame_idx: int, reverse: bool = False) -> None:
        """Forget what SAM 2 will not read again: tracked-frame memories beyond its window, processed
        frames, used inputs, and the full-resolution mask logits that transformers stores with every
        output although it uses them only within the step (the largest part of each output)."""
        session = self.session

        def behind(f: int, distance: int) -> bool:
            return (f - frame_idx if reverse else frame_idx - f) >= distance

        for idx in range(session.get_obj_num()):
            outputs = session.output_dict_per_obj[idx]["non_cond_frame_outputs"]
            for f in [f for f in outputs if behind(f, self.window)]:
                del outputs[f]
            for kind in ("cond_frame_outputs", "non_cond_frame_outputs"):
                for out in session.output_dict_per_obj[idx][kind].values():
                    out.pop("high_res_masks", None)
            for table in (session.frames_tracked_per_obj[idx], session.point_inputs_per_obj[idx],
                          session.mask_inputs_per_obj[idx]):
                for f in [f for f in table if behind(f, 1)]:
                    del table[f]
        if session.processed_frames:
            session.processed_frames.clear()

    def state_frames(self) -> int:
        """Most frames whose memory any one object holds (conditioning + tracked): the bounded quantity."""
        outs = self.session.output_dict_per_obj.values()
        return max((len(o["cond_frame_outputs"]) + len(o["non_cond_frame_outputs"]) for o in outs), default=0)

    def compact(self, keep: Iterable[int]) -> None:
        """Drop every object not in `keep`, carrying the others' state over unchanged.

        A new session receives the kept objects' inputs and outputs under new indices; SAM 2 tracks
        each object from its own state only, so the kept objects' results do not change.
        """
        from transformers import Sam2VideoInferenceSession

        keep = set(keep)
        old = self.session
        if keep >= set(old.obj_ids):
            return
        new = Sam2VideoInferenceSession(
            video_height=old.video_height, video_width=old.video_width, inference_device=old.inference_device,
            inference_state_device=old.inference_state_device, video_storage_device=old.video_storage_device,
            dtype=old.dtype, max_vision_features_cache_size=old.max_vision_features_cache_size)
        new.cache, new.processed_frames = old.cache, old.processed_frames
        for obj_id in old.obj_ids:
            if obj_id not in keep:
                continue
            src, dst = old.obj_id_to_idx(obj_id), new.obj_id_to_idx(obj_id)
            for name in ("point_inputs_per_obj", "mask_inputs_per_obj", "output_dict_per_obj",
                         "frames_tracked_per_obj"):
                getattr(new, name)[dst] = getattr(old, name)[src]
        new.obj_with_new_inputs = [o for o in old.obj_with_new_inputs if o in keep]
        self.session = new


# ---------------------------------------------------------------------------------------------
# The tracker
# ---------------------------------------------------------------------------------------------


@dataclass
class _Track:
    object_id: int
    source: str
    frames: dict[int, dict] = field(default_factory=dict)
    last_seen_ts: float = -math.inf


@dataclass
class _Video:
    """One `track` call's working state."""

    frames: np.ndarray
    timestamps: np.ndarray
    tracks: dict[int, _Track] = field(default_factory=dict)
    back_seeds: list[Seed] = field(default_factory=list)
    next_id: int = 1
    max_state_frames: int = 0
    max_objects_in_session: int = 0
    keyframes_searched: int = 0

    @property
    def height(self) -> int:
        return int(self.frames.shape[1])

    @property
    def width(self) -> int:
        return int(self.frames.shape[2])


def _check_frames(frames: Any, timestamps: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise TrackerInputError(f"frames must be a (T, H, W, 3) uint8 RGB array, got {frames.dtype} {frames.shape}")
    ts = np.asarray(timestamps, dtype=np.float64).reshape(-1)
    if len(ts) != len(frames):
        raise TrackerInputError(f"{len(frames)} frames but {len(ts)} timestamps")
    return frames, ts


def _setting(explicit: Any, folder: Mapping[str, Any], key: str, default: Any) -> Any:
    """An explicit argument, else the checkpoint folder's tracker default, else SAM 2's own default."""
    return explicit if explicit is not None else type(default)(folder.get(key, default))


class Tracker:
    """SAM 2 object tracking over a video's sampled frames (a plain class: no Ray inside)."""

    def __init__(self, model: str = "tiny", *, device: str | None = None, dtype: Any = None, max_objects: int = 8,
                 keyframe_interval_s: float = 2.0, chunk_size: int = 32, points_per_side: int | None = None,
                 points_per_batch: int = 64, pred_iou_thresh: float | None = None,
                 stability_score_thresh: float | None = None, nms_iou: float = 0.7, min_area_frac: float = 0.0005,
                 dedupe_iou: float = 0.7, dedupe_cover: float = 0.9, match_iou: float = 0.5, match_cover: float = 0.9,
                 retire_after_s: float | None = None, backfill_auto: bool = True, offload_state: bool = True,
                 discover: Discoverer | None = None) -> None:
        from models.sam2 import load_sam2

        if max_objects <= 0 or chunk_size <= 0 or keyframe_interval_s <= 0:
            raise ValueError("max_objects, chunk_size and keyframe_interval_s must be positive")
        self.bundle = load_sam2(model, device=device, dtype=dtype)
        self.name = self.bundle.name  # "tiny-sam2" for tiny, else the folder or hub id
        self.max_objects = max_objects
        self.keyframe_interval_s = keyframe_interval_s
        self.chunk_size = chunk_size
        self.min_area_frac = min_area_frac
        self.dedupe = {"dedupe_iou": dedupe_iou, "dedupe_cover": dedupe_cover}
        self.match = {"match_iou": match_iou, "match_cover": match_cover}
        self.retire_after_s = 3 * keyframe_interval_s if retire_after_s is None else retire_after_s
        self.backfill_auto = backfill_auto
        self.offload_state = offload_state
        folder = self.bundle.tracker_defaults
        self.discover: Discoverer = discover or Sam2Discoverer(
            self.bundle, points_per_batch=points_per_batch, nms_iou=nms_iou,
            points_per_side=_setting(points_per_side, folder, "points_per_side", 32),
            pred_iou_thresh=_setting(pred_iou_thresh, folder, "pred_iou_thresh", 0.88),
            stability_score_thresh=_setting(stability_score_thresh, folder, "stability_score_thresh", 0.95))
        self.last_stats: dict[str, Any] = {}

    # -- public -------------------------------------------------------------------------------

    def track(self, frames: np.ndarray, timestamps: Sequence[float],
              prompts: Sequence[ObjectPrompt] | None = None, discover: str | None = None) -> list[dict]:
        """Tracks of the prompted objects, or of automatically found ones when there are no prompts.

        `discover` says where automatic discovery runs: "keyframes" (the first frame and then every
        `keyframe_interval_s`), "first" (the first frame only: a later clip of a prompted video,
        where discovery only proposes continuations of the prompted objects for linking), "none";
        by default "keyframes" without prompts and "none" with them.

        Returns one dict per object (`object_id`, `source`, `frames`: per frame where the object is
        present its `frame_index`, `ts`, xyxy `bbox`, `area`, `score`, COCO `rle`), sorted by id.
        No prompts (None or empty) means automatic discovery. A prompted object stays in the output
        even if SAM 2 never sees it (no frames); an automatic one that vanished at once is dropped.
        Raises `TrackerInputError` for prompts that do not fit the video; finding nothing is `[]`.
        """
        started = time.perf_counter()
        frames, ts = _check_frames(frames, timestamps)
        video = _Video(frames=frames, timestamps=ts)
        if len(frames):
            seeds = resolve_prompts(prompts, ts, video.height, video.width) if prompts else []
            for s in seeds:
                video.tracks.setdefault(s.object_id, _Track(s.object_id, "prompt"))
            mode = discover or ("none" if seeds else "keyframes")
            if mode not in ("keyframes", "first", "none"):
                raise ValueError(f"discover must be 'keyframes', 'first' or 'none', got {mode!r}")
            if seeds or mode != "none":
                self._forward(video, seeds, mode)
            self._backward(video)
        self.last_stats = {
            "frames": len(frames), "objects": len(video.tracks), "seconds": time.perf_counter() - started,
            "max_state_frames": video.max_state_frames, "max_objects_in_session": video.max_objects_in_session,
            "keyframes_searched": video.keyframes_searched,
        }
        return [{"object_id": t.object_id, "source": t.source, "frames": [t.frames[i] for i in sorted(t.frames)]}
                for t in sorted(video.tracks.values(), key=lambda t: t.object_id) if t.frames or t.source == "prompt"]

    # -- passes -------------------------------------------------------------------------------

    def _chunks(self, frames: np.ndarray, start: int, stop: int, reverse: bool
                ) -> Iterable[tuple[list[int], torch.Tensor]]:
        """Frame indices start..stop (inclusive) in processing order, `chunk_size` at a time, preprocessed.

        Preprocessing per chunk keeps only `chunk_size` model-sized frames in memory, on the CPU.
        """
        indices = list(range(start, stop - 1, -1)) if reverse else list(range(start, stop + 1))
        for k in range(0, len(indices), self.chunk_size):
            chunk = indices[k:k + self.chunk_size]
            lo, hi = min(chunk), max(chunk)
            pixels = self.bundle.processor.video_processor(videos=[frames[lo:hi + 1]], device=self.bundle.device,
                                                           return_tensors="pt")
            yield chunk, pixels.pixel_values_videos[0].cpu()[[i - lo for i in chunk]]

    def _forward(self, video: _Video, seeds: list[Seed], discover: str) -> None:
        """Track from the first seed (or frame 0 when discovering) to the end of the video."""
        by_frame: dict[int, list[Seed]] = {}
        for s in seeds:
            by_frame.setdefault(s.frame, []).append(s)
        first_prompt: dict[int, Seed] = {}
        for s in sorted(seeds, key=lambda s: s.frame):
            first_prompt.setdefault(s.object_id, s)
        video.back_seeds.extend(s for s in first_prompt.values() if s.frame > 0)
        keyframes = {"keyframes": keyframe_indices(video.timestamps, self.keyframe_interval_s), "first": [0]}.get(discover, [])
        key_set, prev_key = set(keyframes), {k: (keyframes[j - 1] if j else -1) for j, k in enumerate(keyframes)}
        start = 0 if keyframes else min(by_frame)
        session = TrackingSession(self.bundle, video.height, video.width, offload_state=self.offload_state)
        for chunk, pixels in self._chunks(video.frames, start, len(video.frames) - 1, reverse=False):
            for j, i in enumerate(chunk):
                for s in by_frame.get(i, []):
                    session.add(s)
                result = session.step(i, pixels[j]) if session.object_ids else None
                if result is not None:
                    self._record(video, result, i, lambda oid: True)
                if i in key_set:
                    self._retire(video, session, i)
                    new = self._discover_new(video, session, i, result, stop=prev_key[i] + 1)
                    if new:  # re-run the frame with the new objects; the others' masks come out the same
                        for s in new:
                            session.add(s)
                        self._record(video, session.step(i, pixels[j]), i, lambda oid: True)
                session.prune(i)
                self._account(video, session)
            self._retire(video, session, chunk[-1])

    def _backward(self, video: _Video) -> None:
        """Track each late-starting object from its seed back to its `stop` frame.

        One session serves all of them: objects join at their seed frame and leave (`compact`) at
        the chunk boundary after their `stop`.
        """
        seeds = [s for s in video.back_seeds if s.frame > s.stop]
        if not seeds:
            return
        by_frame: dict[int, list[Seed]] = {}
        for s in seeds:
            by_frame.setdefault(s.frame, []).append(s)
        ranges = {s.object_id: (s.stop, s.frame) for s in seeds}
        session = TrackingSession(self.bundle, video.height, video.width, offload_state=self.offload_state)
        for chunk, pixels in self._chunks(video.frames, max(by_frame), min(s.stop for s in seeds), reverse=True):
            for j, i in enumerate(chunk):
                for s in by_frame.get(i, []):
                    session.add(s)
                if not session.object_ids:
                    continue
                result = session.step(i, pixels[j], reverse=True)
                self._record(video, result, i, lambda oid, i=i: ranges[oid][0] <= i < ranges[oid][1])
                session.prune(i, reverse=True)
                self._account(video, session)
            session.compact(oid for oid in session.object_ids if ranges[oid][0] < chunk[-1])

    # -- per-frame pieces ---------------------------------------------------------------------

    def _record(self, video: _Video, result: FrameResult, i: int, wanted: Callable[[int], bool]) -> None:
        """Append each present object's frame to its track (absent objects, empty masks, are omitted)."""
        ts = float(video.timestamps[i])
        for k, oid in enumerate(result.object_ids):
            if result.areas[k] == 0 or not wanted(oid):
                continue
            track = video.tracks[oid]
            track.frames[i] = {
                "frame_index": int(i), "ts": ts, "bbox": [float(v) for v in result.boxes[k]],
                "area": int(result.areas[k]), "score": round(float(result.scores[k]), 6), "rle": result.rles[k],
            }
            track.last_seen_ts = max(track.last_seen_ts, ts)

    def _account(self, video: _Video, session: TrackingSession) -> None:
        video.max_state_frames = max(video.max_state_frames, session.state_frames())
        video.max_objects_in_session = max(video.max_objects_in_session, len(session.object_ids))

    def _retire(self, video: _Video, session: TrackingSession, i: int) -> None:
        """Drop automatic objects unseen for `retire_after_s` from the session (their tracks stay)."""
        now = float(video.timestamps[i])
        stale = [oid for oid in session.object_ids
                 if video.tracks[oid].source == "auto" and now - video.tracks[oid].last_seen_ts > self.retire_after_s]
        if stale:
            session.compact(oid for oid in session.object_ids if oid not in stale)

    def _discover_new(self, video: _Video, session: TrackingSession, i: int, result: FrameResult | None,
                      stop: int) -> list[Seed]:
        """Seeds for the objects found on keyframe `i` that no live track covers, within `max_objects`."""
        video.keyframes_searched += 1
        room = self.max_objects - sum(1 for oid in session.object_ids if video.tracks[oid].source == "auto")
        if room <= 0:
            return []
        candidates = list(self.discover(video.frames[i]))
        if not candidates:
            return []
        rles = encode_masks(np.stack([np.asarray(c.mask, dtype=bool) for c in candidates]))
        min_area = int(self.min_area_frac * video.height * video.width)
        kept = select_candidates(rles, [c.score for c in candidates], max_objects=self.max_objects,
                                 min_area=min_area, **self.dedupe)
        in_session = set(session.object_ids)
        live = [] if result is None else [r for oid, r, a in zip(result.object_ids, result.rles, result.areas,
                                                                           strict=True)
                                          if a > 0 and oid in in_session]
        fresh = [kept[k] for k in uncovered([rles[k] for k in kept], live, **self.match)][:room]
        seeds = []
        for k in fresh:
            oid = self._next_id(video)
            video.tracks[oid] = _Track(oid, "auto")
            seed = Seed(object_id=oid, source="auto", frame=i, mask_rle=rles[k], stop=max(stop, 0))
            seeds.append(seed)
            if self.backfill_auto and seed.frame > seed.stop:
                video.back_seeds.append(seed)
        return seeds

    @staticmethod
    def _next_id(video: _Video) -> int:
        while video.next_id in video.tracks:
            video.next_id += 1
        return video.next_id


# ---------------------------------------------------------------------------------------------
# The Ray Data stage
# ---------------------------------------------------------------------------------------------


def _failed(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and str(value) != ""


class TrackerStage:
    """The callable class that Ray Data's `map_batches` instantiates once per actor (GPU if there is one).

    Adds `tracks_json` and `tracker` to each row. A video that fails here (bad prompts, a model
    error) gets `error` set and `tracks_json` "[]"; rows that failed upstream pass through untouched,
    and the other videos of the batch go on.
    """

    def __init__(self, model: str = "tiny", **tracker_kwargs: Any) -> None:
        # Frames arrive as read-only views of Ray's object store; the SAM 2 processor only reads them,
        # so torch's warning about non-writable arrays is noise in every worker log.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        self.tracker = Tracker(model, **tracker_kwargs)
        self.clock = BusyClock("tracker")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["video_id"])
        errors = list(batch["error"]) if "error" in batch else [None] * n
        tracks_json = []
        kinds = list(batch["kind"]) if "kind" in batch else [""] * n
        with self.clock.batch():
            for i in range(n):
                if kinds[i] == "track":  # a finished video's whole-track request: its masks are given
                    tracks_json.append(batch["tracks_json"][i])
                    continue
                if _failed(errors[i]):
                    tracks_json.append("[]")
                    continue
                tracks, errors[i] = self._one(batch, i)
                tracks_json.append(json.dumps(tracks, separators=(",", ":")))
        out = dict(batch)
        out["tracks_json"] = np.array(tracks_json, dtype=object)
        out["tracker"] = np.array([self.tracker.name] * n, dtype=object)
        out["error"] = np.array(errors, dtype=object)
        out.update(self.clock.columns(n))
        return out

    def _one(self, batch: Mapping[str, np.ndarray], i: int) -> tuple[list[dict], str | None]:
        """One video's tracks, or ([], readable error): never raises."""
        video_id = str(batch["video_id"][i])
        try:
            frames = np.asarray(batch["frames"][i])
            timestamps = times_column(batch["timestamps"][i])
            if frames.size == 0 or len(timestamps) == 0:
                return [], None
            text = str(batch["prompts_json"][i]) if "prompts_json" in batch and batch["prompts_json"][i] else ""
            prompts = prompts_from_json(text) if text else None
            mode = str(batch["discover"][i]) if "discover" in batch and batch["discover"][i] else None
            return self.tracker.track(frames, timestamps, prompts, discover=mode), None
        except (TrackerInputError, PromptsError) as exc:
            log.warning("video %s: bad prompts: %s", video_id, exc)
            return [], f"tracker: {exc}"
        except Exception as exc:  # noqa: BLE001 - one video's failure must not stop the others
            log.exception("video %s: tracking failed", video_id)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return [], f"tracker: tracking failed: {type(exc).__name__}: {exc}"
