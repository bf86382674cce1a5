"""Text search for `pixelrefer query --text`: Okapi BM25 computed in DuckDB SQL.

DuckDB's `fts` extension is not bundled and cannot be installed offline; ranking in plain SQL keeps
the search streaming over remote Parquet and adds no dependency. This module only holds SQL text
and its parameters, so it imports nothing from the other query modules.

A document is one object: all its captions (per clip and whole-track), the answers that name it
and its label (the concept that found it, or PixelRefer's category), for each video's latest ok run only (a re-indexed video is neither counted twice nor shown
twice).
"""

from __future__ import annotations

from typing import Any

DEFAULT_SEARCH_LIMIT = 20

# BM25 parameters: the usual defaults (Robertson & Zaragoza; Lucene/Elasticsearch use the same).
BM25_K1 = 1.2
BM25_B = 0.75

# Small English stop list: these words carry no signal for "which object is this" searches and
# would otherwise make every caption a weak match for "the red truck".
STOPWORDS = (
    "a", "an", "and", "are", "as", "at", "be", "by", "for", "from", "has", "in", "is", "it", "its",
    "of", "on", "or", "that", "the", "this", "to", "was", "were", "with",
)  # fmt: skip

# Created on every index connection; `pr_terms` is also how a query's own words are tokenized.
MACROS = (
    # Harman's "S" stemmer (1991): folds plurals so "trucks" finds "truck" without a stemming library.
    r"""CREATE MACRO pr_stem(t) AS CASE
        WHEN length(t) <= 3 THEN t
        WHEN suffix(t, 'ies') AND NOT suffix(t, 'eies') AND NOT suffix(t, 'aies')
            THEN substr(t, 1, length(t) - 3) || 'y'
        WHEN suffix(t, 'es') AND NOT (suffix(t, 'aes') OR suffix(t, 'ees') OR suffix(t, 'oes'))
            THEN substr(t, 1, length(t) - 1)
        WHEN suffix(t, 's') AND NOT (suffix(t, 'us') OR suffix(t, 'ss'))
            THEN substr(t, 1, length(t) - 1)
        ELSE t END""",
    # Lower-case, split on anything but letters/digits (Unicode aware), drop stop words, stem.
    r"""CREATE MACRO pr_terms(s) AS list_transform(
        list_filter(regexp_split_to_array(lower(coalesce(s, '')), '[^\p{L}\p{N}]+'),
                    lambda t: t <> '' AND NOT list_contains(%s, t)),
        lambda t: pr_stem(t))"""
    % ("[" + ", ".join(f"'{w}'" for w in STOPWORDS) + "]"),
)

TERMS_SQL = "SELECT pr_terms($text) AS terms"

#   score(obj, q) = sum over query terms t of
#       idf(t) * tf(t, obj) * (k1 + 1) / (tf(t, obj) + k1 * (1 - b + b * len(obj) / avg_len))
#   idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))      (Lucene's form: never negative)
# N, avg_len and df count objects of each video's latest ok run only. An object's document is all
# its captions (one per clip it was seen in, plus the whole-track one) and the answers naming it,
# so a long video's object is ranked once; the row shows its best-matching text (most query-term
# occurrences; ties: a clip's text before the whole track's, then the earliest) with that text's
# clip and time span, which is where a user would look.
SEARCH_SQL = """
WITH latest AS (SELECT video_id, run_id, uri FROM latest_videos),
texts AS (
    SELECT c.video_id, c.run_id, c.object_id, c.clip_index, c.ts_start, c.ts_end, 'caption' AS kind,
           c.caption AS text
    FROM captions c JOIN latest l ON c.video_id = l.video_id AND c.run_id = l.run_id
    UNION ALL
    SELECT video_id, run_id, object_id, clip_index, ts_start, ts_end, 'answer' AS kind, text FROM (
        SELECT q.video_id, q.run_id, unnest(q.object_ids) AS object_id, q.clip_index, q.ts_start, q.ts_end,
               q.answer AS text
        FROM qa q JOIN latest l ON q.video_id = l.video_id AND q.run_id = l.run_id)
    UNION ALL
    SELECT o.video_id, o.run_id, o.object_id, NULL AS clip_index, o.first_ts, o.last_ts, 'label' AS kind,
           o.label AS text
    FROM objects o JOIN latest l ON o.video_id = l.video_id AND o.run_id = l.run_id
    WHERE o.label IS NOT NULL
),
tokens AS (
    SELECT *, len(list_filter(terms, lambda t: list_contains($q, t))) AS hits
    FROM (SELECT *, pr_terms(text) AS terms FROM texts)
),
docs AS (SELECT video_id, run_id, object_id, sum(len(terms)) AS doc_len FROM tokens GROUP BY ALL),
best AS (
    SELECT video_id, run_id, object_id, clip_index, ts_start, ts_end, kind, text FROM tokens WHERE hits > 0
    QUALIFY row_number() OVER (PARTITION BY video_id, run_id, object_id
                               ORDER BY hits DESC, clip_index IS NULL, ts_start NULLS LAST, kind, text) = 1
),
stats AS (SELECT count(*) AS n_docs, avg(doc_len) AS avg_len FROM docs),
tf AS (
    SELECT video_id, run_id, object_id, term, count(*) AS tf
    FROM (SELECT video_id, run_id, object_id, unnest(terms) AS term FROM tokens WHERE hits > 0)
    WHERE list_contains($q, term)
    GROUP BY ALL
),
df AS (SELECT term, count(*) AS df FROM tf GROUP BY term),
scored AS (
    SELECT tf.video_id, tf.run_id, tf.object_id,
           sum(ln(1 + (s.n_docs - df.df + 0.5) / (df.df + 0.5)) * tf.tf * ($k1 + 1)
               / (tf.tf + $k1 * (1 - $b + $b * d.doc_len / s.avg_len))) AS score,
           list(tf.term ORDER BY tf.term) AS matched_terms
    FROM tf JOIN df ON tf.term = df.term
    JOIN docs d ON d.video_id = tf.video_id AND d.run_id = tf.run_id AND d.object_id = tf.object_id
    CROSS JOIN stats s
    GROUP BY tf.video_id, tf.run_id, tf.object_id
)
SELECT s.score, s.video_id, s.object_id, o.label, s.run_id, b.text AS match, b.kind AS match_kind,
       b.clip_index, b.ts_start, b.ts_end, s.matched_terms, o.first_ts, o.last_ts, l.uri
FROM scored s
JOIN best b ON b.video_id = s.video_id AND b.run_id = s.run_id AND b.object_id = s.object_id
JOIN latest l ON l.video_id = s.video_id AND l.run_id = s.run_id
LEFT JOIN (SELECT video_id, run_id, object_id, label, first_ts, last_ts FROM objects) o
    ON o.video_id = s.video_id AND o.run_id = s.run_id AND o.object_id = s.object_id
ORDER BY s.score DESC, s.video_id, s.object_id
LIMIT $limit
"""


def search_params(terms: list[str], limit: int) -> dict[str, Any]:
    """The parameters of SEARCH_SQL: the query's distinct terms, sorted so equal queries match."""
    return {"q": sorted(set(terms)), "k1": BM25_K1, "b": BM25_B, "limit": limit}


# `query --label L`: the objects of each video's latest ok run whose label is L (case and outer
# spaces ignored), with where and when they appear; `$video` narrows it to one video (NULL: all).
LABEL_SQL = """
SELECT o.label, o.video_id, o.object_id, o.source, o.first_ts, o.last_ts, o.num_frames, l.uri, o.run_id
FROM objects o JOIN latest_videos l ON o.video_id = l.video_id AND o.run_id = l.run_id
WHERE lower(trim(o.label)) = lower(trim($label)) AND ($video IS NULL OR o.video_id = $video)
ORDER BY o.video_id, o.first_ts NULLS LAST, o.object_id
LIMIT $limit
"""
