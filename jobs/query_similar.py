"""Objects that look like this one: `pixelrefer query OUTPUT --similar-to VIDEO_ID:OBJECT_ID`.

The appearance vectors are the `tracklets` table's: one per object and clip, pooled by the referrer
inside the object's masks (`pipeline.reid`). The object asked about is the mean of its tracklets'
vectors (weighted by their frames, as re-identification weighs them); every other object of the
latest ok run of every video counts with its best tracklet, the way `--like` counts an object with
its best passage, so an object seen once from the same side ranks high even if it turned later.
Only vectors of the same referrer and width are compared: another model's features are another space.

Through the search index beside the data (`pipeline.search.appearance`, the folder `--like` reads)
when it has seen every commit and holds vectors of the asked object's width: exact below
`ANN_MIN_ROWS` tracklets, IVF_PQ re-ranked on the exact vectors above. Otherwise (no index, one
behind the tables, another width) exactly: one read-only DuckDB statement (`array_cosine_similarity`
over FLOAT[dim]) over every vector, with a one-line note as `--like` gives (`bench/reid.py` times both).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Callable

import numpy as np
import pyarrow as pa

from jobs.query_errors import QueryError, UsageError
from pipeline.reid import mean_vector

if TYPE_CHECKING:
    from jobs.query_sql import Index
    from pipeline.search.appearance import AppearanceIndex


class NoAppearance(QueryError):
    """OUTPUT has no appearance vectors (indexed before re-identification, or with --reid off)."""


def add_similar_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--similar-to", metavar="VIDEO_ID:OBJECT_ID", default=None,
                        help="objects of every video that look like this one (appearance vectors), best first; "
                             "--top K results, --label L only objects labelled L")


def parse_ref(text: str) -> tuple[str, int]:
    video, sep, obj = text.rpartition(":")
    if not sep or not video.strip() or not obj.strip().lstrip("-").isdigit():
        raise UsageError(f"--similar-to {text!r}: give VIDEO_ID:OBJECT_ID, e.g. 3f2a9c...:4 "
                         "(ids as `pixelrefer query OUTPUT --video ID` lists them)")
    return video.strip(), int(obj)


def similar_sql(dim: int, *, label: bool) -> str:
    """The ranking statement. Parameters: $qv, $model, $vid, $oid, $top (and $label with `label`)."""
    dim = int(dim)
    same_label = "AND lower(trim(o.label)) = lower(trim($label))" if label else ""
    return f"""
    WITH scored AS (
        SELECT t.video_id, t.run_id, t.object_id, t.clip_index,
               array_cosine_similarity(CAST(t.vector AS FLOAT[{dim}]), CAST($qv AS FLOAT[{dim}])) AS similarity
        FROM tracklets t JOIN latest_videos l ON t.video_id = l.video_id AND t.run_id = l.run_id
        WHERE t.vector IS NOT NULL AND t.dim = {dim} AND t.model = $model
          AND NOT (t.video_id = $vid AND t.object_id = $oid)
    ), best AS (
        SELECT video_id, run_id, object_id, max(similarity) AS similarity,
               arg_max(clip_index, similarity) AS best_clip, count(*) AS tracklets
        FROM scored GROUP BY ALL
    )
    SELECT b.video_id, l.uri, b.object_id, o.label, o.first_ts, o.last_ts, b.similarity, b.best_clip,
           b.tracklets
    FROM best b JOIN latest_videos l ON b.video_id = l.video_id AND b.run_id = l.run_id
    JOIN objects o ON o.video_id = b.video_id AND o.run_id = b.run_id AND o.object_id = b.object_id
    WHERE true {same_label}
    ORDER BY b.similarity DESC, b.video_id, b.object_id
    LIMIT $top"""


#: The rows the search index found, completed from the tables (the exact statement's columns).
CANDIDATES_SQL = """
    SELECT b.video_id, l.uri, b.object_id, o.label, o.first_ts, o.last_ts, CAST(b.similarity AS FLOAT) AS similarity,
           b.best_clip, b.tracklets
    FROM pr_similar b JOIN latest_videos l ON b.video_id = l.video_id AND b.run_id = l.run_id
    JOIN objects o ON o.video_id = b.video_id AND o.run_id = b.run_id AND o.object_id = b.object_id
    ORDER BY b.similarity DESC, b.video_id, b.object_id"""


def search_similar(index: "Index", ref: str, top: int, label: str | None = None, *, exact: bool = False,
                   note: Callable[[str], None] | None = None) -> pa.Table:
    """The `top` objects most like `ref` ("VIDEO_ID:OBJECT_ID"), over the latest ok run of every video;
    through the search index when it is current (not with `exact`), `note` told why not when it exists."""
    if top < 1:
        raise UsageError("--top must be at least 1")
    if label is not None and not label.strip():
        raise UsageError("--label needs a label, e.g. --label person")
    video_ref, object_id = parse_ref(ref)
    have = index.sql("SELECT count(*) AS n FROM (SELECT 1 FROM tracklets WHERE vector IS NOT NULL LIMIT 1)"
                     ).column("n")[0].as_py()
    if not have:
        raise NoAppearance(
            f"OUTPUT {index.location.url} has no appearance vectors (indexed before re-identification existed, or "
            "with --reid off): index its sources again into a new OUTPUT with `pixelrefer index SOURCE NEW_OUTPUT` "
            "(--reid on is the default); runs into this OUTPUT skip videos it already holds")
    videos = index.sql(
        "SELECT video_id, run_id FROM latest_videos WHERE video_id = $v OR starts_with(video_id, $v) ORDER BY video_id",
        {"v": video_ref}).to_pylist()
    same = [v for v in videos if v["video_id"] == video_ref]
    videos = same or videos
    if len(videos) != 1:
        what = "no indexed video" if not videos else f"{len(videos)} videos"
        raise UsageError(f"--similar-to {ref}: {what} with id {video_ref!r} (ids as `pixelrefer query OUTPUT` "
                         "--sql 'SELECT video_id, uri FROM latest_videos' lists them)")
    video = videos[0]
    rows = index.sql(
        "SELECT object_id, model, dim, vector, num_frames FROM tracklets WHERE video_id = $vid AND run_id = $run "
        "AND object_id = $oid", {"vid": video["video_id"], "run": video["run_id"], "oid": object_id}).to_pylist()
    if not rows:
        known = index.sql("SELECT object_id FROM objects WHERE video_id = $vid AND run_id = $run "
                                "ORDER BY object_id", {"vid": video["video_id"], "run": video["run_id"]}).column(0)
        listed = ", ".join(str(v) for v in known.to_pylist()[:20]) or "none"
        raise UsageError(f"--similar-to {ref}: video {video['video_id']} has no object {object_id} "
                         f"(its objects: {listed})")
    looks = [r for r in rows if r["vector"] is not None]
    if not looks:
        raise QueryError(f"--similar-to {ref}: object {object_id} has no appearance vector (the referrer gave "
                         "none for any of its clips; its video's note may say why)")
    model, dim = looks[0]["model"], int(looks[0]["dim"])
    query = mean_vector([np.asarray(r["vector"], np.float32) for r in looks if r["model"] == model],
                        [float(r["num_frames"] or 1) for r in looks if r["model"] == model])
    if query is None:
        raise QueryError(f"--similar-to {ref}: object {object_id}'s appearance vectors are all zero")
    looks_index = None if exact else _open_appearance(index, dim, note)
    if looks_index is not None:
        found = looks_index.nearest_objects(query, model, int(top), exclude=(video["video_id"], object_id), label=label)
        index.con.register("pr_similar", found)
        return index.sql(CANDIDATES_SQL)
    params = {"qv": query.tolist(), "model": model, "vid": video["video_id"], "oid": object_id, "top": int(top)}
    if label is not None:
        params["label"] = label
    return index.sql(similar_sql(dim, label=label is not None), params)


def _open_appearance(index: "Index", dim: int, note: Callable[[str], None] | None) -> "AppearanceIndex | None":
    """The appearance dataset when it has seen every commit and holds vectors `dim` wide."""
    from jobs.query_like import index_commits
    from pipeline.search.appearance import AppearanceIndex

    location = index.location
    looks, why = AppearanceIndex.open(location.url, location.storage_options, index_commits(index))
    if looks is not None and looks.state.get("dim") != dim:
        looks, why = None, None  # another referrer's width: not in the index by design
    if looks is None and note is not None and why is not None:
        note(f"note: {why}; ranking every appearance vector instead (slower on large indexes): "
             f"`pixelrefer embed {location.url}` brings it up to date")
    return looks
