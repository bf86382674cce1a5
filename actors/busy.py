"""Busy time of the model stages, carried in the rows so the driver can see a starved actor pool.

Ray Data's own statistics (``Dataset.stats()``) are a formatted report that is only complete once the
stream has been drained and whose wording changes between Ray releases; a number per row that the
stage measures itself is exact, cheap and available to ``run_index`` and the benches alike.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

#: Column prefix: ``busy_s_<stage>`` holds a row's share of the wall time its actor spent in the batch.
BUSY_PREFIX = "busy_s_"
#: Column prefix: ``actor_<stage>`` identifies the actor that processed the row (host:pid).
ACTOR_PREFIX = "actor_"
#: Column prefixes: wall-clock (epoch) start and end of the batch the row was in.
START_PREFIX = "batch_start_"
END_PREFIX = "batch_end_"
#: Column prefix: ``phase_s_<stage>_<phase>`` holds a row's share of the seconds its batch spent in
#: that phase (the stage declares its phases up front: every block has the same columns).
PHASE_PREFIX = "phase_s_"
#: Column prefix: ``count_<stage>_<name>`` holds how many times something happened on a row (the
#: tracker's discovery calls and skipped keyframes), summed by the driver like the phases.
COUNT_PREFIX = "count_"


class BusyClock:
    """Times one batch of a stage, and the named phases within it, and spreads the time evenly over
    the batch's rows (the driver sums rows, so the totals come out right whatever the batching)."""

    def __init__(self, stage: str, phases: Sequence[str] = ()) -> None:
        self.stage = stage
        self.actor = f"{os.uname().nodename}:{os.getpid()}"
        self.seconds = 0.0
        self.started = self.ended = 0.0
        self.phase_names = tuple(phases)
        #: Seconds per phase of the current batch, as the stage's components measured them.
        self.phase_seconds: dict[str, float] = {}

    def add(self, seconds: Mapping[str, float]) -> None:
        """Seconds measured by a component's own clock (`models.timing.PhaseTimes`), added to this batch."""
        for name, value in seconds.items():
            self.phase_seconds[name] = self.phase_seconds.get(name, 0.0) + value

    @contextmanager
    def batch(self) -> Iterator[None]:
        self.phase_seconds = {}
        self.started = time.time()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds = time.perf_counter() - start
            self.ended = time.time()

    def columns(self, rows: int) -> dict[str, np.ndarray]:
        share = self.seconds / rows if rows else 0.0
        measured, self.phase_seconds = self.phase_seconds, {}
        unknown = set(measured) - set(self.phase_names)
        if unknown:  # a component grew a phase the stage does not declare: visible, never fatal
            log.warning("stage %s: undeclared phases %s are not reported", self.stage, sorted(unknown))
        phases = {
            f"{PHASE_PREFIX}{self.stage}_{name}": np.full(rows, measured.get(name, 0.0) / rows if rows else 0.0)
            for name in self.phase_names
        }
        return {
            **phases,
            BUSY_PREFIX + self.stage: np.full(rows, share, dtype=np.float64),
            ACTOR_PREFIX + self.stage: np.array([self.actor] * rows, dtype=object),
            START_PREFIX + self.stage: np.full(rows, self.started, dtype=np.float64),
            END_PREFIX + self.stage: np.full(rows, self.ended, dtype=np.float64),
        }
