"""Busy time of the model stages, carried in the rows so the driver can see a starved actor pool.

Ray Data's own statistics (``Dataset.stats()``) are a formatted report that is only complete once the
stream has been drained and whose wording changes between Ray releases; a number per row that the
stage measures itself is exact, cheap and available to ``run_index`` and the benches alike.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Iterator

import numpy as np

#: Column prefix: ``busy_s_<stage>`` holds a row's share of the wall time its actor spent in the batch.
BUSY_PREFIX = "busy_s_"
#: Column prefix: ``actor_<stage>`` identifies the actor that processed the row (host:pid).
ACTOR_PREFIX = "actor_"
#: Column prefixes: wall-clock (epoch) start and end of the batch the row was in.
START_PREFIX = "batch_start_"
END_PREFIX = "batch_end_"


class BusyClock:
    """Times one batch of a stage and spreads the time evenly over the batch's rows."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.actor = f"{os.uname().nodename}:{os.getpid()}"
        self.seconds = 0.0
        self.started = self.ended = 0.0

    @contextmanager
    def batch(self) -> Iterator[None]:
        self.started = time.time()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds = time.perf_counter() - start
            self.ended = time.time()

    def columns(self, rows: int) -> dict[str, np.ndarray]:
        share = self.seconds / rows if rows else 0.0
        return {
            BUSY_PREFIX + self.stage: np.full(rows, share, dtype=np.float64),
            ACTOR_PREFIX + self.stage: np.array([self.actor] * rows, dtype=object),
            START_PREFIX + self.stage: np.full(rows, self.started, dtype=np.float64),
            END_PREFIX + self.stage: np.full(rows, self.ended, dtype=np.float64),
        }
