"""Crash safety when a model actor dies mid-batch (the driver-killed case is in test_nightly.py).

The index job runs as a subprocess with its own local Ray instance. The test watches that
instance's worker processes (and only those) and SIGKILLs a model actor at the moment Ray's process
title says it is executing a batch (`ray::MapWorker(MapBatches(<Stage>)).submit`). The kill point is
therefore a known state, not a delay: the test waits for it (with a generous timeout) and asserts
that the kills happened.

- One kill of the SAM 2 actor, then one of the PixelRefer actor: Ray Data's pools restart a dead
  actor and retry its tasks (`task_retries`), so the run is expected to commit every video; if a
  video was lost instead, the run must list it for the next run, which must complete it.
- The SAM 2 actor killed in every batch: the retries run out, and the run must still commit the
  rest, list the lost videos (`retry_video_ids`) and leave them to the next run.

Either way no video may have duplicate rows, and nothing of a run may be visible before it commits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil

from pipeline.samples import DEFAULT_SHAPES, make_video
from pipeline.store.commit import read_visible as read_table
from pipeline.sources import list_videos

DATA_TABLES = ("videos", "objects", "captions", "qa")
# Small, but with batches long enough (some 0.1 to 1 s per video on one core) for a 5 ms poll to
# find each model actor inside one: 64 tokens per caption make the referrer's batches the longer.
ARGS = ["--num-frames", "4", "--max-new-tokens", "64", "--max-objects", "2"]
VIDEOS = 4
#: The model stages whose actors are killed, in pipeline order.
STAGES = ("TrackerStage", "ReferrerStage")
#: Generous bound on a whole run (Ray start, model loading, two actor restarts) on a busy machine.
RUN_TIMEOUT_S = 420


def _index_cmd(source: Path, output: Path) -> list[str]:
    return [sys.executable, "-m", "jobs.cli", "index", str(source), str(output), *ARGS]


def _env() -> dict[str, str]:
    return {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_DEDUP_LOGS": "0"}


class StageWatcher:
    """Finds the Ray workers that host each model stage's actor, under one driver.

    Ray titles an actor's worker `ray::<actor repr>` while idle and `ray::<actor repr>.<method>`
    while it executes a task; Ray Data's pool actor is `MapWorker(MapBatches(<Stage>))`, its batch
    method `submit`. Only descendants of the driver count: the Ray instance it started is its own,
    and other clusters may run on the machine. The process tree is walked a few times a second (a
    restarted actor is a new worker, which spends seconds loading models before its first batch);
    the titles of the workers found are read at every poll, which is cheap.
    """

    RESCAN_S = 0.2

    def __init__(self, driver_pid: int) -> None:
        self.driver = psutil.Process(driver_pid)
        self.hosts: dict[str, set[int]] = {stage: set() for stage in STAGES}
        self._procs: dict[int, tuple[str, psutil.Process]] = {}
        self._scanned = 0.0

    def titles(self) -> dict[str, dict[int, str]]:
        """Per stage, pid -> current title of its live workers."""
        if time.monotonic() - self._scanned > self.RESCAN_S:
            self._scan()
        found: dict[str, dict[int, str]] = {stage: {} for stage in STAGES}
        for pid, (stage, proc) in list(self._procs.items()):
            try:
                found[stage][pid] = " ".join(proc.cmdline()).strip()
            except psutil.Error:
                del self._procs[pid]
        return found

    def _scan(self) -> None:
        self._scanned = time.monotonic()
        with contextlib.suppress(psutil.Error):
            for child in self.driver.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    title = " ".join(child.cmdline())
                    for stage in STAGES:
                        if title.startswith(f"ray::MapWorker(MapBatches({stage}))"):
                            self._procs.setdefault(child.pid, (stage, child))
                            self.hosts[stage].add(child.pid)


@dataclasses.dataclass
class Kill:
    stage: str
    pid: int
    title: str
    at_s: float  # seconds after the run started


def _run_killing_actors(
    source: Path, output: Path, log: Path, plan: list[tuple[str, int | None]]
) -> tuple[int, list[Kill], dict[str, set[int]]]:
    """Run the index job and SIGKILL model actors while they are inside a batch.

    `plan` lists (stage, kills) in the order they happen; kills None means every batch the stage
    starts until the run ends. Returns the exit status, the kills and every pid that hosted each
    stage's actor (a restarted actor is a new worker process).
    """
    with open(log, "wb") as err:
        proc = subprocess.Popen(_index_cmd(source, output), env=_env(), start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=err)
    watcher = StageWatcher(proc.pid)
    started = time.monotonic()
    kills: list[Kill] = []
    try:
        while proc.poll() is None:
            elapsed = time.monotonic() - started
            assert elapsed < RUN_TIMEOUT_S, f"the run did not end in {RUN_TIMEOUT_S} s:\n{log.read_text()[-3000:]}"
            workers = watcher.titles()
            done = Counter(k.stage for k in kills)
            pending = [stage for stage, n in plan if n is None or done[stage] < n]
            if pending:
                stage = pending[0]
                killed = {k.pid for k in kills}
                busy = [pid for pid, title in workers[stage].items() if title.endswith(".submit") and pid not in killed]
                if busy:
                    os.kill(busy[0], signal.SIGKILL)
                    kills.append(Kill(stage, busy[0], workers[stage][busy[0]], round(elapsed, 1)))
                    # Nothing of the run may be visible while it is still going on.
                    assert _counts(output) == dict.fromkeys(DATA_TABLES, 0)
            time.sleep(0.005)
        return proc.returncode, kills, watcher.hosts
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _make_videos(folder: Path, count: int) -> set[str]:
    for i in range(count):
        make_video(folder / f"{i}.mp4", shapes=DEFAULT_SHAPES[:1], duration_s=1.0, seed=i)
    ids = {v.video_id for v in list_videos(str(folder))}
    assert len(ids) == count
    return ids


def _assert_dead(kills: list[Kill]) -> None:
    for kill in kills:
        with contextlib.suppress(psutil.NoSuchProcess):
            assert psutil.Process(kill.pid).status() == psutil.STATUS_ZOMBIE, f"{kill} survived SIGKILL"


def _counts(output: Path) -> dict[str, int]:
    return {t: read_table(str(output), t).num_rows for t in DATA_TABLES}


def _assert_consistent(output: Path) -> None:
    """Only committed runs are visible, and no video has duplicate rows in any table."""
    runs = read_table(str(output), "runs").to_pylist()
    committed = {r["run_id"] for r in runs}
    assert len(committed) == len(runs) and all(r["status"] == "committed" for r in runs)
    keys = {
        "videos": lambda r: (r["video_id"], r["model"], r["tracker"]),
        "objects": lambda r: (r["video_id"], r["object_id"]),
        "captions": lambda r: (r["video_id"], r["mode"], r["model"], r["object_id"]),
        "qa": lambda r: (r["video_id"], r["mode"], r["model"], r["question"], tuple(r["object_ids"])),
    }
    for table, key in keys.items():
        rows = read_table(str(output), table).to_pylist()
        assert {r["run_id"] for r in rows} <= committed, f"{table}: rows of a run that did not commit"
        dupes = [k for k, n in Counter(key(r) for r in rows).items() if n > 1]
        assert not dupes, f"{table}: duplicate rows {dupes}"


def test_model_actors_killed_mid_batch_are_restarted_and_their_batches_retried(tmp_path, ray_local):
    source, out = tmp_path / "v", tmp_path / "out"
    expected = _make_videos(source, VIDEOS)

    rc, kills, hosts = _run_killing_actors(source, out, tmp_path / "run1.log", [(s, 1) for s in STAGES])
    log = (tmp_path / "run1.log").read_text()
    print(*kills, sep="\n")
    assert rc == 0, log[-3000:]
    assert [k.stage for k in kills] == list(STAGES), f"an actor was not caught inside a batch: {kills}\n{log[-3000:]}"
    _assert_dead(kills)
    _assert_consistent(out)

    (run,) = read_table(str(out), "runs").to_pylist()
    videos = read_table(str(out), "videos").to_pylist()
    indexed = {v["video_id"] for v in videos}
    lost = set(run["retry_video_ids"] or [])
    print(f"run 1: {len(indexed)} videos committed, {len(lost)} recorded for the next run; hosts {hosts}")
    # Every video is accounted for exactly once: committed, or recorded for the next run.
    assert indexed | lost == expected and not indexed & lost, (indexed, lost)
    assert run["videos_ok"] == len(indexed) and run["videos_failed"] == 0
    assert all(v["status"] == "ok" for v in videos), [v["error"] for v in videos]
    if not lost:
        # Ray restarted each killed actor (a new worker process) and retried its batch there.
        for kill in kills:
            assert hosts[kill.stage] - {kill.pid}, f"{kill.stage}: no replacement actor was seen after the kill"

    # The next run does only what is left (nothing, when the retries succeeded), and duplicates nothing.
    _second_run_completes(source, out, expected, indexed, lost)


def test_a_batch_whose_actor_keeps_dying_is_left_to_the_next_run(tmp_path, ray_local):
    """Killing the SAM 2 actor in every batch exhausts the task retries (1 + `task_retries`
    attempts): the run still commits, records the lost videos, and the next run indexes them."""
    source, out = tmp_path / "v", tmp_path / "out"
    expected = _make_videos(source, 2)

    rc, kills, _ = _run_killing_actors(source, out, tmp_path / "run1.log", [("TrackerStage", None)])
    log = (tmp_path / "run1.log").read_text()
    print(*kills, sep="\n")
    assert rc == 0, log[-3000:]
    assert len(kills) >= 3, f"expected the actor to be killed in 3 attempts of a batch: {kills}\n{log[-3000:]}"
    _assert_dead(kills)
    _assert_consistent(out)

    (run,) = read_table(str(out), "runs").to_pylist()
    indexed = {v["video_id"] for v in read_table(str(out), "videos").to_pylist()}
    lost = set(run["retry_video_ids"] or [])
    print(f"run 1: {len(indexed)} videos committed, {len(lost)} recorded for the next run")
    assert lost and indexed | lost == expected and not indexed & lost, (indexed, lost)
    assert "lost to worker crashes" in log and f"{len(lost)} lost" in log

    _second_run_completes(source, out, expected, indexed, lost)


def _second_run_completes(source: Path, out: Path, expected: set[str], indexed: set[str], lost: set[str]) -> None:
    """The next run, in this process on the session's Ray (nothing is killed in it: a Ray of its own
    and a model load in a fresh process would only cost time)."""
    from jobs.cli import main

    assert main(["index", str(source), str(out), *ARGS]) == 0
    _assert_consistent(out)
    runs = read_table(str(out), "runs").to_pylist()
    assert len(runs) == 2
    second = max(runs, key=lambda r: r["started_at"])
    assert (second["videos_skipped"], second["videos_ok"], second["videos_failed"]) == (len(indexed), len(lost), 0)
    assert not second["retry_video_ids"]
    final = read_table(str(out), "videos").to_pylist()
    assert sorted(v["video_id"] for v in final) == sorted(expected)
    assert all(v["status"] == "ok" for v in final)
    assert {c["video_id"] for c in read_table(str(out), "captions").to_pylist()} == expected  # each object captioned
