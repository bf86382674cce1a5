"""A commit SIGKILLed at any point leaves nothing a reader sees; the same commit again shows every
video exactly once (`pipeline.store.commit`: `runs` is the commit point)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.store import TableStore
from pipeline.store.commit import PUBLISH_ORDER, indexed_video_ids, read_visible

#: The writer dies before appending this table (None: after the whole commit).
KILL_POINTS = ["clips", "masks", "embeddings", "tracklets", "videos", "runs", None]

WRITER = textwrap.dedent('''
    import datetime as dt, json, os, signal, sys
    from pipeline.store import TableStore
    from pipeline.store.commit import RunWriter
    from pipeline.store import tables

    output, run_id, kill_at = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    append = tables.TableStore.append
    def dying(self, table, data, commit=None):
        if table == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return append(self, table, data, commit)
    tables.TableStore.append = dying
    when = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    writer = RunWriter(TableStore(output), run_id)
    for v in ("a", "b"):
        vid = f"vid-{v}"
        writer.add("clips", [{"video_id": vid, "clip_index": 0, "ts_start": 0.0, "ts_end": 1.0, "boundary": "end",
                              "num_sampled": 2, "status": "ok", "error": None, "run_id": run_id}])
        writer.add("objects", [{"video_id": vid, "object_id": 1, "source": "auto", "label": "cat", "first_ts": 0.0,
                                "last_ts": 1.0, "num_frames": 2, "run_id": run_id}])
        writer.add("masks", [{"video_id": vid, "object_id": 1, "clip_index": 0, "frame_index": 0, "ts": 0.0,
                              "bbox": [0.0, 0.0, 1.0, 1.0], "area": 1, "score": 0.9,
                              "rle": {"size": [2, 2], "counts": "0"}, "run_id": run_id}])
        writer.add("captions", [{"video_id": vid, "object_id": 1, "clip_index": 0, "ts_start": 0.0, "ts_end": 1.0,
                                 "caption": "a cat", "mode": "lite", "model": "m", "num_tokens": 2, "run_id": run_id}])
        writer.add("embeddings", [{"video_id": vid, "kind": "caption", "object_id": 1, "object_ids": None,
                                   "clip_index": 0, "ts_start": 0.0, "ts_end": 1.0, "text": "a cat", "embedder": "e",
                                   "dim": 2, "vector": [1.0, 0.0], "text_run_id": run_id, "run_id": run_id}])
        writer.add("tracklets", [{"video_id": vid, "clip_index": 0, "track_id": 1, "object_id": 1, "reid_score": None,
                                  "first_ts": 0.0, "last_ts": 1.0, "num_frames": 2, "model": "m", "dim": 2,
                                  "vector": [0.0, 1.0], "run_id": run_id}])
        writer.add("videos", [{"video_id": vid, "uri": f"/v/{v}.mp4", "size_bytes": 1, "etag": None,
                               "duration_s": 1.0, "fps": 2.0, "width": 2, "height": 2, "num_frames": 2,
                               "sampled_ts": [0.0, 0.5], "sampled_fps": 2.0, "clips": 1, "status": "ok",
                               "error": None, "model": "m", "tracker": "t", "run_id": run_id, "indexed_at": when,
                               "commit_index": 0}])
    writer.add("runs", [{"run_id": run_id, "commit_index": 0, "command": "index", "source": "/v", "model": "m",
                         "tracker": "t", "mode": "lite", "started_at": when, "ended_at": when, "status": "committed",
                         "videos_listed": 2, "videos_skipped": 0, "videos_ok": 2, "videos_failed": 0,
                         "videos_quarantined": 0, "clips": 2, "video_seconds": 2.0, "objects": 2, "captions": 2,
                         "answers": 0, "retry_video_ids": [], "embeddings_version": None}])
    writer.commit()
''')


def _commit(output: Path, run_id: str, kill_at: str | None) -> int:
    done = subprocess.run([sys.executable, "-c", WRITER, str(output), run_id, json.dumps(kill_at)],
                          capture_output=True, text=True, timeout=120)
    return done.returncode


def _seen(output: Path) -> dict[str, int]:
    return {t: read_visible(str(output), t).num_rows for t in PUBLISH_ORDER}


@pytest.mark.parametrize("kill_at", KILL_POINTS)
def test_a_commit_killed_anywhere_is_invisible_and_the_rerun_shows_each_video_once(tmp_path: Path, kill_at) -> None:
    out = tmp_path / "out"
    code = _commit(out, "killed", kill_at)
    clean = {"clips": 2, "objects": 2, "masks": 2, "captions": 2, "qa": 0, "embeddings": 2, "tracklets": 2, "videos": 2,
             "runs": 1}
    if kill_at is None:
        assert code == 0 and _seen(out) == clean
        assert indexed_video_ids(TableStore(str(out)), "m", "t") == {"vid-a", "vid-b"}  # a rerun would skip them
        return
    assert code == -9  # SIGKILL, mid-commit
    assert _seen(out) == dict.fromkeys(PUBLISH_ORDER, 0)  # whatever was appended, nothing shows
    assert indexed_video_ids(TableStore(str(out)), "m", "t") == set()  # so the rerun indexes them again
    assert _commit(out, "rerun", None) == 0
    assert _seen(out) == clean
    videos = read_visible(str(out), "videos").to_pylist()
    assert sorted(v["video_id"] for v in videos) == ["vid-a", "vid-b"] and {v["run_id"] for v in videos} == {"rerun"}
