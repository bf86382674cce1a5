"""A real tiny index on a Ray cluster of two 1-CPU nodes (loopback), which used to stall forever:
the tracker and referrer actors (half a CPU each) landed one on each node, and the 1-CPU decode
task then fit on neither. The sizing now asks decoding for what every placement leaves."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.samples import DEFAULT_SHAPES, make_video

#: A run that stalls is killed after this long: a stall fails the test instead of hanging CI.
DEADLINE_S = 240


@pytest.fixture
def two_one_cpu_nodes():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": 200 * 1024 * 1024, "include_dashboard": False})
    cluster.add_node(num_cpus=1, object_store_memory=200 * 1024 * 1024)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        cluster.shutdown()


def test_a_tiny_index_runs_on_two_one_cpu_nodes(tmp_path: Path, two_one_cpu_nodes):
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(2):
        make_video(videos / f"v{i}.mp4", shapes=DEFAULT_SHAPES[:1], seed=i, duration_s=2.0)
    output = tmp_path / "index"
    cmd = [sys.executable, "-m", "jobs.cli", "index", str(videos), str(output), "--address",
           two_one_cpu_nodes.address, "--cuts", "none", "--max-objects", "1", "--max-new-tokens", "4"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DEADLINE_S,
                              cwd=Path(__file__).resolve().parents[1])
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the index stalled on two 1-CPU nodes (no result in {DEADLINE_S} s): {str(exc.stderr)[-1500:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 ok, 0 failed" in proc.stderr, proc.stderr[-3000:]
    assert list((output / "objects").glob("**/*.parquet"))
