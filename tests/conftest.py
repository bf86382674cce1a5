"""Shared fixtures: a local Ray instance on loopback and a private model cache.

`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` must be set before Ray starts: it keeps every Ray process
(head, workers, drivers) on 127.0.0.1 (see DESIGN.md, "Real components and how they start").
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("PIXELREFER_CACHE", os.path.join(tempfile.gettempdir(), "pixelrefer-test-cache"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session (starting Ray costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=512 * 1024 * 1024, log_to_driver=False)
    yield ray
    ray.shutdown()
