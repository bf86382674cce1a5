"""The discovery schedule: on later keyframes, SAM 2's mask generation runs only where something may have entered.

Real encoded videos of scripted shapes (one enters mid-clip, one leaves, one passes in front of a
large tracked object, or nothing new at all). The gate is tested against ground-truth masks; the
tracker with the tiny model and an oracle standing in for SAM 2's tracked masks (tiny's random
weights give every object the same half-frame mask, which would make "what is covered" noise).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import numpy as np
import pytest

from actors.discovery import Candidate
from actors.discovery_schedule import DiscoveryGate, DiscoverySchedule
from actors.rle import decode_rle, encode_masks, rle_areas, rle_boxes
from actors.seeds import keyframe_indices
from actors.session import FrameResult, TrackingSession
from actors.tracker import Tracker
from pipeline.samples import Shape, make_video
from tests.actors.conftest import DecodedVideo, decode

pytestmark = pytest.mark.usefixtures("torch_single_thread")

INTERVAL_S = 0.5
MOVER = Shape(color=(220, 40, 40), size=(28, 36), start_xy=(10, 20), velocity=(20, 0))
RISER = Shape(color=(40, 80, 230), size=(30, 30), start_xy=(110, 70), velocity=(0, -20), kind="ellipse")
#: Enters at 1.2 s, between the keyframes at 1.0 and 1.5 s.
ENTRANT = Shape(color=(240, 220, 30), size=(20, 26), start_xy=(20, 80), start_s=1.2)


def _video(tmp_path_factory, name: str, shapes: Sequence[Shape]) -> DecodedVideo:
    """2.5 s at 10 fps, every frame sampled: keyframes at 0, 5, 10, 15, 20 (every 0.5 s)."""
    path = tmp_path_factory.mktemp("schedule") / f"{name}.mp4"
    return decode(str(path), make_video(path, duration_s=2.5, fps=10.0, shapes=shapes, seed=5))


@pytest.fixture(scope="module")
def entrant_video(tmp_path_factory) -> DecodedVideo:
    return _video(tmp_path_factory, "entrant", (MOVER, RISER, ENTRANT))


@pytest.fixture(scope="module")
def nothing_new_video(tmp_path_factory) -> DecodedVideo:
    return _video(tmp_path_factory, "nothing_new", (MOVER, RISER))


@pytest.fixture(scope="module")
def leaving_video(tmp_path_factory) -> DecodedVideo:
    return _video(tmp_path_factory, "leaving", (Shape(**{**MOVER.__dict__, "end_s": 1.2}), RISER))


@pytest.fixture(scope="module")
def occluder_video(tmp_path_factory) -> DecodedVideo:
    """A large static slab (tracked) and, from 1.2 s, a small shape in front of it."""
    slab = Shape(color=(60, 160, 90), size=(80, 120), start_xy=(20, 20))
    front = Shape(color=(240, 220, 30), size=(20, 26), start_xy=(60, 50), start_s=1.2)
    return _video(tmp_path_factory, "occluder", (slab, front))


def visible(video: DecodedVideo, shape: int, k: int) -> np.ndarray | None:
    """A shape's mask on frame k minus what the shapes drawn after it hide (what a tracker would see)."""
    mask = video.gt_mask(shape, k)
    if mask is None:
        return None
    for later in range(shape + 1, len(video.truth.shapes)):
        above = video.gt_mask(later, k)
        if above is not None:
            mask = mask & ~above
    return mask if mask.any() else None


def rle(mask: np.ndarray) -> dict:
    return encode_masks(mask[None])[0]


def gate_decisions(video: DecodedVideo, schedule: DiscoverySchedule) -> dict[int, bool]:
    """Each keyframe's decision, with discovery (when due) adding every visible shape as a tracked object."""
    gate = DiscoveryGate(schedule, video.frames.shape[1], video.frames.shape[2])
    found: set[int] = set()
    decisions = {}
    for k in keyframe_indices(video.timestamps, INTERVAL_S):
        def tracked() -> dict[int, dict]:
            masks = {s: visible(video, s, k) for s in found}
            return {s: rle(m) for s, m in masks.items() if m is not None}

        decisions[k] = gate.due(video.frames[k], tracked())
        if decisions[k]:
            found |= {s for s in range(len(video.truth.shapes)) if visible(video, s, k) is not None}
            gate.ran(video.frames[k], tracked())
    return decisions


def test_gate_runs_on_the_first_keyframe_after_an_entrance_only(entrant_video):
    assert gate_decisions(entrant_video, DiscoverySchedule()) == {0: True, 5: False, 10: False, 15: True, 20: False}


def test_gate_skips_keyframes_where_tracked_objects_only_move(nothing_new_video):
    assert gate_decisions(nothing_new_video, DiscoverySchedule()) == {0: True, 5: False, 10: False, 15: False,
                                                                       20: False}


def test_gate_runs_when_a_tracked_object_leaves(leaving_video):
    assert gate_decisions(leaving_video, DiscoverySchedule()) == {0: True, 5: False, 10: False, 15: True, 20: False}


def test_gate_runs_when_something_passes_in_front_of_a_large_tracked_object(occluder_video):
    """The newcomer lies inside the slab's earlier mask, and the slab loses far less than `lost_frac`;
    but the slab left those cells without gaining any elsewhere: it did not move, it is hidden there."""
    v = occluder_video
    slab_area, front_area = int(v.gt_mask(0, 0).sum()), int(v.gt_mask(1, 15).sum())
    assert front_area < 0.1 * slab_area
    assert gate_decisions(v, DiscoverySchedule()) == {0: True, 5: False, 10: False, 15: True, 20: False}


def test_every_runs_on_every_keyframe(nothing_new_video):
    assert all(gate_decisions(nothing_new_video, DiscoverySchedule(policy="every")).values())


@pytest.mark.parametrize("bad", [{"policy": "sometimes"}, {"changed_frac": 2.0}, {"grid": 0}, {"pixel_delta": -1}])
def test_bad_schedules_are_refused(bad):
    with pytest.raises(ValueError):
        DiscoverySchedule(**bad)


def test_schedule_from_a_name():
    assert DiscoverySchedule.of("every").policy == "every"
    assert DiscoverySchedule.of(None) == DiscoverySchedule()
    custom = DiscoverySchedule(changed_frac=0.01)
    assert DiscoverySchedule.of(custom) is custom


# -- the tracker ------------------------------------------------------------------------------


class Counting:
    """A ground-truth discoverer (the visible shapes) that counts its calls and the frames it ran on."""

    def __init__(self, video: DecodedVideo) -> None:
        self.video = video
        self.frames: list[int] = []

    def __call__(self, frame: np.ndarray) -> list[Candidate]:
        k = self.video.index_of(frame)
        self.frames.append(k)
        masks = [visible(self.video, s, k) for s in range(len(self.video.truth.shapes))]
        return [Candidate(mask=m, score=0.9) for m in masks if m is not None]


@pytest.fixture
def oracle(monkeypatch) -> Callable[[DecodedVideo], None]:
    """SAM 2 tracking perfectly: each object's mask on every frame is the visible part of the shape it was seeded on."""

    def install(video: DecodedVideo) -> None:
        shape_of: dict[int, int] = {}
        add, step = TrackingSession.add, TrackingSession.step

        def seeded(self, seed) -> None:
            mask = decode_rle(seed.mask_rle)
            shape_of[seed.object_id] = next(s for s in range(len(video.truth.shapes))
                                            if np.array_equal(visible(video, s, seed.frame), mask))
            add(self, seed)

        def tracked(self, frame_idx: int, pixels, reverse: bool = False) -> FrameResult:
            out = step(self, frame_idx, pixels, reverse=reverse)
            empty = np.zeros(video.frames.shape[1:3], dtype=bool)
            masks = [visible(video, shape_of[oid], frame_idx) for oid in out.object_ids]
            rles = encode_masks(np.stack([empty if m is None else m for m in masks])) if masks else []
            return FrameResult(object_ids=out.object_ids, rles=rles, areas=rle_areas(rles), boxes=rle_boxes(rles),
                               scores=out.scores)

        monkeypatch.setattr(TrackingSession, "add", seeded)
        monkeypatch.setattr(TrackingSession, "step", tracked)

    return install


def run(video: DecodedVideo, schedule: str, **kwargs) -> tuple[Tracker, Counting, list[dict]]:
    counting = Counting(video)
    tracker = Tracker("tiny", keyframe_interval_s=INTERVAL_S, discover=counting, discovery_schedule=schedule,
                      **kwargs)
    return tracker, counting, tracker.track(video.frames, video.timestamps)


def starts(tracks: list[dict]) -> list[int]:
    return sorted(t["frames"][0]["frame_index"] for t in tracks)


def test_tracker_finds_an_entrant_at_the_first_keyframe_after_it_enters(entrant_video, oracle):
    v = entrant_video
    oracle(v)
    tracker, counting, tracks = run(v, "changed", backfill_auto=False)
    assert counting.frames == [0, 15]  # enters at 1.2 s (frame 12); keyframes 5 and 10 show nothing new
    assert starts(tracks) == [0, 0, 15]
    assert tracker.last_stats["discovery_calls"] == 2 and tracker.last_stats["keyframes_skipped"] == 3
    _, counting, tracks = run(v, "every", backfill_auto=False)
    assert counting.frames == [0, 5, 10, 15, 20] and starts(tracks) == [0, 0, 15]


def test_an_entrant_found_after_skipped_keyframes_is_followed_back_to_its_entrance(entrant_video, oracle):
    """Skipped keyframes did not look for it, so the backward pass goes to the last searched one."""
    v = entrant_video
    oracle(v)
    _, _, tracks = run(v, "changed")
    assert starts(tracks) == [0, 0, 12]


def test_tracker_skips_later_keyframes_when_nothing_enters(nothing_new_video, oracle):
    v = nothing_new_video
    oracle(v)
    tracker, counting, tracks = run(v, "changed")
    assert counting.frames == [0]
    assert tracker.last_stats["keyframes_skipped"] == 4 and tracker.last_stats["keyframes_searched"] == 1
    assert starts(tracks) == [0, 0] and all(len(t["frames"]) == len(v.frames) for t in tracks)
    tracker, counting, _ = run(v, "every")
    assert counting.frames == [0, 5, 10, 15, 20]
    assert tracker.last_stats["discovery_calls"] == 5 and tracker.last_stats["keyframes_skipped"] == 0


def test_every_is_the_default_and_keeps_todays_calls(nothing_new_video):
    """Without the oracle: the tiny model's own masks, and the schedule of before."""
    v = nothing_new_video
    counting = Counting(v)
    # Room for every object: tiny's masks match nothing, so each keyframe adds both shapes again.
    tracker = Tracker("tiny", keyframe_interval_s=INTERVAL_S, discover=counting, max_objects=16)
    tracker.track(v.frames, v.timestamps)
    assert tracker.discovery_schedule.policy == "every"
    assert counting.frames == keyframe_indices(v.timestamps, INTERVAL_S) == [0, 5, 10, 15, 20]
    assert tracker.last_stats["discovery_calls"] == 5


def test_the_index_job_s_knob_reaches_the_tracker_stage_and_its_counts_reach_the_summary(entrant_video, oracle):
    """`--discovery` (IndexConfig.discovery, "changed" by default) -> tracker_kwargs -> TrackerStage; the
    stage's per-row counts are what the run summary adds up."""
    from actors.tracker import TrackerStage
    from pipeline.config import IndexConfig
    from pipeline.graph import tracker_kwargs
    from pipeline.summary import RunSummary, count_busy

    v = entrant_video
    oracle(v)
    frames = np.empty(2, dtype=object)
    frames[:] = [v.frames, v.frames]
    times = np.empty(2, dtype=object)
    times[:] = [v.timestamps, v.timestamps]
    batch = {"video_id": np.array(["a", "b"]), "frames": frames, "timestamps": times,
             "error": np.array([None, None], dtype=object)}
    summaries = {}
    for policy in ("changed", "every"):
        cfg = IndexConfig(source="s", output="o", keyframe_interval_s=INTERVAL_S,
                          **({} if policy == "changed" else {"discovery": policy}))
        counting = Counting(v)
        out = TrackerStage(**{**tracker_kwargs(cfg), "ship_frames": "all"}, discover=counting)(dict(batch))
        assert starts(json.loads(out["tracks_json"][0])) == [0, 0, 12]  # found at 15, followed back to 12
        summaries[policy] = RunSummary(run_id=policy)
        for i in range(2):
            count_busy({k: col[i] for k, col in out.items()}, summaries[policy], {})
    assert summaries["changed"].counts == {"tracker_discovery_calls": 4, "tracker_keyframes_skipped": 6}
    assert summaries["every"].counts == {"tracker_discovery_calls": 10, "tracker_keyframes_skipped": 0}
    assert "SAM 2 mask generation on 4 keyframes, 6 keyframes skipped" in "\n".join(summaries["changed"].lines())


def test_the_cli_takes_the_policy_and_refuses_others():
    from jobs.cli import build_parser
    from jobs.index import config_from_args
    from pipeline.config import IndexConfig

    for command in ("index", "nightly"):
        assert config_from_args(build_parser().parse_args([command, "in", "out"])).discovery == "changed"
        args = build_parser().parse_args([command, "in", "out", "--discovery", "every"])
        assert config_from_args(args).discovery == "every"
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args([command, "in", "out", "--discovery", "sometimes"])
        assert exit_.value.code == 2
    with pytest.raises(ValueError, match="--discovery"):
        IndexConfig(source="s", output="o", discovery="sometimes")
