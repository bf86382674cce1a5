"""Reading the graph's row columns the same way in every stage, and rows as the batch a stage takes.

`timestamps` travels as a JSON string: as an ndarray, Ray Data turns it into a tensor column in a
block whose clips all have the same length and an object column in a block with a failed (empty)
clip, and then cannot concatenate the two blocks. Arrays are still accepted, for stages called
directly (tests, benches).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np


def times_column(value: Any) -> np.ndarray:
    """A row's `timestamps` (seconds) as a float64 vector, from its JSON text or an array."""
    if isinstance(value, (str, bytes)):
        value = json.loads(value) if value else []
    elif value is None:
        value = []
    return np.asarray(value, dtype=np.float64).reshape(-1)


def times_to_column(times: Any) -> str:
    """The JSON text `times_column` reads back."""
    return json.dumps([float(t) for t in times])


def rows_to_batch(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Rows as the numpy batch `map_batches` hands an actor: one object column per key, each value
    kept whole (a frames array stays one cell), for stages called without Ray (benches, plain loops)."""
    batch = {}
    for key in rows[0]:
        column = np.empty(len(rows), dtype=object)
        for i, row in enumerate(rows):
            column[i] = row[key]
        batch[key] = column
    return batch
