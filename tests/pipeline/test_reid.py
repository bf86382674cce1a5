"""Re-identification (`pipeline.reid`) on scripted tracks and scripted clips: pure, no model, no Ray.

The vectors are made up here (the referrer's are tested in tests/actors/test_reid_vectors.py), so
these tests pin the rule itself: who may merge with whom, and what the tables show afterwards.
"""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pytest

from actors.referrer import encode_vector
from pipeline.assemble import VideoAssembly, assemble
from pipeline.reid import DEFAULT_THRESHOLD, Track, reidentify, unit
from schemas.tables import to_table
from pycocotools import mask as mask_utils

from actors.columns import times_to_column

DIM = 16
RNG = np.random.default_rng(7)
PERSON, OTHER = unit(RNG.normal(size=DIM)), unit(RNG.normal(size=DIM))


def near(vector: np.ndarray, noise: float = 0.05, seed: int = 1) -> np.ndarray:
    return unit(vector + noise * np.random.default_rng(seed).normal(size=vector.shape))


def t(tid: int, frames: range, vector: np.ndarray | None, label: str | None = None, prompt: int | None = None) -> Track:
    return Track(tid, frozenset(frames), vector, label, prompt)


def test_a_track_after_a_gap_joins_the_object_it_looks_like():
    merges = reidentify([t(0, range(0, 5), PERSON), t(1, range(5, 9), OTHER), t(2, range(9, 14), near(PERSON))])
    assert merges[0].object_id == merges[2].object_id == 0 and merges[0].score is None
    assert merges[2].score is not None and merges[2].score >= DEFAULT_THRESHOLD
    assert merges[1].object_id == 1 and merges[1].score is None


def test_two_tracks_visible_at_the_same_moment_are_never_merged():
    # Identical appearance, one shared frame: two things (twins, two cars of one model).
    merges = reidentify([t(0, range(0, 5), PERSON), t(1, range(4, 9), PERSON)])
    assert merges[0].object_id != merges[1].object_id
    # A third, later track may join one of them, never both.
    merges = reidentify([t(0, range(0, 5), PERSON), t(1, range(4, 9), PERSON), t(2, range(20, 25), PERSON)])
    assert len({m.object_id for m in merges.values()}) == 2


def test_concept_labels_and_prompts_are_never_crossed():
    merges = reidentify([t(0, range(0, 3), PERSON, "person"), t(1, range(5, 8), PERSON, "bicycle")])
    assert merges[0].object_id != merges[1].object_id
    merges = reidentify([t(3, range(0, 3), PERSON, prompt=3), t(4, range(5, 8), PERSON, prompt=4)])
    assert merges[3].object_id == 3 and merges[4].object_id == 4


def test_below_the_threshold_or_without_a_vector_a_track_starts_its_own_object():
    merges = reidentify([t(0, range(0, 3), PERSON), t(1, range(5, 8), OTHER), t(2, range(9, 12), None)])
    assert [merges[i].object_id for i in range(3)] == [0, 1, 2]
    far = [t(0, range(0, 3), PERSON), t(1, range(5, 8), near(PERSON, 0.3))]
    assert reidentify(far, threshold=0.999)[1].object_id == 1


def test_the_best_earlier_object_wins_and_the_result_is_deterministic():
    tracks = [t(0, range(0, 3), OTHER), t(1, range(3, 6), PERSON), t(2, range(6, 9), near(PERSON, 0.01))]
    merges = reidentify(tracks)
    assert merges[2].object_id == 1
    assert reidentify(list(reversed(tracks))) == merges


def test_many_tracks_of_a_few_objects_come_back_as_those_objects():
    """A cut every few frames (the gallery grows past its first allocation): 3 looks, 60 tracks."""
    looks = [PERSON, OTHER, unit(np.random.default_rng(11).normal(size=DIM))]
    tracks = [t(i, range(3 * i, 3 * i + 3), near(looks[i % 3], 0.05, seed=i)) for i in range(60)]
    merges = reidentify(tracks)
    assert {i: merges[i].object_id for i in range(60)} == {i: i % 3 for i in range(60)}


# -- through assemble: a person leaves the frame and comes back, scripted masks ---------------------

def frame(shape: int, frame_index: int, t: float) -> dict:
    """Shape `shape`'s box on a frame, encoded as the tracker encodes masks (shapes move right)."""
    mask = np.zeros((120, 160), dtype=np.uint8)
    x = 10 + 5 * frame_index
    mask[10 + 50 * shape:40 + 50 * shape, x:x + 30] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"frame_index": frame_index, "ts": t, "rle": {"size": list(rle["size"]), "counts": rle["counts"].decode()},
            "bbox": [float(v) for v in mask_utils.toBbox(rle)], "area": int(mask.sum()), "score": 1.0}


def _clip(index: int, times: list[float], tracks: dict[int, tuple[int, list[int]]], looks: dict[int, np.ndarray],
          boundary: str, num_clips: int, labels: dict[int, str] | None = None) -> dict:
    """A clip row; `tracks`: local id -> (the shape it follows, the frame positions where it is seen)."""
    records = [{"object_id": local, "source": "concept" if labels else "auto",
                **({"label": labels[local]} if labels else {}),
                "frames": [frame(shape, k, times[k]) for k in seen]} for local, (shape, seen) in tracks.items()]
    meta = {"duration_s": 10.0, "fps": 10.0, "width": 160, "height": 120, "num_frames": 100, "sampled_fps": 1.0,
            "thinned": False, "num_clips": num_clips, "prompted": False}
    return {
        "video_id": "v", "uri": "/v.mp4", "kind": "clip", "clip_index": index, "num_owned": len(times),
        "clip_json": json.dumps({"ts_start": times[0], "ts_end": times[-1] + 1, "boundary": boundary, "shared": False}),
        "video_json": json.dumps(meta), "timestamps": times_to_column(times), "error": "", "note": "",
        "tracks_json": json.dumps(records), "qa_json": "[]",
        "captions_json": json.dumps([{"object_id": local, "caption": f"c{index}.{local}", "ts_start": times[0],
                                      "ts_end": times[-1], "num_tokens": 2, "category": "person"} for local in tracks]),
        "appearance_json": json.dumps([{"object_id": k, "dim": DIM, "vector": encode_vector(v)}
                                       for k, v in looks.items()]),
    }


def _assemble(rows: list[dict], reid: bool = True):
    video = VideoAssembly(video_id="v", uri="/v.mp4", run_id="r", size_bytes=1, etag=None,
                          meta=json.loads(rows[0]["video_json"]))
    for row in rows:
        video.add(row)
    return assemble(video, mode="lite", model="tiny-lite", tracker="tiny-sam2",
                    indexed_at=dt.datetime.now(dt.timezone.utc), track_frames=4, reid=reid)


def _reentry_rows() -> list[dict]:
    times = [float(i) for i in range(8)]
    # Shape 0 is seen on frames 0-2, leaves, and is discovered again (a new local id) on 5-7, with
    # the same look; shape 1 is in view all along and looks the same too, but shares frames with both.
    return [_clip(0, times, {1: (0, [0, 1, 2]), 2: (1, list(range(8))), 3: (0, [5, 6, 7])},
                  {1: PERSON, 2: near(PERSON, 0.02, 3), 3: near(PERSON, 0.05)}, "end", 1)]


def test_a_person_leaving_and_reentering_keeps_one_id():
    done = _assemble(_reentry_rows())
    for name, rows in done.tables.items():
        to_table(name, rows)
    objects = {o["object_id"]: o for o in done.tables["objects"]}
    assert sorted(objects) == [0, 1]  # tracks 0 and 2 are one object; track 1 overlaps both
    person = objects[0]
    assert person["num_frames"] == 6 and (person["first_ts"], person["last_ts"]) == (0.0, 7.0)
    tracklets = sorted((r["track_id"], r["object_id"], r["reid_score"] is None) for r in done.tables["tracklets"])
    assert tracklets == [(0, 0, True), (1, 1, True), (2, 0, False)]
    masks = [(m["object_id"], m["frame_index"]) for m in done.tables["masks"]]
    assert len(masks) == len(set(masks))  # never two masks of one object on a frame


def test_reid_off_keeps_the_linked_tracks():
    done = _assemble(_reentry_rows(), reid=False)
    assert sorted(o["object_id"] for o in done.tables["objects"]) == [0, 1, 2]
    assert done.tables["tracklets"] == []


def test_a_merged_object_spanning_a_cut_gets_one_label_vote_and_a_whole_track_caption():
    rows = [_clip(0, [0.0, 1.0, 2.0], {0: (0, [0, 1, 2])}, {0: PERSON}, "shot", 3),
            _clip(1, [3.0, 4.0, 5.0], {0: (1, [0, 1, 2])}, {0: OTHER}, "shot", 3),
            _clip(2, [6.0, 7.0, 8.0], {4: (0, [0, 1, 2])}, {4: near(PERSON)}, "end", 3)]
    done = _assemble(rows)
    ids = {(r["clip_index"], r["track_id"]): r["object_id"] for r in done.tables["tracklets"]}
    assert ids == {(0, 0): 0, (1, 1): 1, (2, 2): 0}
    assert done.track_request is not None and [t["object_id"] for t in done.track_request["tracks"]] == [0]
    assert done.track_request["spans"][0] == (0.0, 8.0)
    assert {(c["object_id"], c["clip_index"]) for c in done.tables["captions"]} == {(0, 0), (1, 1), (0, 2)}


@pytest.mark.parametrize("labels, merged", [({0: "person"}, True), ({0: "dog"}, False)])
def test_concept_labels_follow_the_merged_object(labels, merged):
    rows = [_clip(0, [0.0, 1.0], {0: (0, [0, 1])}, {0: PERSON}, "shot", 2, {0: "person"}),
            _clip(1, [2.0, 3.0], {0: (0, [0, 1])}, {0: PERSON}, "end", 2, labels)]
    done = _assemble(rows)
    assert len(done.tables["objects"]) == (1 if merged else 2)


def test_a_bad_appearance_entry_leaves_its_object_unmerged_and_the_video_ok():
    rows = _reentry_rows()
    rows[0]["appearance_json"] = json.dumps([
        {"object_id": 1, "dim": DIM, "vector": encode_vector(PERSON)},
        {"object_id": 3, "dim": DIM + 1, "vector": encode_vector(PERSON)},  # width disagrees with dim
        {"object_id": 2, "dim": DIM, "vector": "not base64!"},
    ])
    done = _assemble(rows)
    assert done.ok and sorted(o["object_id"] for o in done.tables["objects"]) == [0, 1, 2]
    tracklets = sorted(done.tables["tracklets"], key=lambda r: r["track_id"])
    assert [r["vector"] is None for r in tracklets] == [False, True, True]
    to_table("tracklets", done.tables["tracklets"])
