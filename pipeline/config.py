"""The index job's configuration: one dataclass that the CLI fills and every stage reads.

Resources are declared here, beside the defaults that size them, so that a cluster operator can see
in one place what each stage asks Ray for.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from actors.discovery_schedule import DISCOVERY_POLICIES
from pipeline.clips import DEFAULT_CLIP_SECONDS, MAX_CLIP_SECONDS
from pipeline.reid import DEFAULT_THRESHOLD, TINY_THRESHOLD
from pipeline.segments import SEGMENT_FIRST_FRAMES, SEGMENT_MAX_FRAMES
from pipeline.sizing import REFERRER_ROWS_PER_BATCH, Cluster, StageResources, check_placement, size_stages

__all__ = ["DEFAULT_CLIP_SECONDS", "DISCOVERY_POLICIES", "MAX_CLIP_SECONDS", "IndexConfig"]


@dataclasses.dataclass
class IndexConfig:
    source: str
    output: str
    model: str = "tiny"
    tracker: str = "tiny"
    mode: str = "lite"
    fps: float | None = 1.0
    num_frames: int | None = None
    #: A per-video frame budget: a longer video is sampled at max_frames / duration (recorded as
    #: `videos.sampled_fps` and named in the summary). None: --fps holds for any length.
    max_frames: int | None = None
    #: Clips end at shot cuts (`cuts="shot"`, TransNetV2) and are at most this long; "none": fixed
    #: windows. 30 s: at 1 fps, 30 frames per SAM 2 session (bounded tracker state) and a caption
    #: timeline with one entry per half minute, while an object crossing a window boundary is linked.
    clip_seconds: float = DEFAULT_CLIP_SECONDS
    cuts: str = "shot"
    #: Minutes between commits of a long run (whole videos only).
    commit_every_min: float = 10.0
    max_side: int | None = 1920
    prompts: str | None = None
    questions: str | None = None
    address: str | None = None
    #: GPUs the cluster may grow to (an autoscaler adding nodes): model pools may grow that far.
    max_gpus: float | None = None
    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    max_objects: int = 8
    #: Concepts a SAM 3 tracker finds in every video (`--find "person, car"`): each object found is
    #: labelled with its concept. Empty: objects come from prompts or SAM 2's discovery.
    find: tuple[str, ...] = ()
    keyframe_interval_s: float = 2.0
    #: When a clip's later keyframes run SAM 2's mask generation (`actors.discovery_schedule`):
    #: "changed", only where something may have entered (an untracked part of the frame changed, or
    #: a tracked object lost area); "every", on each keyframe.
    discovery: str = "changed"
    max_new_tokens: int = 64
    #: K: masked frames of an object shown to PixelRefer per caption, spread over its span (per
    #: clip, and over the whole track). 8: `bench.referrer` at 2B widths on a 20-frame track
    #: measured 9.9 s/object for all 20 frames, 4.7 s for 8, 2.6 s for 4 (CPU); 8 frames over a
    #: 30 s clip is one every ~4 s, enough to see what an object does, at half the cost of all.
    object_frames: int | None = 8
    decode_timeout_s: float = 120.0
    upstream_local_crop: bool = False
    retry_failed: bool = False
    max_attempts: int = 3
    task_retries: int = 2
    command: str = "index"
    run_id: str | None = None
    decode: StageResources = dataclasses.field(default_factory=lambda: StageResources(num_cpus=1.0))
    track: StageResources = dataclasses.field(default_factory=StageResources)
    refer: StageResources = dataclasses.field(default_factory=lambda: StageResources(batch_size=REFERRER_ROWS_PER_BATCH))
    #: A shot-pass segment task (`pipeline.segments`): a CPU, or a slice of a GPU beside the models.
    shots: StageResources = dataclasses.field(default_factory=lambda: StageResources(num_cpus=1.0))
    #: (first, longest) frames of a long video's shot-pass segments (`pipeline.segments.plan_segments`).
    segment_frames: tuple[int, int] = (SEGMENT_FIRST_FRAMES, SEGMENT_MAX_FRAMES)
    #: Clips per referrer call: their prompts share batches (throughput); fewer finish videos sooner.
    clips_per_call: int = REFERRER_ROWS_PER_BATCH
    #: Sentence embedder of the captions and answers (`models.embedders`): "wordllama", a
    #: transformers model folder or hub id, or "none" (no `embeddings` rows; `pixelrefer embed` adds them later).
    embedder: str = "wordllama"
    #: Join the tracks of one object across shot cuts and re-entries by appearance (`pipeline.reid`)
    #: and keep each clip's vector (`tracklets`); False: objects are the IoU-linked tracks, as before.
    reid: bool = True
    #: The cosine that merges two tracks; None: the referrer's (`pipeline.reid.DEFAULT_THRESHOLD`,
    #: or `TINY_THRESHOLD` for the random tiny weights, where their reasons are). Not on the command
    #: line: it belongs to the weights (`bench/reid.py pairs` measures it for new ones).
    reid_threshold: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("lite", "full"):
            raise ValueError(f"--mode must be 'lite' or 'full', got {self.mode!r}")
        if self.num_frames is not None:
            if self.num_frames <= 0:
                raise ValueError(f"--num-frames must be positive, got {self.num_frames}")
            self.fps = None
        elif self.fps is None or self.fps <= 0:
            raise ValueError(f"--fps must be positive, got {self.fps}")
        if self.max_objects <= 0:
            raise ValueError(f"--max-objects must be positive, got {self.max_objects}")
        if self.object_frames is not None and self.object_frames <= 0:
            raise ValueError(f"--object-frames must be positive, got {self.object_frames}")
        if self.max_frames is not None and self.max_frames <= 0:
            raise ValueError(f"--max-frames must be positive, got {self.max_frames}")
        if not (0 < self.clip_seconds <= MAX_CLIP_SECONDS):
            raise ValueError(f"--clip-seconds must be in (0, {MAX_CLIP_SECONDS:g}], got {self.clip_seconds:g}")
        if self.cuts not in ("shot", "none"):
            raise ValueError(f"--cuts must be 'shot' or 'none', got {self.cuts!r}")
        if self.discovery not in DISCOVERY_POLICIES:
            raise ValueError(f"--discovery must be one of {', '.join(DISCOVERY_POLICIES)}, got {self.discovery!r}")
        if self.clips_per_call < 1:
            raise ValueError(f"--clips-per-call must be at least 1, got {self.clips_per_call}")
        if self.max_gpus is not None and not self.max_gpus >= 0:
            raise ValueError(f"--max-gpus must be a number of GPUs >= 0, got {self.max_gpus}")
        if self.find and not self.concept_tracker:
            raise ValueError(
                f"--find needs a SAM 3 tracker, but --tracker is {self.tracker!r} (SAM 2 finds objects without "
                "names): add --tracker tiny-sam3, facebook/sam3 or a SAM 3 checkpoint folder")
        if not self.embedder.strip():
            raise ValueError("--embedder is empty: give 'wordllama', a model folder or hub id, or 'none'")
        if self.reid_threshold is None:
            tiny = self.model in ("tiny", "tiny-lite", "tiny-full")
            self.reid_threshold = TINY_THRESHOLD if tiny else DEFAULT_THRESHOLD
        if not (-1.0 <= self.reid_threshold <= 1.0):
            raise ValueError(f"reid_threshold is a cosine, in [-1, 1]; got {self.reid_threshold}")
        if not (0 < self.commit_every_min <= 24 * 60):
            raise ValueError(f"--commit-every must be in (0, 1440] minutes, got {self.commit_every_min:g}")

    @property
    def model_label(self) -> str:
        """The `model` column: says which weights and which framework produced a row."""
        return f"tiny-{self.mode}" if self.model == "tiny" else f"{self.model}:{self.mode}"

    @property
    def tracker_label(self) -> str:
        return "tiny-sam2" if self.tracker == "tiny" else self.tracker

    @property
    def concept_tracker(self) -> bool:
        """Whether the tracker is SAM 3 (objects found by concept) rather than SAM 2."""
        from models.sam3 import is_sam3  # here: the driver's other paths need no torch import

        return is_sam3(self.tracker)

    def fit_resources(self, cluster: Cluster) -> None:
        """Size every stage for `cluster` (`pipeline.sizing`), or raise `PlacementError` when the
        stages cannot all be placed at once (the run would wait forever)."""
        sizing = size_stages(cluster, self.clips_per_call)
        check_placement(sizing, cluster)
        self.decode, self.track, self.refer, self.shots = sizing.decode, sizing.track, sizing.refer, sizing.shots

    @staticmethod
    def parse_storage_options(text: str | None) -> dict[str, Any]:
        if not text:
            return {}
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--storage-options is not valid JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise ValueError("--storage-options must be a JSON object")
        return value
