"""Rows of the `embeddings` table: one vector per caption and per answer being committed.

Vectors are computed on the driver, at commit time, in one batch per commit, by both writers of the
table: an index run (`pipeline.run`, for the captions and answers of the videos it publishes) and
`pixelrefer embed` (`jobs.embed`, for those an older index or `--embedder none` left without). One
code path for both keeps their rows identical, and the GPU actors unchanged. It is cheap: WordLlama
embeds about 12,000 sentences in 0.2 s on two cores, far below the time a commit's videos took.

An OUTPUT holds vectors of one embedder only (a query must embed its words the same way), so a run
whose embedder differs from the one already there is refused before it does any work.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterable, Mapping

import numpy as np
import pyarrow as pa

from models.embedders import Embedder, embedder_name, load_embedder
from pipeline.store import OutputError, TableStore
from pipeline.store.commit import visible_rows
from schemas.tables import EMBEDDINGS, to_table

log = logging.getLogger(__name__)

#: The columns that say which caption or answer a vector belongs to (with `text`).
KEY_COLUMNS = ("video_id", "text_run_id", "kind", "object_id", "object_ids", "clip_index", "text")


class EmbedderMismatch(OutputError):
    """OUTPUT already holds vectors of another embedder (or of several): a mix cannot be ranked."""


def text_rows(captions: Iterable[Mapping[str, Any]], qa: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The embeddings rows (less embedder and vector) of captions and answers that have text.

    An empty caption has no meaning to embed (its vector would be zero, its cosine undefined).
    """
    rows = []
    for c in captions:
        if (c.get("caption") or "").strip():
            rows.append({"video_id": c["video_id"], "text_run_id": c["run_id"], "kind": "caption",
                         "object_id": c["object_id"], "object_ids": None, "clip_index": c.get("clip_index"),
                         "ts_start": c.get("ts_start"), "ts_end": c.get("ts_end"), "text": c["caption"]})
    for a in qa:
        if (a.get("answer") or "").strip():
            rows.append({"video_id": a["video_id"], "text_run_id": a["run_id"], "kind": "answer",
                         "object_id": None, "object_ids": list(a.get("object_ids") or []),
                         "clip_index": a.get("clip_index"), "ts_start": a.get("ts_start"),
                         "ts_end": a.get("ts_end"), "text": a["answer"]})
    return rows


def key_of(row: Mapping[str, Any]) -> tuple[Any, ...]:
    """What identifies an embedded text across runs; `pixelrefer embed` skips keys already there."""
    ids = row.get("object_ids")
    return (row["video_id"], row["text_run_id"], row["kind"], row.get("object_id"),
            tuple(ids) if ids is not None else None, row.get("clip_index"), row.get("text"))


def embedding_table(embedder: Embedder, rows: list[dict[str, Any]], run_id: str) -> pa.Table:
    """`rows` (from `text_rows`) with their vectors, built column-wise: 12,000 rows of 256 floats as
    Python lists would cost more than embedding them."""
    vectors = embedder.embed([r["text"] for r in rows])
    if vectors.shape != (len(rows), embedder.dim):
        raise ValueError(f"embedder {embedder.name} returned {vectors.shape}, expected ({len(rows)}, {embedder.dim})")
    columns: dict[str, pa.Array] = {}
    for field in EMBEDDINGS:
        if field.name == "vector":
            flat = pa.array(np.ascontiguousarray(vectors, np.float32).reshape(-1))
            offsets = pa.array(np.arange(0, len(rows) * embedder.dim + 1, embedder.dim, dtype=np.int32))
            columns["vector"] = pa.ListArray.from_arrays(offsets, flat)
        elif field.name in ("embedder", "dim", "run_id"):
            value = {"embedder": embedder.name, "dim": embedder.dim, "run_id": run_id}[field.name]
            columns[field.name] = pa.array([value] * len(rows), field.type)
        else:
            columns[field.name] = pa.array([r[field.name] for r in rows], field.type)
    return to_table("embeddings", pa.table(columns))


class RunEmbedder:
    """The embedder of one run: loaded once, and only by a run that has videos to index."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.name = embedder_name(spec)
        self._embedder: Embedder | None = None

    @property
    def enabled(self) -> bool:
        return self.name is not None

    def prepare(self, output: str, storage_options: Mapping[str, Any] | None = None) -> None:
        """Load the embedder and check it against OUTPUT's vectors, before the run does any work: a
        missing model or a mismatch found at the first commit would throw away what came before."""
        if self.enabled:
            embedder = self.embedder()
            check_embedder(output, embedder.name, storage_options, embedder.dim)

    def embedder(self) -> Embedder:
        if self._embedder is None:
            started = time.perf_counter()
            loaded = load_embedder(self.spec)
            if loaded is None:
                raise ValueError("the embedder of a run with --embedder none was asked for")
            self._embedder = loaded
            log.info("embedder %s (%d-d) loaded in %.2f s", loaded.name, loaded.dim, time.perf_counter() - started)
        return self._embedder

    def table(self, captions: Iterable[Mapping[str, Any]], qa: Iterable[Mapping[str, Any]], run_id: str) -> pa.Table | None:
        """The embeddings rows of a commit's captions and answers (None: nothing to embed, or `none`)."""
        if not self.enabled:
            return None
        rows = text_rows(captions, qa)
        return embedding_table(self.embedder(), rows, run_id) if rows else None


def index_embedders(output: str, storage_options: Mapping[str, Any] | None = None) -> list[tuple[str, int]]:
    """The (embedder, dim) pairs of the vectors already committed in OUTPUT, sorted."""
    table = visible_rows(TableStore(output, storage_options), "embeddings", ["embedder", "dim"])
    if not table.num_rows:
        return []
    pairs = table.group_by(["embedder", "dim"]).aggregate([]).to_pylist()
    return sorted((str(p["embedder"]), int(p["dim"])) for p in pairs)


def check_embedder(output: str, name: str | None, storage_options: Mapping[str, Any] | None = None,
                   dim: int | None = None) -> None:
    """Refuse to add `name`'s vectors (of width `dim`, when known) to an OUTPUT holding others."""
    if name is None:
        return
    present = index_embedders(output, storage_options)
    others = [(n, d) for n, d in present if n != name or (dim is not None and d != dim)]
    if others:
        held = ", ".join(f"{n} ({d}-d)" for n, d in present)
        raise EmbedderMismatch(
            f"OUTPUT already holds caption embeddings of {held}, not {name}"
            f"{f' ({dim}-d)' if dim is not None else ''}; one index keeps one embedder's vectors, so that "
            f"`--like` can compare them: use --embedder {present[0][0]}, or --embedder none, or a new OUTPUT"
        )
