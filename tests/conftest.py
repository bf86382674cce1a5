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

from typing import Any  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session (starting Ray costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=512 * 1024 * 1024, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint() -> Any:
    """A real S3 API on loopback (moto's server in a process of its own), with dummy credentials.

    Its own process, not a thread of the test's: delta-rs holds the GIL through some calls, which
    would stall an in-process server until the client times out. moto implements S3's conditional
    writes (If-None-Match), which delta-rs commits with (`test_loopback_s3_has_conditional_writes`)."""
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    with pytest.MonkeyPatch.context() as mp:
        for key, value in {
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }.items():  # fmt: skip
            mp.setenv(key, value)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1",
                                   "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise RuntimeError("moto_server did not start on loopback")
                    time.sleep(0.1)
            yield f"http://127.0.0.1:{port}"
        finally:
            server.terminate()
            server.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_endpoint: str, request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    """A fresh bucket on the loopback S3 endpoint and the storage options that reach it."""
    import re

    import boto3

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-") or "bucket"
    boto3.client(
        "s3", endpoint_url=s3_endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
        region_name="us-east-1",
    ).create_bucket(Bucket=name)
    options = {"key": "testing", "secret": "testing", "endpoint_url": s3_endpoint,
               "client_kwargs": {"region_name": "us-east-1"}}
    return name, options
