"""The frames of `pixelrefer report`: decoding the few that are shown, and drawing masks on them.

Frames are not stored in the index (only masks are), so they are decoded again from the source
video named by `videos.uri`, picking for each wanted time the decoded frame whose presentation
time is nearest to the stored `ts` (PyAV, reading through fsspec so `s3://` sources work with the
same `--storage-options`). Only the frames the page shows are decoded, each reached by a seek, so
the cost follows the page (about 60 frames), not the video's length.
"""

from __future__ import annotations

import base64
import colorsys
import dataclasses
import io
import math
from fractions import Fraction
from typing import Any, Iterator, Mapping, Sequence

import av
import cv2
import fsspec
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils

from jobs.query_errors import QueryError

MIN_DISPLAY_WIDTH = 320  # tiny test clips are upscaled (by an integer factor) to stay legible
MASK_ALPHA = 0.5
SEEK_GAP_S = 3.0  # decode forward instead of seeking when the next frame is this close


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


def decode_frames(uri: str, times: Sequence[float], storage_options: Mapping[str, Any]) -> dict[float, tuple[float, np.ndarray]]:
    """For each wanted time, the decoded RGB frame with the nearest presentation time.

    Returns {wanted_ts: (frame_ts, rgb)}; a time is missing when the stream ended or broke first.
    Times are seconds from the stream's start, like the index's `ts`.
    """
    try:
        handle = fsspec.open(uri, "rb", **storage_options).open()
    except FileNotFoundError as exc:
        raise SourceVideoError(f"the source video {uri} is gone (not found); the report needs it to show frames") from exc
    except Exception as exc:  # OSError, or a storage client's own (e.g. botocore's endpoint errors)
        raise SourceVideoError(f"cannot open the source video {uri}: {type(exc).__name__}: {exc}") from exc
    try:
        with handle, av.open(handle, mode="r") as container:
            if not container.streams.video:
                raise SourceVideoError(f"the source video {uri} has no video stream")
            return _nearest_frames(container, container.streams.video[0], times)
    except av.FFmpegError as exc:
        raise SourceVideoError(f"cannot decode the source video {uri}: {exc}") from exc


def _nearest_frames(container: Any, stream: Any, times: Sequence[float]) -> dict[float, tuple[float, np.ndarray]]:
    """Walk the stream forward, seeking only for the first time and across large gaps.

    `prev`/`current` bracket the wanted time; they persist across wanted times so two close times
    can both pick the same frame.
    """
    stream.thread_type = "AUTO"
    start = stream.start_time or 0
    time_base = stream.time_base or Fraction(1, 1000)
    found: dict[float, tuple[float, np.ndarray]] = {}
    frames: Iterator[tuple[float, Any]] | None = None
    prev = current = None
    for t in sorted(set(times)):
        if frames is None or current is None or t < current[0] - 1e-6 or t - current[0] > SEEK_GAP_S:
            container.seek(start + max(0, int(t / time_base)), stream=stream, backward=True)
            frames = _decoded(container, stream, start, time_base)
            prev, current = None, next(frames, None)
        while current is not None and current[0] < t:
            prev, current = current, next(frames, None)
        candidates = [c for c in (prev, current) if c is not None]
        if candidates:
            ts, frame = min(candidates, key=lambda c: abs(c[0] - t))
            found[t] = (ts, frame.to_ndarray(format="rgb24"))
    return found


def _decoded(container: Any, stream: Any, start: int, time_base: Fraction) -> Iterator[tuple[float, Any]]:
    """(seconds from stream start, frame) in presentation order; a broken tail just ends it."""
    try:
        for frame in container.decode(stream):
            if frame.pts is not None:
                yield float((frame.pts - start) * time_base), frame
    except av.FFmpegError:
        return


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


def encode_image(rgb: np.ndarray, image_format: str) -> str:
    """A data: URL, so the page needs no other file."""
    buffer = io.BytesIO()
    if image_format == "png":
        Image.fromarray(rgb).save(buffer, format="PNG", optimize=True)
        mime = "image/png"
    else:
        Image.fromarray(rgb).save(buffer, format="JPEG", quality=90)
        mime = "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"
