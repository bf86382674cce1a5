"""`pixelrefer report`: one self-contained HTML page about one video of an index.

The page shows a few sampled frames with each object's mask and box drawn in the object's colour,
the per-clip timeline (a row of clip boxes with their captions), when each object is present, and
the answers to the questions. It is a single file (frames inlined as base64 JPEG/PNG, CSS inline,
no script, no external reference), so it can be mailed, attached to a ticket or opened from object
storage without a server.

A 2-hour video at 1 fps has 7,200 sampled frames; inlining them all would make a page of hundreds
of megabytes and decode the whole file. So the job picks at most `--max-frames` (default 60) in
DuckDB: every frame with a mask when they fit; otherwise the frame where each object is first
seen, then one frame per clip (the one showing most objects, nearest the clip's middle), evenly
spread over the clips when there are more clips than room. Only the picked frames' masks are read
from the `masks` table and only those frames are decoded (by seeking), and the page says what was
picked and how many frames were left out. Drawing and decoding live in `jobs.report_frames`, the
page in `jobs.report_html`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import math
import os
import sys
import tempfile
from typing import Any, Mapping, Sequence

import numpy as np

from jobs.query import add_common_arguments, run_cli
from jobs.query_errors import UsageError
from jobs.query_sql import Index, open_index, parse_storage_options
from jobs.query_video import VideoResult
from jobs.report_frames import (
    Overlay,
    SourceVideoError,
    decode_frames,
    decode_rle,
    draw_frame,
    encode_image,
    source_options,
)
from jobs.report_html import render_html

DEFAULT_MAX_FRAMES = 60
MAX_FRAMES_LIMIT = 300  # beyond this a page is too heavy to mail or open; query the masks table instead
DEFAULT_MAX_WIDTH = 640
IMAGE_FORMATS = ("jpeg", "png")

# One row per candidate frame: every masked frame when they fit in $max, else only the frames where
# some object is first seen and each clip's best frame (most objects, then nearest the clip's middle).
CANDIDATES_SQL = """
WITH m AS (
    SELECT object_id, clip_index, round(ts, 6) AS ts FROM masks
    WHERE run_id = $run AND video_id = $vid AND ts IS NOT NULL
),
frames AS (SELECT ts, min(clip_index) AS clip_index, count(DISTINCT object_id) AS objects FROM m GROUP BY ts),
firsts AS (
    SELECT ts, list(object_id ORDER BY object_id) AS first_of
    FROM (SELECT object_id, min(ts) AS ts FROM m GROUP BY object_id) GROUP BY ts
),
clip_best AS (
    SELECT f.ts FROM frames f
    LEFT JOIN (SELECT clip_index, (ts_start + ts_end) / 2 AS middle FROM clips WHERE run_id = $run AND video_id = $vid) c
        ON c.clip_index = f.clip_index
    QUALIFY row_number() OVER (PARTITION BY f.clip_index ORDER BY f.objects DESC, abs(f.ts - c.middle) NULLS LAST, f.ts) = 1
)
SELECT f.ts, f.clip_index, f.objects, coalesce(fi.first_of, CAST([] AS INTEGER[])) AS first_of,
       f.ts IN (SELECT ts FROM clip_best) AS clip_best, count(*) OVER () AS masked_frames
FROM frames f LEFT JOIN firsts fi USING (ts)
QUALIFY masked_frames <= $max OR len(first_of) > 0 OR clip_best
ORDER BY f.ts
"""

MASKS_AT_SQL = """
SELECT object_id, round(ts, 6) AS ts, bbox, rle FROM masks
WHERE run_id = $run AND video_id = $vid AND list_contains($ts, round(ts, 6))
QUALIFY row_number() OVER (PARTITION BY object_id, round(ts, 6) ORDER BY clip_index NULLS LAST) = 1
ORDER BY ts, object_id
"""


@dataclasses.dataclass
class FramePlan:
    """The frames a page shows and the sentence that says how they were chosen."""

    picks: list[dict[str, Any]]  # ts, clip_index, first_of
    note: str


def spread(items: Sequence[Any], count: int) -> list[Any]:
    """`count` items evenly spread over `items`, first and last included."""
    if count <= 0:
        return []
    if len(items) <= count:
        return list(items)
    if count == 1:
        return [items[0]]
    step = (len(items) - 1) / (count - 1)
    return [items[int(math.floor(i * step + 0.5))] for i in range(count)]


def plan_frames(index: Index, result: VideoResult, max_frames: int) -> FramePlan:
    """Pick what the page shows (module docstring); only candidate rows come back from DuckDB."""
    sampled = [round(t, 6) for t in result.video.get("sampled_ts") or []]
    params = {"run": result.run_id, "vid": result.video_id, "max": max_frames}
    rows = index.sql(CANDIDATES_SQL, params).to_pylist()
    if not rows:
        picks = [{"ts": t, "clip_index": None, "first_of": []} for t in spread(sorted(set(sampled)), max_frames)]
        what = "evenly spread sampled frames (no object has a mask)"
        return FramePlan(picks, _note(result, len(picks), len(sampled), what))
    masked = rows[0]["masked_frames"]
    if masked <= max_frames:
        return FramePlan(rows, _note(result, len(rows), max(len(sampled), masked), "every sampled frame with a mask"))
    firsts = spread([r for r in rows if r["first_of"]], max(1, max_frames // 2))
    chosen = {r["ts"]: r for r in firsts}
    best = [r for r in rows if r["clip_best"] and r["ts"] not in chosen]
    clip_count = len({r["clip_index"] for r in rows if r["clip_best"]})
    shown_clips = spread(best, max_frames - len(chosen))
    chosen.update((r["ts"], r) for r in shown_clips)
    objects = sum(len(r["first_of"]) for r in rows)
    seen_first = sum(len(r["first_of"]) for r in firsts)
    what = (
        f"the first sighting of {'each' if seen_first == objects else f'{seen_first}'} of {objects} "
        f"object{'s' if objects != 1 else ''} and one frame from {len(shown_clips)} of {clip_count} clips with "
        f"masks{', evenly spread' if len(shown_clips) < len(best) else ''} (the one showing most objects)"
    )
    return FramePlan([chosen[t] for t in sorted(chosen)], _note(result, len(chosen), max(len(sampled), masked), what))


def _note(result: VideoResult, shown: int, total: int, what: str) -> str:
    return (
        f"Showing {shown} of {total} sampled frames ({total - shown} left out): {what}. Every mask is in the "
        f"masks table: pixelrefer query OUTPUT --sql \"SELECT * FROM masks WHERE video_id = '{result.video_id}' "
        f"AND run_id = '{result.run_id}'\""
    )


def overlays_at(index: Index, video: Mapping[str, Any], times: Sequence[float]) -> dict[float, list[Overlay]]:
    """The stored masks of the picked frames only (`video`: its `videos` row, for the run): a few
    hundred rows, never a whole video's. `pixelrefer serve` draws its thumbnails from these too."""
    found: dict[float, list[Overlay]] = {t: [] for t in times}
    if not times:
        return found
    params = {"run": video["run_id"], "vid": video["video_id"], "ts": list(times)}
    fallback = (int(video.get("height") or 0), int(video.get("width") or 0))
    for row in index.sql(MASKS_AT_SQL, params).to_pylist():
        rle = row["rle"]
        mask = decode_rle(rle) if rle and rle.get("counts") is not None else None
        size = (int(rle["size"][0]), int(rle["size"][1])) if rle and rle.get("size") else fallback
        found.setdefault(row["ts"], []).append(Overlay(row["object_id"], mask, row["bbox"], size))
    return found


def build_report(
    output: str,
    video: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    run_id: str | None = None,
    max_frames: int = DEFAULT_MAX_FRAMES,
    image_format: str = "jpeg",
    max_width: int = DEFAULT_MAX_WIDTH,
    model: str | None = None,
    as_of: Any = None,
) -> str:
    """The report of one video as an HTML string (the Python API behind `pixelrefer report`)."""
    if not 1 <= max_frames <= MAX_FRAMES_LIMIT or max_width < 16:
        raise UsageError(f"--max-frames must be 1 to {MAX_FRAMES_LIMIT} and --max-width at least 16")
    options = dict(storage_options or {})
    with open_index(output, options, model=model, as_of=as_of) as index:
        for note in index.notes:
            print(note, file=sys.stderr)
        result = index.video(video, run_id=run_id)
        plan = plan_frames(index, result, max_frames)
        times = [p["ts"] for p in plan.picks]
        overlays = overlays_at(index, result.video, times)
        notes = index.notes
    uri = result.video["uri"]
    # Decoded at most twice the page width on the longer side: enough for portrait frames shown
    # max_width wide, and a 4K page crosses the decode child's pipe at a tenth of its size.
    decoded = decode_frames(uri, times, source_options(uri, output, options), max_side=2 * max_width)
    if times and not decoded:
        raise SourceVideoError(f"no frame of the source video {uri} could be decoded")
    panels = [_panel(p, overlays.get(p["ts"], []), decoded.get(p["ts"]), max_width, image_format) for p in plan.picks]
    return render_html(result, panels, plan.note, notes, dt.datetime.now(dt.timezone.utc))


def _panel(pick: Mapping[str, Any], overlays: Sequence[Overlay], decoded: tuple[float, np.ndarray] | None,
           max_width: int, fmt: str) -> dict[str, Any]:  # fmt: skip
    panel: dict[str, Any] = {"ts": pick["ts"], "clip_index": pick["clip_index"], "first_of": pick["first_of"],
                             "object_ids": [o.object_id for o in overlays]}  # fmt: skip
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
    parser.add_argument(
        "--max-frames",
        type=int,
        default=DEFAULT_MAX_FRAMES,
        help=f"frames to inline (default {DEFAULT_MAX_FRAMES}, at most {MAX_FRAMES_LIMIT}): every frame with a mask "
        "if they fit, else each object's first sighting and one frame per clip, evenly spread",
    )
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
        model=args.model,
        as_of=args.as_of,
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
