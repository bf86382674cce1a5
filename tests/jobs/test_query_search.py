"""`pixelrefer query --text` (BM25 against a reference implementation) and `--label`."""

from __future__ import annotations

import json
import math
import re

import pytest

from jobs.query_search import STOPWORDS
from jobs.query_sql import open_index

from query_helpers import RUN1, RUN2, IndexInfo, assert_clean_error

pytestmark = pytest.mark.timeout(120)


# --------------------------------------------------------------------------------------------
# --text: BM25, checked against an independent implementation of the documented formula.
# --------------------------------------------------------------------------------------------


def reference_terms(text: str) -> list[str]:
    """Tokenizer as documented in jobs.query_search: lower case, split on non-alphanumerics, stop words, S-stemmer."""
    terms = []
    for word in re.split(r"[^\w]+|_", text.lower()):
        if not word or word in STOPWORDS:
            continue
        if len(word) > 3 and word.endswith("ies") and not word.endswith(("eies", "aies")):
            word = word[:-3] + "y"
        elif len(word) > 3 and word.endswith("es") and not word.endswith(("aes", "ees", "oes")):
            word = word[:-1]
        elif len(word) > 3 and word.endswith("s") and not word.endswith(("us", "ss")):
            word = word[:-1]
        terms.append(word)
    return terms


def reference_bm25(docs: dict[tuple[str, int], list[str]], query: str, k1: float = 1.2, b: float = 0.75) -> dict:
    terms = set(reference_terms(query))
    tokens = {key: [t for text in texts for t in reference_terms(text)] for key, texts in docs.items()}
    n = len(tokens)
    avg = sum(len(v) for v in tokens.values()) / n
    df = {t: sum(1 for v in tokens.values() if t in v) for t in terms}
    scores = {}
    for key, toks in tokens.items():
        score = 0.0
        for t in terms:
            tf = toks.count(t)
            if tf:
                idf = math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5))
                score += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(toks) / avg))
        if score:
            scores[key] = score
    return scores


def latest_documents(index: IndexInfo, data) -> dict[tuple[str, int], list[str]]:
    """Object -> its captions, answers and label, for each video's latest ok run (a: RUN2, b: RUN1)."""
    docs: dict[tuple[str, int], list[str]] = {}
    for run, name in ((RUN2, "a"), (RUN1, "b")):
        vid = index.video_ids[name]
        for (oid, _clip), text in data.CAPTIONS[(run, name)].items():
            docs.setdefault((vid, oid), []).append(text)
        for ids, _, answer, _clip in data.QA[(run, name)]:
            for oid in ids:
                docs.setdefault((vid, oid), []).append(answer)
    for (vid, oid), texts in docs.items():  # an object's label is part of its document
        if data.LABELS.get(oid):
            texts.append(data.LABELS[oid])
    return docs


@pytest.mark.parametrize("words", ["red trucks", "blue ball", "Purple!", "green car parked"])
def test_text_search_matches_reference_bm25(index: IndexInfo, run_query, data, words: str) -> None:
    code, out, err = run_query(*index.cli(), "--text", words, "--format", "json")
    assert code == 0, err
    got = json.loads(out)
    want = reference_bm25(latest_documents(index, data), words)
    assert {(r["video_id"], r["object_id"]): r["score"] for r in got} == pytest.approx(want)
    assert [r["score"] for r in got] == sorted((r["score"] for r in got), reverse=True)
    assert all(r["run_id"] in (RUN1, RUN2) and r["match"] for r in got)


def test_text_search_ranking_and_edges(index: IndexInfo, run_query) -> None:
    with open_index(index.output, index.storage_options) as ix:
        top = ix.search("red truck", limit=1).to_pylist()
        assert [(r["video_id"], r["object_id"]) for r in top] == [(index.video_ids["a"], 1)]
        # The best-matching caption of the object, with where it is: clip 0, 0.0-0.8 s.
        assert top[0]["match"] == "a red truck with a red cabin moving right" and top[0]["match_kind"] == "caption"
        assert (top[0]["clip_index"], top[0]["ts_start"], top[0]["ts_end"], top[0]["label"]) == (0, 0.0, 0.8, "truck")
        whole = ix.search("edge").to_pylist()  # only in object 1's whole-track caption
        assert [(r["object_id"], r["clip_index"], r["ts_start"], r["ts_end"]) for r in whole] == [(1, None, 0.0, 1.8)]
        answer = ix.search("faster").to_pylist()  # an answer naming objects 1 and 2, asked about clip 1
        assert {(r["object_id"], r["match_kind"], r["clip_index"]) for r in answer} == {
            (1, "answer", 1), (2, "answer", 1)}
        assert ix.search("RED TRUCK").to_pylist() == ix.search("red truck").to_pylist()
        assert ix.search("small").num_rows == 0  # only in RUN1's caption of "a": superseded by RUN2
        assert ix.search("cabin").column("run_id").to_pylist() == [RUN2]
    code, out, err = run_query(*index.cli(), "--text", "zebra")
    assert code == 0 and out.strip().endswith("(0 rows)"), err
    code, _, err = run_query(*index.cli(), "--text", "the a ,")
    assert_clean_error(code, err, 2, "no searchable words")



def test_label_lists_objects_by_label_with_their_videos_and_spans(index: IndexInfo, run_query) -> None:
    code, out, err = run_query(*index.cli(), "--label", " Truck ", "--format", "json")
    assert code == 0, err
    rows = json.loads(out)
    # Object 1 of each video's latest ok run is the truck (a: RUN2, b: RUN1); c never indexed ok.
    assert sorted((r["video_id"], r["object_id"], r["run_id"]) for r in rows) == sorted(
        [(index.video_ids["a"], 1, RUN2), (index.video_ids["b"], 1, RUN1)])
    assert all(r["label"] == "truck" and r["first_ts"] <= r["last_ts"] and r["uri"] for r in rows)
    code, out, err = run_query(*index.cli(), "--label", "zebra")
    assert code == 0 and out.strip().endswith("(0 rows)"), err
    code, _, err = run_query(*index.cli(), "--label", "truck", "--text", "red")
    assert_clean_error(code, err, 2, "--label")
    code, _, err = run_query(*index.cli(), "--label", "  ")
    assert_clean_error(code, err, 2, "needs a label")
    code, out, err = run_query(*index.cli(), "--text", "ball", "--format", "json")  # labels are searched too
    assert code == 0 and {r["object_id"] for r in json.loads(out)} >= {2}, err
