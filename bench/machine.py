"""What every bench records beside its figures: the machine, its load, and the versions measured.

A figure without the CPU model, the cores it could use and how busy the machine was cannot be
compared with another; each bench adds the versions of what it measures (`packages`).
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import time
from importlib import metadata
from typing import Any, Callable


def median_s(step: Callable[[], Any], repeats: int) -> float:
    """Median seconds of `repeats` calls after one untimed warm-up call (file metadata, the page
    cache, lazy imports): the latency a user sees on the second query, not the first."""
    step()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times), 4)


def cpu_model() -> str:
    """The CPU's marketing name (/proc/cpuinfo), or what `platform` knows elsewhere."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 0


def describe(*packages: str) -> dict[str, Any]:
    """The machine now, with the installed version of each of `packages` (None when absent)."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else 0
    out: dict[str, Any] = {
        "machine": platform.machine(), "cpu_model": cpu_model(), "cpu_count": usable_cores(),
        "memory_gib": round(memory, 1), "load_avg_1m": round(os.getloadavg()[0], 2), "platform": platform.platform(),
        "python": platform.python_version(),
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
