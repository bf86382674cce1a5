"""When automatic discovery runs on a later keyframe: only where something may have entered.

SAM 2's automatic mask generation is most of the tracker's time, and on most keyframes it only
proposes the objects that are already tracked. The "changed" policy therefore runs it on a later
keyframe only when one of two things says that something new may be in the frame:

- the frame changed where no tracked object explains it: on a coarse grid (`grid` cells along the
  longer side, each a cell's mean colour), the cells that differ by more than `pixel_delta` levels
  from the last keyframe discovery ran on make up at least `changed_frac` of the frame, not
  counting the cells under a tracked mask now, nor those an object left as it moved (it gained at
  least `moved_frac` as many cells elsewhere, and uncovered background where it was); masks are
  grown by one cell so that a ragged edge does not count. An object entering the uncovered part of the frame changes it there, and so
  does one passing in front of a tracked object (which loses that area); tracked objects moving,
  and a static background, do not.
- a tracked object lost area: one tracked when discovery last ran is gone, retired or down to less
  than `lost_frac` of its area then. What hides or replaces it may be a new object, and its freed
  place in `max_objects` may be taken.

Otherwise the keyframe is skipped. The reference stays the last keyframe discovery ran on, so slow
changes add up until they count, and an entrant is found on the first keyframe where it shows,
within one keyframe interval of its entrance. The first keyframe of a pass always runs discovery;
"every" runs it on every keyframe (the behaviour before this policy).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from actors.rle import decode_rle, rle_areas

__all__ = ["DISCOVERY_POLICIES", "DiscoveryGate", "DiscoverySchedule"]

DISCOVERY_POLICIES = ("changed", "every")


@dataclass(frozen=True)
class DiscoverySchedule:
    """The policy and its thresholds (see the module docstring); plain values, so it pickles to Ray actors."""

    policy: str = "changed"
    #: Share of the frame that must have changed where no tracked object explains it: 0.002 is 6
    #: cells of a 64 x 48 grid (a lone noisy cell is not news), an object about 1/20 of the frame's
    #: width across (or a larger one only partly in view).
    changed_frac: float = 0.002
    #: Colour levels (0..255, any channel) a cell's mean must move by to count as changed; well above
    #: compression noise, which a cell's mean averages away, and below a small object's contrast.
    pixel_delta: float = 12.0
    #: A tracked object whose area falls below this share of its area at the last discovery counts as lost.
    lost_frac: float = 0.5
    #: An object that gained at least this share of the cells it left moved: those cells show
    #: background it uncovered, not news. One that left cells without gaining others is hidden there.
    moved_frac: float = 0.5
    #: Cells along the frame's longer side for the change check.
    grid: int = 64

    def __post_init__(self) -> None:
        if self.policy not in DISCOVERY_POLICIES:
            raise ValueError(f"discovery policy must be one of {DISCOVERY_POLICIES}, got {self.policy!r}")
        if not all(0.0 <= f <= 1.0 for f in (self.changed_frac, self.lost_frac)) or self.moved_frac < 0:
            raise ValueError("changed_frac and lost_frac must be within [0, 1], moved_frac >= 0")
        if self.pixel_delta < 0 or self.grid <= 0:
            raise ValueError("pixel_delta must be >= 0 and grid positive")

    @classmethod
    def of(cls, value: str | DiscoverySchedule | None) -> DiscoverySchedule:
        """A schedule from its policy name (default thresholds) or itself; None is the default."""
        if value is None:
            return cls()
        return value if isinstance(value, DiscoverySchedule) else cls(policy=str(value))


def _cells(array: np.ndarray, cell: int, reduce: str) -> np.ndarray:
    """(H, W[, C]) reduced over cell x cell blocks (edge-padded to whole cells): "mean" or "any"."""
    h, w = array.shape[:2]
    ph, pw = -h % cell, -w % cell
    if ph or pw:
        pad = [(0, ph), (0, pw)] + [(0, 0)] * (array.ndim - 2)
        array = np.pad(array, pad, mode="edge")
    blocks = array.reshape(array.shape[0] // cell, cell, array.shape[1] // cell, cell, *array.shape[2:])
    if reduce == "any":
        return blocks.any(axis=(1, 3))
    return blocks.mean(axis=(1, 3), dtype=np.float32)


def _areas(tracked: Mapping[int, Mapping]) -> dict[int, int]:
    ids = list(tracked)
    return dict(zip(ids, (int(a) for a in rle_areas([tracked[oid] for oid in ids])), strict=True))


def _grow(cells: np.ndarray) -> np.ndarray:
    """Cells and their 8 neighbours."""
    padded = np.pad(cells, 1)
    h, w = cells.shape
    out = np.zeros_like(cells)
    for dy in range(3):
        for dx in range(3):
            out |= padded[dy:dy + h, dx:dx + w]
    return out


class DiscoveryGate:
    """One forward pass's state: decides per keyframe whether discovery runs.

    `due` is asked on each keyframe with the tracked masks there; `ran` is told, after discovery ran
    on a keyframe, the tracked masks once its new objects joined, which become the reference.
    """

    def __init__(self, schedule: DiscoverySchedule, height: int, width: int) -> None:
        self.schedule = schedule
        self.cell = max(1, -(-max(height, width) // schedule.grid))
        self.reference: np.ndarray | None = None  # cell means of the last discovered keyframe
        self.reference_cells: dict[int, np.ndarray] = {}  # object id -> the cells its mask touched
        self.reference_areas: dict[int, int] = {}

    def due(self, frame: np.ndarray, tracked: Mapping[int, Mapping]) -> bool:
        """Whether discovery should run on this keyframe; `tracked`: live object id -> its RLE mask here."""
        if self.schedule.policy == "every" or self.reference is None:
            return True
        if self._lost(tracked) or self._changed(frame, tracked):
            return True
        return False

    def ran(self, frame: np.ndarray, tracked: Mapping[int, Mapping]) -> None:
        """Discovery ran on `frame`; `tracked` are the live masks there, new objects included."""
        if self.schedule.policy == "every":
            return
        self.reference = _cells(frame, self.cell, "mean")
        self.reference_cells = self._object_cells(tracked)
        self.reference_areas = _areas(tracked)

    def _lost(self, tracked: Mapping[int, Mapping]) -> bool:
        now = _areas(tracked)
        return any(oid not in now or now[oid] < self.schedule.lost_frac * before
                   for oid, before in self.reference_areas.items())

    def _changed(self, frame: np.ndarray, tracked: Mapping[int, Mapping]) -> bool:
        assert self.reference is not None
        diff = np.abs(_cells(frame, self.cell, "mean") - self.reference)
        changed = (diff.max(axis=-1) if diff.ndim == 3 else diff) > self.schedule.pixel_delta
        if not changed.any():
            return False
        now = self._object_cells(tracked)
        explained = np.zeros_like(changed)
        for cells in now.values():
            explained |= cells
        for oid, before in self.reference_cells.items():
            if oid in now:
                left, gained = int((before & ~now[oid]).sum()), int((now[oid] & ~before).sum())
                if gained >= self.schedule.moved_frac * left:
                    explained |= before
        news = changed & ~_grow(explained)
        return bool(news.any()) and float(news.mean()) >= self.schedule.changed_frac

    def _object_cells(self, tracked: Mapping[int, Mapping]) -> dict[int, np.ndarray]:
        return {oid: _cells(decode_rle(rle), self.cell, "any") for oid, rle in tracked.items()}
