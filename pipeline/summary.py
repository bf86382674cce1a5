"""What a run did, as the driver counts it: the summary printed at the end and the `runs` rows."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from actors.busy import ACTOR_PREFIX, BUSY_PREFIX, COUNT_PREFIX, END_PREFIX, PHASE_PREFIX, START_PREFIX


@dataclasses.dataclass
class RunSummary:
    run_id: str
    committed: bool = False
    videos_listed: int = 0
    videos_skipped: int = 0
    videos_ok: int = 0
    videos_failed: int = 0
    videos_quarantined: int = 0
    retry_video_ids: list[str] = dataclasses.field(default_factory=list)
    objects: int = 0
    captions: int = 0
    answers: int = 0
    frames: int = 0
    clips: int = 0
    clips_failed: int = 0
    #: Seconds of video indexed (the clips done), for video-hours per hour of wall time.
    video_seconds: float = 0.0
    #: Videos whose frame budget (--max-frames) lowered the sampling rate, with the rate used.
    thinned: list[tuple[str, float]] = dataclasses.field(default_factory=list)
    commits: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    rows: dict[str, int] = dataclasses.field(default_factory=dict)
    #: Wall time of the streaming graph (first row submitted to last row received).
    graph_seconds: float = 0.0
    #: Seconds each model stage's actors spent inside batches, summed over actors.
    busy_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    #: Distinct actors seen per model stage.
    actors: dict[str, int] = dataclasses.field(default_factory=dict)
    #: Per model stage, (first batch start, last batch end) as epoch seconds: its active window.
    windows: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    #: Seconds per `<stage>_<phase>` summed over rows (decode, tracker, referrer) and the driver's own
    #: (`driver_assemble`: linking and tables; `driver_write`: commits), to find where the time goes.
    phase_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    #: CPU seconds of the driver process over the run (its share of a node that also runs workers).
    driver_cpu_s: float = 0.0
    #: Events per `<stage>_<name>` summed over rows (`tracker_discovery_calls`, `tracker_keyframes_skipped`).
    counts: dict[str, int] = dataclasses.field(default_factory=dict)

    def add_phase(self, name: str, seconds: float) -> None:
        self.phase_seconds[name] = self.phase_seconds.get(name, 0.0) + seconds

    def utilisation(self) -> dict[str, float]:
        """Share of the graph's wall time each actor pool was busy (1.0: every actor always busy).

        A model stage well under 1.0 while another is near it is starved by the stage before it;
        actor start-up (model loading) counts as idle, which is what it costs the run.
        """
        if self.graph_seconds <= 0:
            return {}
        return {
            stage: busy / (max(1, self.actors.get(stage, 1)) * self.graph_seconds)
            for stage, busy in self.busy_seconds.items()
        }

    def active_utilisation(self) -> dict[str, float]:
        """Busy share within each stage's own window (first batch in to last batch out).

        Unlike `utilisation`, actor start-up and the pipeline filling and draining do not count, so
        this is the steady-state answer to "does the stage before starve this one?".
        """
        out = {}
        for stage, busy in self.busy_seconds.items():
            start, end = self.windows.get(stage, (0.0, 0.0))
            if end > start:
                out[stage] = busy / (max(1, self.actors.get(stage, 1)) * (end - start))
        return out

    def video_hours_per_hour(self) -> float:
        return self.video_seconds / self.seconds if self.seconds else 0.0

    def lines(self) -> list[str]:
        rate = self.frames / self.seconds if self.seconds else 0.0
        out = [
            f"run {self.run_id}: {'committed' if self.committed else 'NOT committed'} in {self.seconds:.1f} s"
            + (f" ({self.commits} commits)" if self.commits > 1 else ""),
            f"  videos: {self.videos_listed} listed, {self.videos_skipped} already indexed, "
            f"{self.videos_ok} ok, {self.videos_failed} failed ({self.videos_quarantined} quarantined), "
            f"{len(self.retry_video_ids)} lost to worker crashes (retried next run)",
            f"  clips {self.clips} ({self.clips_failed} failed), video {self.video_seconds / 3600:.2f} h indexed, "
            f"{self.video_hours_per_hour():.1f} video-hours per hour",
            f"  objects {self.objects}, captions {self.captions}, answers {self.answers}, "
            f"frames {self.frames} ({rate:.1f} frames/s)",
        ]
        calls, skipped = self.counts.get("tracker_discovery_calls", 0), self.counts.get("tracker_keyframes_skipped", 0)
        if calls or skipped:
            out.append(f"  discovery: SAM 2 mask generation on {calls} keyframes, {skipped} keyframes skipped "
                       "with nothing new (--discovery)")
        if self.thinned:
            shown = ", ".join(f"{uri} ({fps:.3g} frames/s)" for uri, fps in self.thinned[:5])
            more = f" and {len(self.thinned) - 5} more" if len(self.thinned) > 5 else ""
            out.append(f"  thinned by --max-frames: {shown}{more}")
        busy, active = self.utilisation(), self.active_utilisation()
        if busy:
            out.append(
                "  stage busy: " + ", ".join(
                    f"{stage} {share:.0%} ({self.actors.get(stage, 1)} actor{'s' if self.actors.get(stage, 1) > 1 else ''}"
                    + (f", {active[stage]:.0%} between its first and last batch" if stage in active else "") + ")"
                    for stage, share in busy.items()
                ) + f" of {self.graph_seconds:.1f} s"
            )
        out += [f"  failed: {uri}: {error}" for uri, error in self.failures]
        return out


def count_busy(row: Mapping[str, Any], summary: RunSummary, actors: dict[str, set[str]]) -> None:
    for key, value in row.items():
        if key.startswith(PHASE_PREFIX):
            seconds = float(value) if value is not None else 0.0
            if np.isfinite(seconds):
                summary.add_phase(key[len(PHASE_PREFIX):], seconds)
        elif key.startswith(COUNT_PREFIX):
            name = key[len(COUNT_PREFIX):]
            summary.counts[name] = summary.counts.get(name, 0) + int(value or 0)
        elif key.startswith(BUSY_PREFIX):
            stage = key[len(BUSY_PREFIX):]
            seconds = float(value) if value is not None else 0.0
            if np.isfinite(seconds):
                summary.busy_seconds[stage] = summary.busy_seconds.get(stage, 0.0) + seconds
            actor = row.get(ACTOR_PREFIX + stage)
            if isinstance(actor, str) and actor:
                actors.setdefault(stage, set()).add(actor)
                summary.actors[stage] = len(actors[stage])
            start, end = float(row.get(START_PREFIX + stage, np.nan)), float(row.get(END_PREFIX + stage, np.nan))
            if np.isfinite(start) and np.isfinite(end):
                lo, hi = summary.windows.get(stage, (start, end))
                summary.windows[stage] = (min(lo, start), max(hi, end))
