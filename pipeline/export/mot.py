"""MOT Challenge boxes, per video.

Layout under `--out` FOLDER, per video: `<video_id>.txt` with one line per mask's box,
`frame,id,bb_left,bb_top,bb_width,bb_height,conf,-1,-1,-1` (MOT16/17 tracker results: what
TrackEval and Datumaro's `mot_seq` read), in frame order; `frame` is the 1-based source frame
(round(ts x fps) + 1), `id` the index's `object_id`, the box the `masks` table's `bbox` (xyxy
pixels) as left/top/width/height, `conf` the tracker's score. `<video_id>/seqinfo.ini` states the
source frame rate and size. Only sampled frames have lines.

Streamed by frame (`masks.grouped`): held is one range of frames' rows.
"""

from __future__ import annotations

from typing import Callable, Sequence

from pipeline.export import masks
from pipeline.export.mots import seqinfo
from pipeline.export.selection import VideoInfo
from pipeline.export.target import Target
from pipeline.store import TableStore


def write(store: TableStore, videos: Sequence[VideoInfo], target: Target,
          note: Callable[[str], None]) -> dict[str, int]:
    totals = {"videos": 0, "tracks": 0, "frames": 0, "boxes": 0}
    for video in videos:
        ids = [o.object_id for o in video.objects]
        with target.open(f"{video.video_id}", "seqinfo.ini") as f:
            f.write(seqinfo(video, "frames are 1-based source frames; id = object_id"))
        seen: set[int] = set()
        with target.open(f"{video.video_id}.txt") as txt:
            for frame_index, rows in masks.grouped(store, video, "frame_index", object_ids=ids):
                frame = video.source_frame(frame_index) + 1
                for object_id, bbox, score in zip(rows.column("object_id").to_pylist(), rows.column("bbox").to_pylist(),
                                                  rows.column("score").to_pylist()):
                    x0, y0, x1, y1 = bbox
                    txt.write(f"{frame},{object_id},{x0:.2f},{y0:.2f},{x1 - x0:.2f},{y1 - y0:.2f},"
                              f"{(score if score is not None else 1.0):.4f},-1,-1,-1\n")
                    seen.add(object_id)
                    totals["boxes"] += 1
                totals["frames"] += 1
        totals["videos"] += 1
        totals["tracks"] += len(seen)
    return totals
