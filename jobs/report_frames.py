"""The frames of `pixelrefer report`: decoding the few that are shown, and drawing masks on them.

Frames are not stored in the index (only masks are), so they are decoded again from the source
video named by `videos.uri`, by the pipeline's own frame sampler (`pipeline.decode.sampling.sample_at`):
for each wanted time the decoded frame whose presentation time is nearest to the stored `ts`,
turned upright by the stream's rotation metadata exactly as indexing turned it before computing
the masks (phone footage is stored landscape with a display matrix), decoded in a decode child
with a timeout (`pipeline.decode.isolation`), so a hanging or crashing decoder fails the report with a
message instead of hanging it. Remote sources are read through fsspec range requests with the
same `--storage-options`. Only the frames the page shows are decoded, so the cost follows the page
(about 60 frames), not the video's length.
"""

from __future__ import annotations

import base64
import colorsys
import dataclasses
import io
import math
from typing import Any, Mapping, Sequence

import cv2
import fsspec
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils

from jobs.query_errors import QueryError
from pipeline.errors import DecodeError
from pipeline.decode.sampling import sample_at

MIN_DISPLAY_WIDTH = 320  # tiny test clips are upscaled (by an integer factor) to stay legible
MASK_ALPHA = 0.5
#: The decode child's deadline for all of a page's frames (up to 300, each maybe its own seek on
#: remote storage); past it the decoder is killed and the report fails with a message.
DECODE_TIMEOUT_S = 300.0


class SourceVideoError(QueryError):
    """The source video named in the index is gone or cannot be decoded."""


# --------------------------------------------------------------------------------------------
# Colours.
# --------------------------------------------------------------------------------------------


def object_color(object_id: int) -> tuple[int, int, int]:
    """A stable, saturated colour for an object id.

    Hues step by the golden ratio, so consecutive ids get far-apart hues; the same id gets the same
    colour in every report, run and video, so people can learn "object 3 is orange".
    """
    hue = (0.07 + int(object_id) * 0.6180339887498949) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.9, 1.0)
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def hex_color(rgb: Sequence[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


# --------------------------------------------------------------------------------------------
# Decoding.
# --------------------------------------------------------------------------------------------


def source_options(uri: str, output_url: str, storage_options: Mapping[str, Any]) -> dict[str, Any]:
    """The OUTPUT's storage options apply to the source when both use the same protocol."""
    def protocol(url: str) -> str:
        return url.split("://", 1)[0] if "://" in url else "file"

    return dict(storage_options) if protocol(uri) == protocol(output_url) else {}


def decode_frames(
    uri: str,
    times: Sequence[float],
    storage_options: Mapping[str, Any],
    *,
    max_side: int | None = None,
    timeout_s: float = DECODE_TIMEOUT_S,
) -> dict[float, tuple[float, np.ndarray]]:
    """For each wanted time, the upright RGB frame with the nearest presentation time.

    Returns {wanted_ts: (frame_ts, rgb)}; a time is missing when the stream ended or broke first.
    Times are seconds from the stream's first frame, like the index's `ts`. `max_side` bounds the
    frames' longer side in the decoder, so a page of 4K frames does not cross the pipe at full size.
    """
    wanted = sorted({float(t) for t in times})
    if not wanted:
        return {}
    try:
        got = sample_at(uri, wanted, max_side=max_side, storage_options=dict(storage_options) or None,
                        timeout_s=timeout_s)  # fmt: skip
    except DecodeError as exc:
        raise _source_error(uri, storage_options, exc) from None
    return {float(t): (float(ts), frame) for t, ts, frame in zip(got.grid_times, got.timestamps, got.frames)}


def _source_error(uri: str, storage_options: Mapping[str, Any], exc: DecodeError) -> SourceVideoError:
    """Say "gone" when the file no longer exists (the usual cause, and one a user fixes differently)."""
    reason = str(exc).removeprefix(f"{uri}: ")
    try:
        fs, path = fsspec.core.url_to_fs(uri, **storage_options)
        gone = not fs.exists(path)
    except Exception:  # noqa: BLE001 - the check is a nicety; the decoder's message stands on its own
        gone = False
    if gone:
        return SourceVideoError(f"the source video {uri} is gone (not found); the report needs it to show frames")
    return SourceVideoError(f"cannot decode the source video {uri}: {reason}")


# --------------------------------------------------------------------------------------------
# Drawing.
# --------------------------------------------------------------------------------------------


def display_size(width: int, height: int, max_width: int) -> tuple[int, int]:
    """Shrink large frames to `max_width`; enlarge tiny ones by an integer factor (crisp pixels)."""
    if width > max_width:
        scale = max_width / width
    elif width < MIN_DISPLAY_WIDTH:
        scale = float(min(math.ceil(MIN_DISPLAY_WIDTH / width), max(1, max_width // width)))
    else:
        scale = 1.0
    return max(1, int(round(width * scale))), max(1, int(round(height * scale)))


def decode_rle(rle: Mapping[str, Any]) -> np.ndarray:
    """COCO RLE (`size` [h, w], `counts` string) to a bool mask."""
    counts = rle["counts"]
    data = {"size": [int(v) for v in rle["size"]], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(data).astype(bool)


@dataclasses.dataclass
class Overlay:
    """One object's mask and box on one frame, as the `masks` table stores them."""

    object_id: int
    mask: np.ndarray | None  # at the mask's own resolution
    bbox: Sequence[float] | None  # xyxy in the mask's pixel space
    size: tuple[int, int]  # (h, w) the mask and bbox refer to


def draw_frame(rgb: np.ndarray, overlays: Sequence[Overlay], max_width: int) -> np.ndarray:
    """Resize the frame for display, blend each mask, then draw boxes and id labels on top."""
    h, w = rgb.shape[:2]
    dw, dh = display_size(w, h, max_width)
    interpolation = cv2.INTER_AREA if dw < w else cv2.INTER_NEAREST
    image = cv2.resize(rgb, (dw, dh), interpolation=interpolation) if (dw, dh) != (w, h) else rgb.copy()
    out = image.astype(np.float32)
    for ov in overlays:
        if ov.mask is not None:
            mask = cv2.resize(ov.mask.astype(np.uint8), (dw, dh), interpolation=cv2.INTER_NEAREST).astype(bool)
            out[mask] = (1 - MASK_ALPHA) * out[mask] + MASK_ALPHA * np.array(object_color(ov.object_id), np.float32)
    canvas = Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(11, dh // 22))
    for ov in overlays:
        if ov.bbox and len(ov.bbox) == 4:
            _draw_box(draw, font, ov, dw / max(1, ov.size[1]), dh / max(1, ov.size[0]))
    return np.asarray(canvas)


def _draw_box(draw: ImageDraw.ImageDraw, font: Any, ov: Overlay, sx: float, sy: float) -> None:
    color = object_color(ov.object_id)
    x0, y0, x1, y1 = (float(v) for v in ov.bbox)  # type: ignore[union-attr]
    box = (x0 * sx, y0 * sy, max(x0 * sx, x1 * sx - 1), max(y0 * sy, y1 * sy - 1))
    draw.rectangle(box, outline=color, width=2)
    label = str(ov.object_id)
    left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
    tw, th = right - left + 6, bottom - top + 4
    ly = box[1] - th if box[1] - th >= 0 else box[1]  # above the box when there is room
    draw.rectangle((box[0], ly, box[0] + tw, ly + th), fill=color)
    luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    draw.text((box[0] + 3 - left, ly + 2 - top), label, fill=(0, 0, 0) if luminance > 140 else (255, 255, 255), font=font)


def image_bytes(rgb: np.ndarray, image_format: str) -> tuple[bytes, str]:
    """The image file (JPEG at quality 90, or PNG) and its MIME type: inlined by the report, served
    by `pixelrefer serve`."""
    buffer = io.BytesIO()
    if image_format == "png":
        Image.fromarray(rgb).save(buffer, format="PNG", optimize=True)
        return buffer.getvalue(), "image/png"
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue(), "image/jpeg"


def encode_image(rgb: np.ndarray, image_format: str) -> str:
    """A data: URL, so the page needs no other file."""
    data, mime = image_bytes(rgb, image_format)
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
