"""The index job as a streaming Ray Data graph: list -> decode/sample (tasks) -> SAM 2 (actor pool)
-> PixelRefer (actor pool) -> rows for four tables, written and committed by the driver.

Frames exist only between the decode task and the referrer actor; what reaches the driver is a
few kilobytes of JSON per video, so the driver's memory is bounded by the batch in hand, not by
the corpus. Ray Data's streaming executor applies backpressure, so the number of decoded videos in
flight is bounded by the object store budget, not by the number of videos listed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import secrets
import sys
import time
import warnings
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from actors.busy import ACTOR_PREFIX, BUSY_PREFIX, END_PREFIX, START_PREFIX
from pipeline.config import IndexConfig
from pipeline.questions import load_questions, questions_for
from pipeline.sink import RunWriter, indexed_video_ids, recover, retry_counts
from pipeline.sources import VideoFile, list_videos
from pipeline.storage_errors import redact_url

log = logging.getLogger(__name__)


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

    def lines(self) -> list[str]:
        rate = self.frames / self.seconds if self.seconds else 0.0
        out = [
            f"run {self.run_id}: {'committed' if self.committed else 'NOT committed'} in {self.seconds:.1f} s",
            f"  videos: {self.videos_listed} listed, {self.videos_skipped} already indexed, "
            f"{self.videos_ok} ok, {self.videos_failed} failed ({self.videos_quarantined} quarantined), "
            f"{len(self.retry_video_ids)} lost to worker crashes (retried next run)",
            f"  objects {self.objects}, captions {self.captions}, answers {self.answers}, "
            f"frames {self.frames} ({rate:.1f} frames/s)",
        ]
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


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def decode_row(row: dict[str, Any], *, cfg: IndexConfig) -> dict[str, Any]:
    """Ray task body: sample one video. Never raises: a bad file becomes the row's `error`."""
    from pipeline.decode import DecodeError, sample_video

    out = dict(row)
    empty = np.zeros((0, 0, 0, 3), dtype=np.uint8)
    meta = {"duration_s": np.nan, "fps": np.nan, "width": -1, "height": -1, "num_frames": -1}
    try:
        video = sample_video(
            row["uri"], fps=cfg.fps, num_frames=cfg.num_frames, max_frames=cfg.max_frames, max_side=cfg.max_side,
            storage_options=cfg.storage_options, timeout_s=cfg.decode_timeout_s,
        )
    except DecodeError as exc:
        out.update(meta, frames=empty, timestamps=np.zeros(0), error=str(exc), note="")
        return out
    except Exception as exc:  # noqa: BLE001 - an unexpected decoder failure is still one video's failure
        out.update(meta, frames=empty, timestamps=np.zeros(0), error=f"decode {row['uri']}: {type(exc).__name__}: {exc}", note="")
        return out
    if len(video.frames) == 0:
        out.update(meta, frames=empty, timestamps=np.zeros(0), error=f"{row['uri']}: no frame could be decoded", note="")
        return out
    out.update(
        frames=video.frames, timestamps=np.asarray(video.timestamps, dtype=np.float64),
        duration_s=_num(video.duration_s), fps=_num(video.fps), width=_int(video.width), height=_int(video.height),
        num_frames=_int(video.num_frames), error="", note=video.error or "",
    )
    return out


def _num(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _int(value: int | None) -> int:
    return -1 if value is None else int(value)


def _opt(value: Any) -> Any:
    """Undo the sentinels used to keep Ray Data columns typed (NaN / -1 / "" mean unknown)."""
    if value is None:
        return None
    if isinstance(value, (float, np.floating)) and np.isnan(value):
        return None
    if isinstance(value, (int, np.integer)) and value < 0:
        return None
    if isinstance(value, str) and value == "":
        return None
    return value.item() if isinstance(value, np.generic) else value


def _video_rows(cfg: IndexConfig, videos: list[VideoFile], run_id: str) -> list[dict[str, Any]]:
    from actors.prompts import load_prompts, prompts_for, prompts_to_json

    prompts = load_prompts(cfg.prompts, cfg.storage_options) if cfg.prompts else {}
    questions = load_questions(cfg.questions, cfg.storage_options) if cfg.questions else {}
    rows = []
    for v in videos:
        mine = prompts_for(v.uri, prompts)
        rows.append({
            "video_id": v.video_id, "uri": v.uri, "size_bytes": int(v.size_bytes), "etag": v.etag or "",
            "mtime": float(v.mtime) if v.mtime is not None else float("nan"),
            "prompts_json": prompts_to_json(mine) if mine else "",
            "questions_json": json.dumps(questions_for(v.uri, questions)),
            "run_id": run_id,
        })
    return rows


def build_dataset(cfg: IndexConfig, rows: list[dict[str, Any]]):
    """The Ray Data graph over the given video rows (one block per video, so decoding spreads)."""
    import ray.data
    from ray.data import ActorPoolStrategy

    from actors.referrer import ReferrerStage
    from actors.tracker import TrackerStage

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    # A block that keeps failing (a worker crash, not a bad video: those become rows) must not stop
    # the others; the driver notices the missing videos and records them for the next run. Set
    # before `from_items`: a Dataset snapshots the current DataContext when it is created.
    ctx.max_errored_blocks = len(rows)
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    # Ray Data retries crashed tasks and actors forever by default; a video that kills its worker
    # every time must stop after `task_retries` and be quarantined instead. Ray 2.60 takes the bound
    # only through the deprecated `**ray_remote_args` (no named parameter yet): ray is pinned <2.64.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = ds.map(decode_row, fn_kwargs={"cfg": cfg}, num_cpus=cfg.decode.num_cpus, max_retries=cfg.task_retries)
        ds = ds.map_batches(
            TrackerStage,
            fn_constructor_kwargs={"model": cfg.tracker, "max_objects": cfg.max_objects, "keyframe_interval_s": cfg.keyframe_interval_s},
            batch_size=cfg.track.batch_size, batch_format="numpy",
            compute=ActorPoolStrategy(min_size=cfg.track.concurrency[0], max_size=cfg.track.concurrency[1]),
            num_cpus=cfg.track.num_cpus, num_gpus=cfg.track.num_gpus, max_task_retries=cfg.task_retries,
        )
        ds = ds.map_batches(
            ReferrerStage,
            fn_constructor_kwargs={
                "model": cfg.model, "mode": cfg.mode, "max_new_tokens": cfg.max_new_tokens,
                "upstream_local_crop": cfg.upstream_local_crop, "object_frames": cfg.object_frames,
            },
            batch_size=cfg.refer.batch_size, batch_format="numpy",
            compute=ActorPoolStrategy(min_size=cfg.refer.concurrency[0], max_size=cfg.refer.concurrency[1]),
            num_cpus=cfg.refer.num_cpus, num_gpus=cfg.refer.num_gpus, max_task_retries=cfg.task_retries,
        )
    return ds


def table_rows(row: Mapping[str, Any], cfg: IndexConfig, indexed_at: dt.datetime) -> dict[str, list[dict[str, Any]]]:
    """Explode one finished video into rows of the four tables."""
    error = _opt(row.get("error"))
    note = _opt(row.get("note"))
    tracks = [] if error else json.loads(row.get("tracks_json") or "[]")
    captions = [] if error else json.loads(row.get("captions_json") or "[]")
    answers = [] if error else json.loads(row.get("qa_json") or "[]")
    video_id, run_id = str(row["video_id"]), str(row["run_id"])
    timestamps = [float(t) for t in (row.get("timestamps") if row.get("timestamps") is not None else [])]
    videos = [{
        "video_id": video_id, "uri": str(row["uri"]), "size_bytes": _opt(row.get("size_bytes")),
        "etag": _opt(row.get("etag")), "duration_s": _opt(row.get("duration_s")), "fps": _opt(row.get("fps")),
        "width": _opt(row.get("width")), "height": _opt(row.get("height")), "num_frames": _opt(row.get("num_frames")),
        "sampled_ts": [] if error else timestamps, "status": "failed" if error else "ok",
        "error": error or note, "model": cfg.model_label, "tracker": cfg.tracker_label, "run_id": run_id,
        "indexed_at": indexed_at,
    }]
    objects = []
    for t in tracks:
        ts = [f["ts"] for f in t["frames"]]
        objects.append({
            "video_id": video_id, "object_id": int(t["object_id"]), "source": t["source"],
            "first_ts": min(ts) if ts else None, "last_ts": max(ts) if ts else None,
            "frames": t["frames"], "run_id": run_id,
        })
    caption_rows = [
        {"video_id": video_id, "mode": cfg.mode, "model": cfg.model_label, "run_id": run_id, **c} for c in captions
    ]
    qa_rows = [{"video_id": video_id, "mode": cfg.mode, "model": cfg.model_label, "run_id": run_id, **a} for a in answers]
    return {"videos": videos, "objects": objects, "captions": caption_rows, "qa": qa_rows}


def iter_finished(ds) -> Iterator[dict[str, Any]]:
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        n = len(batch["video_id"])
        for i in range(n):
            yield {k: v[i] for k, v in batch.items()}


def ensure_ray(address: str | None) -> None:
    """Join the given cluster, or RAY_ADDRESS, or start a local instance (an explicit address wins)."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if address:
        kwargs["address"] = address
    ray.init(**kwargs)


def quarantined_row(cfg: IndexConfig, video: VideoFile, run_id: str, attempts: int, when: dt.datetime) -> dict[str, Any]:
    return {
        "video_id": video.video_id, "uri": video.uri, "size_bytes": int(video.size_bytes), "etag": video.etag,
        "duration_s": None, "fps": None, "width": None, "height": None, "num_frames": None, "sampled_ts": [],
        "status": "failed", "error": f"quarantined: workers crashed on this video in {attempts} runs",
        "model": cfg.model_label, "tracker": cfg.tracker_label, "run_id": run_id, "indexed_at": when,
    }


def run_row(cfg: IndexConfig, summary: RunSummary, started_at: dt.datetime) -> dict[str, Any]:
    return {
        "run_id": summary.run_id, "command": cfg.command, "source": redact_url(cfg.source), "model": cfg.model_label,
        "tracker": cfg.tracker_label, "mode": cfg.mode, "started_at": started_at,
        "ended_at": dt.datetime.now(dt.timezone.utc), "status": "committed",
        "videos_listed": summary.videos_listed, "videos_skipped": summary.videos_skipped,
        "videos_ok": summary.videos_ok, "videos_failed": summary.videos_failed,
        "videos_quarantined": summary.videos_quarantined, "objects": summary.objects,
        "captions": summary.captions, "answers": summary.answers, "retry_video_ids": summary.retry_video_ids,
    }


def run_index(cfg: IndexConfig, progress: Callable[[str], None] | None = None) -> RunSummary:
    """List, skip what is indexed, run the graph, write and commit. Raises only if it cannot commit.

    Every run that commits leaves a `runs` row, also a run with nothing to do, so the history of
    nightly runs is complete.
    """
    progress = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    started = time.monotonic()
    started_at = dt.datetime.now(dt.timezone.utc)
    run_id = cfg.run_id or new_run_id()
    summary = RunSummary(run_id=run_id)
    finished = recover(cfg.output, cfg.storage_options)
    if finished:
        progress(f"finished interrupted commits of runs {', '.join(finished)}")
    videos = list_videos(cfg.source, cfg.storage_options)
    summary.videos_listed = len(videos)
    if not videos:
        progress(f"no videos found under {redact_url(cfg.source)}")
    done = indexed_video_ids(
        cfg.output, cfg.model_label, cfg.tracker_label, cfg.storage_options, include_failed=not cfg.retry_failed
    )
    attempts = retry_counts(cfg.output, cfg.model_label, cfg.tracker_label, cfg.storage_options)
    todo = [v for v in videos if v.video_id not in done]
    summary.videos_skipped = len(videos) - len(todo)
    quarantine = [v for v in todo if attempts.get(v.video_id, 0) >= cfg.max_attempts]
    todo = [v for v in todo if attempts.get(v.video_id, 0) < cfg.max_attempts]
    writer = RunWriter(cfg.output, run_id, cfg.storage_options, rows_per_file=cfg.rows_per_file)
    try:
        for video in quarantine:
            row = quarantined_row(cfg, video, run_id, attempts[video.video_id], started_at)
            writer.add("videos", [row])
            summary.videos_failed += 1
            summary.videos_quarantined += 1
            summary.failures.append((video.uri, row["error"]))
        if todo:
            _process(cfg, todo, len(videos), run_id, writer, summary, progress, started)
        summary.seconds = time.monotonic() - started
        writer.add("runs", [run_row(cfg, summary, started_at)])
        summary.rows = writer.commit()
        summary.committed = True
    except BaseException:
        writer.abort()
        raise
    finally:
        summary.seconds = time.monotonic() - started
    return summary


def _count_busy(row: Mapping[str, Any], summary: RunSummary, actors: dict[str, set[str]]) -> None:
    for key, value in row.items():
        if key.startswith(BUSY_PREFIX):
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


def _process(
    cfg: IndexConfig, todo: list[VideoFile], listed: int, run_id: str, writer: RunWriter, summary: RunSummary,
    progress: Callable[[str], None], started: float,
) -> None:
    import ray

    rows = _video_rows(cfg, todo, run_id)
    ensure_ray(cfg.address)
    resources = ray.cluster_resources()
    node_cpus = [n.get("Resources", {}).get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    cfg.fit_resources(resources.get("CPU", 1.0), resources.get("GPU", 0.0), max(node_cpus, default=None))
    progress(f"run {run_id}: indexing {len(todo)} of {listed} videos with {cfg.model_label} / {cfg.tracker_label}")
    indexed_at = dt.datetime.now(dt.timezone.utc)
    seen: set[str] = set()
    actors: dict[str, set[str]] = {}
    graph_start = time.monotonic()
    for row in iter_finished(build_dataset(cfg, rows)):
        _count_busy(row, summary, actors)
        summary.graph_seconds = time.monotonic() - graph_start
        tables = table_rows(row, cfg, indexed_at)
        for name, table in tables.items():
            writer.add(name, table)
        video = tables["videos"][0]
        seen.add(video["video_id"])
        if video["status"] == "ok":
            summary.videos_ok += 1
            summary.frames += len(video["sampled_ts"])
        else:
            summary.videos_failed += 1
            summary.failures.append((video["uri"], video["error"]))
            log.error("video %s failed: %s", video["uri"], video["error"])
        summary.objects += len(tables["objects"])
        summary.captions += len(tables["captions"])
        summary.answers += len(tables["qa"])
        elapsed = time.monotonic() - started
        progress(
            f"[{summary.videos_ok + summary.videos_failed}/{len(todo)} videos] objects {summary.objects} · "
            f"failed {summary.videos_failed} · {summary.frames / elapsed:.1f} frames/s"
        )
    lost = [v for v in todo if v.video_id not in seen]
    for video in lost:
        log.error("video %s: its workers failed after retries; it will be retried by the next run", video.uri)
    summary.retry_video_ids = [v.video_id for v in lost]
