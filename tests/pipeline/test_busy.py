"""Stage busy time: measured by each actor, summed by the driver into a utilisation per pool."""

from __future__ import annotations

import time

import numpy as np
import pytest

from actors.busy import ACTOR_PREFIX, BUSY_PREFIX, END_PREFIX, START_PREFIX, BusyClock
from pipeline.summary import RunSummary, count_busy as _count_busy


def test_a_batch_s_time_is_spread_over_its_rows():
    clock = BusyClock("tracker")
    with clock.batch():
        time.sleep(0.02)
    cols = clock.columns(4)
    assert cols[BUSY_PREFIX + "tracker"].sum() == pytest.approx(clock.seconds)
    assert clock.seconds >= 0.02
    assert len(set(cols[ACTOR_PREFIX + "tracker"])) == 1
    assert cols[END_PREFIX + "tracker"][0] - cols[START_PREFIX + "tracker"][0] >= 0.02


def test_a_failing_batch_still_counts_its_time():
    clock = BusyClock("referrer")
    with pytest.raises(RuntimeError), clock.batch():
        time.sleep(0.01)
        raise RuntimeError("boom")
    assert clock.seconds >= 0.01


def test_utilisation_is_busy_time_over_actors_times_wall():
    summary = RunSummary(run_id="r", graph_seconds=10.0)
    actors: dict[str, set[str]] = {}
    rows = [
        {BUSY_PREFIX + "tracker": 3.0, ACTOR_PREFIX + "tracker": "h:1", START_PREFIX + "tracker": 100.0,
         END_PREFIX + "tracker": 103.0, BUSY_PREFIX + "referrer": 2.0, ACTOR_PREFIX + "referrer": "h:3",
         START_PREFIX + "referrer": 103.0, END_PREFIX + "referrer": 105.0},
        {BUSY_PREFIX + "tracker": 5.0, ACTOR_PREFIX + "tracker": "h:2", START_PREFIX + "tracker": 101.0,
         END_PREFIX + "tracker": 106.0, BUSY_PREFIX + "referrer": np.nan, ACTOR_PREFIX + "referrer": "h:3"},
        {"video_id": "failed upstream, never reached a stage"},
    ]
    for row in rows:
        _count_busy(row, summary, actors)
    assert summary.actors == {"tracker": 2, "referrer": 1}
    assert summary.utilisation() == pytest.approx({"tracker": 0.4, "referrer": 0.2})
    assert summary.windows == {"tracker": (100.0, 106.0), "referrer": (103.0, 105.0)}
    assert summary.active_utilisation() == pytest.approx({"tracker": 8 / 12, "referrer": 1.0})
    line = next(line for line in summary.lines() if "stage busy" in line)
    assert "tracker 40% (2 actors, 67% between its first and last batch)" in line
    assert "referrer 20% (1 actor, 100% between its first and last batch)" in line


def test_no_graph_no_utilisation():
    assert RunSummary(run_id="r").utilisation() == {}
    assert not any("stage busy" in line for line in RunSummary(run_id="r").lines())
