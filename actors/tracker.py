"""The tracking stage: a video's sampled frames in, object tracks (COCO RLE masks and boxes) out.

SAM 2 from transformers does the work: `Sam2VideoModel` with its inference session tracks every
object (several at once in one session), and SAM 2's automatic mask generation (transformers'
`mask-generation` pipeline on a `Sam2Model` that shares the video model's weights) finds objects
when a video has no prompts.

Which objects:

- prompts (`actors.prompts`): boxes, points or masks on a timestamp or frame. Each prompted object
  is tracked forward from its first prompt frame to the end, and backward from it to the start;
  further prompts for the same `object_id` on later frames become extra conditioning frames.
- automatic (no prompts): on keyframes (the first sampled frame, then the first frame at least
  `keyframe_interval_s` later, and so on) SAM 2 proposes masks. Duplicates are removed (IoU; a whole
  replaces its parts), the best `max_objects` by score and area are kept, and a new track starts
  only for a proposal that no live track already covers (mask IoU, or one mask mostly inside the
  other), so objects that enter later are found too. With the "changed" schedule
  (`actors.discovery_schedule`) a later keyframe runs discovery only where something may have
  entered (the frame changed where no tracked object explains it, or a tracked object lost area);
  "every" runs it on each keyframe. A new track is also followed backward to the previous keyframe
  discovery was due on, where it had not been found yet. At most `max_objects` automatic objects
  are followed at once; one absent for `retire_after_s` leaves the session (its track is kept) and frees
  its place; if it comes back it is found again as a new object.

Bounded memory on long videos: frames are preprocessed `chunk_size` at a time, one session carries
the tracker state across chunks (so ids stay stable and chunking does not change results), and
after every frame the session forgets what SAM 2 will not read again (tracked-frame memories older
than its memory window, processed frames, used inputs, full-resolution logits); only conditioning
(prompt / seed) frames stay, as in SAM 2. Processed frames (and, with `offload_state`, the
memories) live on the CPU and reach the GPU only for the frame being tracked. Masks never leave the
actor: each frame's masks become COCO RLE, areas and boxes at once.

The pieces live apart: `actors.seeds` (prompts against the frames), `actors.discovery` (proposals),
`actors.session` (one SAM 2 session), `actors.rle` (mask encoding); this module runs the passes.
With a SAM 3 checkpoint the stage runs `actors.concepts.ConceptTracker` instead: objects found by
the clip's concepts (`--find`), in the same track format, each with its concept as `label`.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from actors.busy import COUNT_PREFIX, BusyClock
from actors.columns import times_column
from actors.discovery import Discoverer, Sam2Discoverer, select_candidates, uncovered
from actors.discovery_schedule import DiscoveryGate, DiscoverySchedule
from actors.prompts import ObjectPrompt, PromptsError, prompts_from_json
from actors.requests import owned_tracks, shown_frames
from actors.rle import encode_masks
from actors.seeds import Seed, TrackerInputError, check_frames, keyframe_indices, resolve_prompts
from actors.session import FrameResult, TrackingSession
from models.sam3 import ConceptError
from models.timing import PhaseTimes

log = logging.getLogger(__name__)

__all__ = ["TRACKER_COUNTS", "TRACKER_PHASES", "Tracker", "TrackerInputError", "TrackerStage"]

#: Where a tracker batch's time goes (`phase_s_tracker_<phase>` columns): resizing frames for SAM 2,
#: automatic mask generation on keyframes, propagating every object onto each frame, masks to RLE.
TRACKER_PHASES = ("preprocess", "discovery", "propagation", "mask_encoding")
#: Per row (`count_tracker_<name>` columns): keyframes where SAM 2's mask generation ran, and those
#: the discovery schedule skipped (nothing new there).
TRACKER_COUNTS = ("discovery_calls", "keyframes_skipped")


@dataclass
class _Track:
    object_id: int
    source: str
    frames: dict[int, dict] = field(default_factory=dict)
    last_seen_ts: float = -math.inf


@dataclass
class _Video:
    """One `track` call's working state."""

    frames: np.ndarray
    timestamps: np.ndarray
    tracks: dict[int, _Track] = field(default_factory=dict)
    back_seeds: list[Seed] = field(default_factory=list)
    next_id: int = 1
    max_state_frames: int = 0
    max_objects_in_session: int = 0
    keyframes_searched: int = 0
    discovery_calls: int = 0
    keyframes_skipped: int = 0

    @property
    def height(self) -> int:
        return int(self.frames.shape[1])

    @property
    def width(self) -> int:
        return int(self.frames.shape[2])


def _setting(explicit: Any, folder: Mapping[str, Any], key: str, default: Any) -> Any:
    """An explicit argument, else the checkpoint folder's tracker default, else SAM 2's own default."""
    return explicit if explicit is not None else type(default)(folder.get(key, default))


class Tracker:
    """SAM 2 object tracking over a video's sampled frames (a plain class: no Ray inside)."""

    def __init__(self, model: str = "tiny", *, device: str | None = None, dtype: Any = None, max_objects: int = 8,
                 keyframe_interval_s: float = 2.0, chunk_size: int = 32, points_per_side: int | None = None,
                 points_per_batch: int = 64, pred_iou_thresh: float | None = None,
                 stability_score_thresh: float | None = None, nms_iou: float = 0.7, min_area_frac: float = 0.0005,
                 dedupe_iou: float = 0.7, dedupe_cover: float = 0.9, match_iou: float = 0.5, match_cover: float = 0.9,
                 retire_after_s: float | None = None, backfill_auto: bool = True, offload_state: bool = True,
                 discover: Discoverer | None = None,
                 discovery_schedule: str | DiscoverySchedule = "every") -> None:
        from models.sam2 import load_sam2

        if max_objects <= 0 or chunk_size <= 0 or keyframe_interval_s <= 0:
            raise ValueError("max_objects, chunk_size and keyframe_interval_s must be positive")
        self.bundle = load_sam2(model, device=device, dtype=dtype)
        self.name = self.bundle.name  # "tiny-sam2" for tiny, else the folder or hub id
        self.max_objects = max_objects
        self.keyframe_interval_s = keyframe_interval_s
        self.chunk_size = chunk_size
        self.min_area_frac = min_area_frac
        self.dedupe = {"dedupe_iou": dedupe_iou, "dedupe_cover": dedupe_cover}
        self.match = {"match_iou": match_iou, "match_cover": match_cover}
        self.retire_after_s = 3 * keyframe_interval_s if retire_after_s is None else retire_after_s
        self.backfill_auto = backfill_auto
        self.offload_state = offload_state
        #: When later keyframes run discovery: "every", "changed" (only where something may have
        #: entered: `actors.discovery_schedule`), or a `DiscoverySchedule` with its thresholds.
        #: "every" by default here (the index job's default is "changed": `IndexConfig.discovery`):
        #: "changed" judges by the tracked masks, which only a trained checkpoint makes meaningful
        #: (`tiny`'s random weights cover half the frame with every mask), and this class's unit
        #: tests count the keyframes searched with tiny's own masks.
        self.discovery_schedule = DiscoverySchedule.of(discovery_schedule)
        folder = self.bundle.tracker_defaults
        self.discover: Discoverer = discover or Sam2Discoverer(
            self.bundle, points_per_batch=points_per_batch, nms_iou=nms_iou,
            points_per_side=_setting(points_per_side, folder, "points_per_side", 32),
            pred_iou_thresh=_setting(pred_iou_thresh, folder, "pred_iou_thresh", 0.88),
            stability_score_thresh=_setting(stability_score_thresh, folder, "stability_score_thresh", 0.95))
        self.last_stats: dict[str, Any] = {}
        #: Seconds per phase (TRACKER_PHASES) since the caller last took them.
        self.times = PhaseTimes(self.bundle.device)

    # -- public -------------------------------------------------------------------------------

    def track(self, frames: np.ndarray, timestamps: Sequence[float],
              prompts: Sequence[ObjectPrompt] | None = None, discover: str | None = None) -> list[dict]:
        """Tracks of the prompted objects, or of automatically found ones when there are no prompts.

        `discover` says where automatic discovery runs: "keyframes" (the first frame and then every
        `keyframe_interval_s`), "first" (the first frame only: a later clip of a prompted video,
        where discovery only proposes continuations of the prompted objects for linking), "none";
        by default "keyframes" without prompts and "none" with them.

        Returns one dict per object (`object_id`, `source`, `frames`: per frame where the object is
        present its `frame_index`, `ts`, xyxy `bbox`, `area`, `score`, COCO `rle`), sorted by id.
        No prompts (None or empty) means automatic discovery. A prompted object stays in the output
        even if SAM 2 never sees it (no frames); an automatic one that vanished at once is dropped.
        Raises `TrackerInputError` for prompts that do not fit the video; finding nothing is `[]`.
        """
        started = time.perf_counter()
        frames, ts = check_frames(frames, timestamps)
        video = _Video(frames=frames, timestamps=ts)
        if len(frames):
            seeds = resolve_prompts(prompts, ts, video.height, video.width) if prompts else []
            for s in seeds:
                video.tracks.setdefault(s.object_id, _Track(s.object_id, "prompt"))
            mode = discover or ("none" if seeds else "keyframes")
            if mode not in ("keyframes", "first", "none"):
                raise ValueError(f"discover must be 'keyframes', 'first' or 'none', got {mode!r}")
            if seeds or mode != "none":
                self._forward(video, seeds, mode)
            self._backward(video)
        self.last_stats = {
            "frames": len(frames), "objects": len(video.tracks), "seconds": time.perf_counter() - started,
            "max_state_frames": video.max_state_frames, "max_objects_in_session": video.max_objects_in_session,
            "keyframes_searched": video.keyframes_searched, "discovery_calls": video.discovery_calls,
            "keyframes_skipped": video.keyframes_skipped,
        }
        return [{"object_id": t.object_id, "source": t.source, "frames": [t.frames[i] for i in sorted(t.frames)]}
                for t in sorted(video.tracks.values(), key=lambda t: t.object_id) if t.frames or t.source == "prompt"]

    # -- passes -------------------------------------------------------------------------------

    def _chunks(self, frames: np.ndarray, start: int, stop: int, reverse: bool
                ) -> Iterable[tuple[list[int], torch.Tensor]]:
        """Frame indices start..stop (inclusive) in processing order, `chunk_size` at a time, preprocessed.

        Preprocessing per chunk keeps only `chunk_size` model-sized frames in memory, on the CPU.
        """
        indices = list(range(start, stop - 1, -1)) if reverse else list(range(start, stop + 1))
        for k in range(0, len(indices), self.chunk_size):
            chunk = indices[k:k + self.chunk_size]
            lo, hi = min(chunk), max(chunk)
            with self.times("preprocess"):
                pixels = self.bundle.processor.video_processor(videos=[frames[lo:hi + 1]],
                                                               device=self.bundle.device, return_tensors="pt")
                pixels = pixels.pixel_values_videos[0].cpu()[[i - lo for i in chunk]]
            yield chunk, pixels

    def _forward(self, video: _Video, seeds: list[Seed], discover: str) -> None:
        """Track from the first seed (or frame 0 when discovering) to the end of the video."""
        by_frame: dict[int, list[Seed]] = {}
        for s in seeds:
            by_frame.setdefault(s.frame, []).append(s)
        first_prompt: dict[int, Seed] = {}
        for s in sorted(seeds, key=lambda s: s.frame):
            first_prompt.setdefault(s.object_id, s)
        video.back_seeds.extend(s for s in first_prompt.values() if s.frame > 0)
        keyframes = {"keyframes": keyframe_indices(video.timestamps, self.keyframe_interval_s), "first": [0]}.get(discover, [])
        key_set, searched_at = set(keyframes), -1  # the last keyframe discovery was due on
        gate = DiscoveryGate(self.discovery_schedule, video.height, video.width)
        start = 0 if keyframes else min(by_frame)
        session = TrackingSession(self.bundle, video.height, video.width, offload_state=self.offload_state,
                                  times=self.times)
        for chunk, pixels in self._chunks(video.frames, start, len(video.frames) - 1, reverse=False):
            for j, i in enumerate(chunk):
                for s in by_frame.get(i, []):
                    session.add(s)
                result = session.step(i, pixels[j]) if session.object_ids else None
                if result is not None:
                    self._record(video, result, i, lambda oid: True)
                if i in key_set:
                    self._retire(video, session, i)
                    with self.times("discovery"):
                        due = gate.due(video.frames[i], self._live(session, result))
                    video.keyframes_skipped += not due
                    if due:
                        self._search(video, session, gate, i, pixels[j], result, stop=searched_at + 1)
                        searched_at = i
                session.prune(i)
                self._account(video, session)
            self._retire(video, session, chunk[-1])

    def _backward(self, video: _Video) -> None:
        """Track each late-starting object from its seed back to its `stop` frame.

        One session serves all of them: objects join at their seed frame and leave (`compact`) at
        the chunk boundary after their `stop`.
        """
        seeds = [s for s in video.back_seeds if s.frame > s.stop]
        if not seeds:
            return
        by_frame: dict[int, list[Seed]] = {}
        for s in seeds:
            by_frame.setdefault(s.frame, []).append(s)
        ranges = {s.object_id: (s.stop, s.frame) for s in seeds}
        session = TrackingSession(self.bundle, video.height, video.width, offload_state=self.offload_state,
                                  times=self.times)
        for chunk, pixels in self._chunks(video.frames, max(by_frame), min(s.stop for s in seeds), reverse=True):
            for j, i in enumerate(chunk):
                for s in by_frame.get(i, []):
                    session.add(s)
                if not session.object_ids:
                    continue
                result = session.step(i, pixels[j], reverse=True)
                self._record(video, result, i, lambda oid, i=i: ranges[oid][0] <= i < ranges[oid][1])
                session.prune(i, reverse=True)
                self._account(video, session)
            session.compact(oid for oid in session.object_ids if ranges[oid][0] < chunk[-1])

    # -- per-frame pieces ---------------------------------------------------------------------

    def _record(self, video: _Video, result: FrameResult, i: int, wanted: Callable[[int], bool]) -> None:
        """Append each present object's frame to its track (absent objects, empty masks, are omitted)."""
        ts = float(video.timestamps[i])
        for k, oid in enumerate(result.object_ids):
            if result.areas[k] == 0 or not wanted(oid):
                continue
            track = video.tracks[oid]
            track.frames[i] = {
                "frame_index": int(i), "ts": ts, "bbox": [float(v) for v in result.boxes[k]],
                "area": int(result.areas[k]), "score": round(float(result.scores[k]), 6), "rle": result.rles[k],
            }
            track.last_seen_ts = max(track.last_seen_ts, ts)

    def _account(self, video: _Video, session: TrackingSession) -> None:
        video.max_state_frames = max(video.max_state_frames, session.state_frames())
        video.max_objects_in_session = max(video.max_objects_in_session, len(session.object_ids))

    def _retire(self, video: _Video, session: TrackingSession, i: int) -> None:
        """Drop automatic objects unseen for `retire_after_s` from the session (their tracks stay)."""
        now = float(video.timestamps[i])
        stale = [oid for oid in session.object_ids
                 if video.tracks[oid].source == "auto" and now - video.tracks[oid].last_seen_ts > self.retire_after_s]
        if stale:
            session.compact(oid for oid in session.object_ids if oid not in stale)

    def _search(self, video: _Video, session: TrackingSession, gate: DiscoveryGate, i: int, pixels: torch.Tensor,
                result: FrameResult | None, stop: int) -> None:
        """Discovery on keyframe `i`: new objects join the session and the frame is tracked again with them
        (the others' masks come out the same); the gate keeps the frame as its reference."""
        calls = video.discovery_calls
        new = self._discover_new(video, session, i, result, stop=stop)
        if new:
            for s in new:
                session.add(s)
            result = session.step(i, pixels)
            self._record(video, result, i, lambda oid: True)
        if video.discovery_calls > calls:
            with self.times("discovery"):
                gate.ran(video.frames[i], self._live(session, result))

    def _discover_new(self, video: _Video, session: TrackingSession, i: int, result: FrameResult | None,
                      stop: int) -> list[Seed]:
        """Seeds for the objects found on keyframe `i` that no live track covers, within `max_objects`."""
        video.keyframes_searched += 1
        room = self.max_objects - sum(1 for oid in session.object_ids if video.tracks[oid].source == "auto")
        if room <= 0:
            return []
        video.discovery_calls += 1
        with self.times("discovery"):
            candidates = list(self.discover(video.frames[i]))
            if not candidates:
                return []
            rles = encode_masks(np.stack([np.asarray(c.mask, dtype=bool) for c in candidates]))
        min_area = int(self.min_area_frac * video.height * video.width)
        kept = select_candidates(rles, [c.score for c in candidates], max_objects=self.max_objects,
                                 min_area=min_area, **self.dedupe)
        live = list(self._live(session, result).values())
        fresh = [kept[k] for k in uncovered([rles[k] for k in kept], live, **self.match)][:room]
        seeds = []
        for k in fresh:
            oid = self._next_id(video)
            video.tracks[oid] = _Track(oid, "auto")
            seed = Seed(object_id=oid, source="auto", frame=i, mask_rle=rles[k], stop=max(stop, 0))
            seeds.append(seed)
            if self.backfill_auto and seed.frame > seed.stop:
                video.back_seeds.append(seed)
        return seeds

    @staticmethod
    def _live(session: TrackingSession, result: FrameResult | None) -> dict[int, dict]:
        """The RLE masks, by object id, of the objects in the session that are present on `result`'s frame."""
        if result is None:
            return {}
        in_session = set(session.object_ids)
        return {oid: r for oid, r, a in zip(result.object_ids, result.rles, result.areas, strict=True)
                if a > 0 and oid in in_session}

    @staticmethod
    def _next_id(video: _Video) -> int:
        while video.next_id in video.tracks:
            video.next_id += 1
        return video.next_id


# ---------------------------------------------------------------------------------------------
# The Ray Data stage
# ---------------------------------------------------------------------------------------------


def _concepts(batch: Mapping[str, np.ndarray], i: int) -> list[str]:
    value = batch["concepts_json"][i] if "concepts_json" in batch else ""
    return [str(c) for c in json.loads(value)] if isinstance(value, str) and value else []


def _failed(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and str(value) != ""


class TrackerStage:
    """The callable class that Ray Data's `map_batches` instantiates once per actor (GPU if there is one).

    Adds `tracks_json`, `tracker` and `frame_indices` to each row. A video that fails here (bad
    prompts, a model error) gets `error` set and `tracks_json` "[]"; rows that failed upstream pass
    through untouched, and the other videos of the batch go on.
    """

    def __init__(self, model: str = "tiny", *, ship_frames: str = "all", object_frames: int | None = None,
                 **tracker_kwargs: Any) -> None:
        from models.sam3 import is_sam3

        if ship_frames not in ("all", "shown"):
            raise ValueError(f"ship_frames must be 'all' or 'shown', got {ship_frames!r}")
        #: "shown": a clip row leaves with only the frames PixelRefer-Lite will see (each object's
        #: `object_frames` spread frames) and their indices in `frame_indices`; full PixelRefer
        #: reads every frame of the clip, so it needs "all".
        self.ship_frames = ship_frames
        self.object_frames = object_frames
        # Frames arrive as read-only views of Ray's object store; the SAM 2 processor only reads them,
        # so torch's warning about non-writable arrays is noise in every worker log.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        #: SAM 3: objects come from each clip's concepts (`concepts_json`), not prompts or discovery.
        self.by_concept = is_sam3(model)
        if self.by_concept:
            from actors.concepts import ConceptTracker

            keep = {k: tracker_kwargs[k] for k in ("device", "dtype", "max_objects") if k in tracker_kwargs}
            self.tracker: Any = ConceptTracker(model, **keep)
        else:
            self.tracker = Tracker(model, **tracker_kwargs)
        self.clock = BusyClock("tracker", TRACKER_PHASES)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["video_id"])
        errors = list(batch["error"]) if "error" in batch else [None] * n
        tracks_json = []
        tracked: dict[int, list[dict]] = {}  # clip rows tracked here, for the frames they ship
        kinds = list(batch["kind"]) if "kind" in batch else [""] * n
        counts = {name: np.zeros(n, dtype=np.int64) for name in TRACKER_COUNTS}
        with self.clock.batch():
            for i in range(n):
                if kinds[i] == "track":  # a finished video's whole-track request: its masks are given
                    tracks_json.append(batch["tracks_json"][i])
                    continue
                if _failed(errors[i]):
                    tracks_json.append("[]")
                    continue
                self.tracker.last_stats = {}
                tracks, errors[i] = self._one(batch, i)
                for name in TRACKER_COUNTS:
                    counts[name][i] = int(self.tracker.last_stats.get(name, 0))
                if kinds[i] == "clip" and not _failed(errors[i]):
                    tracked[i] = tracks
                tracks_json.append(json.dumps(tracks, separators=(",", ":")))
        self.clock.add(self.tracker.times.take())
        out = dict(batch)
        out["frames"], out["frame_indices"] = self._shipped(batch, tracked)
        out["tracks_json"] = np.array(tracks_json, dtype=object)
        out["tracker"] = np.array([self.tracker.name] * n, dtype=object)
        out["error"] = np.array(errors, dtype=object)
        out.update(self.clock.columns(n))
        out.update({f"{COUNT_PREFIX}tracker_{name}": values for name, values in counts.items()})
        return out

    def _shipped(self, batch: Mapping[str, np.ndarray], tracked: Mapping[int, list[dict]]
                 ) -> tuple[np.ndarray, np.ndarray]:
        """The frames each row carries on to the referrer, and which clip frames they are ("": all).

        With "shown", a clip of 30 sampled frames and two objects leaves with at most 2 x K frames,
        not 30: the rest would cross the object store only to be dropped by the referrer. Only the
        clip rows tracked here (`tracked`: row -> its tracks) are cut; the others keep theirs.
        """
        n = len(batch["video_id"])
        indices = [""] * n
        if self.ship_frames == "all":
            return batch["frames"], np.array(indices, dtype=object)
        frames = np.empty(n, dtype=object)
        for i in range(n):
            frames[i] = batch["frames"][i]
            if i in tracked:
                owned = int(batch["num_owned"][i]) if "num_owned" in batch else None
                shown = shown_frames(owned_tracks(tracked[i], owned), self.object_frames)
                keep = sorted({f for picks in shown.values() for f in picks})
                frames[i] = np.asarray(frames[i])[keep]
                indices[i] = json.dumps(keep)
        return frames, np.array(indices, dtype=object)

    def _one(self, batch: Mapping[str, np.ndarray], i: int) -> tuple[list[dict], str | None]:
        """One video's tracks, or ([], readable error): never raises."""
        video_id = str(batch["video_id"][i])
        try:
            frames = np.asarray(batch["frames"][i])
            timestamps = times_column(batch["timestamps"][i])
            if frames.size == 0 or len(timestamps) == 0:
                return [], None
            text = str(batch["prompts_json"][i]) if "prompts_json" in batch and batch["prompts_json"][i] else ""
            prompts = prompts_from_json(text) if text else None
            concepts = _concepts(batch, i)
            if self.by_concept:
                if prompts:
                    raise TrackerInputError(f"{self.tracker.name} finds objects by concept; box, point and mask "
                                            "prompts need a SAM 2 tracker (--tracker)")
                if not concepts:
                    raise TrackerInputError(f"{self.tracker.name} finds objects by concept, and this video has none: "
                                            "give --find 'person, car' or concepts in the prompts file")
                return self.tracker.track(frames, timestamps, concepts), None
            if concepts:
                raise TrackerInputError(f"concepts {concepts} need a SAM 3 tracker, not {self.tracker.name}")
            mode = str(batch["discover"][i]) if "discover" in batch and batch["discover"][i] else None
            return self.tracker.track(frames, timestamps, prompts, discover=mode), None
        except (TrackerInputError, PromptsError, ConceptError) as exc:
            log.warning("video %s: bad prompts or concepts: %s", video_id, exc)
            return [], f"tracker: {exc}"
        except Exception as exc:  # noqa: BLE001 - one video's failure must not stop the others
            log.exception("video %s: tracking failed", video_id)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return [], f"tracker: tracking failed: {type(exc).__name__}: {exc}"
