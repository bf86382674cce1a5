"""Keeping Ray's start-up noise off the user's terminal, without hiding anything a user can act on.

A clean ``pixelrefer index`` run used to print three lines that look like problems and are not:

- ``WARNING authentication_token_setup.py -- Token authentication is enabled for this Ray
  cluster. Set RAY_AUTH_MODE=disabled to opt out``: Ray says this whenever ``ray.init()`` starts a
  new local instance and ``RAY_AUTH_MODE`` is unset. Token authentication is the safe default we
  want; the only "action" it offers is to turn it off. Setting ``RAY_AUTH_MODE=token`` ourselves
  would silence it too, but ``ray.init()`` also joins a cluster started by ``ray start`` when it
  finds one, and without a token file that join would then fail, so only the message is dropped.
  Ray's warning that authentication is *disabled*, a real security notice, still shows.
- ``WARNING __init__.py -- Progress bars disabled``: Ray Data's, because `pipeline.graph` turns its
  bars off on purpose (the CLI prints one line per video instead).
- ``E ... core_worker.cc ... Actor with class name: 'MapWorker(MapBatches(TrackerStage))' ... has
  constructor arguments in the object store and max_restarts > 0``: see
  `absorb_actor_restart_arg_error`.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

log = logging.getLogger(__name__)

#: Ray logger -> starts of its messages that are noise for us (Ray 2.60 sources named above).
_NOISE: dict[str, tuple[str, ...]] = {
    "ray._private.authentication.authentication_token_setup": ("Token authentication is enabled for this Ray cluster",),
    "ray.data._internal.progress": ("Progress bars disabled.",),
}

_absorbed = False
_NO_NODE_HAS = "pixelrefer-restart-arg-probe"


class _DropNoise(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def quiet_ray_notices() -> None:
    """Drop the Ray log messages in `_NOISE`; call before ``ray.init()``.

    A filter on the emitting logger only, so every other message of those loggers still shows.
    Idempotent; a Ray that renames a module or rewords a message only lets that message through.
    """
    for name, prefixes in _NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise(prefixes))


def absorb_actor_restart_arg_error() -> None:
    """Use up, out of the user's sight, Ray's one-per-process "constructor arguments in the object
    store" error; call once Ray is initialised, before the first Ray Data actor pool starts.

    The error is not about our arguments: `TrackerStage` and `ReferrerStage` get a few strings and
    numbers. Ray Data itself builds every pool actor (``_MapWorker``) with two ``ray.put``
    references, its `DataContext` and the operator's `MapTransformer`, and gives pool actors
    ``max_restarts=-1``; Ray core (``core_worker.cc``, ``CreateActor``) logs this error for any
    actor that has both (ray-project/ray#57733, still open). The references are owned by the driver
    and held by the operator for the whole execution, so they can only be lost with the driver's
    node, and then the run is lost anyway and the next run redoes it. Turning restarts off instead
    (``max_restarts=0``) would end the crash recovery that `task_retries` relies on.

    Ray core logs it with ``RAY_LOG_ONCE_PER_PROCESS(ERROR)``, and the only knob is the level of
    every C++ log line (``RAY_BACKEND_LOG_LEVEL``), which would also hide real errors. So one
    throwaway actor of that kind is submitted while file descriptor 2 points to ``/dev/null`` (the
    driver's ``python-core-driver-*.log`` still records the line), and killed before any node could
    run it. Any other stderr output in those few milliseconds is lost, which at this point is only
    Ray's own. Costs well under a second, once per process; never fatal: if anything goes wrong,
    the error is merely shown.
    """
    global _absorbed
    if _absorbed:
        return
    _absorbed = True
    import ray

    try:
        # A custom resource no node has: the probe never gets a worker, so killing it at once is
        # clean (killing one while its worker is leased makes the GCS log an error of its own).
        probe_cls = ray.remote(num_cpus=0, resources={_NO_NODE_HAS: 1}, max_restarts=1)(_RestartArgProbe)
        argument = ray.put(None)
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            with open(os.devnull, "wb") as null:
                os.dup2(null.fileno(), 2)
                try:
                    probe = probe_cls.remote(argument)
                finally:
                    os.dup2(saved, 2)
        finally:
            os.close(saved)
        ray.kill(probe, no_restart=True)
    except Exception as exc:  # noqa: BLE001 - cosmetic: a failure here must not stop a run
        log.debug("could not pre-empt Ray's actor restart warning: %s", exc)


class _RestartArgProbe:
    def __init__(self, argument: Any) -> None:
        pass
