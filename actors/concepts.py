"""Finding objects by name: SAM 3 detects every instance of each concept ("person", "red car") on every
frame of a clip and tracks them, with the same output contract as `actors.tracker.Tracker.track`.

transformers' `Sam3VideoModel` does the work, one inference session per clip: the clip's frames go
through the processor, `add_text_prompt` registers all concepts (SAM 3 keeps each object tied to the
concept that found it), and `propagate_in_video_iterator` detects, associates and tracks frame by
frame, holding back each frame's output for SAM 3's "hotstart" window so that tracks it removes as
spurious never appear. Masks become COCO RLE, areas and boxes as each frame leaves the model.

Memory: SAM 3 users report memory that grows without bound on long videos. Two things grow:

- within a clip, transformers stores with every tracked frame each object's full-input-size mask logits
  (1008 x 1008 fp32, 4 MB per object per frame, on the GPU), which it never reads again, and every
  frame's memory features and processed pixels; before each frame this tracker drops the stored
  masks, the memories older than SAM 3's memory window (conditioning frames stay) and the pixels of
  frames already tracked, none of which SAM 3 reads again (tests check the tracks do not change);
- across clips, anything that outlives the call; the session is local to `track`, released in a
  `finally` (deleted, `gc.collect()`, and `torch.cuda.empty_cache()` on CUDA), so nothing does.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from actors.rle import encode_masks, rle_areas, rle_boxes
from actors.seeds import check_frames
from models.sam3 import ConceptError, Sam3Bundle, check_concepts, load_sam3
from models.timing import PhaseTimes

__all__ = ["CONCEPT_PHASES", "ConceptError", "ConceptTracker"]

#: Where a concept tracker's time goes, named as the SAM 2 tracker's (`TRACKER_PHASES`: the stage
#: reports one set): resizing the clip's frames; discovery, here the detector (vision backbone,
#: text encoder, DETR and mask head per concept and frame); propagation, the tracker (memory attention, mask
#: decoding, detection-track association, memory encoding); masks to video size and RLE.
CONCEPT_PHASES = ("preprocess", "discovery", "propagation", "mask_encoding")


@dataclass
class _Object:
    sam_id: int
    label: str
    score: float
    frames: dict[int, dict] = field(default_factory=dict)


def unique_concepts(concepts: Sequence[str]) -> list[str]:
    """Concepts stripped, without repeats that differ only in case or spacing (the first spelling wins).

    SAM 3's CLIP tokenizer lowercases and collapses spaces, so "Car" and "car" would be two prompts
    that find the same objects twice under two labels.
    """
    seen: dict[str, str] = {}
    for c in concepts:
        seen.setdefault(" ".join(c.split()).casefold(), c.strip())
    return list(seen.values())


class _ModelClock:
    """Splits each SAM 3 frame step into detector and tracker time with forward hooks, and bounds the
    session's memory before each step (see the module docstring).

    Hooks rather than wrapping calls: `propagate_in_video_iterator` drives the model internally, and
    forward hooks are the public way to run code around its module calls.
    """

    def __init__(self, model: Any, times: PhaseTimes, sync: bool) -> None:
        self.times, self.sync = times, sync
        self.window = max(int(model.config.tracker_config.num_maskmem),
                          int(model.config.tracker_config.max_object_pointers_in_encoder))
        self.max_state_frames = 0
        self.max_objects = 0
        self._step_start = 0.0
        self._detector_s = 0.0
        self._part_start = 0.0
        detector = model.detector_model
        self.handles = [model.register_forward_pre_hook(self._before_step, with_kwargs=True),
                        model.register_forward_hook(self._after_step)]
        for part in (detector, detector.vision_encoder, detector.text_encoder):
            self.handles += [part.register_forward_pre_hook(self._before_part),
                             part.register_forward_hook(self._after_part)]

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _before_step(self, module: Any, args: tuple, kwargs: dict) -> None:
        session, frame_idx = kwargs.get("inference_session"), kwargs.get("frame_idx")
        if session is not None and frame_idx is not None:
            self._prune(session, int(frame_idx))
        self._detector_s = 0.0
        self._step_start = self._now()

    def _after_step(self, module: Any, args: tuple, output: Any) -> None:
        total = self._now() - self._step_start
        self.times.add("discovery", self._detector_s)
        self.times.add("propagation", max(total - self._detector_s, 0.0))

    def _before_part(self, module: Any, args: tuple) -> None:
        self._part_start = self._now()

    def _after_part(self, module: Any, args: tuple, output: Any) -> None:
        self._detector_s += self._now() - self._part_start

    def _prune(self, session: Any, frame_idx: int) -> None:
        """Drop, before tracking `frame_idx` forwards, what SAM 3 will not read again.

        Pixels of tracked frames are replaced by None rather than removed: SAM 3 takes the clip's length
        from the number of stored frames.
        """
        state_frames = 0
        for outputs in session.output_dict_per_obj.values():
            stale = [f for f in outputs["non_cond_frame_outputs"] if frame_idx - f >= self.window]
            for f in stale:
                del outputs["non_cond_frame_outputs"][f]
            for kind in ("cond_frame_outputs", "non_cond_frame_outputs"):
                for out in outputs[kind].values():
                    out.pop("high_res_masks", None)
            held = len(outputs["cond_frame_outputs"]) + len(outputs["non_cond_frame_outputs"])
            state_frames = max(state_frames, held)
        frames = session.processed_frames or {}
        for f in [f for f, pixels in frames.items() if f < frame_idx and pixels is not None]:
            frames[f] = None
        self.max_state_frames = max(self.max_state_frames, state_frames)
        self.max_objects = max(self.max_objects, len(session.obj_ids))


class ConceptTracker:
    """SAM 3 concept detection and tracking over a clip's sampled frames (a plain class: no Ray inside)."""

    def __init__(self, model: str = "tiny-sam3", *, device: str | None = None, dtype: Any = None,
                 max_objects: int = 8, score_threshold: float | None = None, bundle: Sam3Bundle | None = None
                 ) -> None:
        """`score_threshold`: least detection score (0..1) that starts a new object; default the
        checkpoint folder's `pixelrefer_tracker.json`, else SAM 3's own (0.7). At most `max_objects`
        objects are tracked at once (SAM 3 keeps the best-scoring new detections) and returned per clip.
        `bundle`: an already loaded model instead of `model` (a bench's full-size random model).
        """
        if max_objects <= 0:
            raise ValueError("max_objects must be positive")
        self.bundle = bundle or load_sam3(model, device=device, dtype=dtype)
        self.name = self.bundle.name  # "tiny-sam3" for tiny, else the folder or hub id
        self.max_objects = max_objects
        sam = self.bundle.model
        if score_threshold is None and "score_threshold" in self.bundle.tracker_defaults:
            score_threshold = float(self.bundle.tracker_defaults["score_threshold"])
        if score_threshold is not None:
            if not 0.0 < score_threshold < 1.0:
                raise ValueError(f"score_threshold must be between 0 and 1, got {score_threshold}")
            # SAM 3 has two thresholds: to keep a detection at all, and to start an object with one.
            sam.new_det_thresh = score_threshold
            sam.score_threshold_detection = min(sam.score_threshold_detection, score_threshold)
        sam.max_num_objects = min(int(sam.max_num_objects), max_objects)
        self.last_stats: dict[str, Any] = {}
        #: Seconds per phase (CONCEPT_PHASES) since the caller last took them.
        self.times = PhaseTimes(self.bundle.device)
        self._clock = _ModelClock(sam, self.times, sync=self.bundle.device.type == "cuda")

    def track(self, frames: np.ndarray, timestamps: Sequence[float], concepts: Sequence[str]) -> list[dict]:
        """Tracks of every object that matches one of `concepts`, labelled with the concept that found it.

        Returns one dict per object (`object_id` 1.. in this clip, `source` "concept", `label`, `score`:
        its detection score, `frames`: per frame where it is present its `frame_index`, `ts`, xyxy
        `bbox`, `area`, `score`, COCO `rle`), sorted by id; at most `max_objects`, the best scores
        first. Raises `ConceptError` for unusable concepts before any model work; finding nothing is `[]`.
        """
        started = time.perf_counter()
        check_concepts(self.bundle, concepts)
        prompts = unique_concepts(concepts)
        frames, ts = check_frames(frames, timestamps)
        found: dict[int, _Object] = {}
        self._clock.max_state_frames = self._clock.max_objects = 0
        if len(frames):
            try:
                self._run(frames, ts, prompts, found)
            finally:
                self._release()
        kept = sorted(sorted((o for o in found.values() if o.frames), key=lambda o: (-o.score, o.sam_id))
                      [:self.max_objects], key=lambda o: o.sam_id)
        self.last_stats = {
            "frames": len(frames), "concepts": len(prompts), "objects": len(kept), "objects_found": len(found),
            "seconds": time.perf_counter() - started, "max_state_frames": self._clock.max_state_frames,
            "max_objects_in_session": self._clock.max_objects,
        }
        return [{"object_id": k, "source": "concept", "label": o.label, "score": round(o.score, 6),
                 "frames": [o.frames[i] for i in sorted(o.frames)]} for k, o in enumerate(kept, start=1)]

    def _run(self, frames: np.ndarray, ts: np.ndarray, prompts: list[str], found: dict[int, _Object]) -> None:
        """One SAM 3 session over the clip; every name bound to it dies with this frame."""
        bundle = self.bundle
        height, width = int(frames.shape[1]), int(frames.shape[2])
        with self.times("preprocess"):
            session = bundle.processor.init_video_session(
                video=[frames], inference_device=bundle.device, processing_device=bundle.device,
                video_storage_device="cpu", dtype=bundle.dtype)
            session.video_height, session.video_width = height, width
        bundle.processor.add_text_prompt(session, prompts)
        steps = bundle.model.propagate_in_video_iterator(session)
        try:
            for out in steps:
                with self.times("mask_encoding"):
                    self._record(session, out, ts, found)
        finally:
            # An exception's traceback keeps this frame alive: unbind the session so it does not.
            steps.close()
            del steps, session

    def _record(self, session: Any, out: Any, ts: np.ndarray, found: dict[int, _Object]) -> None:
        """Append each present object's frame; SAM 3's hidden and empty masks are left out."""
        post = self.bundle.processor.postprocess_outputs(session, out)
        ids = [int(i) for i in post["object_ids"].tolist()]
        if not ids:
            return
        label = {oid: text for text, oids in post["prompt_to_obj_ids"].items() for oid in oids}
        scores = post["scores"].tolist()
        rles = encode_masks(post["masks"].cpu().numpy())
        areas, boxes = rle_areas(rles), rle_boxes(rles)
        tracker_scores = out.obj_id_to_tracker_score or {}
        i = int(out.frame_idx)
        for k, oid in enumerate(ids):
            if areas[k] == 0:
                continue
            obj = found.setdefault(oid, _Object(sam_id=oid, label=label[oid], score=float(scores[k])))
            obj.frames[i] = {
                "frame_index": i, "ts": float(ts[i]), "bbox": [float(v) for v in boxes[k]], "area": int(areas[k]),
                "score": round(float(tracker_scores.get(oid, scores[k])), 6), "rle": rles[k],
            }

    def _release(self) -> None:
        """Give back what the clip's session held, so that nothing outlives `track`."""
        gc.collect()
        if self.bundle.device.type == "cuda":
            torch.cuda.empty_cache()
