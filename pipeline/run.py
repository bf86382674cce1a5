"""One index run: list, skip what is indexed, stream clips through the graph, commit as it goes.

Waves and commits. A video is published whole (all its clips, its objects, its captions) or not at
all. Its whole-track captions can only be asked once its last clip is linked, so the driver feeds
them back into the graph as `track` rows of the *next* wave, alongside that wave's new videos; the
model actors of a wave serve both. Each wave is sized to take about `--commit-every` minutes
(measured on the waves before it), and finished videos are committed when that much time has
passed, at the end of each wave, and at the end of the run: a killed backfill loses at most the
work since its last commit, and the same command resumes there (committed videos are skipped).

Why not Ray Data's `Datasink.on_write_complete` or the DataContext checkpointing: both work per
output block of one dataset, while a commit here is a set of whole videos whose rows come from many
blocks (one per clip) and from two waves (the whole-track captions), written to eight tables in one
commit over the Delta tables (`pipeline.store.commit`).

Overlapping runs (a cron overlap, `index` and `nightly` at once, two clusters) claim their videos
before indexing them (`pipeline.store.claims`): each video is indexed by one run; the other run
leaves it and says so.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import secrets
import sys
import time
from typing import Any, Callable, Mapping

from pipeline.assemble import Assembled, VideoAssembly, assemble, loads, number, track_captions
from pipeline.config import IndexConfig
from pipeline.search.embeddings import RunEmbedder
from pipeline.graph import build_dataset, ensure_ray, iter_finished
from pipeline import storage_errors
from pipeline.questions import load_questions, questions_for
from pipeline.search.sync import BackgroundSync
from pipeline.store.claims import Claims
from pipeline.store.commit import RunWriter, indexed_video_ids, latest_by_uri, retry_counts, visible_videos
from pipeline.store.tables import TableStore
from pipeline.sources import VideoFile, list_videos
from pipeline.storage_errors import redact_url
from pipeline.sizing import Cluster, Sizing, describe
from pipeline.summary import RunSummary, count_busy
from pipeline.tasks import ROW_DEFAULTS, video_row

log = logging.getLogger(__name__)

#: The first wave takes videos up to this many bytes (later waves are sized by measured speed).
FIRST_WAVE_BYTES = 2 << 30
#: Progress lines at most this often (plus one per finished video).
PROGRESS_EVERY_S = 5.0


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


@dataclasses.dataclass
class _Pending:
    """A video whose clips are all linked, waiting for its whole-track captions."""

    assembled: Assembled
    spans: dict[int, tuple[float, float]]


class _Run:
    """The driver's state for one run (kept apart from `run_index` so each piece stays small)."""

    def __init__(self, cfg: IndexConfig, store: TableStore, run_id: str, summary: RunSummary, listed: int,
                 progress: Callable[[str], None]) -> None:
        self.cfg, self.store, self.run_id, self.summary, self.progress = cfg, store, run_id, summary, progress
        self.listed = listed
        self.started = time.monotonic()
        self.started_at = dt.datetime.now(dt.timezone.utc)
        self.indexed_at = self.started_at
        self.commit_index = 0
        self.last_commit = time.monotonic()
        self.writer: RunWriter | None = None
        self.ready: list[Assembled] = []  # complete videos not yet committed
        self.track_rows: list[dict[str, Any]] = []  # for the next wave
        self.pending: dict[str, _Pending] = {}  # video_id -> waiting for its track captions
        self.assemblies: dict[str, VideoAssembly] = {}
        self.actors: dict[str, set[str]] = {}
        self.clips_total = 0
        self.clips_done = 0
        self.last_progress = 0.0
        self.quarantine_rows: list[dict[str, Any]] = []  # and sources removed from SOURCE
        self.finished: set[str] = set()  # videos linked (committed, ready or waiting for track captions)
        self.embedder = RunEmbedder(cfg.embedder)
        self.search = BackgroundSync(cfg.output, cfg.storage_options, progress)

    # -- rows coming back ----------------------------------------------------------------------

    def take(self, row: Mapping[str, Any]) -> None:
        count_busy(row, self.summary, self.actors)
        kind = str(row["kind"])
        video_id = str(row["video_id"])
        if kind == "track":
            pending = self.pending.pop(video_id, None)
            if pending is not None:
                captions = track_captions(video_id, self.run_id, row, pending.spans, mode=self.cfg.mode,
                                          model=self.cfg.model_label)
                pending.assembled.tables["captions"] += captions
                self._ready(pending.assembled)
                self._report(force=True)  # one line per finished video, also when it waited for these
            return
        video = self.assemblies.get(video_id)
        meta = loads(row.get("video_json"), {})
        if video is None:
            video = VideoAssembly(
                video_id=video_id, uri=str(row["uri"]), run_id=self.run_id, size_bytes=int(row["size_bytes"]),
                etag=row["etag"] or None, meta={"num_clips": None, **meta} if meta.get("num_clips") is None else {},
            )
            self.assemblies[video_id] = video
        if video.learn(meta):
            self.clips_total += int(meta["num_clips"])
        if kind == "failed":
            video.error = str(row["error"]) or "failed"
        else:
            video.add(row)
            self.clips_done += 1
            self.summary.clips += 1
            clip = loads(row.get("clip_json"), {})
            span = (number(clip.get("ts_end")) or 0.0) - (number(clip.get("ts_start")) or 0.0)
            self.summary.video_seconds += max(0.0, span)
            if isinstance(row.get("error"), str) and row["error"]:
                self.summary.clips_failed += 1
        if video.complete:
            del self.assemblies[video_id]
            self._finish(video)
        self._report(force=video.complete)

    def _finish(self, video: VideoAssembly) -> None:
        self.finished.add(video.video_id)
        started = time.perf_counter()
        done = assemble(video, mode=self.cfg.mode, model=self.cfg.model_label, tracker=self.cfg.tracker_label,
                        indexed_at=self.indexed_at, track_frames=self.cfg.object_frames, reid=self.cfg.reid,
                        reid_threshold=self.cfg.reid_threshold)
        self.summary.add_phase("driver_assemble", time.perf_counter() - started)
        if video.meta.get("thinned"):
            self.summary.thinned.append((video.uri, float(video.meta.get("sampled_fps") or 0.0)))
        if done.track_request is None:
            self._ready(done)
            return
        request = done.track_request
        self.pending[video.video_id] = _Pending(done, request["spans"])
        self.track_rows.append({
            **ROW_DEFAULTS, "kind": "track", "video_id": video.video_id, "uri": video.uri,
            "size_bytes": int(video.size_bytes or 0), "etag": video.etag or "", "run_id": self.run_id,
            "prompts_json": "", "questions_json": "[]",
            "clip_json": json.dumps({"timestamps": request["timestamps"]}),
            "tracks_json": json.dumps(request["tracks"], separators=(",", ":")),
        })

    def _ready(self, done: Assembled) -> None:
        self.ready.append(done)
        s = self.summary
        video = done.tables["videos"][0]
        if done.ok:
            s.videos_ok += 1
            s.frames += done.frames
        else:
            s.videos_failed += 1
            s.failures.append((video["uri"], done.error or ""))
            log.error("video %s failed: %s", video["uri"], done.error)
        s.objects += len(done.tables["objects"])
        s.captions += len(done.tables["captions"])
        s.answers += len(done.tables["qa"])

    def _report(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_progress < PROGRESS_EVERY_S:
            return
        self.last_progress = now
        s, elapsed = self.summary, now - self.started
        rate = s.video_seconds / elapsed if elapsed > 0 else 0.0
        eta = ""
        if self.clips_done and self.clips_total > self.clips_done:
            eta = f" · ETA {dt.timedelta(seconds=round(elapsed / self.clips_done * (self.clips_total - self.clips_done)))}"
        self.progress(
            f"[clips {self.clips_done}/{self.clips_total} · videos {s.videos_ok + s.videos_failed}/{self.listed - s.videos_skipped}"
            f" · {s.video_seconds / 3600:.2f} video-h · {rate:.1f} video-h/h{eta}] objects {s.objects} · failed {s.videos_failed}"
        )

    # -- commits --------------------------------------------------------------------------------

    def maybe_commit(self) -> None:
        if self.ready and time.monotonic() - self.last_commit >= self.cfg.commit_every_min * 60:
            self.commit()

    def commit(self, final: bool = False) -> None:
        """Publish the ready videos and a `runs` row atomically.

        The vectors of their captions and answers are computed here, on the driver, in one batch per
        commit (`pipeline.search.embeddings`, the code path `pixelrefer embed` uses too): the GPU actors stay
        as they are, and WordLlama embeds ~12,000 sentences in 0.2 s.

        The final commit always happens (it carries the videos lost to worker crashes), so every
        run leaves at least one `runs` row; the others only when there is something to publish.
        """
        if not self.ready and not final:
            return
        started = time.perf_counter()
        writer = RunWriter(self.store, self.run_id, commit_index=self.commit_index)
        try:
            counts = RunSummary(run_id=self.run_id, videos_listed=self.summary.videos_listed,
                                videos_skipped=self.summary.videos_skipped)
            if self.commit_index == 0:
                counts.videos_quarantined = self.summary.videos_quarantined
                counts.videos_failed += self.summary.videos_quarantined
                for row in self.quarantine_rows:
                    writer.add("videos", [row])
            for done in self.ready:
                for name in ("clips", "objects", "masks", "captions", "qa", "tracklets", "videos"):
                    writer.add(name, done.tables[name])
                counts.videos_ok += int(done.ok)
                counts.videos_failed += int(not done.ok)
                counts.clips += done.clips
                counts.video_seconds += float(done.tables["videos"][0]["duration_s"] or 0.0)
                counts.objects += len(done.tables["objects"])
                counts.captions += len(done.tables["captions"])
                counts.answers += len(done.tables["qa"])
            embed_started = time.perf_counter()
            vectors = self.embedder.table([c for d in self.ready for c in d.tables["captions"]],
                                          [a for d in self.ready for a in d.tables["qa"]], self.run_id)
            if vectors is not None:
                writer.add("embeddings", vectors)
                self.summary.add_phase("driver_embed", time.perf_counter() - embed_started)
            counts.retry_video_ids = list(self.summary.retry_video_ids) if final else []
            writer.add("runs", [run_row(self.cfg, counts, self.started_at, self.commit_index)])
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        self.summary.add_phase("driver_write", time.perf_counter() - started)
        self.summary.committed = True
        self.summary.commits += 1
        if self.commit_index:
            self.progress(f"run {self.run_id}: commit {self.commit_index} published {len(self.ready)} videos")
        self.commit_index += 1
        self.ready = []
        self.search.request()
        self.last_commit = time.monotonic()


def run_row(cfg: IndexConfig, counts: RunSummary, started_at: dt.datetime, commit_index: int) -> dict[str, Any]:
    return {
        "run_id": counts.run_id, "commit_index": commit_index, "command": cfg.command,
        "source": redact_url(cfg.source), "model": cfg.model_label, "tracker": cfg.tracker_label, "mode": cfg.mode,
        "started_at": started_at, "ended_at": dt.datetime.now(dt.timezone.utc), "status": "committed",
        "videos_listed": counts.videos_listed, "videos_skipped": counts.videos_skipped,
        "videos_ok": counts.videos_ok, "videos_failed": counts.videos_failed,
        "videos_quarantined": counts.videos_quarantined, "clips": counts.clips, "video_seconds": counts.video_seconds,
        "objects": counts.objects, "captions": counts.captions, "answers": counts.answers,
        "retry_video_ids": counts.retry_video_ids, "embeddings_version": None,
    }


def quarantined_row(cfg: IndexConfig, video: VideoFile, run_id: str, attempts: int, when: dt.datetime) -> dict[str, Any]:
    return {
        "video_id": video.video_id, "uri": video.uri, "size_bytes": int(video.size_bytes), "etag": video.etag,
        "duration_s": None, "fps": None, "width": None, "height": None, "num_frames": None, "sampled_ts": [],
        "sampled_fps": None, "clips": None, "status": "failed",
        "error": f"quarantined: workers crashed on this video in {attempts} runs",
        "model": cfg.model_label, "tracker": cfg.tracker_label, "run_id": run_id, "indexed_at": when,
        "commit_index": 0,
    }


def removed_rows(cfg: IndexConfig, store: TableStore, listed: list[VideoFile], run_id: str,
                 when: dt.datetime) -> list[dict[str, Any]]:
    """`removed` rows for the sources under SOURCE that the index shows but SOURCE no longer holds.

    Only uris under this SOURCE count (an OUTPUT may index several sources), and only when the
    listing found something: an empty listing is more likely a wrong prefix or a transient store
    problem than a bucket emptied on purpose."""
    if not listed:
        return []
    prefix = _source_prefix(cfg.source).rstrip("/")
    present = {v.uri for v in listed}
    shown = latest_by_uri(visible_videos(store, ["video_id", "uri", "status", "model", "run_id", "indexed_at"]))
    rows = []
    for uri, row in sorted(shown.items()):
        if uri in present or not (uri == prefix or uri.startswith(prefix + "/")):
            continue
        rows.append({**quarantined_row(cfg, VideoFile(uri=uri, size_bytes=0, etag=None, mtime=None), run_id, 0, when),
                     "video_id": row["video_id"], "status": "removed", "error": "removed from SOURCE"})
    return rows


def _source_prefix(source: str) -> str:
    """SOURCE as its videos' uris spell it: a local folder's or file's absolute path, else the URL."""
    import os

    from pipeline.sources import is_local, local_path

    if is_local(source):
        return os.path.abspath(local_path(source))
    return source.rstrip("/")


def _input_rows(cfg: IndexConfig, videos: list[VideoFile], run_id: str) -> list[dict[str, Any]]:
    """The graph's video rows, with each video's prompts, concepts and questions.

    Raises `PromptsError` for concepts that cannot be used: with a SAM 2 tracker, or given both by
    `--find` and the prompts file for the same video (which of the two was meant is unknowable), and
    `ConceptError` for one longer than SAM 3's text budget.
    """
    from actors.prompts import PromptsError, load_prompts, prompts_for, prompts_to_json, split_prompts

    prompts = load_prompts(cfg.prompts, cfg.storage_options) if cfg.prompts else {}
    questions = load_questions(cfg.questions, cfg.storage_options) if cfg.questions else {}
    rows = []
    checked: list[list[str]] = []
    for v in videos:
        objects, concepts = split_prompts(prompts_for(v.uri, prompts) or [])
        if concepts and cfg.find:
            raise PromptsError(f"{cfg.prompts}: video {v.uri} has concepts {concepts} in the prompts file and "
                               f"--find gives {list(cfg.find)}: give its concepts in one place only")
        concepts = concepts or list(cfg.find)
        if concepts and not cfg.concept_tracker:
            raise PromptsError(f"{cfg.prompts}: video {v.uri} has concepts {concepts}, which need a SAM 3 tracker "
                               f"(--tracker tiny-sam3, facebook/sam3 or a SAM 3 folder); --tracker is {cfg.tracker!r}")
        if concepts and concepts not in checked:
            from models.sam3 import check_concepts_of

            check_concepts_of(cfg.tracker, concepts)
            checked.append(concepts)
        rows.append(video_row(v, run_id, prompts_to_json(objects) if objects else "",
                              json.dumps(questions_for(v.uri, questions)),
                              json.dumps(concepts) if concepts else ""))
    return rows


def _waves(cfg: IndexConfig, rows: list[dict[str, Any]], speed: Callable[[], float | None]):
    """Successive slices of `rows`: the first up to FIRST_WAVE_BYTES, then about `--commit-every` of work."""
    start = 0
    while start < len(rows):
        bytes_per_s = speed()
        budget = FIRST_WAVE_BYTES if not bytes_per_s else bytes_per_s * cfg.commit_every_min * 60
        end, total = start, 0
        while end < len(rows) and (end == start or total + rows[end]["size_bytes"] <= budget):
            total += rows[end]["size_bytes"]
            end += 1
        yield rows[start:end]
        start = end


def run_index(cfg: IndexConfig, progress: Callable[[str], None] | None = None) -> RunSummary:
    """List, skip what is indexed, run the graph wave by wave, commit as it goes.

    Raises only if it cannot commit. Every run that commits leaves at least one `runs` row, also a
    run with nothing to do, so the history of nightly runs is complete.
    """
    progress = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    started, cpu_started = time.monotonic(), time.process_time()
    run_id = cfg.run_id or new_run_id()
    summary = RunSummary(run_id=run_id)
    store = TableStore(cfg.output, cfg.storage_options)
    store.require_location()
    store.check_layout()
    videos = list_videos(cfg.source, cfg.storage_options)
    summary.videos_listed = len(videos)
    if not videos:
        progress(f"no videos found under {redact_url(cfg.source)}")
    claims = Claims(store, run_id, cfg.model_label, cfg.tracker_label)
    run = _Run(cfg, store, run_id, summary, len(videos), progress)
    try:
        todo, quarantine, attempts = _claim_work(cfg, store, claims, videos, summary, progress)
        run.quarantine_rows = [quarantined_row(cfg, v, run_id, attempts[v.video_id], run.started_at) for v in quarantine]
        if cfg.command == "nightly":
            removed = removed_rows(cfg, store, videos, run_id, run.started_at)
            if removed:
                progress(f"{len(removed)} source(s) no longer under {redact_url(cfg.source)}: recorded as removed")
            run.quarantine_rows += removed
        for video, row in zip(quarantine, run.quarantine_rows):
            summary.videos_failed += 1
            summary.videos_quarantined += 1
            summary.failures.append((video.uri, row["error"]))
        if todo:
            run.embedder.prepare(cfg.output, cfg.storage_options)
            _process(cfg, run, todo, len(videos))
        run.commit(final=True)
        search_started = time.perf_counter()
        run.search.close()
        summary.add_phase("driver_search_index", time.perf_counter() - search_started)
        _maintain_if_needed(cfg, store, progress)
    finally:
        claims.release()
        summary.seconds = time.monotonic() - started
        summary.driver_cpu_s = time.process_time() - cpu_started
    return summary


def _maintain_if_needed(cfg: IndexConfig, store: TableStore, progress: Callable[[str], None]) -> None:
    """`nightly` compacts and vacuums by itself once a table has gathered many small files, so an
    index committed every night for a year stays as fast to read as on its first day."""
    if cfg.command != "nightly":
        return
    try:
        from pipeline.store.maintain import maintain, needs_maintenance

        if needs_maintenance(store):
            progress("tables have many small files: running maintenance (compact, checkpoint, vacuum)")
            maintain(store, progress=progress)
    except Exception as exc:  # noqa: BLE001 - the run is committed; maintenance is retried next night
        log.warning("maintenance of %s failed (%s); `pixelrefer maintain` retries it", redact_url(cfg.output),
                    storage_errors.redact(str(exc), cfg.storage_options))


def _claim_work(cfg: IndexConfig, store: TableStore, claims: Claims, videos: list[VideoFile], summary: RunSummary,
                progress: Callable[[str], None]) -> tuple[list[VideoFile], list[VideoFile], dict[str, int]]:
    """(videos to index, videos to quarantine, crash counts): what is not indexed yet, claimed by
    this run. What is indexed is read again *after* claiming: a run that committed and released
    those videos a moment ago is then seen, so nothing is indexed twice."""
    done = indexed_video_ids(store, cfg.model_label, cfg.tracker_label, include_failed=not cfg.retry_failed)
    wanted = [v for v in videos if v.video_id not in done]
    mine, others = claims.claim([v.video_id for v in wanted])
    if others:
        holders = sorted(set(others.values()))
        progress(f"another run holds {len(others)} of these videos ({', '.join(holders[:3])}"
                 f"{', ...' if len(holders) > 3 else ''}); they are left to it")
    done = indexed_video_ids(store, cfg.model_label, cfg.tracker_label, include_failed=not cfg.retry_failed)
    held = set(mine)
    todo = [v for v in wanted if v.video_id in held and v.video_id not in done]
    summary.videos_skipped = len(videos) - len(todo)
    attempts = retry_counts(store, cfg.model_label, cfg.tracker_label)
    quarantine = [v for v in todo if attempts.get(v.video_id, 0) >= cfg.max_attempts]
    todo = [v for v in todo if attempts.get(v.video_id, 0) < cfg.max_attempts]
    return todo, quarantine, attempts


def _process(cfg: IndexConfig, run: _Run, todo: list[VideoFile], listed: int) -> None:
    rows = _input_rows(cfg, todo, run.run_id)
    ensure_ray(cfg.address)
    _fit(cfg, run, first=True)
    run.progress(f"run {run.run_id}: indexing {len(todo)} of {listed} videos with {cfg.model_label} / {cfg.tracker_label}")
    done_bytes, busy_s = 0, 0.0

    def speed() -> float | None:
        return done_bytes / busy_s if busy_s > 0 and done_bytes else None

    graph_start = time.monotonic()
    waves = _waves(cfg, rows, speed)
    wave: list[dict[str, Any]] | None = next(waves, None)
    while wave is not None or run.track_rows:
        feed = list(wave or []) + run.track_rows
        run.track_rows = []
        wave_start = time.monotonic()
        for row in iter_finished(build_dataset(cfg, feed)):
            run.take(row)
            run.summary.graph_seconds = time.monotonic() - graph_start
            run.maybe_commit()
        for row in wave or []:
            if row["video_id"] not in run.finished:
                log.error("video %s: its workers failed after retries; it will be retried by the next run", row["uri"])
                run.summary.retry_video_ids.append(row["video_id"])
                run.assemblies.pop(row["video_id"], None)
        for video_id, pending in list(run.pending.items()):
            if not any(r["video_id"] == video_id for r in run.track_rows):
                log.error("video %s: its whole-track captions were lost to a worker crash; retried next run",
                          pending.assembled.tables["videos"][0]["uri"])
                run.summary.retry_video_ids.append(video_id)
                del run.pending[video_id]
        done_bytes += sum(int(r["size_bytes"]) for r in (wave or []))
        busy_s += time.monotonic() - wave_start
        wave = next(waves, None)
        if wave is not None or run.track_rows:
            run.commit()
            _fit(cfg, run, first=False)  # GPUs that joined during this wave serve the next


def _fit(cfg: IndexConfig, run: _Run, first: bool) -> None:
    """Size the stages for the nodes there are now (`pipeline.sizing`); called before every wave, so
    that GPUs that joined during a wave serve the next one without `--max-gpus`.

    Raises `PlacementError` when one actor of each stage and a decode task cannot be placed at once:
    the wave would wait forever (before a later wave, the finished videos are committed already).
    """
    before = Sizing(cfg.decode, cfg.track, cfg.refer)
    cfg.fit_resources(Cluster.from_ray(cfg.max_gpus))
    now = Sizing(cfg.decode, cfg.track, cfg.refer)
    if first:
        log.info("run %s: %s", run.run_id, describe(now))
    elif now != before:
        run.progress(f"run {run.run_id}: the cluster changed; {describe(now)}")
