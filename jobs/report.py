"""`pixelrefer report`: one self-contained HTML page about one video of an index.

The page shows sampled frames with each object's mask and box drawn in the object's colour, a
timeline of when each object is present, its captions, and the answers to the questions. It is a
single file (frames inlined as base64 JPEG/PNG, CSS inline, no script, no external reference), so
it can be mailed, attached to a ticket or opened from object storage without a server.

Frames are not stored in the index (only masks are), so they are decoded again from the source
video named by the `videos.uri` column, picking for each object frame the decoded frame whose
presentation time is nearest to the stored `ts` (PyAV, reading through fsspec so `s3://` sources
work with the same `--storage-options`).
"""

from __future__ import annotations

import argparse
import base64
import colorsys
import dataclasses
import datetime as dt
import html
import io
import math
import os
import sys
import tempfile
from fractions import Fraction
from typing import Any, Iterator, Mapping, Sequence

import av
import cv2
import fsspec
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils

from jobs.query import add_common_arguments, run_cli
from jobs.query_errors import QueryError, UsageError
from jobs.query_sql import open_index, parse_storage_options
from jobs.query_video import VideoResult, presence_spans

DEFAULT_MAX_FRAMES = 12
DEFAULT_MAX_WIDTH = 640
MIN_DISPLAY_WIDTH = 320  # tiny test clips are upscaled (by an integer factor) to stay legible
MASK_ALPHA = 0.5
SEEK_GAP_S = 3.0  # decode forward instead of seeking when the next frame is this close
IMAGE_FORMATS = ("jpeg", "png")


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
# Choosing and decoding frames.
# --------------------------------------------------------------------------------------------


def choose_frame_times(result: VideoResult, max_frames: int) -> list[float]:
    """Evenly spread times among those where some object has a mask (first and last included).

    Falls back to the video's sampled times when it has no objects, so a report still shows it.
    """
    times = sorted({round(f["ts"], 6) for frames in result.objects.column("frames").to_pylist() for f in frames or []})
    if not times:
        times = sorted({round(t, 6) for t in result.video.get("sampled_ts") or []})
    if len(times) <= max_frames:
        return times
    picks = np.linspace(0, len(times) - 1, max_frames).round().astype(int)
    return [times[i] for i in sorted(set(picks.tolist()))]


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
    object_id: int
    mask: np.ndarray | None  # at the mask's own resolution
    bbox: Sequence[float] | None  # xyxy in the mask's pixel space
    size: tuple[int, int]  # (h, w) the mask and bbox refer to


def overlays_at(result: VideoResult, ts: float, tolerance: float = 1e-3) -> list[Overlay]:
    """The object frames stored for (nearly) this time, one per object."""
    found = []
    for obj in result.objects.select(["object_id", "frames"]).to_pylist():
        for f in obj["frames"] or []:
            if abs(f["ts"] - ts) <= tolerance:
                rle = f.get("rle")
                mask = decode_rle(rle) if rle and rle.get("counts") is not None else None
                size = tuple(rle["size"]) if rle else (int(result.video["height"] or 0), int(result.video["width"] or 0))
                found.append(Overlay(obj["object_id"], mask, f.get("bbox"), size))  # type: ignore[arg-type]
                break
    return found


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


# --------------------------------------------------------------------------------------------
# HTML.
# --------------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:16px;color:#1b1b1b;background:#fff}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:20px 0 8px}
.meta{color:#555;margin:0} .meta span{margin-right:14px} .error{color:#b00020;font-weight:600}
.frames{display:flex;flex-wrap:wrap;gap:12px} figure{margin:0}
figure img{display:block;image-rendering:pixelated}
figcaption{color:#555;font-size:12px;margin-top:2px}
.sw{display:inline-block;width:12px;height:12px;border-radius:2px;margin-right:6px;vertical-align:-1px}
.obj{border-left:4px solid;padding:4px 10px;margin:8px 0}
.obj ul{margin:4px 0 0;padding-left:18px}
table{border-collapse:collapse} td,th{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
.missing{width:200px;height:120px;display:flex;align-items:center;justify-content:center;background:#eee;color:#777}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _fmt_ts(t: float | None) -> str:
    return "?" if t is None else f"{t:.2f}"


def render_html(result: VideoResult, panels: Sequence[dict[str, Any]], generated: dt.datetime) -> str:
    """The page; every value from the index is escaped (captions are model output)."""
    v = result.video
    title = f"pixelrefer report: {v['video_id']}"
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Video {_e(v['video_id'])}</h1>",
        _meta_block(v),
        "<h2>Frames</h2>",
        _frames_block(panels),
        "<h2>Timeline</h2>",
        timeline_svg(result, [p["ts"] for p in panels]),
        "<h2>Objects</h2>",
        _objects_block(result),
        "<h2>Questions and answers</h2>",
        _qa_block(result),
        f'<p class="meta">Generated by pixelrefer report at {_e(generated.isoformat(timespec="seconds"))}.</p>',
        "</body></html>",
    ]
    return "\n".join(parts)


def _meta_block(v: Mapping[str, Any]) -> str:
    fields = [
        ("source", v.get("uri")),
        ("run", v.get("run_id")),
        ("model", v.get("model")),
        ("tracker", v.get("tracker")),
        ("status", v.get("status")),
        ("duration", f"{v['duration_s']:.2f} s" if v.get("duration_s") is not None else None),
        ("size", f"{v['width']}x{v['height']}" if v.get("width") else None),
        ("indexed", v.get("indexed_at")),
    ]
    spans = "".join(f"<span><b>{_e(k)}</b> {_e(val)}</span>" for k, val in fields if val is not None)
    error = f'<p class="error">{_e(v["error"])}</p>' if v.get("error") else ""
    return f'<p class="meta">{spans}</p>{error}'


def _frames_block(panels: Sequence[dict[str, Any]]) -> str:
    if not panels:
        return "<p>No frames: this video has no objects and no sampled frames.</p>"
    figures = []
    for p in panels:
        ids = ", ".join(str(i) for i in p["object_ids"]) or "none"
        if p.get("src"):
            body = f'<img src="{p["src"]}" width="{p["width"]}" height="{p["height"]}" alt="frame at {p["ts"]:.2f} s">'
            note = f"t = {p['frame_ts']:.3f} s · objects {_e(ids)}"
        else:
            body = '<div class="missing">frame not decodable</div>'
            note = f"t = {p['ts']:.3f} s · objects {_e(ids)}"
        figures.append(f'<figure data-ts="{p["ts"]:.6f}">{body}<figcaption>{note}</figcaption></figure>')
    return f'<div class="frames">{"".join(figures)}</div>'


def timeline_svg(result: VideoResult, shown_ts: Sequence[float]) -> str:
    """One row per object with a bar for each span where it is present (see presence_spans)."""
    objects = result.objects.select(["object_id", "frames"]).to_pylist()
    sampled = result.video.get("sampled_ts") or []
    all_ts = [f["ts"] for o in objects for f in o["frames"] or []] + list(sampled)
    duration = result.video.get("duration_s") or (max(all_ts) if all_ts else 1.0) or 1.0
    left, right, row_h, top = 90, 20, 22, 10
    width = 760
    plot_w = width - left - right
    height = top + row_h * max(1, len(objects)) + 28

    def x(t: float) -> float:
        return left + plot_w * min(max(t / duration, 0.0), 1.0)

    els = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" aria-label="object timeline">']
    for i, obj in enumerate(objects):
        y = top + i * row_h
        color = hex_color(object_color(obj["object_id"]))
        els.append(f'<text x="4" y="{y + 15}" font-size="12">object {obj["object_id"]}</text>')
        for a, b in presence_spans((f["ts"] for f in obj["frames"] or []), sampled):
            w = max(x(b) - x(a), 3.0)
            els.append(
                f'<rect class="span" data-object-id="{obj["object_id"]}" data-start="{a:.6f}" data-end="{b:.6f}" '
                f'x="{x(a):.1f}" y="{y + 4}" width="{w:.1f}" height="{row_h - 8}" rx="2" fill="{color}"/>'
            )
    axis_y = top + row_h * max(1, len(objects)) + 4
    els.append(f'<line x1="{left}" y1="{axis_y}" x2="{left + plot_w}" y2="{axis_y}" stroke="#888"/>')
    for t in shown_ts:
        els.append(f'<line x1="{x(t):.1f}" y1="{axis_y - 4}" x2="{x(t):.1f}" y2="{axis_y}" stroke="#333"/>')
    for k in range(6):
        t = duration * k / 5
        els.append(f'<text x="{x(t):.1f}" y="{axis_y + 16}" font-size="11" text-anchor="middle">{t:.1f}s</text>')
    els.append("</svg>")
    return "".join(els)


def _objects_block(result: VideoResult) -> str:
    captions: dict[int, list[dict[str, Any]]] = {}
    for c in result.captions.to_pylist():
        captions.setdefault(c["object_id"], []).append(c)
    answers: dict[int, list[dict[str, Any]]] = {}
    for q in result.qa.to_pylist():
        for oid in q["object_ids"] or []:
            answers.setdefault(oid, []).append(q)
    blocks = []
    for obj in result.object_summaries():
        oid = obj["object_id"]
        color = hex_color(object_color(oid))
        spans = ", ".join(f"{a:.2f}–{b:.2f} s" for a, b in obj["spans"]) or "never"
        items = [
            f"<li>{_fmt_ts(c['ts_start'])}–{_fmt_ts(c['ts_end'])} s: {_e(c['caption'])}</li>"
            for c in captions.get(oid, [])
        ] + [f"<li>Q: {_e(q['question'])} A: {_e(q['answer'])}</li>" for q in answers.get(oid, [])]
        blocks.append(
            f'<div class="obj" data-object-id="{oid}" style="border-color:{color}">'
            f'<span class="sw" style="background:{color}"></span><b>object {oid}</b> '
            f"({_e(obj['source'] or 'unknown')}), present {_e(spans)}, {obj['num_frames']} frames"
            f"<ul>{''.join(items) or '<li>no caption</li>'}</ul></div>"
        )
    return "".join(blocks) or "<p>No objects.</p>"


def _qa_block(result: VideoResult) -> str:
    rows = result.qa.to_pylist()
    if not rows:
        return "<p>No questions were asked.</p>"
    body = []
    for q in rows:
        swatches = "".join(
            f'<span class="sw" style="background:{hex_color(object_color(i))}"></span>{i} ' for i in q["object_ids"] or []
        )
        body.append(f"<tr><td>{swatches or 'video'}</td><td>{_e(q['question'])}</td><td>{_e(q['answer'])}</td></tr>")
    return f"<table><tr><th>objects</th><th>question</th><th>answer</th></tr>{''.join(body)}</table>"


# --------------------------------------------------------------------------------------------
# The job.
# --------------------------------------------------------------------------------------------


def build_report(
    output: str,
    video: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    run_id: str | None = None,
    max_frames: int = DEFAULT_MAX_FRAMES,
    image_format: str = "jpeg",
    max_width: int = DEFAULT_MAX_WIDTH,
) -> str:
    """The report of one video as an HTML string (the Python API behind `pixelrefer report`)."""
    if max_frames < 1 or max_width < 16:
        raise UsageError("--max-frames must be at least 1 and --max-width at least 16")
    options = dict(storage_options or {})
    with open_index(output, options) as index:
        result = index.video(video, run_id=run_id)
    times = choose_frame_times(result, max_frames)
    decoded = decode_frames(result.video["uri"], times, source_options(result.video["uri"], output, options)) if times else {}
    if times and not decoded:
        raise SourceVideoError(f"no frame of the source video {result.video['uri']} could be decoded")
    panels = [_panel(result, t, decoded.get(t), max_width, image_format) for t in times]
    return render_html(result, panels, dt.datetime.now(dt.timezone.utc))


def _panel(result: VideoResult, ts: float, decoded: tuple[float, np.ndarray] | None, max_width: int, fmt: str) -> dict[str, Any]:
    overlays = overlays_at(result, ts)
    panel: dict[str, Any] = {"ts": ts, "object_ids": [o.object_id for o in overlays]}
    if decoded is not None:
        frame_ts, rgb = decoded
        image = draw_frame(rgb, overlays, max_width)
        panel.update(frame_ts=frame_ts, src=encode_image(image, fmt), width=image.shape[1], height=image.shape[0])
    return panel


def write_text_atomically(path: str, text: str) -> None:
    """Write next to the target and rename, so a failed run never leaves half a page."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"--out folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".report-", suffix=".html.tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a report is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `pixelrefer report` (added to the lead's subparser)."""
    add_common_arguments(parser)
    parser.add_argument("--video", required=True, metavar="ID|URI", help="video_id, id prefix or source uri")
    parser.add_argument("--out", required=True, metavar="FILE.html", help="where to write the page")
    parser.add_argument("--run", metavar="RUN_ID", default=None, help="report this run instead of the latest ok one")
    parser.add_argument("--max-frames", type=int, default=DEFAULT_MAX_FRAMES, help="frames to show (evenly spread)")
    parser.add_argument("--max-width", type=int, default=DEFAULT_MAX_WIDTH, help="largest frame width in pixels")
    parser.add_argument("--image-format", choices=IMAGE_FORMATS, default="jpeg", help="how frames are inlined")


def report_main(args: argparse.Namespace) -> int:
    """`pixelrefer report`: returns the exit code; errors go to stderr as one message."""
    return run_cli("report", lambda: _report(args))


def _report(args: argparse.Namespace) -> None:
    page = build_report(
        args.output,
        args.video,
        storage_options=parse_storage_options(args.storage_options),
        run_id=args.run,
        max_frames=args.max_frames,
        image_format=args.image_format,
        max_width=args.max_width,
    )
    write_text_atomically(args.out, page)
    print(f"wrote {args.out}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m jobs.report OUTPUT --video ID --out FILE.html` without the umbrella CLI."""
    parser = argparse.ArgumentParser(prog="pixelrefer report", description=__doc__.split("\n\n")[0])
    add_report_arguments(parser)
    return report_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
