"""Two runs over the same OUTPUT at once: every video is indexed by one of them, shown once.

Locally, two real `nightly` processes start at the same moment (a cron overlap). On the loopback
S3, runs claim the same videos from several threads at once: the claims are what decides who
indexes what, and they must come out disjoint and complete there too (delta-rs commits on S3 with
conditional writes; `tests/pipeline/test_store.py` checks the endpoint has them)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

from jobs.query_sql import open_index
from pipeline.samples import DEFAULT_SHAPES, make_video
from pipeline.store import TableStore
from pipeline.store.claims import Claims
from pipeline.store.commit import read_visible

FAST = ["--num-frames", "2", "--max-new-tokens", "4", "--max-objects", "1", "--cuts", "none", "--embedder", "none"]


def test_two_nightly_runs_at_the_same_moment_index_each_video_once(tmp_path: Path) -> None:
    for i in range(2):
        make_video(tmp_path / "v" / f"{i}.mp4", shapes=DEFAULT_SHAPES[:1], duration_s=0.5, seed=i)
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    cmd = [sys.executable, "-m", "jobs.cli", "nightly", str(tmp_path / "v"), str(out), *FAST]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errs = [p.communicate(timeout=900)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-1500:] + errs[1][-1500:]
    videos = read_visible(str(out), "videos").to_pylist()
    assert sorted(Counter(v["uri"] for v in videos).values()) == [1, 1]  # indexed once each, by one run
    runs = read_visible(str(out), "runs").to_pylist()
    assert sum(r["videos_ok"] for r in runs) == 2
    with open_index(str(out)) as ix:
        assert ix.sql("SELECT count(*) AS n FROM latest_videos").column("n")[0].as_py() == 2
    for r in runs:
        if r["videos_ok"] < 2:  # one run left (some) videos to the other and said so
            assert any("another run holds" in e for e in errs)


def test_runs_claiming_at_once_on_s3_split_the_videos(s3_bucket) -> None:
    bucket, options = s3_bucket
    store = TableStore(f"s3://{bucket}/index", options)
    videos = [f"video-{i}" for i in range(8)]
    won: dict[str, list[str]] = {}

    def claim(run_id: str) -> None:
        won[run_id] = Claims(store, run_id, "m", "t").claim(videos)[0]

    threads = [threading.Thread(target=claim, args=(f"run-{k}",)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    claimed = [v for ids in won.values() for v in ids]
    assert sorted(claimed) == videos  # complete and disjoint: each video has exactly one run
    assert len([r for r, ids in won.items() if ids]) == 1  # the first merge took all that were free
