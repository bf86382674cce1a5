"""`TrackerStage`: the Ray Data batch contract (per-video errors recorded, never raised)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from actors.prompts import ObjectPrompt, prompts_to_json
from actors.tracker import TrackerStage

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def object_array(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


@pytest.fixture(scope="module")
def stage():
    return TrackerStage("tiny", keyframe_interval_s=1.0, max_objects=4)


def test_batch_with_good_bad_failed_and_empty_videos(stage, shapes_video):
    v = shapes_video
    frames, ts = v.frames[:4], v.timestamps[:4]
    rows = [
        ("auto", frames, ts, "", None),
        ("prompted", frames, ts, prompts_to_json([ObjectPrompt(box=(10, 20, 46, 48)),
                                                  ObjectPrompt(points=((120, 80),), labels=(1,), ts=0.2)]), None),
        ("bad-box", frames, ts, prompts_to_json([ObjectPrompt(box=(300, 300, 400, 400))]), None),
        ("bad-frame", frames, ts, prompts_to_json([ObjectPrompt(box=(1, 1, 9, 9), frame=40)]), None),
        ("bad-mask", frames, ts, json.dumps([{"mask": {"size": [10, 10], "counts": "PP0"}}]), None),
        ("bad-json", frames, ts, "{not json", None),
        ("upstream", np.zeros((0, 0, 0, 3), np.uint8), np.zeros(0), "", "decode: cannot open file"),
        ("no-frames", np.zeros((0, 120, 160, 3), np.uint8), np.zeros(0), "", None),
    ]
    batch = {
        "video_id": np.array([r[0] for r in rows]),
        "frames": object_array([r[1] for r in rows]),
        "timestamps": object_array([r[2] for r in rows]),
        "prompts_json": np.array([r[3] for r in rows], dtype=object),
        "error": object_array([r[4] for r in rows]),
        "uri": np.array([f"/videos/{r[0]}.mp4" for r in rows]),
    }
    out = stage(batch)
    by_id = {vid: i for i, vid in enumerate(out["video_id"])}
    assert list(out["uri"]) == list(batch["uri"]) and out["frames"] is batch["frames"]  # passed through
    assert set(out["tracker"]) == {"tiny-sam2"}

    def tracks(vid: str) -> list[dict]:
        return json.loads(out["tracks_json"][by_id[vid]])

    def error(vid: str):
        return out["error"][by_id[vid]]

    assert error("auto") is None and all(t["source"] == "auto" for t in tracks("auto"))
    assert error("prompted") is None and [t["object_id"] for t in tracks("prompted")] == [1, 2]
    assert all(len(t["frames"]) == 4 for t in tracks("prompted"))
    assert "lies outside the 160x120 frame" in error("bad-box") and tracks("bad-box") == []
    assert "frame 40 does not exist" in error("bad-frame")
    assert "mask size [10, 10] does not match the frame size [120, 160]" in error("bad-mask")
    assert "not valid JSON" in error("bad-json")
    assert error("upstream") == "decode: cannot open file" and tracks("upstream") == []
    assert error("no-frames") is None and tracks("no-frames") == []


def test_same_shape_frames_arrive_as_one_array(stage, shapes_video):
    """Ray Data turns equal-shaped tensors into one (N, T, H, W, 3) array instead of an object array."""
    v = shapes_video
    batch = {
        "video_id": np.array(["a", "b"]),
        "frames": np.stack([v.frames[:2], v.frames[2:4]]),
        "timestamps": np.stack([v.timestamps[:2], v.timestamps[2:4]]),
        "prompts_json": np.array([prompts_to_json([ObjectPrompt(box=(10, 20, 46, 48))])] * 2, dtype=object),
    }
    out = stage(batch)
    assert list(out["error"]) == [None, None]
    (track,) = json.loads(out["tracks_json"][1])
    assert [f["ts"] for f in track["frames"]] == pytest.approx(list(v.timestamps[2:4]))


def test_lite_rows_leave_with_only_the_frames_pixelrefer_sees(shapes_video):
    v = shapes_video
    frames, ts = v.frames[:6], v.timestamps[:6]
    batch = {
        "video_id": np.array(["clip", "track"]),
        "kind": np.array(["clip", "track"], dtype=object),
        "frames": object_array([frames, frames[:2]]),
        "timestamps": object_array([ts, ts[:2]]),
        "num_owned": np.array([5, -1]),  # frame 5 is the next clip's first frame
        "tracks_json": np.array(["", "[]"], dtype=object),
        "error": object_array([None, None]),
    }
    everything = TrackerStage("tiny", keyframe_interval_s=1.0, max_objects=2)(dict(batch))
    assert everything["frames"] is batch["frames"] and list(everything["frame_indices"]) == ["", ""]
    stage = TrackerStage("tiny", keyframe_interval_s=1.0, max_objects=2, ship_frames="shown", object_frames=2)
    out = stage(dict(batch))
    tracks = json.loads(out["tracks_json"][0])
    assert tracks, "the tiny tracker finds objects on the shapes video"
    shown = sorted({f for t in tracks for f in (lambda fs: [fs[0], fs[-1]] if len(fs) > 1 else fs)(
        sorted(x["frame_index"] for x in t["frames"] if x["frame_index"] < 5))})
    assert json.loads(out["frame_indices"][0]) == shown and 5 not in shown
    assert np.array_equal(out["frames"][0], frames[shown])
    assert out["frame_indices"][1] == "" and len(out["frames"][1]) == 2  # whole-track rows keep theirs
    assert {f"phase_s_tracker_{p}" for p in ("preprocess", "discovery", "propagation", "mask_encoding")} <= set(out)
    assert out["phase_s_tracker_propagation"].sum() > 0 and out["phase_s_tracker_discovery"].sum() > 0
