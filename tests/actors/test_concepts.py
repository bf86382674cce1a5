"""The SAM 3 concept tracker on tiny-sam3: objects found by name come out in the Tracker's track format,
labelled with their concept, deterministically, and no clip's session outlives its `track` call."""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest
import torch

from actors import concepts as concepts_module
from actors.concepts import CONCEPT_PHASES, ConceptError, ConceptTracker
from actors.rle import decode_rle, rle_areas, rle_boxes
from actors.seeds import TrackerInputError

pytestmark = pytest.mark.usefixtures("torch_single_thread")

FRAME_KEYS = {"frame_index", "ts", "bbox", "area", "score", "rle"}


def moving_shapes(frames: int = 6, height: int = 96, width: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """A red box moving right and a blue disc moving left on grey, 5 frames a second."""
    video = np.full((frames, height, width, 3), 90, np.uint8)
    yy, xx = np.mgrid[:height, :width]
    for t in range(frames):
        video[t, 20:44, 10 + 5 * t:40 + 5 * t] = (220, 40, 40)
        video[t][(yy - 60) ** 2 + (xx - (90 - 4 * t)) ** 2 < 14 ** 2] = (40, 60, 220)
    return video, np.round(np.arange(frames) / 5.0, 3)


@pytest.fixture(scope="module")
def tracker() -> ConceptTracker:
    return ConceptTracker("tiny-sam3", device="cpu")


@pytest.fixture(scope="module")
def clip() -> tuple[np.ndarray, np.ndarray]:
    return moving_shapes()


def _live_sessions() -> int:
    from transformers.models.sam3_video.modeling_sam3_video import Sam3VideoInferenceSession

    gc.collect()
    return sum(type(o) is Sam3VideoInferenceSession for o in gc.get_objects())


def _live_tensors() -> int:
    gc.collect()
    return sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())


def test_labelled_tracks_in_the_tracker_format(tracker, clip):
    video, ts = clip
    tracks = tracker.track(video, ts, ["person", "car"])
    assert tracker.name == "tiny-sam3"
    assert [t["object_id"] for t in tracks] == list(range(1, len(tracks) + 1))
    assert {t["label"] for t in tracks} == {"person", "car"}  # every concept finds something in tiny
    assert len(tracks) <= 4
    for track in tracks:
        assert set(track) == {"object_id", "source", "label", "score", "frames"}
        assert track["source"] == "concept" and isinstance(track["score"], float) and 0 < track["score"] <= 1
        indices = [f["frame_index"] for f in track["frames"]]
        assert indices == sorted(set(indices)) and indices and all(0 <= i < len(video) for i in indices)
        for frame in track["frames"]:
            assert set(frame) == FRAME_KEYS
            assert frame["ts"] == ts[frame["frame_index"]]
            assert decode_rle(frame["rle"]).shape == video.shape[1:3]
            assert frame["area"] == int(rle_areas([frame["rle"]])[0]) > 0
            assert frame["bbox"] == [float(v) for v in rle_boxes([frame["rle"]])[0]]
            assert all(isinstance(v, float) for v in frame["bbox"]) and 0 <= frame["score"] <= 1
    json.dumps(tracks)  # the stage ships them as JSON
    assert set(tracker.times.take()) == set(CONCEPT_PHASES)
    assert tracker.last_stats["frames"] == len(video) and tracker.last_stats["objects"] == len(tracks)


def test_deterministic_across_calls(tracker, clip):
    video, ts = clip
    assert tracker.track(video, ts, ["person", "car"]) == tracker.track(video, ts, ["person", "car"])


def test_each_concept_labels_its_own_objects(tracker, clip):
    video, ts = clip
    both = tracker.track(video, ts, ["person", " red car "])
    alone = {c: tracker.track(video, ts, [c]) for c in ("person", "red car")}
    assert {t["label"] for t in both} == {"person", "red car"}  # as written, stripped
    for concept, tracks in alone.items():
        assert tracks and {t["label"] for t in tracks} == {concept}
        # The same objects as in the joint run: SAM 3 keeps each concept's objects to themselves.
        assert [t["frames"] for t in tracks] == [t["frames"] for t in both if t["label"] == concept]
    # Case and spacing variants are one concept, under its first spelling.
    assert {t["label"] for t in tracker.track(video, ts, ["Person", "person", "PERSON "])} == {"Person"}


def test_at_most_max_objects_best_scores_first(tracker, clip):
    video, ts = clip
    everything = tracker.track(video, ts, ["person", "car"])
    capped = ConceptTracker("tiny-sam3", device="cpu", max_objects=1)
    assert capped.bundle.model.max_num_objects == 1  # SAM 3 itself tracks no more at once
    tracks = capped.track(video, ts, ["person", "car"])
    assert len(everything) > 1 and len(tracks) == 1 and tracks[0]["object_id"] == 1
    assert tracks[0]["score"] == max(t["score"] for t in everything)


def test_bad_concepts_fail_before_any_model_work(tracker, clip, monkeypatch):
    video, ts = clip
    tracker.times.take()

    def no_model(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(tracker.bundle.processor, "init_video_session", no_model)
    for concepts, named in [([], "no concepts"), (["car", ""], r"concept #2 \(''\) is empty"),
                            (["car", "x" * 40], "concept 'x{40}' is 42 tokens long")]:
        with pytest.raises(ConceptError, match=named):
            tracker.track(video, ts, concepts)
    assert isinstance(ConceptError("x"), ValueError) and tracker.times.take() == {}
    with pytest.raises(TrackerInputError, match="6 frames but 5 timestamps"):
        tracker.track(video, ts[:5], ["car"])
    assert tracker.track(video[:0], ts[:0], ["car"]) == []


def test_no_session_outlives_its_call(tracker, clip):
    video, ts = clip[0][:3], clip[1][:3]
    tracker.track(video, ts, ["person", "car"])
    tensors_after_one = _live_tensors()
    for _ in range(5):
        assert tracker.track(video, ts, ["person", "car"])
    assert _live_sessions() == 0
    assert _live_tensors() <= tensors_after_one


def test_failed_call_releases_its_session(tracker, clip, monkeypatch):
    video, ts = clip

    def broken(*args, **kwargs):
        raise RuntimeError("broken post-processing")

    monkeypatch.setattr(tracker.bundle.processor, "postprocess_outputs", broken)
    with pytest.raises(RuntimeError, match="broken"):
        tracker.track(video, ts, ["car"])
    assert _live_sessions() == 0


def test_pruning_memory_does_not_change_tracks(tracker, monkeypatch):
    """12 frames, three times tiny's memory window: the pruned session tracks exactly like the full one."""
    video, ts = moving_shapes(frames=12)
    pruned = tracker.track(video, ts, ["person", "car"])
    window = max(tracker.bundle.model.config.tracker_config.num_maskmem,
                 tracker.bundle.model.config.tracker_config.max_object_pointers_in_encoder)
    assert 0 < tracker.last_stats["max_state_frames"] <= window + 1  # + the conditioning frame
    monkeypatch.setattr(concepts_module._ModelClock, "_prune", lambda self, session, frame_idx: None)
    assert tracker.track(video, ts, ["person", "car"]) == pruned
    assert max(len(t["frames"]) for t in pruned) == len(video)
