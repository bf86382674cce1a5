"""What `pixelrefer query --video` finds about one video, and when its objects are on screen.

Kept apart from the SQL sandbox because `pixelrefer report` draws the same result (presence spans
for its timeline) and the output formats render it, neither of which needs DuckDB.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import pyarrow as pa

TIMELINE_SCHEMA = pa.schema(
    [
        ("section", pa.string()),
        ("video_id", pa.string()),
        ("run_id", pa.string()),
        ("object_ids", pa.string()),
        ("ts_start", pa.float64()),
        ("ts_end", pa.float64()),
        ("question", pa.string()),
        ("text", pa.string()),
    ]
)


def presence_spans(object_ts: Iterable[float], sampled_ts: Sequence[float] | None) -> list[tuple[float, float]]:
    """Group an object's frame times into spans of consecutive sampled frames.

    An object is "present" between two sampled frames only when it was seen in both; a sampled
    frame where it was not seen ends the span. Without `sampled_ts` its own times are one span.
    """
    seen = sorted({round(float(t), 6) for t in object_ts if t is not None})
    if not seen:
        return []
    if not sampled_ts:
        return [(seen[0], seen[-1])]
    seen_set = set(seen)
    grid = sorted({round(float(t), 6) for t in sampled_ts} | seen_set)
    spans: list[tuple[float, float]] = []
    start: float | None = None
    previous: float | None = None
    for t in grid:
        if t in seen_set:
            start = t if start is None else start
            previous = t
        elif start is not None:
            spans.append((start, previous))  # type: ignore[arg-type]
            start = None
    if start is not None:
        spans.append((start, previous))  # type: ignore[arg-type]
    return spans


@dataclasses.dataclass
class VideoResult:
    """Everything about one video in one run: its row, objects (with frames), captions and answers."""

    video: dict[str, Any]
    runs: list[dict[str, Any]]  # every run of this video, latest first (status, model, indexed_at)
    objects: pa.Table
    captions: pa.Table
    qa: pa.Table

    @property
    def video_id(self) -> str:
        return self.video["video_id"]

    @property
    def run_id(self) -> str:
        return self.video["run_id"]

    def object_summaries(self) -> list[dict[str, Any]]:
        """Objects without their per-frame masks: id, source, time span(s), frame count."""
        sampled = self.video.get("sampled_ts") or []
        rows = []
        for obj in self.objects.select(["object_id", "source", "first_ts", "last_ts", "frames"]).to_pylist():
            frames = obj.pop("frames") or []
            obj["num_frames"] = len(frames)
            obj["spans"] = [list(s) for s in presence_spans((f["ts"] for f in frames), sampled)]
            rows.append(obj)
        return rows

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready document (masks left out: the report is the place to look at them)."""
        video = {k: v for k, v in self.video.items() if k != "sampled_ts"}
        video["num_sampled"] = len(self.video.get("sampled_ts") or [])
        return {
            "video": video,
            "runs": self.runs,
            "objects": self.object_summaries(),
            "captions": self.captions.to_pylist(),
            "qa": self.qa.to_pylist(),
        }

    def timeline(self) -> pa.Table:
        """One flat table (objects, captions, answers) for CSV, where one header must fit all rows."""
        base = {"video_id": self.video_id, "run_id": self.run_id}
        rows: list[dict[str, Any]] = []
        for obj in self.object_summaries():
            spans = "; ".join(f"{a:g}-{b:g}" for a, b in obj["spans"])
            text = f"{obj['source'] or ''} object, {obj['num_frames']} frames, present {spans}".strip()
            rows.append(
                {**base, "section": "object", "object_ids": str(obj["object_id"]), "ts_start": obj["first_ts"],
                 "ts_end": obj["last_ts"], "question": None, "text": text}
            )  # fmt: skip
        for cap in self.captions.to_pylist():
            rows.append(
                {**base, "section": "caption", "object_ids": str(cap["object_id"]), "ts_start": cap["ts_start"],
                 "ts_end": cap["ts_end"], "question": None, "text": cap["caption"]}
            )  # fmt: skip
        for qa in self.qa.to_pylist():
            ids = " ".join(str(i) for i in qa["object_ids"] or [])
            rows.append(
                {**base, "section": "answer", "object_ids": ids, "ts_start": None, "ts_end": None,
                 "question": qa["question"], "text": qa["answer"]}
            )  # fmt: skip
        return pa.Table.from_pylist(rows, schema=TIMELINE_SCHEMA)
