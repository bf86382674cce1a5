"""CPU preprocessing of PixelRefer / PixelRefer-Lite, numerically identical to the authors' code.

Every step here decides *which pixels* the vision tower sees, so each one follows upstream exactly
(file:line references are to alibaba-damo-academy/PixelRefer @ 2a18ec7, see
``../shared/parity/README.md``); the docstrings say where a library call would differ.

Scale-Adaptive Object Tokenizer (SAOT) input, per mask:

* **crop**: the mask's bounding box padded by 2 patches (28 px) on each side, clipped to the frame.
  Lite crops ``[top, bottom_excl)`` and reports the box inclusively; full reports
  ``min(h-1, r1+28)`` and crops up to that row *exclusive*, so its crop drops the last row/column.
* **scale rule**: ``s = ceil(sqrt(196 * n / |M|))``; if ``s == 1`` and ``|M|/196 > T`` then
  ``s = 1/sqrt((|M|/196)/T)`` with ``T = 50`` (Lite) or ``100`` (full).
* **resize** to ``ceil(side*s/14)*14``: Lite uses cv2 INTER_LINEAR when a side grows and INTER_AREA
  otherwise, full always INTER_LINEAR.
* **mask to patch grid**: Lite resizes the float mask straight to the grid with cv2 bilinear
  (quirk L4); full uses ``torch.nn.functional.interpolate`` bilinear on the uint8 mask (rounded).
* Lite context images: the whole frame resized to 336x336 and the *unresized* crop to 224x224, both
  cv2 INTER_AREA. Quirk L3 (upstream caches the 224 crop per frame, so a second object on a frame
  gets the first object's crop) is a bug; we give each mask its own crop unless the caller asks for
  ``upstream_local_crop`` (the selection happens in ``modeling_pixelrefer``).

Encoder input (upstream ``DAMOVLImageProcessor``): ``smart_resize`` against a *per-image* pixel budget
``max_pixels // number_of_images_in_the_call`` (this matters for many masks: 15+ masks shrink even the
336 frames), PIL bicubic when the size changes, ``(x/255 - mean)/std`` in float32, and patches
flattened as (C, 14, 14) in raster order (merge size 1) or in 2x2 merge groups (merge size 2).

Prompts: upstream's own chat template (quirk L10: the processor overwrites the tokenizer's template),
rendered here as plain string building; ``<region>`` expansion as in each framework's ``mm_infer``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Hashable, Literal, Sequence

import cv2
import numpy as np
import torch
from PIL import Image

from .config import IMAGE_TAG, IMAGE_TOKEN, REGION_PLACEHOLDER, REGION_TOKEN, VIDEO_TAG, ImageProcessorSettings

PATCH_SIZE = 14
CROP_PAD_PATCHES = 2
OMEGA = PATCH_SIZE * PATCH_SIZE  # 196 pixels per patch
LITE_GLOBAL_SIZE = 336
LITE_LOCAL_SIZE = 224

Framework = Literal["lite", "full"]


class InputError(ValueError):
    """The frames, masks or prompts given to the model are not usable; the message names the problem."""


# ---------------------------------------------------------------------------------------------------
# SAOT: crop, scale rule, resize, mask to grid
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MaskCrop:
    """One mask prepared for the object tokenizer.

    ``box`` is (top, left, bottom, right) with inclusive bottom/right, exactly what upstream passes to
    the position embedding (which then reads it as x0, y0, x1, y1: quirk L2, reproduced downstream).
    """

    box: tuple[int, int, int, int]
    frame_hw: tuple[int, int]
    crop_hw: tuple[int, int]  # the crop after the scale rule (multiples of 14), before smart_resize
    grid_hw: tuple[int, int]  # crop_hw // 14: the grid the mask is resized to
    area: int
    scale: float
    image: np.ndarray  # resized crop, uint8 HxWx3
    mask_grid: np.ndarray  # Lite: float32 (cv2 bilinear); full: uint8 (torch bilinear on uint8)
    source: np.ndarray  # the unresized crop (Lite's 224 local context is made from it)
    num_tokens: int  # tokens written into the prompt for this mask (Lite: mask_num; full: min(n, cells))


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Inclusive (r0, c0, r1, c1) of the nonzero pixels, or None for an empty mask.

    Equal to cv2.boundingRect (Lite) and ``np.where(mask == 1)`` (full) on 0/1 masks; two
    ``np.any`` projections are cheaper than collecting every nonzero coordinate on HD frames.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]), int(cols[-1])


def scale_rate(area: int, mask_num: int, threshold: float, *, float32_like_torch: bool = False) -> float:
    """SAOT scale factor ``s`` for a mask of ``area`` pixels.

    ``float32_like_torch`` reproduces full's arithmetic, where ``mask.sum()`` is a torch int tensor so
    the divisions run in float32 (``mm_utils.py:43-47``); Lite divides Python ints (float64).
    """
    if float32_like_torch:
        f_area = np.float32(area)
        s = math.ceil(math.sqrt(float(np.float32(OMEGA * mask_num) / f_area)))
        if s == 1:
            ratio = np.float32(f_area / np.float32(OMEGA))
            if ratio > threshold:
                s = 1 / math.sqrt(float(np.float32(ratio / np.float32(threshold))))
        return s
    s = math.ceil(math.sqrt(OMEGA * mask_num / max(area, 1)))
    if s == 1 and (area / OMEGA) > threshold:
        s = 1.0 / math.sqrt((area / OMEGA) / threshold)
    return s


def _scaled_side(side: int, s: float) -> int:
    return int(math.ceil((side * s) / PATCH_SIZE) * PATCH_SIZE)


def lite_crop(frame: np.ndarray, mask: np.ndarray, mask_num: int = 32, threshold: float = 50.0) -> MaskCrop:
    """Lite's ``resize_image_mask`` for one non-empty 0/1 uint8 mask (``pixelreferlite/mm_utils.py:45-164``)."""
    h, w = mask.shape
    bbox = mask_bbox(mask)
    if bbox is None:
        raise InputError("empty mask")
    r0, c0, r1, c1 = bbox
    pad = PATCH_SIZE * CROP_PAD_PATCHES
    top, left = max(0, r0 - pad), max(0, c0 - pad)
    bottom_excl, right_excl = min(h, r1 + 1 + pad), min(w, c1 + 1 + pad)
    box = (top, left, min(h - 1, bottom_excl - 1), min(w - 1, right_excl - 1))
    crop_h, crop_w = bottom_excl - top, right_excl - left
    source = frame[top:bottom_excl, left:right_excl]
    crop_mask = mask[top:bottom_excl, left:right_excl]
    area = int(mask.sum(dtype=np.int64))
    s = scale_rate(area, mask_num, threshold)
    rh, rw = _scaled_side(crop_h, s), _scaled_side(crop_w, s)
    # cv2 (not PIL/torch): the weights were trained on cv2's kernels and the choice of kernel is part
    # of the rule (LINEAR when a side grows, AREA otherwise).
    interp = cv2.INTER_LINEAR if (rh >= crop_h or rw >= crop_w) else cv2.INTER_AREA
    image = cv2.resize(np.ascontiguousarray(source), (rw, rh), interpolation=interp)
    gh, gw = rh // PATCH_SIZE, rw // PATCH_SIZE
    mask_grid = cv2.resize(crop_mask.astype(np.float32), (gw, gh), interpolation=cv2.INTER_LINEAR)
    return MaskCrop(
        box=box,
        frame_hw=(h, w),
        crop_hw=(rh, rw),
        grid_hw=(gh, gw),
        area=area,
        scale=s,
        image=image,
        mask_grid=mask_grid.reshape(gh, gw),
        source=source,
        num_tokens=mask_num,
    )


def full_crop(frame: np.ndarray, mask: np.ndarray, mask_num: int = 32, threshold: float = 100.0) -> MaskCrop:
    """Full PixelRefer's ``resize_image_mask`` for one non-empty 0/1 uint8 mask (``pixelrefer/mm_utils.py:25-58``)."""
    h, w = mask.shape
    bbox = mask_bbox(mask)
    if bbox is None:
        raise InputError("empty mask")
    r0, c0, r1, c1 = bbox
    pad = PATCH_SIZE * CROP_PAD_PATCHES
    box = (max(0, r0 - pad), max(0, c0 - pad), min(h - 1, r1 + pad), min(w - 1, c1 + pad))
    crop_h, crop_w = box[2] - box[0], box[3] - box[1]
    if crop_h <= 0 or crop_w <= 0:
        # Upstream's exclusive end leaves nothing to crop when the padded box is one pixel wide
        # (a frame narrower than 2 pixels); cv2 would fail with an opaque assertion.
        raise InputError(f"mask box {box} leaves an empty crop on a {h}x{w} frame")
    source = frame[box[0] : box[2], box[1] : box[3]]
    crop_mask = mask[box[0] : box[2], box[1] : box[3]]
    area = int(mask.sum(dtype=np.int64))
    s = scale_rate(area, mask_num, threshold, float32_like_torch=True)
    rh, rw = _scaled_side(crop_h, s), _scaled_side(crop_w, s)
    image = cv2.resize(np.ascontiguousarray(source), (rw, rh))  # cv2 default INTER_LINEAR, as upstream
    gh, gw = rh // PATCH_SIZE, rw // PATCH_SIZE
    # torch's uint8 bilinear (rounds to integers) is what upstream calls on the uint8 masks it is given.
    grid = torch.nn.functional.interpolate(
        torch.from_numpy(np.ascontiguousarray(crop_mask))[None, None],
        size=(gh, gw),
        mode="bilinear",
        align_corners=False,
    )[0, 0]
    num_tokens = min(mask_num, int(grid.sum()))
    return MaskCrop(
        box=box,
        frame_hw=(h, w),
        crop_hw=(rh, rw),
        grid_hw=(gh, gw),
        area=area,
        scale=s,
        image=image,
        mask_grid=grid.numpy(),
        source=source,
        num_tokens=num_tokens,
    )


def make_crop(framework: Framework, frame: np.ndarray, mask: np.ndarray, mask_num: int = 32) -> MaskCrop:
    if framework == "lite":
        return lite_crop(frame, mask, mask_num, 50.0)
    return full_crop(frame, mask, mask_num, 100.0)


def lite_global_image(frame: np.ndarray) -> np.ndarray:
    """Lite's F_global input: the whole frame squashed to 336x336 (aspect not kept), cv2 INTER_AREA."""
    return cv2.resize(frame, (LITE_GLOBAL_SIZE, LITE_GLOBAL_SIZE), interpolation=cv2.INTER_AREA)


def lite_local_image(crop: MaskCrop) -> np.ndarray:
    """Lite's F_local input: the padded, *unresized* crop squashed to 224x224, cv2 INTER_AREA."""
    return cv2.resize(
        np.ascontiguousarray(crop.source), (LITE_LOCAL_SIZE, LITE_LOCAL_SIZE), interpolation=cv2.INTER_AREA
    )


# ---------------------------------------------------------------------------------------------------
# Encoder input: smart_resize, pixel budget, normalise, patchify
# ---------------------------------------------------------------------------------------------------
def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Upstream's ``smart_resize`` (``damovl_encoder/image_processing.py:99-129``).

    transformers' VideoLLaMA3 version differs: it has no branch for a side shorter than ``factor``
    (upstream scales such images up first) and clamps sides to at least ``factor``.
    """
    if height < factor or width < factor:
        scale = factor / min(height, width)
        width = round(scale * width)
        height = round(scale * height)
    elif max(height, width) / min(height, width) > 200:
        raise InputError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if h_bar <= 0 or w_bar <= 0:
        raise InputError(f"image of {height}x{width} cannot be fitted into {max_pixels} pixels")
    return h_bar, w_bar


def pixel_budget(settings: ImageProcessorSettings, merge: int, num_images: int) -> int:
    """Per-image ``max_pixels`` of one processor call over ``num_images`` images at ``merge``.

    Upstream divides the processor's budget by ``(merge_size/merge)**2`` and then by the number of
    images in the call (``image_processing.py:273-279``).
    """
    base = int(settings.max_pixels / (settings.merge_size / merge) ** 2)
    return int(base // max(num_images, 1))


def encoder_size(hw: tuple[int, int], settings: ImageProcessorSettings, merge: int, num_images: int) -> tuple[int, int]:
    return smart_resize(
        hw[0], hw[1], settings.patch_size * merge, settings.min_pixels, pixel_budget(settings, merge, num_images)
    )


def resize_for_encoder(image: np.ndarray, size: tuple[int, int], settings: ImageProcessorSettings) -> np.ndarray:
    """Resize to ``size`` (h, w) with PIL as upstream's processor does; a no-op when already that size."""
    if image.shape[:2] == tuple(size):
        return image
    pil = Image.fromarray(np.ascontiguousarray(image))
    return np.asarray(pil.resize((size[1], size[0]), resample=Image.Resampling(settings.resample)))


def patchify(image: np.ndarray, settings: ImageProcessorSettings, merge: int) -> np.ndarray:
    """Normalise a uint8 HxWx3 image and flatten it into (gh*gw, 3*p*p) float32 patches.

    The rescale runs in float64 and is cast to float32 before ``(x - mean)/std`` in float32, like
    transformers 4.46's ``rescale``/``normalize`` that upstream calls; patches are (C, p, p) blocks in
    raster order for ``merge == 1`` and grouped in merge x merge blocks otherwise (the order the
    tower's RoPE positions and ``pixel_unshuffle`` expect).
    """
    p = settings.patch_size
    h, w = image.shape[:2]
    if h % (p * merge) or w % (p * merge):
        raise InputError(f"image of {h}x{w} is not a multiple of {p * merge}")
    x = (image.astype(np.float64) * settings.rescale_factor).astype(np.float32)
    x = (x - np.asarray(settings.image_mean, dtype=np.float32)) / np.asarray(settings.image_std, dtype=np.float32)
    x = x.transpose(2, 0, 1)  # C, H, W
    c = x.shape[0]
    gh, gw = h // p, w // p
    x = x.reshape(c, gh // merge, merge, p, gw // merge, merge, p).transpose(1, 4, 2, 5, 0, 3, 6)
    return np.ascontiguousarray(x.reshape(gh * gw, c * p * p))


@dataclass(frozen=True)
class EncoderImage:
    """One image ready for the vision tower: patches, patch grid and merge size."""

    patches: np.ndarray
    grid_hw: tuple[int, int]
    merge: int


def prepare_encoder_image(
    image: np.ndarray, settings: ImageProcessorSettings, merge: int, num_images: int
) -> EncoderImage:
    """``smart_resize`` against the per-image budget, PIL resize if needed, normalise and patchify.

    Not transformers' ``VideoLlama3ImageProcessor``: it yields the same pixel values for an image that
    needs no resize, but it has no per-call budget (``max_pixels // num_images``), a different
    ``smart_resize`` and a torchvision resize, so crops and frames that upstream shrinks would differ.
    """
    size = encoder_size(image.shape[:2], settings, merge, num_images)
    resized = resize_for_encoder(image, size, settings)
    return EncoderImage(
        patchify(resized, settings, merge), (size[0] // settings.patch_size, size[1] // settings.patch_size), merge
    )


# ---------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------
def format_time(t: float) -> str:
    """``round(t, 1)`` printed the way Python prints a float (``0.0``, ``12.3``), as both templates do."""
    return str(round(float(t), 1))


def lite_region_text(num_tokens: Sequence[int], times: Sequence[float] | None) -> str:
    """Lite's replacement for one object's ``<region>``.

    Image: ``[<REGION>*n]``. Video (``generate_region_timestamp``): ``[Time t:<REGION>*n,...]`` with one
    entry per mask of the object in frame order and no unit after the time.
    """
    if times is None:
        return "[" + REGION_TOKEN * num_tokens[0] + "]"
    return "[" + ",".join(f"Time {format_time(t)}:" + REGION_TOKEN * n for t, n in zip(times, num_tokens)) + "]"


def full_region_text(num_tokens: int) -> str:
    """Full's replacement for one mask's ``<region>``: ``[<REGION>*min(n, cells)]``, no time."""
    return "[" + REGION_TOKEN * num_tokens + "]"


def count_regions(prompt: str) -> int:
    return prompt.count(REGION_PLACEHOLDER)


def replace_regions(prompt: str, replacements: Sequence[str]) -> str:
    """Replace the ``<region>`` placeholders in order (upstream: ``str.replace(..., 1)`` in a loop)."""
    n = count_regions(prompt)
    if n != len(replacements):
        raise InputError(
            f"prompt has {n} {REGION_PLACEHOLDER} placeholder(s) but {len(replacements)} "
            f"region(s) were given: {prompt!r}"
        )
    parts = prompt.split(REGION_PLACEHOLDER)
    out = [parts[0]]
    for rep, tail in zip(replacements, parts[1:]):
        out.append(rep)
        out.append(tail)
    return "".join(out)


def video_block(timestamps: Sequence[float], tokens_per_frame: int) -> str:
    """Full's rendering of a video (already expanded): ``Time 0.0s:<image>*k,Time 1.0s:<image>*k\\n``."""
    items = [f"Time {format_time(t)}s:" + IMAGE_TOKEN * tokens_per_frame for t in timestamps]
    return ",".join(items) + "\n"


def image_block(tokens: int) -> str:
    """Full's rendering of a single image (already expanded): ``<image>*k\\n`` with no time."""
    return IMAGE_TOKEN * tokens + "\n"


def chat_prompt(user_content: str) -> str:
    """Upstream's DEFAULT_CHAT_TEMPLATE for one user turn plus the generation prompt (quirk L10).

    Built as a string rather than through ``tokenizer.apply_chat_template``: the checkpoint's own
    template is not the one upstream renders with, and for the only turn we produce (one user message
    whose frames/regions are already expanded) upstream's template reduces to this ChatML line.
    """
    return "<|im_start|>user\n" + user_content + "<|im_end|>\n<|im_start|>assistant\n"


def lite_user_content(prompt: str) -> str:
    """Lite's user turn: the (already region-expanded) text, stripped.

    Upstream crashes on ``<video>``/``<image>`` tags (quirk L1) because Lite never feeds frames to the
    LLM; we drop the tags instead and keep the rest of the text, chunk by chunk, stripped as upstream
    strips every text chunk.
    """
    text = prompt
    for tag in (VIDEO_TAG, IMAGE_TAG):
        if tag in text:
            chunks = [c.strip() for c in text.split(tag)]
            text = "".join(c for c in chunks if c)
    return text.strip()


def full_user_content(prompt: str, visual_block: str, modal_tag: str) -> str:
    """Full's user turn: text chunks around the modal tag, stripped, with the visual block in its place.

    Without a tag upstream prepends one (``mm_infer`` warns "Image tag not found"), so the frames go
    first. The tag of the other modality is not special for the template and is rejected by the caller.
    """
    if modal_tag not in prompt:
        prompt = modal_tag + prompt
    chunks = prompt.split(modal_tag)
    out: list[str] = []
    for i, chunk in enumerate(chunks):
        if i > 0:
            out.append(visual_block)
        stripped = chunk.strip()
        if stripped:
            out.append(stripped)
    return "".join(out)


def normalise_mask(mask: np.ndarray, frame_hw: tuple[int, int], where: str) -> np.ndarray:
    """A HxW bool/integer/float mask as 0/1 uint8 (upstream's masks are 0/1 uint8 tensors)."""
    if not isinstance(mask, np.ndarray):
        try:
            mask = np.asarray(mask)
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"{where}: mask is not an array ({type(mask).__name__})") from exc
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise InputError(f"{where}: mask must be HxW, got shape {mask.shape}")
    if tuple(mask.shape) != tuple(frame_hw):
        raise InputError(f"{where}: mask shape {mask.shape} != frame size {tuple(frame_hw)}")
    if mask.dtype == np.uint8:
        return (mask > 0).astype(np.uint8) if mask.max(initial=0) > 1 else mask
    if mask.dtype == bool or np.issubdtype(mask.dtype, np.number):
        return (mask > 0).astype(np.uint8) if mask.dtype != bool else mask.astype(np.uint8)
    raise InputError(f"{where}: mask dtype {mask.dtype} is not boolean or numeric")


# ---------------------------------------------------------------------------------------------------
# Sequences and the encoder plan
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RegionInput:
    """One mask of a sequence, in prompt order; ``crop_key`` (e.g. (object, frame)) identifies its crop
    so that the same crop at the same size is encoded once for the whole call."""

    crop: MaskCrop
    frame_index: int
    crop_key: Hashable


@dataclass
class SequenceInput:
    """One prompt: its expanded token ids (before full's compression) and its masks in prompt order."""

    input_ids: list[int]
    regions: list[RegionInput]


@dataclass
class FrameInput:
    """Full's global visual input: every frame prepared for the tower.

    ``video``: merge ``spatial_merge_size``, ``Time t s:`` prefixes and frame-difference compression;
    otherwise (a single image) merge 1 and no time, as upstream's image path (``image_downsampling=1``).
    """

    images: list[EncoderImage]
    timestamps: list[float]
    video: bool

    @property
    def tokens_per_frame(self) -> int:
        gh, gw = self.images[0].grid_hw
        m = self.images[0].merge
        return (gh // m) * (gw // m)


@dataclass
class EncoderPlan:
    """Every distinct image of a call and, per sequence and mask, the keys of its crop / local / global
    images (local and global are None for full)."""

    images: dict[Hashable, EncoderImage] = field(default_factory=dict)
    region_keys: list[list[tuple[Hashable, Hashable | None, Hashable | None]]] = field(default_factory=list)


def plan_encoder_inputs(
    framework: Framework,
    sequences: Sequence[SequenceInput],
    frames: Sequence[np.ndarray],
    settings: ImageProcessorSettings,
    *,
    upstream_local_crop: bool = False,
) -> EncoderPlan:
    """Decide the exact encoder input of every mask of every sequence, sharing identical images.

    The pixel budget is per *sequence* (upstream processes one prompt's M crops, M 336 frames and M 224
    crops as three calls of M images), so an image's final size depends on M; images are keyed by
    their source and final size, so e.g. a frame's 336 image is encoded once for every sequence that
    ends up with the same size (always when M <= 14 with the released processor settings).

    Lite's F_local source: the mask's own crop, or with ``upstream_local_crop`` (quirk L3) the first
    mask of the same sequence on the same frame.
    """
    plan = EncoderPlan()
    global_cache: dict[int, np.ndarray] = {}
    local_cache: dict[Hashable, np.ndarray] = {}

    def add(key: Hashable, image_fn, hw: tuple[int, int], m: int) -> Hashable:
        size = encoder_size(hw, settings, 1, m)
        full_key = (key, size)
        if full_key not in plan.images:
            image = image_fn()
            plan.images[full_key] = EncoderImage(
                patchify(resize_for_encoder(image, size, settings), settings, 1),
                (size[0] // settings.patch_size, size[1] // settings.patch_size),
                1,
            )
        return full_key

    for seq in sequences:
        m = len(seq.regions)
        keys: list[tuple[Hashable, Hashable | None, Hashable | None]] = []
        first_on_frame: dict[int, RegionInput] = {}
        for region in seq.regions:
            crop = region.crop
            crop_key = add(("crop", region.crop_key), lambda c=crop: c.image, crop.crop_hw, m)
            local_key = global_key = None
            if framework == "lite":
                source = region
                if upstream_local_crop:
                    source = first_on_frame.setdefault(region.frame_index, region)

                def local_image(src: RegionInput = source) -> np.ndarray:
                    if src.crop_key not in local_cache:
                        local_cache[src.crop_key] = lite_local_image(src.crop)
                    return local_cache[src.crop_key]

                def global_image(f: int = region.frame_index) -> np.ndarray:
                    if f not in global_cache:
                        global_cache[f] = lite_global_image(frames[f])
                    return global_cache[f]

                local_key = add(("local", source.crop_key), local_image, (LITE_LOCAL_SIZE, LITE_LOCAL_SIZE), m)
                global_key = add(("global", region.frame_index), global_image, (LITE_GLOBAL_SIZE, LITE_GLOBAL_SIZE), m)
            keys.append((crop_key, local_key, global_key))
        plan.region_keys.append(keys)
    return plan


def prepare_frames(
    frames: Sequence[np.ndarray],
    timestamps: Sequence[float],
    settings: ImageProcessorSettings,
    spatial_merge_size: int,
    *,
    video: bool,
) -> FrameInput:
    """Full's frames for the tower: merge ``spatial_merge_size`` and budget ``max_pixels // T`` for a
    video; merge 1 and the whole merge-1 budget for a single image."""
    merge = spatial_merge_size if video else 1
    images = [prepare_encoder_image(f, settings, merge, len(frames)) for f in frames]
    return FrameInput(images, [float(t) for t in timestamps], video)


# ---------------------------------------------------------------------------------------------------
# Text side
# ---------------------------------------------------------------------------------------------------
class PromptBuilder:
    """Turns prompts with ``<region>`` placeholders into token ids, upstream's way, for one framework."""

    def __init__(self, framework: Framework, tokenizer: Any, region_token_id: int, image_token_id: int | None) -> None:
        self.framework = framework
        self.tokenizer = tokenizer
        self.region_token_id = region_token_id
        self.image_token_id = image_token_id

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def lite(
        self, prompt: str, objects: Sequence[Sequence[RegionInput]], timestamps: Sequence[float] | None
    ) -> SequenceInput:
        """Lite: one ``<region>`` per object; ``timestamps`` None renders the image form ``[...]``."""
        replacements = []
        for regions in objects:
            times = None if timestamps is None else [timestamps[r.frame_index] for r in regions]
            replacements.append(lite_region_text([r.crop.num_tokens for r in regions], times))
        text = chat_prompt(lite_user_content(replace_regions(prompt, replacements)))
        regions_flat = [r for regions in objects for r in regions]
        return self._finish(text, regions_flat)

    def full(
        self, prompt: str, regions: Sequence[RegionInput], frames: FrameInput, groups: Sequence[int] | None = None
    ) -> SequenceInput:
        """Full: one ``<region>`` per mask (``groups`` = masks per placeholder when the caller's prompt has
        one placeholder per object; their ``[...]`` are joined with ``,``). Frames go where the modal tag
        is, or first."""
        if groups is None:
            replacements = [full_region_text(r.crop.num_tokens) for r in regions]
        else:
            replacements, i = [], 0
            for g in groups:
                replacements.append(",".join(full_region_text(r.crop.num_tokens) for r in regions[i : i + g]))
                i += g
        text = replace_regions(prompt, replacements)
        tag = VIDEO_TAG if frames.video else IMAGE_TAG
        other = IMAGE_TAG if frames.video else VIDEO_TAG
        text = text.replace(other, tag)
        if text.count(tag) > 1:
            raise InputError(f"prompt holds {text.count(tag)} {tag} tags; at most one is allowed")
        block = (
            video_block(frames.timestamps, frames.tokens_per_frame)
            if frames.video
            else image_block(frames.tokens_per_frame)
        )
        return self._finish(chat_prompt(full_user_content(text, block, tag)), list(regions))

    def _finish(self, text: str, regions: list[RegionInput]) -> SequenceInput:
        ids = self.tokenize(text)
        expected = sum(r.crop.num_tokens for r in regions)
        got = sum(1 for i in ids if i == self.region_token_id)
        if got != expected:
            raise InputError(
                f"prompt tokenises to {got} {REGION_TOKEN} tokens but its regions need {expected}; "
                f"does the prompt contain {REGION_TOKEN} literally?"
            )
        return SequenceInput(ids, regions)
