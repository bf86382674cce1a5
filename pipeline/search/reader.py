"""The read side of the search index: the nearest passages and the BM25 passages `--like` fuses,
both filtered inside Lance (`pipeline.search.index` keeps the dataset up to date)."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.search.index import (COLUMNS, DATASET, STATE, SearchIndexUnsupported, SearchLocation, _lance, _quote,
                                   read_state)
from pipeline.storage_errors import redact


#: IVF lists probed per query, and the multiple of k re-ranked with the exact vectors. At 1M
#: passages (244 lists) the search takes 0.14-0.17 s whether 16 or 256 lists are probed, while the
#: recall on random vectors, the worst case, goes from 0.29 at 32 to 0.73 at 128 (`bench.search`).
NPROBES = 128
REFINE_FACTOR = 4


def open_current(output: str, storage_options: Mapping[str, Any] | None, commits: list[str],
                 dataset: str = DATASET, state_name: str = STATE) -> tuple[Any, dict[str, Any], str | None]:
    """A dataset of the search folder and its state when its sync has seen exactly `commits` (the
    `runs` table's); else None and why (None too where there can be none: a store Lance cannot use)."""
    try:
        location = SearchLocation.of(output, storage_options, dataset)
    except SearchIndexUnsupported:
        return None, {}, None
    state = read_state(output, storage_options, state_name)
    if state is None:
        return None, {}, "OUTPUT has no search index"
    behind = len(set(commits) - set(state.get("commits") or []))
    if state.get("commits") != commits:
        return None, {}, (f"the search index is behind the tables by {behind} commit(s)" if behind
                          else "the search index does not match the tables")
    try:
        return _lance().dataset(location.uri, storage_options=location.options), state, None
    except (ValueError, OSError) as exc:
        return None, {}, f"the search index cannot be opened ({redact(str(exc), storage_options)})"


class SearchIndex:
    """The read side: nearest passages and BM25 passages, both filtered inside Lance."""

    def __init__(self, dataset: Any, state: Mapping[str, Any]) -> None:
        self.dataset = dataset
        self.state = dict(state)

    @classmethod
    def open(cls, output: str, storage_options: Mapping[str, Any] | None,
             commits: list[str]) -> tuple["SearchIndex | None", str | None]:
        """The index when it has seen exactly `commits` (the `runs` table's); else None and why
        (None too where there can be none: a store the search index cannot live on)."""
        dataset, state, why = open_current(output, storage_options, commits)
        return (cls(dataset, state) if dataset is not None else None), why

    @staticmethod
    def where(video_id: str | None = None, label: str | None = None) -> str | None:
        """The Lance filter for `--video` / `--label` (labels are stored trimmed and lower-cased)."""
        parts = []
        if video_id is not None:
            parts.append(f"video_id = {_quote(video_id)}")
        if label is not None:
            parts.append(f"array_has_any(labels, [{_quote(label.strip().lower())}])")
        return " AND ".join(parts) or None

    def nearest(self, vector: np.ndarray | list[float], k: int, where: str | None = None,
                nprobes: int = NPROBES) -> pa.Table:
        """The `k` passages nearest `vector` by cosine, with `similarity` (1 - cosine distance):
        IVF_PQ candidates re-ranked on their exact vectors when the index exists, exact otherwise."""
        # metric named: without an index Lance's flat search would use L2, and 1 - L2 is no cosine
        query = {"column": "vector", "q": np.asarray(vector, np.float32), "k": int(k), "nprobes": int(nprobes),
                 "refine_factor": REFINE_FACTOR, "metric": "cosine"}
        table = self.dataset.to_table(nearest=query, columns=[*COLUMNS, "_distance"], filter=where, prefilter=True,
                                      disable_scoring_autoprojection=True)
        similarity = pc.subtract(pa.scalar(1.0, pa.float32()), table.column("_distance"))
        return table.drop_columns(["_distance"]).append_column("similarity", similarity)

    def bm25(self, text: str, k: int, where: str | None = None) -> pa.Table:
        """The `k` passages with the best BM25 score for any word of `text`, with `score`."""
        from lance.query import MatchQuery

        table = self.dataset.to_table(full_text_query=MatchQuery(text, "text"), columns=[*COLUMNS, "_score"],
                                      filter=where, prefilter=True, limit=int(k), disable_scoring_autoprojection=True)
        return table.rename_columns([*COLUMNS, "score"])
