"""MOTS: the MOTS Challenge text format (what TrackEval reads) and, beside it, MOTS PNG (what
Datumaro and CVAT's "MOTS PNG 1.0" import read), per video.

Layout under `--out` FOLDER, per video:
- `<video_id>.txt`: one line per mask, `frame id class_id height width rle`, in frame order;
  `frame` is the 1-based source frame (MOTS Challenge numbering: source frame 0 is frame 1),
  `id` is `class_id * 1000 + object_id` (so `id % 1000` is the index's `object_id`), `rle` the
  `masks` table's COCO RLE counts as is.
- `<video_id>/instances/frame_<source frame:06d>.png`: a 16-bit PNG per sampled frame with masks,
  each pixel `class_id * 1000 + object_id` (0: background; where masks overlap the smaller one is
  drawn on top); 0-based source frames, CVAT's frame names.
- `<video_id>/instances/labels.txt`: class names, line k is `class_id` k + 1.
- `<video_id>/seqinfo.ini`: MOTChallenge sequence info (source frame rate, frame count, size) with
  the numbering stated in comments.
Only sampled frames appear (the source frames in between have no line and no PNG). Object ids must
be below 1000 (the format's id encoding); a video with larger ids is skipped with a note.

Streamed by frame: held is one range of frames' mask rows (`masks.grouped`) and one frame's
index image.
"""

from __future__ import annotations

import io
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.export import masks
from pipeline.export.selection import ExportError, VideoInfo
from pipeline.export.target import Target
from pipeline.store import TableStore

#: MOTS packs class and instance into one id: class_id * 1000 + instance.
INSTANCES = 1000
MAX_CLASSES = 65535 // INSTANCES - 1


def class_ids(videos: Sequence[VideoInfo]) -> dict[str, int]:
    names = sorted({o.label or "object" for v in videos for o in v.objects})
    if len(names) > MAX_CLASSES:
        raise ExportError(f"the MOTS formats hold at most {MAX_CLASSES} classes; this selection has {len(names)} "
                          "labels: narrow it with --label or --video")
    return {name: i + 1 for i, name in enumerate(names)}


def seqinfo(video: VideoInfo, format_note: str) -> str:
    """MOTChallenge's seqinfo.ini for one video, numbering stated in `;` comments."""
    return (
        f"; pixelrefer export of {video.uri} (video_id {video.video_id}, run {video.run_id})\n"
        f"; {format_note}\n"
        f"; only the index's {len(video.sampled_ts)} sampled frames (about {video.sampled_fps or 0:g} per second) "
        "have annotations\n"
        "[Sequence]\n"
        f"name={video.video_id}\n"
        f"frameRate={video.fps or video.sampled_fps or 0:g}\n"
        f"seqLength={video.frame_count}\n"
        f"imWidth={video.width}\nimHeight={video.height}\nimExt=.jpg\n"
    )


def write(store: TableStore, videos: Sequence[VideoInfo], target: Target,
          note: Callable[[str], None]) -> dict[str, int]:
    classes = class_ids(videos)
    totals = {"videos": 0, "tracks": 0, "frames": 0, "masks": 0}
    for video in videos:
        if any(o.object_id >= INSTANCES or o.object_id < 0 for o in video.objects):
            note(f"skipped video {video.video_id}: MOTS ids hold object ids 0-{INSTANCES - 1} only")
            continue
        label_of = {o.object_id: classes[o.label or "object"] for o in video.objects}
        with target.open(f"{video.video_id}", "instances", "labels.txt") as f:
            f.write("".join(f"{name}\n" for name in classes))
        with target.open(f"{video.video_id}", "seqinfo.ini") as f:
            f.write(seqinfo(video, "MOTS txt frames are 1-based source frames; instances/frame_NNNNNN.png are "
                                   "0-based source frames; id = class_id * 1000 + object_id"))
        seen: set[int] = set()
        with target.open(f"{video.video_id}.txt") as txt:
            for frame_index, rows in masks.grouped(store, video, "frame_index", object_ids=list(label_of)):
                frame = video.source_frame(frame_index)
                ids = rows.column("object_id").to_pylist()
                rles = rows.column("rle").to_pylist()
                for object_id, rle in zip(ids, rles):
                    h, w = rle["size"]
                    txt.write(f"{frame + 1} {label_of[object_id] * INSTANCES + object_id} {label_of[object_id]} "
                              f"{h} {w} {rle['counts']}\n")
                _write_png(target, video, frame, ids, rles, rows.column("area").to_pylist(), label_of)
                seen.update(ids)
                totals["frames"] += 1
                totals["masks"] += len(ids)
        totals["videos"] += 1
        totals["tracks"] += len(seen)
    return totals


def _write_png(target: Target, video: VideoInfo, frame: int, ids: list[int], rles: list[dict], areas: list[int],
               label_of: dict[int, int]) -> None:
    """One frame's index image. Each mask is painted inside its own extent only (pycocotools'
    `toBbox`, read from the RLE without decoding): on a 720p frame that halves the cost per object."""
    h, w = (int(v) for v in rles[0]["size"])
    image = np.zeros((h, w), np.uint16)
    coco = [{"size": [int(v) for v in r["size"]], "counts": r["counts"]} for r in rles]
    extents = mask_utils.toBbox(coco)
    for k in sorted(range(len(ids)), key=lambda k: -(areas[k] or 0)):
        x, y, bw, bh = (int(v) for v in extents[k])
        if bw and bh:
            inside = (slice(y, y + bh), slice(x, x + bw))
            np.copyto(image[inside], label_of[ids[k]] * INSTANCES + ids[k],
                      where=mask_utils.decode(coco[k])[inside].view(bool))
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)  # speed over size: label images stay small
    with target.open(f"{video.video_id}", "instances", f"frame_{frame:06d}.png", mode="wb") as f:
        f.write(buffer.getvalue())
