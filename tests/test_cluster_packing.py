"""A real tiny index on a Ray cluster of two 1-CPU nodes (loopback), which used to stall forever:
the tracker and referrer actors (half a CPU each) landed one on each node, and the 1-CPU decode
task then fit on neither (Ray Data: `backpressured:tasks(ResourceBudget)`). The sizing now asks
decoding for what every placement of the actors leaves (`pipeline.sizing`).

As in `tests/jobs/test_submit.py`, the cluster lives in a helper *subprocess* with its own
RAY_TMPDIR (`tests/loopback_cluster.py`): `ray.init()` elsewhere on the machine (this session's local Ray, other sessions' tests)
cannot find it, the Ray state of this test process is never touched, and stopping it kills only its
own processes. The index runs in a second subprocess with a deadline, so a stall fails the test
instead of hanging CI.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import pytest
from loopback_cluster import helper_cluster

from pipeline.samples import DEFAULT_SHAPES, make_video

#: A run that stalls is killed after this long (the run takes ~20-30 s on 2 shared cores).
DEADLINE_S = 180
ROOT = Path(__file__).resolve().parents[1]

CLUSTER = textwrap.dedent(
    """
    import json, os, signal, sys
    from ray.cluster_utils import Cluster

    node = dict(num_cpus=1, object_store_memory=100 * 1024 * 1024, node_ip_address="127.0.0.1", temp_dir=sys.argv[1])
    cluster = Cluster(initialize_head=True, head_node_args=dict(node, include_dashboard=False))
    cluster.add_node(**node)
    cluster.wait_for_nodes()

    def stop(*_):
        cluster.shutdown()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    print(json.dumps({"address": cluster.address}), flush=True)
    sys.stdin.read()  # until the test closes our stdin (or dies)
    stop()
    """
)

INDEX = textwrap.dedent(
    """
    import json, sys
    from pipeline.config import IndexConfig
    from pipeline.run import run_index

    cfg = IndexConfig(source=sys.argv[1], output=sys.argv[2], model="tiny", tracker="tiny", cuts="none",
                      address=sys.argv[3], max_objects=1, max_new_tokens=4)
    summary = run_index(cfg, progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps({"committed": summary.committed, "ok": summary.videos_ok, "failed": summary.videos_failed,
                      "decode_cpus": cfg.decode.num_cpus, "actor_cpus": [cfg.track.num_cpus, cfg.refer.num_cpus]}))
    """
)


@pytest.fixture
def two_one_cpu_nodes() -> Iterator[dict]:
    """A head and a worker node of one CPU each on loopback; yields its address and environment."""
    with helper_cluster(CLUSTER, prefix="prpack-") as (line, _, env):
        yield {"address": line["address"], "env": env}


def test_a_tiny_index_runs_on_two_one_cpu_nodes(tmp_path: Path, two_one_cpu_nodes: dict):
    videos = tmp_path / "videos"
    for i in range(2):
        make_video(videos / f"v{i}.mp4", shapes=DEFAULT_SHAPES[:1], seed=i, duration_s=2.0)
    output = tmp_path / "index"
    cmd = [sys.executable, "-c", INDEX, str(videos), str(output), two_one_cpu_nodes["address"]]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DEADLINE_S, cwd=ROOT,
                              env=two_one_cpu_nodes["env"])
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else str(exc.stderr)
        pytest.fail(f"the index stalled on two 1-CPU nodes (no result in {DEADLINE_S} s): {err[-1500:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["committed"] and (result["ok"], result["failed"]) == (2, 0), proc.stderr[-3000:]
    # What every placement of the two half-CPU actors leaves on a 1-CPU node.
    assert result["decode_cpus"] == 0.5 and result["actor_cpus"] == [0.5, 0.5]
    assert list((output / "objects").glob("**/*.parquet")), "no objects table written"
