"""IoU matching, de-duplication and keyframes, on synthetic masks with known answers (no model)."""

from __future__ import annotations

import numpy as np
import pytest

from actors.discovery import select_candidates, uncovered
from actors.rle import decode_rle, encode_masks, mask_overlaps, rle_areas, rle_boxes
from actors.seeds import keyframe_indices

H, W = 40, 60


def box_mask(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def rles(*masks: np.ndarray) -> list[dict]:
    return encode_masks(np.stack(masks))


def test_rle_round_trip_area_and_box():
    mask = box_mask(5, 7, 15, 10)
    (rle,) = rles(mask)
    assert rle["size"] == [H, W] and isinstance(rle["counts"], str)
    assert np.array_equal(decode_rle(rle), mask)
    assert rle_areas([rle]).tolist() == [30]
    assert rle_boxes([rle]).tolist() == [[5.0, 7.0, 15.0, 10.0]]  # exclusive far edge
    assert encode_masks(np.zeros((0, H, W), bool)) == []


def test_overlaps_iou_and_cover():
    a = box_mask(0, 0, 10, 10)  # 100 px
    b = box_mask(5, 0, 15, 10)  # 100 px, 50 shared
    part = box_mask(2, 2, 6, 6)  # 16 px inside a
    far = box_mask(40, 30, 50, 40)
    iou, cover = mask_overlaps(rles(a), rles(b, part, far))
    assert iou[0].tolist() == pytest.approx([50 / 150, 16 / 100, 0.0])
    assert cover[0].tolist() == pytest.approx([0.5, 1.0, 0.0])
    empty_iou, empty_cover = mask_overlaps(rles(a), [])
    assert empty_iou.shape == empty_cover.shape == (1, 0)


def test_select_drops_duplicates_parts_and_specks_and_keeps_the_best():
    whole = box_mask(0, 0, 20, 20)
    near_copy = box_mask(0, 0, 20, 19)  # IoU 0.95 with whole
    part = box_mask(2, 2, 8, 8)  # inside whole
    other = box_mask(30, 5, 50, 25)
    speck = box_mask(55, 35, 57, 37)  # 4 px
    candidates = rles(near_copy, whole, part, other, speck)
    scores = [0.90, 0.95, 0.99, 0.80, 0.99]
    kept = select_candidates(candidates, scores, max_objects=8, min_area=10)
    assert kept == [1, 3]  # part and near_copy lose to `whole`; the speck is too small
    # Keeping the part when cover is not checked: then the part (best score) comes first.
    assert select_candidates(candidates, scores, max_objects=8, min_area=10, dedupe_cover=1.01) == [2, 1, 3]
    assert select_candidates(candidates, scores, max_objects=1, min_area=10) == [1]


def test_a_whole_replaces_its_parts_at_the_best_parts_rank():
    left, right = box_mask(0, 0, 10, 20), box_mask(10, 0, 20, 20)
    whole = box_mask(0, 0, 20, 20)
    other = box_mask(40, 0, 50, 10)
    candidates = rles(left, other, right, whole)
    assert select_candidates(candidates, [0.99, 0.98, 0.97, 0.90], max_objects=8) == [3, 1]


def test_select_ranks_near_equal_scores_by_area():
    small, large = box_mask(0, 0, 5, 5), box_mask(20, 0, 40, 20)
    assert select_candidates(rles(small, large), [0.901, 0.899], max_objects=2) == [1, 0]
    assert select_candidates(rles(small, large), [0.95, 0.90], max_objects=2) == [0, 1]
    assert select_candidates([], [], max_objects=3) == []


def test_uncovered_candidates_start_new_tracks():
    track_a = box_mask(0, 0, 20, 20)
    track_b = box_mask(30, 0, 50, 20)
    moved_a = box_mask(2, 0, 22, 20)  # IoU 18*20 / (22*20) = 0.82
    part_of_b = box_mask(35, 5, 40, 10)  # inside b: covered
    newcomer = box_mask(10, 25, 30, 40)
    half_on_a = box_mask(10, 0, 30, 20)  # IoU 1/3, cover 0.5: a different object
    candidates = rles(moved_a, part_of_b, newcomer, half_on_a)
    assert uncovered(candidates, rles(track_a, track_b)) == [2, 3]
    assert uncovered(candidates, []) == [0, 1, 2, 3]
    assert uncovered(candidates, rles(track_a, track_b), match_iou=0.3) == [2]


def test_keyframes_follow_timestamps_not_indices():
    assert keyframe_indices([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0], 1.0) == [0, 2, 4, 6]
    # Variable frame rate: dense first half, sparse second half.
    vfr = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.8, 1.1, 1.4, 1.7]
    assert keyframe_indices(vfr, 0.5) == [0, 5, 7, 9]
    assert keyframe_indices([3.0, 3.2, 5.1], 2.0) == [0, 2]  # relative to the first frame's time
    assert keyframe_indices([], 2.0) == []
