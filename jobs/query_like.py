"""Search by meaning: `pixelrefer query OUTPUT --like "a person carrying a ladder"`.

The words are embedded with the embedder that made the index's vectors (its name and width are
read from the `embeddings` table, and a different one is refused), and objects are ranked two ways,
each over the latest ok run of every video:

- dense: cosine similarity (`array_cosine_similarity`, vectors cast to FLOAT[dim]) between the
  words and each of the object's captions and the answers that name it; an object counts with its
  best passage, which is the one shown;
- BM25 over the same texts, exactly as `--text` ranks them (`jobs.query_search`).

The two rankings are fused by reciprocal rank fusion (Cormack, Clarke & Büttcher, 2009):

    score(object) = 1 / (60 + dense_rank) + 1 / (60 + bm25_rank)

where a rank counts from 1, and a ranking an object is not in (no BM25 term matched, or it is
beyond the first `RRF_WINDOW` objects of that ranking) adds nothing. k = 60 is the paper's
constant: it damps the difference between neighbouring ranks, so neither ranking's scale matters
and an object near the top of both beats one at the top of only one. Paraphrases with no word in
common still rank by the dense side; exact rare words (a name, a number) are not lost to it.

Two ways to the same ranking, `bench.search` times both:

- through the search index (`pipeline.search.index`, kept up to date by index runs and `pixelrefer
  embed`), whenever it has seen every commit: Lance returns the `CANDIDATES_PER_OBJECT` x window
  nearest passages (IVF_PQ, re-ranked on the exact vectors) and the as many best BM25 passages, both
  already narrowed by --video / --label, and the same fusion runs in DuckDB over those candidates.
  Its BM25 side scores passages (an object counts with its best one, labels are not searched as
  words), where `--text` scores an object's texts together; the dense side is exact below
  `ANN_MIN_ROWS` passages and approximate above (recall in `bench.search`).
- `--exact`, or an index that is behind the tables (a run stopped before its last commit; a note on
  stderr says so): one read-only SQL statement (`like_sql`) over every vector and, for BM25,
  exactly as `--text` ranks.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any, Callable, TYPE_CHECKING

import pyarrow as pa

from jobs.query_errors import QueryError, UsageError
from jobs.query_search import SEARCH_SQL, TERMS_SQL, search_params
from models.embedders import WORDLLAMA_NAME, EmbedderError, load_embedder
from pipeline.search.reader import SearchIndex
from pipeline.store.commit import commit_key

if TYPE_CHECKING:
    from jobs.query_sql import Index

DEFAULT_TOP = 10
#: k of reciprocal rank fusion (the paper's value).
RRF_K = 60
#: Objects each ranking contributes to the fusion, at least (more when --top asks for more).
RRF_WINDOW = 100
#: BM25's own row limit when it runs inside the fusion: every matching object (the window applies after
#: the --video / --label filters).
BM25_ALL = 2**31 - 1
#: Passages the search index returns per object wanted: an object has a caption per clip, and the
#: candidates of one object count once.
CANDIDATES_PER_OBJECT = 10
_CANDIDATE_PARAMS = ("window", "top", "k", "vid", "label")
_NO_PASSAGES = pa.table({"video_id": pa.array([], pa.string()), "text_run_id": pa.array([], pa.string()),
                         "kind": pa.array([], pa.string()), "object_ids": pa.array([], pa.list_(pa.int32())),
                         "clip_index": pa.array([], pa.int32()), "ts_start": pa.array([], pa.float64()),
                         "ts_end": pa.array([], pa.float64()), "text": pa.array([], pa.string()),
                         "labels": pa.array([], pa.list_(pa.string())), "score": pa.array([], pa.float32())})


def add_like_arguments(parser: argparse.ArgumentParser) -> None:
    """`--like` and its options (added to `pixelrefer query`)."""
    parser.add_argument("--like", metavar="WORDS",
                        help="objects whose captions or answers mean WORDS, best first (embeddings fused with BM25); "
                             "--video narrows it to one video")
    parser.add_argument("--top", type=int, default=DEFAULT_TOP, metavar="K", help=f"--like, --similar-to: results (default {DEFAULT_TOP})")
    parser.add_argument("--exact", action="store_true",
                        help="--like, --similar-to: rank every stored vector instead of using the search index "
                             "(slow at scale)")
    parser.add_argument("--embedder", metavar="E", default=None,
                        help="--like: the embedder that made the index's vectors, when it is not wordllama "
                             "(a model folder or hub id)")


class NoEmbeddings(QueryError):
    """OUTPUT has no caption embeddings (indexed with --embedder none, or before they existed)."""


def index_embedder(index: "Index") -> tuple[str, int]:
    """The (name, dim) of the index's vectors; refuses an index without any, or with several kinds."""
    rows = index.sql("SELECT embedder, dim, count(*) AS n FROM embeddings GROUP BY ALL ORDER BY n DESC, embedder"
                     ).to_pylist()
    if not rows:
        raise NoEmbeddings(
            f"OUTPUT {index.location.url} has no caption embeddings (indexed with --embedder none, or before "
            f"--like existed): add them with `pixelrefer embed {index.location.url}`"
        )
    if len(rows) > 1:
        kinds = ", ".join(f"{r['embedder']} ({r['dim']}-d, {r['n']} rows)" for r in rows)
        raise QueryError(f"OUTPUT {index.location.url} holds vectors of several embedders ({kinds}): they cannot be "
                         "ranked together")
    return str(rows[0]["embedder"]), int(rows[0]["dim"])


def query_vector(index: "Index", text: str, spec: str | None) -> tuple[list[float], str, int]:
    """`text` embedded by the index's embedder: (vector, name, dim)."""
    name, dim = index_embedder(index)
    if spec is None:
        if name != WORDLLAMA_NAME:
            raise UsageError(f"the index's vectors were made by {name} ({dim}-d): give --embedder with that "
                             "model's folder or hub id")
        spec = name
    try:
        embedder = _embedder(spec)
    except EmbedderError as exc:
        raise UsageError(str(exc)) from exc
    if embedder is None:
        raise UsageError("--embedder none cannot search by meaning")
    if (embedder.name, embedder.dim) != (name, dim):
        raise UsageError(f"--embedder {spec} makes {embedder.dim}-d vectors named {embedder.name}, but the index's "
                         f"are {name} ({dim}-d): query with the embedder that made them")
    return [float(v) for v in embedder.embed([text])[0]], name, dim


@functools.lru_cache(maxsize=4)
def _embedder(spec: str) -> Any:
    """Loaded once per process: `pixelrefer serve` answers many searches, and loading is most of one."""
    return load_embedder(spec)


def _pick(column: str) -> str:
    """A result column from the dense side where the object is there (its best passage), else BM25's."""
    return f"CASE WHEN d.object_id IS NOT NULL THEN d.{column} ELSE b.{column} END AS {column}"


def like_sql(dim: int, *, bm25: bool, video: bool, label: bool, candidates: bool = False) -> str:
    """The one statement of `--like`. Parameters: $qv, $embedder, $window, $top, $k (RRF), plus
    $vid with `video`, $label with `label`, and SEARCH_SQL's ($q, $k1, $b, $limit) with `bm25`.

    With `candidates`, the passages come from the search index instead (tables `pr_dense` and
    `pr_bm25`, already filtered by video and label): no $qv, $embedder, nor SEARCH_SQL's."""
    dim = int(dim)
    latest = "SELECT video_id, run_id, uri FROM latest_videos" + (" WHERE video_id = $vid" if video else "")
    same_label = "lower(trim({}.label)) = lower(trim($label))"  # as `query --label` compares
    label_join = ("JOIN objects o ON o.video_id = p.video_id AND o.run_id = p.run_id AND o.object_id = p.object_id "
                  f"AND {same_label.format('o')}") if label else ""
    filters = [f for f, on in (("video_id = $vid", video), (same_label.format("s"), label)) if on]
    if candidates and bm25:
        bm25_cte = f"""
bm AS (
    SELECT *, row_number() OVER (ORDER BY score DESC, video_id, object_id) AS bm25_rank FROM (
        SELECT p.video_id, p.run_id, p.object_id, p.score, p.text, p.kind, p.clip_index, p.ts_start, p.ts_end
        FROM (SELECT c.video_id, c.text_run_id AS run_id, c.kind, c.clip_index, c.ts_start, c.ts_end, c.text,
                     c.score, unnest(c.object_ids) AS object_id
              FROM pr_bm25 c JOIN latest l ON c.video_id = l.video_id AND c.text_run_id = l.run_id) p {label_join}
        QUALIFY row_number() OVER (PARTITION BY p.video_id, p.run_id, p.object_id
                                   ORDER BY p.score DESC, p.clip_index IS NULL, p.ts_start NULLS LAST, p.kind, p.text) = 1)
    ORDER BY bm25_rank LIMIT $window
),"""
    elif bm25:
        bm25_cte = f"""
bm AS (
    SELECT video_id, run_id, object_id, score, match AS text, match_kind AS kind, clip_index, ts_start, ts_end,
           row_number() OVER (ORDER BY score DESC, video_id, object_id) AS bm25_rank
    FROM ({SEARCH_SQL}) s {'WHERE ' + ' AND '.join(filters) if filters else ''}
    ORDER BY bm25_rank LIMIT $window
),"""
    else:
        bm25_cte = """
bm AS (SELECT NULL::VARCHAR AS video_id, NULL::VARCHAR AS run_id, NULL::INTEGER AS object_id, NULL::DOUBLE AS score,
              NULL::VARCHAR AS text, NULL::VARCHAR AS kind, NULL::INTEGER AS clip_index, NULL::DOUBLE AS ts_start,
              NULL::DOUBLE AS ts_end, NULL::BIGINT AS bm25_rank WHERE false),"""
    if candidates:
        passages = """
    SELECT c.video_id, c.text_run_id AS run_id, c.kind, c.clip_index, c.ts_start, c.ts_end, c.text,
           c.object_ids AS ids, c.similarity
    FROM pr_dense c JOIN latest l ON c.video_id = l.video_id AND c.text_run_id = l.run_id"""
    else:
        passages = f"""
    SELECT e.video_id, e.text_run_id AS run_id, e.kind, e.clip_index, e.ts_start, e.ts_end, e.text,
           CASE WHEN e.kind = 'caption' THEN [e.object_id] ELSE e.object_ids END AS ids,
           array_cosine_similarity(CAST(e.vector AS FLOAT[{dim}]), CAST($qv AS FLOAT[{dim}])) AS similarity
    FROM embeddings e JOIN latest l ON e.video_id = l.video_id AND e.text_run_id = l.run_id
    WHERE e.embedder = $embedder"""
    return f"""
WITH latest AS ({latest}),
passages AS ({passages}
),
per_object AS (
    SELECT p.* FROM (SELECT * EXCLUDE (ids), unnest(ids) AS object_id FROM passages) p {label_join}
),
best AS (
    SELECT * FROM per_object
    QUALIFY row_number() OVER (PARTITION BY video_id, run_id, object_id
                               ORDER BY similarity DESC, clip_index IS NULL, ts_start NULLS LAST, kind, text) = 1
),
dense AS (
    SELECT *, row_number() OVER (ORDER BY similarity DESC, video_id, object_id) AS dense_rank
    FROM best ORDER BY dense_rank LIMIT $window
),{bm25_cte}
fused AS (
    SELECT coalesce(d.video_id, b.video_id) AS video_id, coalesce(d.run_id, b.run_id) AS run_id,
           coalesce(d.object_id, b.object_id) AS object_id,
           coalesce(1.0 / ($k + d.dense_rank), 0) + coalesce(1.0 / ($k + b.bm25_rank), 0) AS score,
           {_pick('clip_index')}, {_pick('ts_start')}, {_pick('ts_end')}, {_pick('text')}, {_pick('kind')},
           d.similarity, b.score AS bm25, d.dense_rank, b.bm25_rank
    FROM dense d FULL OUTER JOIN bm b
        ON d.video_id = b.video_id AND d.run_id = b.run_id AND d.object_id = b.object_id
)
SELECT f.video_id, f.object_id, f.clip_index, f.ts_start, f.ts_end, f.score, f.text, f.kind, o.label,
       f.similarity, f.bm25, f.dense_rank, f.bm25_rank, f.run_id, l.uri
FROM fused f
JOIN latest l ON l.video_id = f.video_id AND l.run_id = f.run_id
LEFT JOIN (SELECT video_id, run_id, object_id, label FROM objects) o
    ON o.video_id = f.video_id AND o.run_id = f.run_id AND o.object_id = f.object_id
ORDER BY f.score DESC, f.similarity DESC NULLS LAST, f.video_id, f.object_id
LIMIT $top
"""


def like_params(vector: list[float], embedder: str, terms: list[str], top: int, *, video_id: str | None = None,
                label: str | None = None) -> dict[str, Any]:
    """The parameters of `like_sql` built with the same switches (bm25 = bool(terms), video, label)."""
    params: dict[str, Any] = {"qv": vector, "embedder": embedder, "window": max(RRF_WINDOW, top), "top": top,
                              "k": RRF_K}
    if terms:
        params.update(search_params(terms, BM25_ALL))
    if video_id is not None:
        params["vid"] = video_id
    if label is not None:
        params["label"] = label
    return params


def search_like(index: "Index", text: str, top: int = DEFAULT_TOP, *, video: str | None = None,
                label: str | None = None, embedder: str | None = None, exact: bool = False,
                note: Callable[[str], None] | None = None) -> pa.Table:
    """Objects whose captions or answers mean `text`, best first (see the module docstring).

    Through the search index when it is up to date, exactly over every vector otherwise (or with
    `exact`); `note` is told when an index exists but cannot be used, and why."""
    if not text or not text.strip():
        raise UsageError("--like is empty: give the words to search for, e.g. --like \"a person carrying a ladder\"")
    if top < 1:
        raise UsageError("--top must be at least 1")
    if label is not None and not label.strip():
        raise UsageError("--label is empty")
    video_id = index._video_runs(video)[0]["video_id"] if video is not None else None
    vector, name, dim = query_vector(index, text, embedder)
    terms = index.sql(TERMS_SQL, {"text": text}).column("terms")[0].as_py() or []
    params = like_params(vector, name, terms, top, video_id=video_id, label=label)
    search = None if exact else open_search(index, note)
    if search is None:
        sql = like_sql(dim, bm25=bool(terms), video=video_id is not None, label=label is not None)
        return index.sql(sql, params)
    where = SearchIndex.where(video_id, label)
    wanted = CANDIDATES_PER_OBJECT * params["window"]
    index.con.register("pr_dense", search.nearest(vector, wanted, where))
    index.con.register("pr_bm25", search.bm25(text, wanted, where) if terms else _NO_PASSAGES)
    sql = like_sql(dim, bm25=bool(terms), video=video_id is not None, label=label is not None, candidates=True)
    return index.sql(sql, {name: value for name, value in params.items() if name in _CANDIDATE_PARAMS})


def index_commits(index: "Index") -> list[str]:
    """The `runs` table's commits as sorted `commit_key`s: what a current search index has seen."""
    return sorted(commit_key(r["run_id"], r["commit_index"]) for r in
                  index._internal("SELECT DISTINCT run_id, commit_index FROM runs").to_pylist())


def open_search(index: "Index", note: Callable[[str], None] | None = None) -> SearchIndex | None:
    """OUTPUT's search index when it has seen every commit of the `runs` table, else None (and a
    note when there is one to bring up to date, or it is stored where Lance cannot read it)."""
    location = index.location
    search, why = SearchIndex.open(location.url, location.storage_options, index_commits(index))
    if search is None and note is not None and why is not None:
        note(f"note: {why}; ranking every vector instead (slower on large indexes): "
             f"`pixelrefer embed {location.url}` brings it up to date")
    return search


def check_like_arguments(args: argparse.Namespace) -> None:
    """--like replaces --sql and --text; --video narrows it (in the other modes it is a mode of its own)."""
    if args.like is None:
        if args.embedder is not None:
            raise UsageError("--embedder goes with --like")
        if args.exact and getattr(args, "similar_to", None) is None:
            raise UsageError("--exact goes with --like or --similar-to")
        return
    if args.sql is not None or args.text is not None:
        raise UsageError("--like cannot be combined with --sql or --text")
