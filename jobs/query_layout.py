"""Which table layout an OUTPUT was written in, and the DuckDB view of each table for it.

Two layouts exist. The current one (DESIGN.md, "Output tables") has seven tables, with masks in a
long `masks` table and a `clips` table. The first contract had five: masks nested in
`objects.frames` (one multi-megabyte row per object), no `clips`, no clip columns. An index of
the first kind is read transparently: each table's view maps the old files onto the current
schema (one clip per video, since the old pipeline saw a video as one clip; masks unnested from
`objects.frames`), so every query, `--video` and `report` work unchanged. An OUTPUT that mixes the
two layouts is refused: its globs would bind one file's schema and misread (or fail on) the rest.

Detection must stay cheap on object storage, so it never reads every footer. The current writer
puts a `masks` run folder next to every `objects` run folder (and usually a `clips` one next to
every `videos` one); only run folders without their new-layout twin are suspects, and only the
first Parquet footer of a suspect is read. A current index has (almost) no suspects; an old index
is recognised by its first suspect.
"""

from __future__ import annotations

import dataclasses
import posixpath
from typing import Callable

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.query_errors import LegacyLayoutError

FOOTER_BLOCK = 1 << 16  # read a footer in one small range request, not a storage client's default block


def parquet_scan(glob: str) -> str:
    """`read_parquet` over a table's committed files.

    `hive_types` pins `run_id` to VARCHAR: DuckDB would otherwise guess BIGINT for a run id made of
    digits and clash with the string column inside the files.
    """
    quoted = glob.replace("'", "''")
    return f"read_parquet('{quoted}', hive_partitioning = true, hive_types = {{'run_id': VARCHAR}})"


def current_view_sql(name: str, schema: pa.Schema, glob: str) -> str:
    """A view listing the schema's columns once, so the hive `run_id` never appears twice."""
    columns = ", ".join(f'"{field.name}"' for field in schema)
    return f'CREATE VIEW "{name}" AS SELECT {columns} FROM {parquet_scan(glob)}'


# table -> (the old table its files come from, the SELECT mapping them onto the current schema).
# `{src}` is that old table's scan; `videos` and `clips` name views created earlier (TABLES order).
_LEGACY_SELECTS: dict[str, tuple[str, str]] = {
    "videos": ("videos", """
        SELECT video_id, uri, size_bytes, etag, duration_s, fps, width, height, num_frames, sampled_ts,
               -- not recorded then: the mean rate of the frames actually sampled (capped videos show it)
               CAST(CASE WHEN len(sampled_ts) > 1 AND sampled_ts[-1] > sampled_ts[1]
                         THEN (len(sampled_ts) - 1) / (sampled_ts[-1] - sampled_ts[1]) END AS DOUBLE) AS sampled_fps,
               CAST(CASE WHEN status = 'ok' THEN 1 ELSE 0 END AS INTEGER) AS clips,
               status, error, model, tracker, run_id, indexed_at
        FROM {src}"""),
    "clips": ("videos", """
        SELECT video_id, CAST(0 AS INTEGER) AS clip_index, CAST(0 AS DOUBLE) AS ts_start,
               CAST(coalesce(duration_s, sampled_ts[-1]) AS DOUBLE) AS ts_end, 'end' AS boundary,
               CAST(len(sampled_ts) AS INTEGER) AS num_sampled, status, CAST(NULL AS VARCHAR) AS error, run_id
        FROM videos WHERE status = 'ok'"""),
    "objects": ("objects", """
        SELECT video_id, object_id, source, CAST(NULL AS VARCHAR) AS label, first_ts, last_ts,
               CAST(len(frames) AS INTEGER) AS num_frames, run_id
        FROM {src}"""),
    "masks": ("objects", """
        SELECT video_id, object_id, CAST(0 AS INTEGER) AS clip_index, f.frame_index, f.ts, f.bbox, f.area,
               f.score, f.rle, run_id
        FROM (SELECT video_id, object_id, run_id, unnest(frames) AS f FROM {src})"""),
    "captions": ("captions", """
        SELECT video_id, object_id, CAST(0 AS INTEGER) AS clip_index, ts_start, ts_end, caption, mode, model,
               num_tokens, run_id
        FROM {src}"""),
    "qa": ("qa", """
        SELECT q.video_id, q.object_ids, CAST(0 AS INTEGER) AS clip_index, c.ts_start, c.ts_end, q.question,
               q.answer, q.mode, q.model, q.run_id
        FROM {src} q LEFT JOIN clips c ON c.video_id = q.video_id AND c.run_id = q.run_id"""),
    "runs": ("runs", """
        SELECT run_id, CAST(0 AS INTEGER) AS commit_index, command, source, model, tracker, mode, started_at,
               ended_at, status, videos_listed, videos_skipped, videos_ok, videos_failed, videos_quarantined,
               videos_ok AS clips, CAST(NULL AS DOUBLE) AS video_seconds, objects, captions, answers,
               retry_video_ids
        FROM {src}"""),
    # The first contract had no embeddings; `pixelrefer embed` refuses such an index, so this is empty.
    "embeddings": ("embeddings", """
        SELECT video_id, kind, object_id, object_ids, clip_index, ts_start, ts_end, text, embedder, dim, vector,
               text_run_id, run_id
        FROM {src}"""),
}


def legacy_view_sql(name: str, glob_of: Callable[[str], str]) -> tuple[str, str]:
    """(the old table the view needs, the CREATE VIEW statement); `glob_of(table)` names its files."""
    source, select = _LEGACY_SELECTS[name]
    columns = select.format(src=parquet_scan(glob_of(source)))
    return source, f'CREATE VIEW "{name}" AS {columns}'


@dataclasses.dataclass(frozen=True)
class Layout:
    """How OUTPUT's files are laid out; `legacy_run` names one run of the first contract."""

    legacy: bool = False
    legacy_run: str | None = None

    def note(self, url: str) -> str | None:
        """The line a command prints (stderr) so a user knows why every video has one clip."""
        if not self.legacy:
            return None
        return (
            f"note: OUTPUT {url} was written by an older pixelrefer (masks in objects.frames, no clips table); "
            "it is read as one clip per video. For per-clip captions re-index the sources into a new OUTPUT "
            "with `pixelrefer index SOURCE NEW_OUTPUT ...`"
        )


def detect_layout(fs: fsspec.AbstractFileSystem, root: str, url: str, folders: set[str]) -> Layout:
    """Classify OUTPUT from run-folder listings and at most a few footers (see the module docstring)."""
    runs = {t: _run_folders(fs, f"{root}/{t}") if t in folders else [] for t in ("videos", "clips", "objects", "masks")}
    new_runs = sorted(set(runs["clips"]) | set(runs["masks"]))
    suspects = [("objects", r) for r in runs["objects"] if r not in set(runs["masks"])]
    suspects += [("videos", r) for r in runs["videos"] if r not in set(runs["clips"]) | set(runs["objects"])]
    for table, run in suspects:
        columns = _first_footer_columns(fs, f"{root}/{table}/{run}")
        if columns is None:
            continue  # unreadable or empty: the query that reads it reports the file itself
        legacy = "frames" in columns if table == "objects" else "clips" not in columns
        if not legacy:
            continue
        run_id = run.split("=", 1)[-1]
        if new_runs:
            raise LegacyLayoutError(
                f"OUTPUT {url} mixes runs written by an older pixelrefer (masks in objects.frames, no clips "
                f"table; e.g. run {run_id}) with runs of the current layout (e.g. run "
                f"{new_runs[0].split('=', 1)[-1]}), which cannot be read as one index. Re-index the sources into "
                "a new OUTPUT with `pixelrefer index SOURCE NEW_OUTPUT ...`, or move one layout's "
                "run_id=... folders out of OUTPUT"
            )
        return Layout(legacy=True, legacy_run=run_id)
    return Layout()


def _run_folders(fs: fsspec.AbstractFileSystem, folder: str) -> list[str]:
    """`run_id=...` folder names of a table, sorted; one listing."""
    try:
        entries = fs.ls(folder, detail=True)
    except FileNotFoundError:
        return []
    names = [posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "directory"]
    return sorted(n for n in names if n.startswith("run_id="))


def first_parquet(fs: fsspec.AbstractFileSystem, folder: str) -> str | None:
    """The first Parquet file under `folder`, walking top-down so object storage lists little."""
    try:
        if not fs.isdir(folder):
            return None
        for dirpath, _dirs, files in fs.walk(folder):
            for name in sorted(files):
                if name.endswith(".parquet"):
                    return f"{dirpath.rstrip('/')}/{name}"
    except FileNotFoundError:
        return None
    return None


def _first_footer_columns(fs: fsspec.AbstractFileSystem, folder: str) -> set[str] | None:
    path = first_parquet(fs, folder)
    if path is None:
        return None
    try:
        with fs.open(path, "rb", block_size=FOOTER_BLOCK) as handle:
            return set(pq.read_schema(handle).names)
    except (OSError, pa.ArrowException, ValueError):
        return None
