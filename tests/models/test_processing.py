"""SAOT preprocessing and prompt rendering, checked against the rules in the parity README."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from models.config import ImageProcessorSettings
from models.processing_pixelrefer import (
    InputError,
    RegionInput,
    SequenceInput,
    chat_prompt,
    full_crop,
    full_region_text,
    full_user_content,
    lite_crop,
    lite_region_text,
    lite_user_content,
    normalise_mask,
    patchify,
    pixel_budget,
    plan_encoder_inputs,
    prepare_encoder_image,
    replace_regions,
    scale_rate,
    smart_resize,
    video_block,
)

SETTINGS = ImageProcessorSettings()  # released: merge 2, mm_max_length 8192, min_pixels 3136


def _rect(h, w, r0, c0, rh, rw):
    m = np.zeros((h, w), np.uint8)
    m[r0 : r0 + rh, c0 : c0 + rw] = 1
    return m


def _frame(h, w, seed=0):
    return (np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8)


# -- scale rule ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "area,lite,full",
    [
        (150, 7, 7),  # small: ceil(sqrt(196*32/150)) = ceil(6.47)
        (4000, 2, 2),  # medium: ceil(sqrt(1.568))
        (6272, 1, 1),  # exactly 32 patches
        (9800, 1, 1),  # |M|/196 = 50: not above Lite's threshold
        (19600, 1 / math.sqrt(2), 1),  # 100 patches: Lite shrinks, full (T = 100) does not
        (39200, 0.5, 1 / math.sqrt(2)),  # 200 patches: both shrink
    ],
)
def test_scale_rule(area, lite, full):
    assert scale_rate(area, 32, 50.0) == pytest.approx(lite, rel=1e-12)
    assert scale_rate(area, 32, 100.0, float32_like_torch=True) == pytest.approx(full, rel=1e-7)


def test_small_mask_crop_padding_and_clipping():
    frame = _frame(100, 120)
    mask = _rect(100, 120, 20, 30, 10, 15)  # area 150 -> s = 7
    lite = lite_crop(frame, mask)
    # top clipped at 0, 28 px elsewhere; Lite's end is exclusive, its box inclusive
    assert lite.box == (0, 2, 57, 72) and lite.scale == 7
    assert lite.source.shape[:2] == (58, 71)
    assert lite.crop_hw == (math.ceil(58 * 7 / 14) * 14, math.ceil(71 * 7 / 14) * 14) == (406, 504)
    assert lite.grid_hw == (29, 36) and lite.image.shape == (406, 504, 3)
    np.testing.assert_array_equal(lite.image, cv2.resize(frame[0:58, 2:73], (504, 406), interpolation=cv2.INTER_LINEAR))
    np.testing.assert_array_equal(
        lite.mask_grid, cv2.resize(mask[0:58, 2:73].astype(np.float32), (36, 29), interpolation=cv2.INTER_LINEAR)
    )
    assert lite.mask_grid.dtype == np.float32 and lite.num_tokens == 32
    full = full_crop(frame, mask)
    # full: the box end is min(h-1, r1+28) and the crop stops *before* it (drops a row and a column)
    assert full.box == (0, 2, 57, 72) and full.source.shape[:2] == (57, 70)
    assert full.mask_grid.dtype == np.uint8 and set(np.unique(full.mask_grid)) <= {0, 1}
    assert full.num_tokens == min(32, int(full.mask_grid.sum()))


def test_large_mask_is_downscaled_with_area_interpolation():
    frame = _frame(300, 400)
    mask = _rect(300, 400, 20, 20, 200, 200)  # 40000 px = 204 patches
    lite = lite_crop(frame, mask)
    s = 1 / math.sqrt(40000 / 196 / 50)
    assert lite.scale == pytest.approx(s)
    h, w = lite.source.shape[:2]
    assert lite.crop_hw == (math.ceil(h * s / 14) * 14, math.ceil(w * s / 14) * 14)
    np.testing.assert_array_equal(lite.image, cv2.resize(lite.source, lite.crop_hw[::-1], interpolation=cv2.INTER_AREA))
    full = full_crop(frame, mask)
    assert full.scale == pytest.approx(1 / math.sqrt(40000 / 196 / 100), rel=1e-6)
    np.testing.assert_array_equal(
        full.image, cv2.resize(full.source, full.crop_hw[::-1], interpolation=cv2.INTER_LINEAR)
    )


def test_medium_mask_keeps_scale_one():
    frame = _frame(200, 200)
    mask = _rect(200, 200, 50, 50, 80, 100)  # 8000 px: 1 < |M|/196 < 50
    crop = lite_crop(frame, mask)
    assert crop.scale == 1 and crop.crop_hw == (math.ceil(136 / 14) * 14, math.ceil(156 / 14) * 14)


def test_empty_mask_is_rejected():
    with pytest.raises(InputError, match="empty mask"):
        lite_crop(_frame(50, 50), np.zeros((50, 50), np.uint8))
    with pytest.raises(InputError, match="empty mask"):
        full_crop(_frame(50, 50), np.zeros((50, 50), np.uint8))


# -- encoder input -----------------------------------------------------------------------------------
def test_smart_resize_branches():
    assert smart_resize(112, 140, 28, 3136, 10**7) == (112, 140)  # already a multiple
    assert smart_resize(100, 130, 14, 3136, 10**7) == (98, 126)  # rounded to the nearest
    assert smart_resize(10, 300, 14, 3136, 10**7) == (14, 420)  # short side below factor: scaled up
    h, w = smart_resize(1000, 1000, 14, 3136, 100000)  # over budget: floor to the budget
    assert h * w <= 100000 and h % 14 == 0 and (h, w) == (308, 308)
    assert smart_resize(30, 30, 14, 3136, 10**7) == (56, 56)  # under min_pixels: ceil up
    with pytest.raises(InputError, match="aspect ratio"):
        smart_resize(20, 5000, 14, 3136, 10**7)


def test_pixel_budget_is_per_image_of_the_call():
    assert SETTINGS.max_pixels == 8192 * 4 * 196
    assert pixel_budget(SETTINGS, 1, 1) == 8192 * 196
    assert pixel_budget(SETTINGS, 1, 4) == 8192 * 196 // 4
    assert pixel_budget(SETTINGS, 2, 3) == 8192 * 4 * 196 // 3
    # 15 masks shrink even the 336x336 context images
    assert prepare_encoder_image(_frame(336, 336), SETTINGS, 1, 14).grid_hw == (24, 24)
    assert prepare_encoder_image(_frame(336, 336), SETTINGS, 1, 15).grid_hw == (23, 23)


def test_patchify_raster_and_merge_order():
    img = _frame(28, 56)
    x = ((img.astype(np.float64) / 255).astype(np.float32) - np.float32(0.5)) / np.float32(0.5)
    raster = patchify(img, SETTINGS, 1)
    assert raster.shape == (8, 588) and raster.dtype == np.float32
    np.testing.assert_array_equal(raster[5], x[14:28, 14:28].transpose(2, 0, 1).reshape(-1))  # row 1, col 1
    merged = patchify(img, SETTINGS, 2)
    # merge order: 2x2 block 0 = patches (0,0),(0,1),(1,0),(1,1), then block 1
    order = [0, 1, 4, 5, 2, 3, 6, 7]
    np.testing.assert_array_equal(merged, raster[order])


def test_plan_shares_images_and_applies_quirk_l3():
    frames = [_frame(96, 128, s) for s in range(2)]
    a0, a1 = lite_crop(frames[0], _rect(96, 128, 10, 10, 20, 20)), lite_crop(frames[1], _rect(96, 128, 12, 14, 20, 20))
    b0 = lite_crop(frames[0], _rect(96, 128, 50, 60, 30, 40))
    regions = [RegionInput(a0, 0, ("a", 0)), RegionInput(a1, 1, ("a", 1)), RegionInput(b0, 0, ("b", 0))]
    fixed = plan_encoder_inputs("lite", [SequenceInput([], regions)], frames, SETTINGS)
    upstream = plan_encoder_inputs("lite", [SequenceInput([], regions)], frames, SETTINGS, upstream_local_crop=True)
    k_fixed, k_up = fixed.region_keys[0], upstream.region_keys[0]
    assert k_fixed[2][1] != k_fixed[0][1]  # each mask its own 224 crop
    assert k_up[2][1] == k_up[0][1]  # L3: b on frame 0 gets a's crop
    assert k_fixed[0][2] == k_fixed[2][2]  # one 336 image per frame
    # two sequences with the same M share every image
    both = plan_encoder_inputs("lite", [SequenceInput([], regions), SequenceInput([], regions[::-1])], frames, SETTINGS)
    assert len(both.images) == len(fixed.images)


# -- prompts -----------------------------------------------------------------------------------------
def test_lite_region_text():
    assert lite_region_text([2], None) == "[<REGION><REGION>]"
    assert lite_region_text([1, 2], [0.0, 1.25]) == "[Time 0.0:<REGION>,Time 1.2:<REGION><REGION>]"
    assert full_region_text(3) == "[<REGION><REGION><REGION>]"


def test_replace_regions_counts():
    assert replace_regions("a <region> b <region>.", ["X", "Y"]) == "a X b Y."
    with pytest.raises(InputError, match="2 <region> placeholder"):
        replace_regions("a <region> b <region>.", ["X"])


def test_chat_template_and_tags():
    assert chat_prompt("hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert lite_user_content("  <video>\nDescribe X. ") == "Describe X."
    block = video_block([0.0, 1.0], 2)
    assert block == "Time 0.0s:<image><image>,Time 1.0s:<image><image>\n"
    assert full_user_content("<video>\nDescribe X.", block, "<video>") == block + "Describe X."
    assert full_user_content("Describe X.", block, "<video>") == block + "Describe X."  # frames first
    assert full_user_content("Look: <video> then X.", block, "<video>") == "Look:" + block + "then X."


def test_normalise_mask():
    m = normalise_mask(np.array([[0, 255], [7, 0]], np.uint8), (2, 2), "m")
    np.testing.assert_array_equal(m, [[0, 1], [1, 0]])
    assert normalise_mask(np.array([[True, False]]), (1, 2), "m").dtype == np.uint8
    with pytest.raises(InputError, match=r"mask shape \(2, 2\) != frame size \(3, 2\)"):
        normalise_mask(np.zeros((2, 2)), (3, 2), "object 0, frame 1")


def test_full_mask_grid_is_torch_uint8_bilinear():
    frame, mask = _frame(80, 90), _rect(80, 90, 30, 30, 7, 9)
    crop = full_crop(frame, mask)
    src = torch.from_numpy(mask[crop.box[0] : crop.box[2], crop.box[1] : crop.box[3]].copy())[None, None]
    expected = torch.nn.functional.interpolate(src, size=crop.grid_hw, mode="bilinear", align_corners=False)[0, 0]
    np.testing.assert_array_equal(crop.mask_grid, expected.numpy())
