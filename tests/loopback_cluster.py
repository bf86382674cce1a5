"""A Ray cluster on loopback in a helper subprocess of its own, for tests (a plain module: tests/ has
no packages).

The helper runs a test's `ray.cluster_utils.Cluster` script with a private RAY_TMPDIR, so no
`ray.init()` elsewhere on the machine (this session's local Ray, other sessions' tests) can find it,
the Ray state of the test process is never touched, and stopping it kills only its own processes.
The script prints one JSON line (what the test needs: addresses) and runs until its stdin closes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest


def cluster_processes(root: str) -> list:
    """The processes of the cluster under `root`, and nothing else.

    Ray's processes name the private folder in their command line; job drivers do not, but carry
    RAY_TMPDIR=root in their environment (everything the helper starts inherits it). Children are
    found through a parent map taken in one pass (an orphan loses its parent).
    """
    import psutil

    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    procs: dict[int, psutil.Process] = {}
    parents: dict[int, int] = {}
    for proc in psutil.process_iter(["ppid", "cmdline"]):
        procs[proc.pid], parents[proc.pid] = proc, proc.info["ppid"]
    found: set[int] = set()
    for pid, proc in procs.items():
        with contextlib.suppress(psutil.Error):
            if any(root in arg for arg in proc.info["cmdline"] or []) or proc.environ().get("RAY_TMPDIR") == root:
                found.add(pid)
    frontier = set(found)
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier and pid not in found}
        found |= frontier
    return [procs[pid] for pid in sorted(found - mine)]


def kill_leftovers(root: str) -> None:
    """Kill what is left of the cluster under `root`: terminate, then kill what did not stop."""
    import psutil

    targets = cluster_processes(root)
    for proc in targets:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(targets, timeout=5)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()


@contextlib.contextmanager
def helper_cluster(script: str, args: Sequence[str] = (), *, prefix: str = "prray-",
                   env: Mapping[str, str] | None = None) -> Iterator[tuple[dict[str, Any], str, dict[str, str]]]:
    """Run `script` (argv: its Ray temp dir, then `args`) under a private RAY_TMPDIR; yields the JSON
    line it prints, the root folder and the environment it runs in (for the test's own subprocesses).
    On exit its stdin is closed, and whatever is left under the root is killed and removed."""
    root = tempfile.mkdtemp(prefix=prefix)  # short: Ray's socket paths live under it
    temp_dir = os.path.join(root, "ray")
    os.makedirs(temp_dir)
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    run_env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_TMPDIR=root, RAY_USAGE_STATS_ENABLED="0", **(env or {}))
    helper = subprocess.Popen([sys.executable, "-c", script, temp_dir, *args], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, env=run_env, cwd=root, text=True)
    try:
        line = helper.stdout.readline()
        if not line:
            pytest.fail(f"the test cluster did not start (helper exit {helper.wait(timeout=60)})")
        yield json.loads(line), root, run_env
    finally:
        with contextlib.suppress(Exception):
            helper.stdin.close()
        try:
            helper.wait(timeout=30)
        except subprocess.TimeoutExpired:
            helper.kill()
        kill_leftovers(root)
        shutil.rmtree(root, ignore_errors=True)
