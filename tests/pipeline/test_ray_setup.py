"""Ray's start-up noise stays off the terminal, and nothing else does (`pipeline.ray_setup`)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from pipeline.ray_setup import quiet_ray_notices

ROOT = Path(__file__).resolve().parents[2]


def _emitted(logger_name: str, *messages: str) -> list[str]:
    logger = logging.getLogger(logger_name)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        for message in messages:
            logger.warning(message)
    finally:
        logger.removeHandler(handler)
    return seen


def test_only_the_noise_is_dropped():
    quiet_ray_notices()
    quiet_ray_notices()  # idempotent
    auth = "ray._private.authentication.authentication_token_setup"
    assert len([f for f in logging.getLogger(auth).filters if type(f).__name__ == "_DropNoise"]) == 1
    assert _emitted(
        auth,
        "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.",
        "Token authentication is disabled for this Ray cluster. Anyone with network access ...",
    ) == ["Token authentication is disabled for this Ray cluster. Anyone with network access ..."]
    assert _emitted(
        "ray.data._internal.progress", "Progress bars disabled. To enable, set ...", "something else",
    ) == ["something else"]
    assert _emitted("ray.data", "Progress bars disabled. (not the logger we filter)") != []


def test_a_fresh_driver_prints_neither_the_token_notice_nor_the_restart_arg_error(tmp_path):
    """In a process of its own: Ray logs the restart-argument error once per process."""
    script = textwrap.dedent("""
        import ray
        from pipeline.graph import ensure_ray

        ensure_ray(None)

        @ray.remote(num_cpus=0, max_restarts=1)
        class Actor:  # like Ray Data's pool actors: an object-store argument and restarts
            def __init__(self, argument):
                self.argument = argument

            def ping(self):
                return "pong"

        actor = Actor.remote(ray.put(b"x" * 200_000))
        print(ray.get(actor.ping.remote(), timeout=120))
        ray.shutdown()
    """)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_MODE", None)
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "pong"
    assert "constructor arguments in the object store" not in done.stderr
    assert "Token authentication is enabled" not in done.stderr
    assert "Failed to kill actor" not in done.stderr
    assert not [line for line in done.stderr.splitlines() if " E " in line or "ERROR" in line], done.stderr
