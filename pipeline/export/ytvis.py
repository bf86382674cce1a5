"""YouTube-VIS JSON: one file, one annotation per object with per-frame COCO RLE.

Frames: a YTVIS video is a list of frames, here the index's sampled grid (`videos.sampled_ts`):
frame k of a video is `masks.frame_index` k, at `pixelrefer.timestamps[k]` seconds (decoder
presentation time), source frame `pixelrefer.source_frames[k]` (round(ts x fps), 0-based);
`file_names` name those source frames (`<video_id>/frame_<source frame:06d>.jpg`, CVAT's and
ffmpeg's `%06d` numbering), so extracted frames line up. Ids: `videos[].id` 1, 2, ... in export
order with the index's `video_id` in `pixelrefer.video_id`; an annotation's `id` is its position,
its object keeps the index's `object_id` in `pixelrefer.object_id`; categories are the labels
(`object` for none), ids 1, 2, ... in name order.

`segmentations` hold the `masks` table's RLE as is (`size` [h, w], compressed `counts`), `bboxes`
COCO [x, y, w, h], `areas` pixels, null where the object has no mask. Extra fields
(`pixelrefer`: captions, label, span, source) are ignored by YTVIS readers.

Streamed: the header is written first, then one annotation at a time; held is one object's mask
rows of one video (`masks.grouped` by object).
"""

from __future__ import annotations

import json
from typing import IO, Any, Sequence

from pipeline.export import masks
from pipeline.export.selection import VideoInfo, captions_of
from pipeline.store import TableStore

DESCRIPTION = ("pixelrefer export (YouTube-VIS 2019 layout): frames are the index's sampled frames; "
               "pixelrefer.timestamps[k] is frame k's time in seconds, pixelrefer.source_frames[k] its 0-based "
               "source frame")


def categories(videos: Sequence[VideoInfo]) -> list[str]:
    return sorted({o.label or "object" for v in videos for o in v.objects})


def write(store: TableStore, videos: Sequence[VideoInfo], out: IO[str]) -> dict[str, int]:
    names = categories(videos)
    category_id = {name: i + 1 for i, name in enumerate(names)}
    head = {
        "info": {"description": DESCRIPTION, "version": "1.0", "contributor": "pixelrefer"},
        "licenses": [],
        "categories": [{"id": category_id[n], "name": n, "supercategory": "object"} for n in names],
        "videos": [_video_entry(i + 1, v) for i, v in enumerate(videos)],
    }
    text = json.dumps(head)
    out.write(text[:-1] + ', "annotations": [')
    count = masks_written = 0
    for number, video in enumerate(videos, start=1):
        captions = captions_of(store, video)
        objects = {o.object_id: o for o in video.objects}
        for object_id, rows in masks.grouped(store, video, "object_id", object_ids=list(objects)):
            obj = objects[object_id]
            ann = _annotation(count + 1, number, video, rows, category_id[obj.label or "object"])
            ann["pixelrefer"] = {"video_id": video.video_id, "object_id": object_id, "label": obj.label,
                                 "source": obj.source, "first_ts": obj.first_ts, "last_ts": obj.last_ts,
                                 "captions": captions.get(object_id, [])}
            out.write((", " if count else "") + json.dumps(ann))
            count += 1
            masks_written += rows.num_rows
    out.write("]}\n")
    return {"videos": len(videos), "tracks": count, "masks": masks_written}


def _video_entry(number: int, video: VideoInfo) -> dict[str, Any]:
    frames = [video.source_frame(k) for k in range(len(video.sampled_ts))]
    return {
        "id": number, "width": video.width, "height": video.height, "length": len(frames),
        "file_names": [f"{video.video_id}/frame_{f:06d}.jpg" for f in frames],
        "pixelrefer": {"video_id": video.video_id, "uri": video.uri, "run_id": video.run_id, "fps": video.fps,
                       "sampled_fps": video.sampled_fps, "timestamps": video.sampled_ts, "source_frames": frames},
    }


def _annotation(ann_id: int, video_number: int, video: VideoInfo, rows: Any, category: int) -> dict[str, Any]:
    n = len(video.sampled_ts)
    segmentations: list[Any] = [None] * n
    bboxes: list[Any] = [None] * n
    areas: list[Any] = [None] * n
    for frame, bbox, area, rle in zip(rows.column("frame_index").to_pylist(), rows.column("bbox").to_pylist(),
                                      rows.column("area").to_pylist(), rows.column("rle").to_pylist()):
        if frame is None or not 0 <= frame < n:
            continue
        segmentations[frame] = {"size": list(rle["size"]), "counts": rle["counts"]}
        x0, y0, x1, y1 = bbox
        bboxes[frame] = [round(x0, 3), round(y0, 3), round(x1 - x0, 3), round(y1 - y0, 3)]
        areas[frame] = area
    return {"id": ann_id, "video_id": video_number, "category_id": category, "iscrowd": 0,
            "height": video.height, "width": video.width, "length": 1,
            "segmentations": segmentations, "bboxes": bboxes, "areas": areas}
