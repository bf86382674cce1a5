"""A prompted object across a failed boundary link: kept (or reported lost), and named in the video's note.

Later clips of a prompted video only discover candidates on their first frame; linking decides which
one continues the user's object. Here the IoU link fails in the ways a real tracker makes it fail (a
different segmentation of the same object, the object lost for the shared frame, nothing there).
"""

from __future__ import annotations

import datetime as dt

from pipeline.assemble import assemble
from pipeline.linking import ClipTracks, LinkBreak, link_objects, link_video
from schemas.tables import to_table
from tests.pipeline.test_linking import _assembly, moving, track

STRANGER = (40, 25, 55, 38)


def prompted_clips(clip0_frames: range = range(4), first_mask: tuple[int, int, int, int] = moving(3)
                   ) -> list[ClipTracks]:
    """User object 7 in clip 0; clips 1 and 2 discover their own, clip 1's local 0 starting at `first_mask`."""
    clip0 = ClipTracks(0, [track(7, {i: moving(i) for i in clip0_frames}, source="prompt")],
                       num_owned=3, shared=True, boundary="window")
    clip1 = ClipTracks(1, [track(0, {0: first_mask, 1: moving(4), 2: moving(5), 3: moving(6)}, t0=3.0),
                           track(1, {0: STRANGER}, t0=3.0)],
                       num_owned=3, shared=True, boundary="window")
    clip2 = ClipTracks(2, [track(4, {0: moving(6), 1: moving(7)}, t0=6.0)], num_owned=2, shared=False, boundary="end")
    return [clip0, clip1, clip2]


def test_a_weak_match_on_the_shared_frame_keeps_the_prompted_object_for_the_rest_of_the_video():
    # Clip 1's discovery segmented only the left third of the object: IoU 0.33, under the 0.5 of a link.
    clips = prompted_clips(first_mask=(12, 5, 16, 20))
    assert link_video(clips, prompted=True) == {(0, 7): 7, (1, 0): 7, (2, 4): 7}  # the stranger stays out
    (gap,) = link_objects(clips, prompted=True).breaks
    assert (gap.object_id, gap.clip_index, gap.kept, round(gap.best_iou, 2)) == (7, 1, True, 0.33)
    assert link_objects(list(reversed(clips)), prompted=True) == link_objects(clips, prompted=True)


def test_an_object_lost_for_the_shared_frame_continues_from_its_last_own_frame():
    clips = prompted_clips(clip0_frames=range(3))  # the tracker lost it on frame 3, clip 1's first
    assert link_video(clips, prompted=True) == {(0, 7): 7, (1, 0): 7, (2, 4): 7}
    assert [b.kept for b in link_objects(clips, prompted=True).breaks] == [True]


def test_an_object_with_nothing_to_continue_it_is_reported_lost():
    clips = prompted_clips(first_mask=(50, 0, 60, 4))
    links = link_objects(clips, prompted=True)
    assert links.ids == {(0, 7): 7}
    assert links.breaks == [LinkBreak(7, 1, 0.0, False)]
    assert "object 7" in links.breaks[0].describe() and "clip 1" in links.breaks[0].describe()


def test_an_object_that_left_before_the_clip_ended_is_no_failed_link():
    clips = prompted_clips(clip0_frames=range(2), first_mask=(50, 0, 60, 4))
    assert link_objects(clips, prompted=True).breaks == []


def test_a_shot_cut_or_an_unprompted_video_reports_nothing():
    clips = prompted_clips(first_mask=(50, 0, 60, 4))
    assert link_objects(clips, prompted=False).breaks == []
    clips[0].boundary = "shot"
    assert link_objects(clips, prompted=True).breaks == []


def test_the_same_prompt_in_the_next_clip_continues_the_object_not_a_duplicate_of_it():
    clips = prompted_clips()
    # The user prompted 7 again later in clip 1: its track, backward-tracked to frame 0, overlaps less
    # than the duplicate discovery found before reaching the prompt frame (local 0, a perfect match).
    clips[1].tracks.append(track(7, {0: (12, 5, 22, 20), 1: moving(4), 2: moving(5), 3: moving(6)},
                                 source="prompt", t0=3.0))
    ids = link_video(clips, prompted=True)
    assert ids[(1, 7)] == 7 and (1, 0) not in ids  # one track of 7 per clip
    assert ids[(2, 4)] == 7
    assert link_objects(clips, prompted=True).breaks == []


def test_a_failed_link_is_noted_on_an_ok_video_and_the_object_keeps_its_frames():
    video = _assembly(prompted_clips(first_mask=(12, 5, 16, 20)))
    video.meta["prompted"] = True
    done = assemble(video, mode="lite", model="m", tracker="t", indexed_at=dt.datetime.now(dt.timezone.utc),
                    track_frames=4)
    for name, rows in done.tables.items():
        to_table(name, rows)
    row = done.tables["videos"][0]
    assert row["status"] == "ok"
    assert row["error"] == ("object 7 not linked into clip 1 by mask IoU, continued by its best overlap there "
                            "(IoU 0.33)")
    (obj,) = done.tables["objects"]
    assert (obj["object_id"], obj["source"]) == (7, "prompt")
    assert sorted({m["clip_index"] for m in done.tables["masks"]}) == [0, 1, 2]
