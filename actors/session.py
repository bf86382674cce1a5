"""One SAM 2 inference session, with the housekeeping transformers leaves to the caller (bounded
memory on long clips, removing finished objects, masks turned into RLE as they leave the model).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from actors.rle import decode_rle, encode_masks, rle_areas, rle_boxes
from actors.seeds import Seed
from models.timing import PhaseTimes


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

    def __init__(self, bundle: Any, height: int, width: int, *, offload_state: bool = True,
                 times: PhaseTimes | None = None) -> None:
        self.bundle = bundle
        self.times = times or PhaseTimes()
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
        with torch.inference_mode(), self.times("propagation"):
            out = self.bundle.model(inference_session=self.session, frame_idx=frame_idx, frame=pixels,
                                    reverse=reverse)
            masks = self.bundle.processor.post_process_masks(
                [out.pred_masks], original_sizes=[[self.height, self.width]], binarize=True)[0][:, 0]
            scores = torch.sigmoid(out.object_score_logits.float().reshape(-1)).cpu().numpy()
            masks = masks.cpu().numpy()
        with self.times("mask_encoding"):
            rles = encode_masks(masks)
            return FrameResult(object_ids=list(out.object_ids), rles=rles, areas=rle_areas(rles),
                               boxes=rle_boxes(rles), scores=scores)

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
