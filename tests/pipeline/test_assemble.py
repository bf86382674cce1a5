"""The driver's assembly of a video from clip rows, fed with a scripted mask sequence.

The masks are the ground truth of the test videos' moving shapes (`pipeline.samples`), encoded as
the tracker encodes them, so linking sees what a perfect tracker would hand it: one shape crossing
a clip boundary must come out as one object with one id, a per-clip caption in each clip and a
request for its whole-track caption; a second shape that only appears in the second clip gets a
new id; across a shot cut nothing is linked.
"""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
from pycocotools import mask as mask_utils

from actors.columns import times_to_column
from pipeline.assemble import VideoAssembly, assemble
from pipeline.samples import DEFAULT_SHAPES, GroundTruth

W, H = 160, 120
TRUTH = GroundTruth(path="", width=W, height=H, timestamps=[], shapes=list(DEFAULT_SHAPES[:2]))


def frame(shape: int, frame_index: int, t: float) -> dict:
    mask = TRUTH.mask(shape, t)
    assert mask is not None and mask.any()
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"frame_index": frame_index, "ts": t, "rle": {"size": list(rle["size"]), "counts": rle["counts"].decode()},
            "bbox": [float(v) for v in mask_utils.toBbox(rle)], "area": int(mask.sum()), "score": 1.0}


def clip_row(index: int, times: list[float], tracks: dict[int, int], *, boundary: str, shared: bool,
             first_frame: int = 0) -> dict:
    """A clip as the graph returns it; `tracks` maps local ids to the shape they follow."""
    owned = len(times) - int(shared)
    track_records = [
        {"object_id": local, "source": "auto",
         "frames": [frame(shape, k, t) for k, t in enumerate(times) if k >= first_frame]}
        for local, shape in tracks.items()
    ]
    captions = [{"object_id": local, "caption": f"clip {index} object {local}", "ts_start": times[0],
                 "ts_end": times[owned - 1], "num_tokens": 4} for local in tracks]
    meta = {"duration_s": 4.0, "fps": 10.0, "width": W, "height": H, "num_frames": 40, "sampled_fps": 2.0,
            "thinned": False, "num_clips": 2, "prompted": False}
    return {
        "video_id": "v", "uri": "/videos/v.mp4", "kind": "clip", "clip_index": index, "num_owned": owned,
        "clip_json": json.dumps({"ts_start": times[0], "ts_end": times[owned - 1] + 0.5, "boundary": boundary,
                                 "shared": shared}),
        "video_json": json.dumps(meta), "timestamps": times_to_column(times), "error": "", "note": "",
        "tracks_json": json.dumps(track_records), "captions_json": json.dumps(captions), "qa_json": "[]",
    }


def assembled(boundary: str):
    video = VideoAssembly(video_id="v", uri="/videos/v.mp4", run_id="r", size_bytes=1, etag=None,
                          meta=json.loads(clip_row(0, [0.0], {}, boundary="end", shared=False)["video_json"]))
    # clip 0: shape 0 over 0..1.5 s, tracked onto the next clip's first frame (2.0 s)
    video.add(clip_row(0, [0.0, 0.5, 1.0, 1.5, 2.0], {1: 0}, boundary=boundary, shared=True))
    # clip 1: discovery finds shape 0 (local id 1) at its start and shape 1 (local id 2)
    video.add(clip_row(1, [2.0, 2.5, 3.0, 3.5], {1: 0, 2: 1}, boundary="end", shared=False))
    assert video.complete
    return assemble(video, mode="lite", model="tiny-lite", tracker="tiny-sam2",
                    indexed_at=dt.datetime.now(dt.timezone.utc), track_frames=4)


def test_a_track_crossing_a_window_boundary_keeps_its_id():
    done = assembled("window")
    objects = {o["object_id"]: o for o in done.tables["objects"]}
    assert len(objects) == 2
    crossing = next(o for o in objects.values() if o["num_frames"] == 8)
    assert (crossing["first_ts"], crossing["last_ts"]) == (0.0, 3.5)
    masks = [m for m in done.tables["masks"] if m["object_id"] == crossing["object_id"]]
    assert sorted({m["clip_index"] for m in masks}) == [0, 1]
    assert [m["frame_index"] for m in masks] == list(range(8))  # numbered video-wide, shared frame once
    captions = [c for c in done.tables["captions"] if c["object_id"] == crossing["object_id"]]
    assert sorted(c["clip_index"] for c in captions) == [0, 1]
    request = done.track_request
    assert request is not None
    assert [t["object_id"] for t in request["tracks"]] == [crossing["object_id"]]
    assert len(request["tracks"][0]["frames"]) == 4
    assert request["spans"][crossing["object_id"]] == (0.0, 3.5)
    assert done.tables["videos"][0]["sampled_ts"] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]


def test_nothing_is_linked_across_a_shot_cut():
    done = assembled("shot")
    assert len(done.tables["objects"]) == 3
    assert {m["clip_index"] for m in done.tables["masks"] if m["object_id"] == 0} == {0}
    assert done.track_request is None
