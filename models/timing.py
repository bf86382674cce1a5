"""Seconds per named phase of a model call, for the benches and the stages' per-phase columns.

Why not the torch profiler: it is a tracing tool (overhead on every op, a report after the fact),
while the index wants a handful of cumulative wall-clock numbers per batch, always on, at the cost of
a few ``perf_counter`` calls. On CUDA the clock waits for queued kernels at each phase boundary, so a
phase is charged its own GPU work and not the next one's.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import torch

__all__ = ["PhaseTimes"]


class PhaseTimes:
    """Cumulative seconds per phase name; ``take`` returns them and starts over."""

    def __init__(self, device: "torch.device | str | None" = None) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.sync = torch.device(device).type == "cuda" if device is not None else False

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.seconds[name] += time.perf_counter() - start

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds

    def take(self) -> dict[str, float]:
        out = dict(self.seconds)
        self.seconds.clear()
        return out


@contextmanager
def maybe(times: PhaseTimes | None, name: str) -> Iterator[None]:
    """``times(name)`` when timing is asked for, else nothing."""
    if times is None:
        yield
    else:
        with times(name):
            yield
