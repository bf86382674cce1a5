"""Masks as COCO RLE, the form they take in every table and between stages.

pycocotools does the encoding, decoding, areas, boxes and IoU; what is here only converts between its
byte counts and the tables' string counts, and derives the cover measure that it lacks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_util


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
