"""What `pixelrefer query --video` finds about one video: its clips, objects, captions and answers.

The SQL here runs in `jobs.query_sql`'s sandbox (this module only holds its text, like
`jobs.query_search`), and the result is drawn by `pixelrefer report` and rendered by the output
formats, neither of which needs DuckDB. Heavy lifting stays in DuckDB: a 2-hour video at 1 fps has
~7,200 sampled frames and tens of thousands of `masks` rows, of which only per-object aggregates
(presence spans, clips) come back.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pyarrow as pa

CLIPS_SQL = """
SELECT clip_index, ts_start, ts_end, boundary, num_sampled, status, error
FROM clips WHERE run_id = $run AND video_id = $vid ORDER BY clip_index
"""

# `tracklets`: the object's per-clip tracks as re-identification merged them (null: an index without
# the table, or --reid off). Presence spans, as gaps and islands: number the union of the video's sampled times and the
# object's mask times; an object's consecutive numbers form one span, so a sampled frame where it
# has no mask ends the span. Times are compared at microsecond precision (they are the same
# decoder timestamps in both tables, but written by different stages).
OBJECTS_SQL = """
WITH m AS (
    SELECT object_id, clip_index, round(ts, 6) AS ts FROM masks
    WHERE run_id = $run AND video_id = $vid AND ts IS NOT NULL
),
seen AS (SELECT DISTINCT object_id, ts FROM m),
grid AS (
    SELECT ts, row_number() OVER (ORDER BY ts) AS pos FROM (
        SELECT round(t, 6) AS ts FROM (
            SELECT unnest(sampled_ts) AS t FROM videos WHERE run_id = $run AND video_id = $vid)
        UNION SELECT ts FROM seen)
),
islands AS (
    SELECT s.object_id, s.ts, g.pos - row_number() OVER (PARTITION BY s.object_id ORDER BY g.pos) AS island
    FROM seen s JOIN grid g USING (ts)
),
spans AS (
    SELECT object_id, list([lo, hi] ORDER BY lo) AS spans
    FROM (SELECT object_id, min(ts) AS lo, max(ts) AS hi FROM islands GROUP BY object_id, island)
    GROUP BY object_id
),
in_clips AS (
    SELECT object_id, list_sort(list(DISTINCT clip_index)) AS clips FROM m
    WHERE clip_index IS NOT NULL GROUP BY object_id
),
tracks AS (
    SELECT object_id, list({'clip_index': clip_index, 'track_id': track_id, 'reid_score': reid_score,
                            'first_ts': first_ts, 'last_ts': last_ts} ORDER BY clip_index, track_id) AS tracklets
    FROM tracklets WHERE run_id = $run AND video_id = $vid GROUP BY object_id
)
SELECT o.object_id, o.source, o.label, o.first_ts, o.last_ts, o.num_frames,
       coalesce(c.clips, CAST([] AS INTEGER[])) AS clips, coalesce(s.spans, CAST([] AS DOUBLE[][])) AS spans,
       t.tracklets
FROM objects o LEFT JOIN spans s USING (object_id) LEFT JOIN in_clips c USING (object_id)
LEFT JOIN tracks t USING (object_id)
WHERE o.run_id = $run AND o.video_id = $vid
ORDER BY o.object_id
"""

# The listing without a mode: per run, from `videos` (every run has rows there) and `clips`;
# `commits` from `runs`, where a long run writes one row per commit.
# One row per committed run: those that indexed videos, and those that did not (`embed`, a nightly
# run with nothing new), from the `runs` table's rows, so the history is complete.
RUNS_SQL = """
WITH v AS (
    SELECT run_id, min(indexed_at) AS indexed_at, string_agg(DISTINCT model, ', ') AS model,
           count(*) FILTER (WHERE status = 'ok') AS videos_ok,
           count(*) FILTER (WHERE status = 'failed') AS videos_failed,
           round(sum(duration_s) FILTER (WHERE status = 'ok') / 3600, 3) AS video_hours
    FROM videos GROUP BY run_id
),
c AS (SELECT run_id, count(*) AS clips FROM clips GROUP BY run_id),
r AS (SELECT run_id, count(*) AS commits, string_agg(DISTINCT command, ', ') AS command,
             min(started_at) AS started_at, string_agg(DISTINCT model, ', ') AS model
      FROM runs GROUP BY run_id)
SELECT coalesce(v.run_id, r.run_id) AS run_id, r.command, coalesce(v.indexed_at, r.started_at) AS indexed_at,
       coalesce(v.model, r.model) AS model, coalesce(v.videos_ok, 0) AS videos_ok,
       coalesce(v.videos_failed, 0) AS videos_failed, coalesce(c.clips, 0) AS clips,
       coalesce(v.video_hours, 0) AS video_hours, r.commits
FROM v FULL OUTER JOIN r ON v.run_id = r.run_id LEFT JOIN c ON c.run_id = coalesce(v.run_id, r.run_id)
ORDER BY indexed_at NULLS LAST, run_id
"""

TIMELINE_SCHEMA = pa.schema(
    [
        ("section", pa.string()),
        ("video_id", pa.string()),
        ("run_id", pa.string()),
        ("clip_index", pa.int32()),
        ("object_ids", pa.string()),
        ("ts_start", pa.float64()),
        ("ts_end", pa.float64()),
        ("question", pa.string()),
        ("text", pa.string()),
    ]
)


def merged_from(tracklets: list[dict[str, Any]] | None) -> str | None:
    """How re-identification made an object of several tracks, for people: "tracks 0 (clips 0-1) +
    4 (clip 3, cosine 0.912)"; None when it is one track (nothing was merged)."""
    tracks: dict[int, dict[str, Any]] = {}
    for t in tracklets or []:
        entry = tracks.setdefault(int(t["track_id"]), {"clips": [], "score": t["reid_score"]})
        entry["clips"].append(int(t["clip_index"]))
    if len(tracks) < 2:
        return None
    parts = []
    for tid, entry in sorted(tracks.items(), key=lambda kv: (min(kv[1]["clips"]), kv[0])):
        clips = entry["clips"]
        where = f"clip {clips[0]}" if len(clips) == 1 else f"clips {min(clips)}-{max(clips)}"
        score = f", cosine {entry['score']:.3f}" if entry["score"] is not None else ""
        parts.append(f"{tid} ({where}{score})")
    return "tracks " + " + ".join(parts)


@dataclasses.dataclass
class VideoResult:
    """Everything about one video in one run (masks stay in the index: the report fetches a few)."""

    video: dict[str, Any]
    runs: list[dict[str, Any]]  # every run of this video, latest first (status, model, indexed_at)
    clips: pa.Table  # CLIPS_SQL
    objects: pa.Table  # OBJECTS_SQL: one row per object with its clips and presence spans
    captions: pa.Table  # by clip, whole-track captions (clip_index null) last
    qa: pa.Table

    @property
    def video_id(self) -> str:
        return self.video["video_id"]

    @property
    def run_id(self) -> str:
        return self.video["run_id"]

    def object_summaries(self) -> list[dict[str, Any]]:
        """Objects with their whole-track caption (if seen in several clips), as plain dicts."""
        track = {c["object_id"]: c["caption"] for c in self.captions.to_pylist() if c["clip_index"] is None}
        return [{**obj, "track_caption": track.get(obj["object_id"]), "merged_from": merged_from(obj.get("tracklets"))}
                for obj in self.objects.to_pylist()]

    def clip_timeline(self) -> list[dict[str, Any]]:
        """Each clip with the objects seen in it, their captions and the answers asked about it.

        Captions or answers whose clip is not in the `clips` table (an index written without it)
        still get a clip entry, so nothing the index holds is dropped from the timeline.
        """
        entries: dict[int, dict[str, Any]] = {}

        def entry(index: int) -> dict[str, Any]:
            if index not in entries:
                entries[index] = {"clip_index": index, "ts_start": None, "ts_end": None, "boundary": None,
                                  "num_sampled": None, "status": None, "error": None}  # fmt: skip
                entries[index].update(object_ids=[], captions=[], answers=[])
            return entries[index]

        for clip in self.clips.to_pylist():
            entry(clip["clip_index"]).update(clip)
        for obj in self.objects.to_pylist():
            for index in obj["clips"] or []:
                entry(index)["object_ids"].append(obj["object_id"])
        for cap in self.captions.to_pylist():
            if cap["clip_index"] is not None:
                entry(cap["clip_index"])["captions"].append(
                    {k: cap[k] for k in ("object_id", "ts_start", "ts_end", "caption")}
                )
        for qa in self.qa.to_pylist():
            if qa["clip_index"] is not None:
                entry(qa["clip_index"])["answers"].append({k: qa[k] for k in ("object_ids", "question", "answer")})
        return [entries[i] for i in sorted(entries)]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready document: `clips` is the timeline; `captions`/`qa` are the rows as stored."""
        video = {k: v for k, v in self.video.items() if k != "sampled_ts"}
        video["num_sampled"] = len(self.video.get("sampled_ts") or [])
        return {
            "video": video,
            "runs": self.runs,
            "clips": self.clip_timeline(),
            "objects": self.object_summaries(),
            "captions": self.captions.to_pylist(),
            "qa": self.qa.to_pylist(),
        }

    def timeline(self) -> pa.Table:
        """One flat table (clips, objects, captions, answers) for CSV, where one header fits all rows."""
        base = {"video_id": self.video_id, "run_id": self.run_id, "question": None}
        rows: list[dict[str, Any]] = []
        for clip in self.clips.to_pylist():
            text = f"{clip['boundary'] or ''} clip, {clip['num_sampled']} sampled frames, {clip['status']}"
            if clip["error"]:
                text += f": {clip['error']}"
            rows.append({**base, "section": "clip", "clip_index": clip["clip_index"], "object_ids": None,
                         "ts_start": clip["ts_start"], "ts_end": clip["ts_end"], "text": text})  # fmt: skip
        for obj in self.objects.to_pylist():
            spans = "; ".join(f"{a:g}-{b:g}" for a, b in obj["spans"])
            label = f"{obj['label']} " if obj["label"] else ""
            text = f"{label}{obj['source'] or ''} object, {obj['num_frames']} frames, present {spans}".strip()
            merged = merged_from(obj.get("tracklets"))
            if merged:
                text += f"; re-identified from {merged}"
            rows.append({**base, "section": "object", "clip_index": None, "object_ids": str(obj["object_id"]),
                         "ts_start": obj["first_ts"], "ts_end": obj["last_ts"], "text": text})  # fmt: skip
        for cap in self.captions.to_pylist():
            rows.append({**base, "section": "caption", "clip_index": cap["clip_index"],
                         "object_ids": str(cap["object_id"]), "ts_start": cap["ts_start"], "ts_end": cap["ts_end"],
                         "text": cap["caption"]})  # fmt: skip
        for qa in self.qa.to_pylist():
            ids = " ".join(str(i) for i in qa["object_ids"] or [])
            rows.append({**base, "section": "answer", "clip_index": qa["clip_index"], "object_ids": ids,
                         "ts_start": qa["ts_start"], "ts_end": qa["ts_end"], "question": qa["question"],
                         "text": qa["answer"]})  # fmt: skip
        return pa.Table.from_pylist(rows, schema=TIMELINE_SCHEMA)
