"""Tracker contract on real encoded videos, with the tiny (random-weight) SAM 2.

Random weights make tracked masks meaningless, so these tests check the contract: ids, sources,
frame indices and timestamps, RLE that decodes to the frame size, boxes and areas consistent with
the masks. Where SAM 2 reproduces its input (a mask prompt or a discovered mask on its own frame),
the mask is also compared with the ground truth.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from actors.prompts import ObjectPrompt
from actors.discovery import Candidate
from actors.rle import decode_rle, encode_masks
from actors.seeds import Seed, TrackerInputError
from actors.session import TrackingSession
from actors.tracker import Tracker

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def gt_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


def check_contract(tracks: list[dict], video) -> None:
    """Every track and frame has the objects-table shape and is self-consistent."""
    height, width = video.frames.shape[1:3]
    json.dumps(tracks)  # what leaves the actor is plain JSON
    ids = [t["object_id"] for t in tracks]
    assert ids == sorted(set(ids))
    for t in tracks:
        assert set(t) == {"object_id", "source", "frames"}
        assert t["source"] in ("prompt", "auto")
        indices = [f["frame_index"] for f in t["frames"]]
        assert indices == sorted(set(indices))
        for f in t["frames"]:
            assert set(f) == {"frame_index", "ts", "bbox", "area", "score", "rle"}
            assert 0 <= f["frame_index"] < len(video.frames)
            assert f["ts"] == pytest.approx(video.timestamps[f["frame_index"]])
            assert f["rle"]["size"] == [height, width] and isinstance(f["rle"]["counts"], str)
            mask = decode_rle(f["rle"])
            assert mask.shape == (height, width)
            assert f["area"] == int(mask.sum()) > 0
            assert f["bbox"] == list(gt_box(mask))
            assert 0.0 <= f["score"] <= 1.0


def frame_of(track: dict, index: int) -> dict:
    return next(f for f in track["frames"] if f["frame_index"] == index)


def test_every_prompt_kind_in_one_session(tiny_tracker, shapes_video):
    v = shapes_video
    red, blue = v.gt_mask(0, 0), v.gt_mask(1, 0)
    prompts = [
        ObjectPrompt(box=gt_box(red)),
        ObjectPrompt(points=((125.0, 85.0), (20.0, 100.0)), labels=(1, 0), object_id=7),
        ObjectPrompt(mask_rle=encode_masks(blue[None])[0], frame=0),
        ObjectPrompt(box=gt_box(blue), points=((125.0, 85.0),), labels=(1,), ts=0.0),
    ]
    tracks = tiny_tracker.track(v.frames, v.timestamps, prompts)
    check_contract(tracks, v)
    assert [t["object_id"] for t in tracks] == [1, 2, 3, 7]  # user id kept, others from 1 up
    assert {t["source"] for t in tracks} == {"prompt"}
    for t in tracks:  # tracked over all sampled frames (tiny reports objects present)
        assert [f["frame_index"] for f in t["frames"]] == list(range(len(v.frames)))
    mask_track = tracks[1]  # ids: box 1, points 7 (given), mask 2, box+points 3
    assert iou(decode_rle(frame_of(mask_track, 0)["rle"]), blue) > 0.8  # a mask prompt is reproduced
    assert tiny_tracker.last_stats["max_objects_in_session"] == 4


def test_prompt_in_the_middle_tracks_both_ways(tiny_tracker, shapes_video):
    v = shapes_video
    k = 4  # ts 0.8 s
    red = v.gt_mask(0, k)
    prompt = ObjectPrompt(mask_rle=encode_masks(red[None])[0], ts=float(v.timestamps[k]) + 0.04)  # nearest frame
    (track,) = tiny_tracker.track(v.frames, v.timestamps, [prompt])
    check_contract([track], v)
    indices = [f["frame_index"] for f in track["frames"]]
    assert indices == list(range(len(v.frames)))  # backward to the start and forward to the end
    assert iou(decode_rle(frame_of(track, k)["rle"]), red) > 0.8
    assert frame_of(track, k)["score"] > 0.99  # mask prompts are certain


def test_two_prompts_for_one_object_and_a_late_object(tiny_tracker, shapes_video):
    v = shapes_video
    box = gt_box(v.gt_mask(0, 3))
    prompts = [ObjectPrompt(box=box, frame=3, object_id=5),
               ObjectPrompt(box=gt_box(v.gt_mask(0, 7)), frame=7, object_id=5),
               ObjectPrompt(box=gt_box(v.gt_mask(2, 8)), frame=8)]
    tracks = tiny_tracker.track(v.frames, v.timestamps, prompts)
    check_contract(tracks, v)
    assert [t["object_id"] for t in tracks] == [1, 5]
    assert [f["frame_index"] for f in tracks[1]["frames"]] == list(range(len(v.frames)))


def gt_discoverer(video, score: float = 0.9):
    """Proposes the ground-truth masks of the shapes present on a frame (SAM 2 stands in for it in production)."""

    def discover(frame: np.ndarray) -> list[Candidate]:
        k = video.index_of(frame)
        masks = [video.gt_mask(s, k) for s in range(len(video.truth.shapes))]
        return [Candidate(mask=m, score=score) for m in masks if m is not None]

    return discover


def track_matching(tracks: list[dict], video, shape: int, index: int) -> dict | None:
    """The track whose mask on frame `index` is the ground truth of `shape` (IoU > 0.8), if any."""
    gt = video.gt_mask(shape, index)
    for t in tracks:
        f = next((f for f in t["frames"] if f["frame_index"] == index), None)
        if f is not None and iou(decode_rle(f["rle"]), gt) > 0.8:
            return t
    return None


def test_automatic_discovery_finds_an_object_that_enters_later(shapes_video):
    v = shapes_video
    tracker = Tracker("tiny", keyframe_interval_s=1.0, backfill_auto=False, discover=gt_discoverer(v))
    tracks = tracker.track(v.frames, v.timestamps)
    check_contract(tracks, v)
    assert {t["source"] for t in tracks} == {"auto"}
    assert tracker.last_stats["keyframes_searched"] == 2  # ts 0.0 and 1.0
    first = [track_matching(tracks, v, s, 0) for s in (0, 1)]
    assert all(first) and first[0]["object_id"] != first[1]["object_id"]
    late = track_matching(tracks, v, 2, 5)  # the yellow shape enters at 1.0 s = keyframe 5
    assert late is not None and late["object_id"] not in (first[0]["object_id"], first[1]["object_id"])
    assert late["frames"][0]["frame_index"] == 5
    assert v.gt_mask(2, 0) is None


def test_automatic_tracks_are_backfilled_to_the_previous_keyframe(shapes_video):
    v = shapes_video
    tracker = Tracker("tiny", keyframe_interval_s=1.0, discover=gt_discoverer(v))
    tracks = tracker.track(v.frames, v.timestamps)
    check_contract(tracks, v)
    late = track_matching(tracks, v, 2, 5)
    assert late is not None
    assert [f["frame_index"] for f in late["frames"]][0] == 1  # frames 1..4 tracked backward, not keyframe 0


def test_max_objects_caps_automatic_objects(shapes_video):
    v = shapes_video
    tracker = Tracker("tiny", keyframe_interval_s=1.0, max_objects=2, discover=gt_discoverer(v))
    tracks = tracker.track(v.frames, v.timestamps)
    check_contract(tracks, v)
    assert len(tracks) == 2 and tracker.last_stats["max_objects_in_session"] == 2


def test_absent_frames_are_omitted_and_stale_automatic_objects_make_room(shapes_video):
    """A presence head that says "absent" everywhere: objects exist only on their seed frames."""
    v = shapes_video
    tracker = Tracker("tiny", keyframe_interval_s=0.4, retire_after_s=0.5, max_objects=2, chunk_size=2,
                      backfill_auto=False, discover=gt_discoverer(v))
    with torch.no_grad():
        tracker.bundle.model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(-20.0)
    tracks = tracker.track(v.frames, v.timestamps)
    check_contract(tracks, v)
    assert all(len(t["frames"]) == 1 for t in tracks)  # only the discovery frame: tracked frames are absent
    seeds = sorted(t["frames"][0]["frame_index"] for t in tracks)
    # Keyframes 0, 2, 4, 6, 8: two objects at 0; none at 2 (no room); retired after 0.5 s, so two new at 4, ...
    assert seeds == [0, 0, 4, 4, 8, 8]
    assert tracker.last_stats["max_objects_in_session"] == 2
    red = v.gt_mask(0, 4)
    (prompted,) = tracker.track(v.frames, v.timestamps, [ObjectPrompt(mask_rle=encode_masks(red[None])[0], frame=4)])
    assert [f["frame_index"] for f in prompted["frames"]] == [4]


def test_nothing_discovered_is_zero_objects_not_an_error(shapes_video):
    v = shapes_video
    tracker = Tracker("tiny", keyframe_interval_s=1.0, discover=lambda frame: [])
    assert tracker.track(v.frames, v.timestamps) == []
    assert tracker.track(v.frames[:0], v.timestamps[:0]) == []


def test_sam2_automatic_mask_generation(tiny_tracker, shapes_video):
    """The real discovery path (SAM 2 mask generation on the shared image model) with tiny's settings."""
    v = shapes_video
    tracks = tiny_tracker.track(v.frames[:6], v.timestamps[:6])
    check_contract(tracks, type(v)(v.frames[:6], v.timestamps[:6], v.truth))
    assert {t["source"] for t in tracks} <= {"auto"}
    assert tiny_tracker.last_stats["max_objects_in_session"] <= tiny_tracker.max_objects


def test_chunked_long_video_keeps_ids_and_bounded_state(long_video):
    v = long_video
    prompts = [ObjectPrompt(box=gt_box(v.gt_mask(0, 0))),
               ObjectPrompt(box=gt_box(v.gt_mask(1, 9)), frame=9, object_id=9)]
    chunked = Tracker("tiny", chunk_size=3)
    whole = Tracker("tiny", chunk_size=len(v.frames))
    a = chunked.track(v.frames, v.timestamps, prompts)
    b = whole.track(v.frames, v.timestamps, prompts)
    check_contract(a, v)
    assert [t["object_id"] for t in a] == [1, 9]
    for t in a:
        assert [f["frame_index"] for f in t["frames"]] == list(range(len(v.frames)))
    assert a == b  # state carried across chunk boundaries: chunking changes nothing
    cfg = chunked.bundle.model.config
    window = max(cfg.num_maskmem, cfg.max_object_pointers_in_encoder)  # farthest tracked frame SAM 2 reads
    assert window == 4
    assert chunked.last_stats["max_state_frames"] <= window + 1  # + the prompt frame; the video has 16


def test_compacting_a_session_keeps_the_remaining_objects_exact(tiny_tracker, shapes_video):
    v = shapes_video
    bundle = tiny_tracker.bundle
    pixels = bundle.processor.video_processor(videos=[v.frames], return_tensors="pt").pixel_values_videos[0]
    boxes = [(10.0, 20.0, 46.0, 48.0), (100.0, 60.0, 140.0, 100.0), (60.0, 10.0, 90.0, 40.0)]

    def run(compact_at: int | None) -> dict[int, list[str]]:
        session = TrackingSession(bundle, *v.frames.shape[1:3])
        for oid, box in enumerate(boxes, 1):
            session.add(Seed(object_id=oid, source="prompt", frame=0, prompt=ObjectPrompt(box=box), box=box))
        out: dict[int, list[str]] = {1: [], 3: []}
        for i in range(len(v.frames)):
            if i == compact_at:
                session.compact([1, 3])
                assert session.object_ids == [1, 3]
            result = session.step(i, pixels[i])
            for oid, rle in zip(result.object_ids, result.rles, strict=True):
                if oid in out:
                    out[oid].append(rle["counts"])
            session.prune(i)
        return out

    assert run(compact_at=5) == run(compact_at=None)


@pytest.mark.parametrize(
    "prompt, message",
    [
        (ObjectPrompt(box=(10, 10, 50, 50), frame=10), "frame 10 does not exist"),
        (ObjectPrompt(box=(10, 10, 50, 50), ts=9.0), "ts 9 s is outside the video"),
        (ObjectPrompt(box=(200, 10, 260, 50)), "lies outside the 160x120 frame"),
        (ObjectPrompt(box=(10, 10, 10, 50)), "zero area"),
        (ObjectPrompt(points=((10.0, 500.0),), labels=(1,)), "point (10, 500) lies outside"),
        (ObjectPrompt(points=((10.0, 10.0),), labels=(0,)), "at least one positive"),
        (ObjectPrompt(mask_rle=encode_masks(np.ones((1, 60, 80), bool))[0]), "mask size [60, 80] does not match"),
        (ObjectPrompt(mask_rle=encode_masks(np.zeros((1, 120, 160), bool))[0]), "mask is empty"),
    ],
)
def test_bad_prompts_raise_a_clear_error(tiny_tracker, shapes_video, prompt, message):
    v = shapes_video
    with pytest.raises(TrackerInputError) as err:
        tiny_tracker.track(v.frames, v.timestamps, [ObjectPrompt(box=(1, 1, 20, 20)), prompt])
    assert message in str(err.value)
    assert "prompt 1" in str(err.value)


def test_duplicate_prompt_for_one_object_on_one_frame(tiny_tracker, shapes_video):
    v = shapes_video
    with pytest.raises(TrackerInputError, match="two prompts on frame 0"):
        tiny_tracker.track(v.frames, v.timestamps, [ObjectPrompt(box=(1, 1, 20, 20), object_id=3),
                                                    ObjectPrompt(points=((5.0, 5.0),), object_id=3, labels=(1,))])


def test_bfloat16_path(shapes_video):
    """The dtype used on GPUs, exercised on the CPU: prompts of each kind and SAM 2 discovery."""
    v = shapes_video
    tracker = Tracker("tiny", dtype="bfloat16", keyframe_interval_s=1.0)
    assert tracker.bundle.model.dtype == torch.bfloat16
    frames, ts = v.frames[:4], v.timestamps[:4]
    red = v.gt_mask(0, 3)
    prompts = [ObjectPrompt(box=gt_box(v.gt_mask(1, 0))), ObjectPrompt(points=((120.0, 80.0),), labels=(1,), frame=2),
               ObjectPrompt(mask_rle=encode_masks(red[None])[0], frame=3)]
    part = type(v)(frames, ts, v.truth)
    check_contract(tracker.track(frames, ts, prompts), part)
    check_contract(tracker.track(frames, ts), part)
