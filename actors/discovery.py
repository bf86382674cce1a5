"""Automatic discovery: SAM 2's proposals on a keyframe, deduplicated and matched against live tracks.

The selection rules are pure functions of RLE masks and scores (unit-tested without a model); the
proposer is SAM 2's automatic mask generation, or any callable with the same signature.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from actors.rle import mask_overlaps, rle_areas


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
