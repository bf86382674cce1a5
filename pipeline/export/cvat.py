"""CVAT for video 1.1 XML, one file per video: tracks a person loads into a CVAT task made from the
same source video, corrects, and exports again.

Layout under `--out` FOLDER: `<video_id>.xml`. Frames are the source video's 0-based frames (what
a CVAT task of that video numbers): a sampled frame at `ts` is frame round(ts x fps); the task's
size is the source frame count. Each object is one `<track id="object_id">` in interpolation mode:
a `<box>` keyframe at every sampled frame where it has a mask (the `masks` table's `bbox`, xyxy
pixels), and an `outside="1"` keyframe at the first sampled frame after each stretch of presence,
so CVAT interpolates boxes between samples only while the object is there. Labels are the
objects' labels (`object` for none), the same list in every file of an export. The header comment
states the numbering and the source.

Boxes, not masks: a track of `<mask>` shapes is what CVAT's own track export writes, but CVAT does
not interpolate masks, and Datumaro (1.13) cannot read masks inside tracks; boxes are what a
person corrects frame by frame in CVAT, and the masks stay in the YTVIS and MOTS exports.

Streamed by object: held is one object's mask rows (`masks.grouped`), written track by track.
"""

from __future__ import annotations

from typing import IO, Any, Callable, Sequence
from xml.sax.saxutils import escape, quoteattr

from pipeline.export import masks
from pipeline.export.selection import VideoInfo
from pipeline.export.target import Target
from pipeline.store import TableStore


def write(store: TableStore, videos: Sequence[VideoInfo], target: Target,
          note: Callable[[str], None]) -> dict[str, int]:
    totals = {"videos": 0, "tracks": 0, "frames": 0, "boxes": 0}
    names = sorted({o.label or "object" for v in videos for o in v.objects})
    for video in videos:
        with target.open(f"{video.video_id}.xml") as out:
            _header(out, video, names)
            frames: set[int] = set()
            labels = {o.object_id: o.label or "object" for o in video.objects}
            for object_id, rows in masks.grouped(store, video, "object_id", object_ids=list(labels)):
                boxes = _track(out, video, object_id, labels[object_id], rows)
                frames.update(boxes)
                totals["tracks"] += 1
                totals["boxes"] += len(boxes)
            out.write("</annotations>\n")
        totals["videos"] += 1
        totals["frames"] += len(frames)
    return totals


def _header(out: IO[str], video: VideoInfo, names: list[str]) -> None:
    """`names`: the labels of the whole export, the same in every file (one CVAT project's labels)."""
    labels = "".join(f"<label><name>{escape(n)}</name><type>any</type><attributes></attributes></label>"
                     for n in names)
    out.write(
        '<?xml version="1.0" encoding="utf-8"?>\n<annotations>\n<version>1.1</version>\n'
        f"<!-- pixelrefer export of {escape(video.uri).replace('--', '- -')} (video_id {video.video_id}, run "
        f"{video.run_id}): frames are the source video's 0-based frames at {video.fps or 0:g} fps; boxes are "
        f"keyframes at the index's {len(video.sampled_ts)} sampled frames; track id = object_id -->\n"
        f"<meta><task><name>{escape(video.video_id)}</name><size>{video.frame_count}</size>"
        f"<mode>interpolation</mode><overlap>0</overlap><start_frame>0</start_frame>"
        f"<stop_frame>{max(video.frame_count - 1, 0)}</stop_frame><labels>{labels}</labels>"
        f"<original_size><width>{video.width}</width><height>{video.height}</height></original_size>"
        f"</task><source>{escape(video.uri)}</source></meta>\n"
    )


def _track(out: IO[str], video: VideoInfo, object_id: int, label: str, rows: Any) -> list[int]:
    """Write one track; returns the source frames where the object is present."""
    out.write(f"<track id=\"{object_id}\" label={quoteattr(label)} source=\"auto\">\n")
    present: list[int] = []
    indexes = rows.column("frame_index").to_pylist()
    bboxes = rows.column("bbox").to_pylist()
    for k, (frame_index, bbox) in enumerate(zip(indexes, bboxes)):
        frame = video.source_frame(frame_index)
        out.write(_box(frame, bbox, outside=False))
        present.append(frame)
        ends = k + 1 == len(indexes) or indexes[k + 1] != frame_index + 1
        if ends and frame_index + 1 < len(video.sampled_ts):
            out.write(_box(video.source_frame(frame_index + 1), bbox, outside=True))
    out.write("</track>\n")
    return present


def _box(frame: int, bbox: list[float], outside: bool) -> str:
    x0, y0, x1, y1 = bbox
    return (f'<box frame="{frame}" outside="{int(outside)}" occluded="0" keyframe="1" xtl="{x0:.2f}" ytl="{y0:.2f}" '
            f'xbr="{x1:.2f}" ybr="{y1:.2f}" z_order="0"></box>\n')
