"""Arrow schemas of every output table, and the one validation every writer goes through.

The schemas are the contract with readers (DuckDB, pyarrow.dataset, the query CLI), so they are
declared once here and never inferred from data: an inferred schema would drift with the first
batch that happens to hold a null or an empty list.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.compute as pc

RLE = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])

VIDEOS = pa.schema(
    [
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        ("size_bytes", pa.int64()),
        ("etag", pa.string()),
        ("duration_s", pa.float64()),
        ("fps", pa.float64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("num_frames", pa.int32()),
        ("sampled_ts", pa.list_(pa.float64())),
        # The rate actually used: --fps, or lower where --max-frames thinned a long video.
        ("sampled_fps", pa.float64()),
        ("clips", pa.int32()),
        pa.field("status", pa.string(), nullable=False),
        ("error", pa.string()),
        ("model", pa.string()),
        ("tracker", pa.string()),
        pa.field("run_id", pa.string(), nullable=False),
        # When the row was committed (its commit's time): what orders "latest" for a source.
        ("indexed_at", pa.timestamp("us", tz="UTC")),
        # The run commit that wrote the row: a video is visible only once `runs` holds that commit.
        ("commit_index", pa.int32()),
    ]
)

CLIPS = pa.schema(
    [
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("clip_index", pa.int32(), nullable=False),
        ("ts_start", pa.float64()),
        ("ts_end", pa.float64()),
        ("boundary", pa.string()),
        ("num_sampled", pa.int32()),
        pa.field("status", pa.string(), nullable=False),
        ("error", pa.string()),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)

OBJECTS = pa.schema(
    [
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("object_id", pa.int32(), nullable=False),
        ("source", pa.string()),
        # The concept that found it (SAM 3), else PixelRefer's short category answer (`actors.labels`).
        ("label", pa.string()),
        ("first_ts", pa.float64()),
        ("last_ts", pa.float64()),
        ("num_frames", pa.int32()),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)

# One row per object per sampled frame where it has a mask: long, so that DuckDB answers "what was
# visible at 12:05" with a filter instead of unnesting one multi-megabyte row per object.
MASKS = pa.schema(
    [
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("object_id", pa.int32(), nullable=False),
        ("clip_index", pa.int32()),
        ("frame_index", pa.int32()),
        ("ts", pa.float64()),
        ("bbox", pa.list_(pa.float32())),
        ("area", pa.int64()),
        ("score", pa.float32()),
        ("rle", RLE),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)

CAPTIONS = pa.schema(
    [
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("object_id", pa.int32(), nullable=False),
        # null: the whole-track caption of an object seen in more than one clip
        ("clip_index", pa.int32()),
        ("ts_start", pa.float64()),
        ("ts_end", pa.float64()),
        ("caption", pa.string()),
        ("mode", pa.string()),
        ("model", pa.string()),
        ("num_tokens", pa.int32()),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)

QA = pa.schema(
    [
        pa.field("video_id", pa.string(), nullable=False),
        ("object_ids", pa.list_(pa.int32())),
        ("clip_index", pa.int32()),
        ("ts_start", pa.float64()),
        ("ts_end", pa.float64()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("mode", pa.string()),
        ("model", pa.string()),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)

RUNS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        # A long run commits every --commit-every minutes: one row per commit, counts of that commit.
        ("commit_index", pa.int32()),
        ("command", pa.string()),
        ("source", pa.string()),
        ("model", pa.string()),
        ("tracker", pa.string()),
        ("mode", pa.string()),
        ("started_at", pa.timestamp("us", tz="UTC")),
        ("ended_at", pa.timestamp("us", tz="UTC")),
        pa.field("status", pa.string(), nullable=False),
        ("videos_listed", pa.int64()),
        ("videos_skipped", pa.int64()),
        ("videos_ok", pa.int64()),
        ("videos_failed", pa.int64()),
        ("videos_quarantined", pa.int64()),
        ("clips", pa.int64()),
        ("video_seconds", pa.float64()),
        ("objects", pa.int64()),
        ("captions", pa.int64()),
        ("answers", pa.int64()),
        # Videos whose workers crashed in this run: not recorded in `videos`, so the next run
        # retries them; after `max_attempts` such runs they are quarantined.
        ("retry_video_ids", pa.list_(pa.string())),
        # The `embeddings` table version this commit appended (null: none): what the search index
        # reads from the change feed instead of re-reading the run's files.
        ("embeddings_version", pa.int64()),
    ]
)

# One vector per caption and per answer, keyed like `captions` / `qa`. `vector` is a variable-length
# list<float32> with its width in `dim`, not a fixed-size list: the width belongs to the embedder
# (WordLlama 256, bge-small 384), and one schema per table is what every writer validates against
# and what DuckDB unifies across run folders. Queries cast to FLOAT[dim] (`array_cosine_similarity`);
# `validate` checks that every vector has `dim` values. `text_run_id` is the run of the caption or
# answer embedded: the index run itself, or an earlier one for rows that `pixelrefer embed` added.
EMBEDDINGS = pa.schema(
    [
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),  # caption / answer
        ("object_id", pa.int32()),  # null for answers
        ("object_ids", pa.list_(pa.int32())),  # the objects an answer is about; null for captions
        ("clip_index", pa.int32()),
        ("ts_start", pa.float64()),
        ("ts_end", pa.float64()),
        ("text", pa.string()),
        pa.field("embedder", pa.string(), nullable=False),
        pa.field("dim", pa.int32(), nullable=False),
        pa.field("vector", pa.list_(pa.float32()), nullable=False),
        pa.field("text_run_id", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)

# One row per tracklet: an object's track inside one clip, before re-identification joined it to
# others (`pipeline.reid`). `track_id` is the id linking gave it (mask IoU across window boundaries),
# `object_id` the object it belongs to after re-identification (the `objects` id), `reid_score` the
# cosine that merged its track into that object (null: its track starts the object). `vector` is its
# appearance in this clip (the mean tower feature inside its masks, L2-normalised; null when the
# referrer gave none), `dim` its width, `model` the referrer that made it. A new table rather than
# new columns of `objects`, so an index of the schema before stays readable as it is.
TRACKLETS = pa.schema(
    [
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("clip_index", pa.int32(), nullable=False),
        pa.field("track_id", pa.int32(), nullable=False),
        pa.field("object_id", pa.int32(), nullable=False),
        ("reid_score", pa.float32()),
        ("first_ts", pa.float64()),
        ("last_ts", pa.float64()),
        ("num_frames", pa.int32()),
        ("model", pa.string()),
        ("dim", pa.int32()),
        ("vector", pa.list_(pa.float32())),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)

TABLES: dict[str, pa.Schema] = {
    "videos": VIDEOS, "clips": CLIPS, "objects": OBJECTS, "masks": MASKS, "captions": CAPTIONS, "qa": QA, "runs": RUNS,
    "embeddings": EMBEDDINGS, "tracklets": TRACKLETS,
}

#: Version of these schemas as the Delta tables record it (`pipeline.store.tables`): 2 is the Delta
#: layout (`videos.commit_index`, `videos.status` 'removed', `runs.embeddings_version`).
SCHEMA_VERSION = 2

#: `removed`: the source was deleted from SOURCE (recorded by `nightly`); its history stays readable.
VIDEO_STATUSES = ("ok", "failed", "removed")
MODES = ("lite", "full")
OBJECT_SOURCES = ("prompt", "auto", "concept")
CLIP_STATUSES = ("ok", "failed")
CLIP_BOUNDARIES = ("shot", "window", "end")
RUN_STATUSES = ("committed",)
EMBEDDING_KINDS = ("caption", "answer")


class SchemaError(ValueError):
    """A batch does not fit its table's schema; the message names the table, column and row."""


def to_table(name: str, rows: Iterable[Mapping[str, Any]] | pa.Table) -> pa.Table:
    """Build (or cast) a batch for table `name` and validate it.

    Raising here, before anything is written, is what keeps a bad batch out of a committed run.
    """
    schema = TABLES[name]
    if isinstance(rows, pa.Table):
        missing = [f.name for f in schema if f.name not in rows.column_names]
        extra = [c for c in rows.column_names if c not in schema.names]
        if missing or extra:
            raise SchemaError(f"table {name!r}: missing columns {missing}, unexpected columns {extra}")
        try:
            table = rows.select(schema.names).cast(schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
            raise SchemaError(f"table {name!r}: {exc}") from exc
    else:
        rows = list(rows)
        for i, row in enumerate(rows):
            extra = set(row) - set(schema.names)
            if extra:
                raise SchemaError(f"table {name!r} row {i}: unexpected columns {sorted(extra)}")
        try:
            table = pa.Table.from_pylist(rows, schema=schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise SchemaError(f"table {name!r}: {exc}") from exc
    validate(name, table)
    return table


def validate(name: str, table: pa.Table) -> None:
    """Check schema equality, non-null columns and the enumerated values."""
    schema = TABLES[name]
    if not table.schema.equals(schema, check_metadata=False):
        raise SchemaError(f"table {name!r}: schema differs:\n{table.schema}\nexpected:\n{schema}")
    for field in schema:
        if not field.nullable and table.column(field.name).null_count:
            raise SchemaError(f"table {name!r}: column {field.name!r} has nulls")
    checks = {
        "videos": ("status", VIDEO_STATUSES),
        "captions": ("mode", MODES),
        "qa": ("mode", MODES),
        "objects": ("source", OBJECT_SOURCES),
        "runs": ("status", RUN_STATUSES),
        "clips": ("status", CLIP_STATUSES),
        "masks": None,
        "embeddings": ("kind", EMBEDDING_KINDS),
        "tracklets": None,
    }
    checked = [checks[name]] if checks[name] else []
    if name == "clips":
        checked.append(("boundary", CLIP_BOUNDARIES))
    for column, allowed in checked:
        bad = set(table.column(column).to_pylist()) - set(allowed) - {None}
        if bad:
            raise SchemaError(f"table {name!r}: column {column!r} has values {sorted(bad)}, allowed {allowed}")
    if name in ("embeddings", "tracklets") and table.num_rows:
        lengths = pc.list_value_length(table.column("vector"))
        same = pc.equal(lengths, table.column("dim"))
        if pc.any(pc.invert(same)).as_py() or (name == "tracklets" and not pc.all(
                pc.equal(pc.is_null(table.column("vector")), pc.is_null(table.column("dim")))).as_py()):
            raise SchemaError(f"table {name!r}: a vector's length differs from its row's dim (or only one is null)")
