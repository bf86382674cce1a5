"""Linking tracks across clips, and a video's clips assembled into table rows (pure, no Ray)."""

from __future__ import annotations

import datetime as dt

import numpy as np
from pycocotools import mask as mask_utils

from pipeline.assemble import VideoAssembly, assemble
from pipeline.linking import ClipTracks, boundary_links, link_video
from schemas.tables import to_table

H, W = 40, 60


def rle(x0: int, y0: int, x1: int, y1: int) -> dict:
    m = np.zeros((H, W), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    r = mask_utils.encode(np.asfortranarray(m))
    return {"size": [H, W], "counts": r["counts"].decode("ascii")}


def track(oid: int, boxes: dict[int, tuple[int, int, int, int]], source: str = "auto", t0: float = 0.0) -> dict:
    return {"object_id": oid, "source": source, "frames": [
        {"frame_index": i, "ts": t0 + i, "bbox": [float(v) for v in b], "area": (b[2] - b[0]) * (b[3] - b[1]),
         "score": 0.9, "rle": rle(*b)} for i, b in sorted(boxes.items())]}


# A box moving right by 4 px a frame: clip 0 owns frames 0-2 and samples clip 1's first frame (its 3).
def moving(i: int) -> tuple[int, int, int, int]:
    return (4 * i, 5, 4 * i + 12, 20)


def two_clips(boundary: str = "window") -> list[ClipTracks]:
    clip0 = ClipTracks(0, [track(0, {i: moving(i) for i in range(4)}), track(1, {0: (40, 25, 55, 38)})],
                       num_owned=3, shared=True, boundary=boundary)
    # Clip 1 numbers its objects afresh: its 0 is a newcomer, its 5 is clip 0's object 0.
    clip1 = ClipTracks(1, [track(0, {1: (0, 30, 8, 38)}, t0=3.0), track(5, {j: moving(3 + j) for j in range(3)}, t0=3.0)],
                       num_owned=3, shared=False, boundary="end")
    return [clip0, clip1]


def test_an_object_keeps_its_id_across_a_window_boundary():
    clips = two_clips()
    assert boundary_links(clips[0], clips[1]) == [(0, 5)]
    ids = link_video(clips, prompted=False)
    assert ids[(0, 0)] == ids[(1, 5)] == 0
    assert ids[(0, 1)] == 1 and ids[(1, 0)] == 2  # fresh ids in order of first appearance


def test_a_shot_cut_is_never_linked_across():
    ids = link_video(two_clips("shot"), prompted=False)
    assert ids[(0, 0)] != ids[(1, 5)]


def test_linking_needs_overlap_and_is_one_to_one():
    clip0 = ClipTracks(0, [track(0, {0: (0, 0, 10, 10), 1: (0, 0, 10, 10)}), track(1, {1: (0, 0, 10, 9)})],
                       num_owned=1, shared=True, boundary="window")
    clip1 = ClipTracks(1, [track(0, {0: (0, 0, 10, 10)}), track(1, {0: (50, 30, 58, 38)})],
                       num_owned=1, shared=False, boundary="end")
    assert boundary_links(clip0, clip1) == [(0, 0)]  # the best pair wins; 1 has no partner left


def test_clips_linked_in_any_arrival_order_give_the_same_ids():
    clips = two_clips()
    assert link_video(clips, prompted=False) == link_video(list(reversed(clips)), prompted=False)


def test_prompted_video_keeps_only_chains_of_prompted_objects():
    clip0 = ClipTracks(0, [track(7, {i: moving(i) for i in range(4)}, source="prompt")],
                       num_owned=3, shared=True, boundary="window")
    clip1 = ClipTracks(1, [track(0, {0: moving(3), 1: moving(4)}), track(1, {0: (40, 25, 55, 38)})],
                       num_owned=2, shared=False, boundary="end")
    ids = link_video([clip0, clip1], prompted=True)
    assert ids == {(0, 7): 7, (1, 0): 7}  # the continuation takes the user's id, the stranger is dropped


def test_a_failed_clip_breaks_the_chain_but_not_the_video():
    clips = two_clips()
    clips[1].ok = False
    ids = link_video(clips, prompted=False)
    assert (0, 0) in ids and ids[(0, 0)] != ids.get((1, 5))


def _assembly(clip_tracks: list[ClipTracks], errors: dict[int, str] | None = None) -> VideoAssembly:
    video = VideoAssembly(video_id="v", uri="file:///v.mp4", run_id="r", size_bytes=10, etag=None,
                          meta={"duration_s": 6.0, "fps": 1.0, "width": W, "height": H, "num_frames": 6,
                                "sampled_fps": 1.0, "thinned": False, "num_clips": len(clip_tracks)})
    for c in clip_tracks:
        error = (errors or {}).get(c.clip_index)
        start = 3.0 * c.clip_index
        video.clips[c.clip_index] = {
            "ts_start": start, "ts_end": start + 3.0, "boundary": c.boundary, "shared": c.shared,
            "error": error, "note": None,
            "timestamps": [] if error else [start + i for i in range(c.num_owned)],
            "num_owned": 0 if error else c.num_owned, "tracks": [] if error else c.tracks,
            "captions": [] if error else [{"object_id": t["object_id"], "ts_start": start, "ts_end": start + 2,
                                           "caption": f"clip {c.clip_index}", "num_tokens": 3} for t in c.tracks],
            "qa": [],
        }
    return video


def test_assembled_rows_fit_the_schemas_and_number_frames_video_wide():
    done = assemble(_assembly(two_clips()), mode="lite", model="tiny-lite", tracker="tiny-sam2",
                    indexed_at=dt.datetime.now(dt.timezone.utc), track_frames=2)
    for name, rows in done.tables.items():
        to_table(name, rows)
    video = done.tables["videos"][0]
    assert video["status"] == "ok" and video["sampled_ts"] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0] and video["clips"] == 2
    masks = [m for m in done.tables["masks"] if m["object_id"] == 0]
    # The shared frame is written once, by the clip that owns it.
    assert [(m["clip_index"], m["frame_index"]) for m in masks] == [(0, 0), (0, 1), (0, 2), (1, 3), (1, 4), (1, 5)]
    obj = next(o for o in done.tables["objects"] if o["object_id"] == 0)
    assert obj["num_frames"] == 6 and obj["first_ts"] == 0.0 and obj["last_ts"] == 5.0
    assert sorted((c["object_id"], c["clip_index"]) for c in done.tables["captions"]) == [(0, 0), (0, 1), (1, 0), (2, 1)]
    request = done.track_request
    assert request is not None and [t["object_id"] for t in request["tracks"]] == [0]  # only 0 spans two clips
    assert len(request["tracks"][0]["frames"]) == 2 and request["spans"][0] == (0.0, 5.0)


def test_a_failed_clip_leaves_an_ok_video_with_a_note():
    done = assemble(_assembly(two_clips(), errors={1: "decode: damaged"}), mode="lite", model="m", tracker="t",
                    indexed_at=dt.datetime.now(dt.timezone.utc), track_frames=8)
    video = done.tables["videos"][0]
    assert video["status"] == "ok" and "1 of 2 clips failed" in video["error"] and "damaged" in video["error"]
    assert [c["status"] for c in done.tables["clips"]] == ["ok", "failed"]
    assert done.track_request is None


def test_no_decodable_clip_fails_the_video():
    done = assemble(_assembly(two_clips(), errors={0: "bad", 1: "worse"}), mode="lite", model="m", tracker="t",
                    indexed_at=dt.datetime.now(dt.timezone.utc), track_frames=8)
    assert done.tables["videos"][0]["status"] == "failed" and not done.ok


def test_concept_tracks_with_different_labels_are_never_linked():
    clips = two_clips()
    clips[0].tracks[0]["label"] = "person"
    clips[1].tracks[1]["label"] = "bicycle"  # the same mask on the shared frame, another concept
    assert boundary_links(clips[0], clips[1]) == []
    clips[1].tracks[1]["label"] = "person"
    assert boundary_links(clips[0], clips[1]) == [(0, 5)]


def test_labels_survive_linking_and_categories_are_voted():
    clips = two_clips()
    clips[0].tracks[0].update(label="person", source="concept")
    clips[1].tracks[1].update(label="person", source="concept")  # clip 1's local 5: clip 0's 0
    video = _assembly(clips)
    # Clip categories of the unlabelled objects (clip 0's 1, clip 1's 0) come back from the referrer.
    for c in video.clips.values():
        for cap in c["captions"]:
            cap["category"] = "red ball" if cap["object_id"] == 1 else None
    done = assemble(video, mode="lite", model="tiny-lite", tracker="tiny-sam3",
                    indexed_at=dt.datetime.now(dt.timezone.utc), track_frames=2)
    to_table("objects", done.tables["objects"])
    to_table("captions", done.tables["captions"])  # `category` stays out of the captions table
    objects = {o["object_id"]: o for o in done.tables["objects"]}
    assert (objects[0]["label"], objects[0]["source"]) == ("person", "concept")  # one id across the boundary
    assert objects[1]["label"] == "red ball" and objects[1]["source"] == "auto"
    assert objects[2]["label"] is None  # asked, no answer
    # The whole-track request carries the label, so the referrer does not ask again.
    assert [t["label"] for t in done.track_request["tracks"]] == ["person"]
