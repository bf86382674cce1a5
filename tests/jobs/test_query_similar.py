"""`pixelrefer query OUTPUT --similar-to VIDEO_ID:OBJECT_ID` over a committed test index.

The shared index of tests/jobs has no appearance vectors (like an index made before them); a
private copy gets `tracklets` rows with made-up vectors, in which object 1 of "a" and object 2 of "b"
look alike, and object 2 of "b" is re-identified from two tracks. Real vectors come from the referrer
(tests/test_reid_e2e.py).
"""

from __future__ import annotations

import json
import numpy as np
import pytest

from index_builders import RUN1, RUN2, index_tables, video_id_for, write_index
from schemas.tables import to_table
from pipeline.store import TableStore

DIM = 8
RNG = np.random.default_rng(3)
LOOKS = {name: v / np.linalg.norm(v) for name, v in (("alike", RNG.normal(size=DIM)), ("a2", RNG.normal(size=DIM)),
                                                      ("a3", RNG.normal(size=DIM)), ("b1", RNG.normal(size=DIM)))}
# (video, object) -> its look; "a" is shown by RUN2 (its latest ok run), "b" by RUN1
WHO = {("a", 1): "alike", ("a", 2): "a2", ("a", 3): "a3", ("b", 1): "b1", ("b", 2): "alike"}


@pytest.fixture(scope="module")
def similar_index(tmp_path_factory, sample_videos) -> dict:
    folder = tmp_path_factory.mktemp("similar")
    uris = {"a": sample_videos["a"].path, "b": sample_videos["b"].path, "c": str(folder / "c.mp4")}
    runs = index_tables(uris, sample_videos)
    output = str(folder / "index")
    write_index(output, runs)
    rows = []
    for (name, obj), look in WHO.items():
        run = RUN2 if name == "a" else RUN1
        for clip in (0, 1):
            noise = 0.02 * np.random.default_rng(obj * 10 + clip).normal(size=DIM)
            vector = (LOOKS[look] + noise).astype(np.float32)
            merged = (name, obj, clip) == ("b", 2, 1)  # b's object 2 came back in clip 1 as track 5
            rows.append({"video_id": video_id_for(uris[name]), "clip_index": clip, "track_id": 5 if merged else obj,
                         "object_id": obj, "reid_score": 0.93 if merged else None, "first_ts": float(clip),
                         "last_ts": clip + 0.8, "num_frames": 5,
                         "model": "tiny-lite", "dim": DIM, "vector": (vector / np.linalg.norm(vector)).tolist(),
                         "run_id": run})
    store = TableStore(output)
    for run in (RUN1, RUN2):
        store.append("tracklets", to_table("tracklets", [r for r in rows if r["run_id"] == run]), commit=f"{run}/0")
    return {"output": output, "ids": {k: video_id_for(v) for k, v in uris.items()}}


def test_the_same_look_in_another_video_ranks_first(similar_index, run_query):
    ids = similar_index["ids"]
    code, out, err = run_query(similar_index["output"], "--similar-to", f"{ids['a']}:1", "--format", "json")
    assert code == 0, err
    rows = json.loads(out)
    assert (rows[0]["video_id"], rows[0]["object_id"]) == (ids["b"], 2) and rows[0]["similarity"] > 0.99
    assert rows[0]["label"] == "ball" and rows[0]["tracklets"] == 2
    assert [r["similarity"] for r in rows] == sorted((r["similarity"] for r in rows), reverse=True)
    assert (ids["a"], 1) not in {(r["video_id"], r["object_id"]) for r in rows}
    assert len(rows) == 4


def test_top_label_and_a_video_id_prefix_narrow_it(similar_index, run_query):
    ids = similar_index["ids"]
    code, out, _ = run_query(similar_index["output"], "--similar-to", f"{ids['a'][:10]}:1", "--top", "1",
                             "--label", "truck", "--format", "json")
    assert code == 0
    assert [(r["video_id"], r["object_id"]) for r in json.loads(out)] == [(ids["b"], 1)]


@pytest.mark.parametrize("ref, words", [("{a}:99", "has no object 99"), ("nope:1", "no indexed video"),
                                        ("{a}", "VIDEO_ID:OBJECT_ID"), ("{a}:x", "VIDEO_ID:OBJECT_ID")])
def test_an_unknown_object_or_a_bad_reference_exits_2_naming_it(similar_index, run_query, ref, words):
    code, _, err = run_query(similar_index["output"], "--similar-to", ref.format(a=similar_index["ids"]["a"]))
    assert code == 2 and words in err


def test_similar_to_is_a_search_of_its_own(similar_index, run_query):
    code, _, err = run_query(similar_index["output"], "--similar-to", "x:1", "--like", "ball")
    assert code == 2 and "--similar-to" in err


def test_an_index_without_vectors_says_how_to_add_them(local_index, run_query):
    code, _, err = run_query(local_index.output, "--similar-to", f"{local_index.video_ids['a']}:1")
    assert code == 1
    assert "no appearance vectors" in err and "pixelrefer index SOURCE NEW_OUTPUT" in err
    code, out, _ = run_query(local_index.output, "--sql", "SELECT count(*) AS n FROM tracklets", "--format", "json")
    assert code == 0 and json.loads(out) == [{"n": 0}]  # an index older than the table reads as empty


def test_video_and_report_show_a_merged_object_as_one_with_its_tracks(similar_index, run_query, tmp_path, capsys):
    ids = similar_index["ids"]
    code, out, _ = run_query(similar_index["output"], "--video", ids["b"], "--format", "json")
    assert code == 0
    objects = {o["object_id"]: o for o in json.loads(out)["objects"]}
    assert objects[2]["merged_from"] == "tracks 2 (clip 0) + 5 (clip 1, cosine 0.930)"
    assert [t["track_id"] for t in objects[2]["tracklets"]] == [2, 5] and objects[1]["merged_from"] is None
    code, out, _ = run_query(similar_index["output"], "--video", ids["b"])
    assert code == 0 and "tracks 2 (clip 0) + 5 (clip 1, cosine 0.930)" in out
    from jobs import report

    page = tmp_path / "b.html"
    assert report.main([similar_index["output"], "--video", ids["b"], "--out", str(page)]) == 0
    assert "tracks 2 (clip 0) + 5 (clip 1, cosine 0.930)" in page.read_text()


def test_the_threshold_bench_reports_same_and_different_identity_cosines(similar_index, tmp_path):
    """`bench.reid pairs`, the script that re-checks the threshold on real weights, on made-up vectors."""
    from bench.reid import pairs

    ids = similar_index["ids"]
    labels = tmp_path / "labels.csv"
    lines = ["video_id,clip_index,track_id,identity"]
    for (name, obj), look in WHO.items():
        for clip in (0, 1):
            track = 5 if (name, obj, clip) == ("b", 2, 1) else obj
            lines.append(f"{ids[name]},{clip},{track},{look}")
    labels.write_text("\n".join(lines) + "\n")
    result = pairs(similar_index["output"], str(labels))
    assert result["tracklets"] == 10 and result["identities"] == 4
    assert result["same_cosine"]["p1"] > 0.99 > result["different_cosine"]["p99"]
    by_threshold = {row["threshold"]: row for row in result["thresholds"]}
    assert by_threshold[0.95] == {"threshold": 0.95, "same_merged": 1.0, "different_merged": 0.0}


@pytest.fixture
def synced_copy(similar_index, tmp_path) -> dict:
    """A private copy of the index with its search folder synced (the appearance dataset included)."""
    import shutil

    from pipeline.search.appearance import sync_search

    output = str(tmp_path / "index")
    shutil.copytree(similar_index["output"], output)
    result = sync_search(output)
    assert result.then.rows == 10 and not result.then.ann
    return {"output": output, "ids": similar_index["ids"]}


def _ranked(run_query, output: str, *args: str) -> tuple[list[tuple], str]:
    code, out, err = run_query(output, *args, "--format", "json")
    assert code == 0, err
    return [(r["video_id"], r["object_id"], r["label"], r["best_clip"], r["tracklets"], round(r["similarity"], 5))
            for r in json.loads(out)], err


def _through_index(monkeypatch) -> list[int]:
    """Counts the queries answered by the appearance dataset (so a test knows which path ranked)."""
    from pipeline.search.appearance import AppearanceIndex

    calls: list[int] = []
    real = AppearanceIndex.nearest_objects

    def counted(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(AppearanceIndex, "nearest_objects", counted)
    return calls


def test_the_search_index_ranks_as_the_exact_statement(synced_copy, run_query, monkeypatch):
    ids, output = synced_copy["ids"], synced_copy["output"]
    calls = _through_index(monkeypatch)
    for ref, extra in ((f"{ids['a']}:1", ()), (f"{ids['a']}:2", ("--top", "2")), (f"{ids['b']}:2", ()),
                       (f"{ids['a']}:1", ("--label", "truck"))):
        indexed, err = _ranked(run_query, output, "--similar-to", ref, *extra)
        assert "note" not in err
        exact, _ = _ranked(run_query, output, "--similar-to", ref, *extra, "--exact")
        assert indexed == exact and indexed
    assert len(calls) == 4
    assert _ranked(run_query, output, "--similar-to", f"{ids['a']}:1")[0][0][:2] == (ids["b"], 2)


def test_a_stale_index_falls_back_to_the_exact_ranking_until_synced(synced_copy, run_query, monkeypatch):
    from pipeline.search.appearance import sync_search

    ids, output = synced_copy["ids"], synced_copy["output"]
    exact, _ = _ranked(run_query, output, "--similar-to", f"{ids['a']}:1", "--exact")
    store = TableStore(output)
    row = store.read("runs").to_pylist()[0]
    store.append("runs", to_table("runs", [{**row, "commit_index": 9}]), commit=f"{row['run_id']}/9")
    calls = _through_index(monkeypatch)
    stale, err = _ranked(run_query, output, "--similar-to", f"{ids['a']}:1")
    assert stale == exact and not calls
    assert "behind the tables by 1 commit" in err and "pixelrefer embed" in err
    assert not sync_search(output).then.up_to_date
    again, err = _ranked(run_query, output, "--similar-to", f"{ids['a']}:1")
    assert again == exact and calls and "note" not in err


def test_a_rebuild_or_a_lost_state_leaves_it_usable(synced_copy, run_query, monkeypatch):
    from pathlib import Path

    from pipeline.search.appearance import STATE, sync_search

    ids, output = synced_copy["ids"], synced_copy["output"]
    exact, _ = _ranked(run_query, output, "--similar-to", f"{ids['b']}:2", "--exact")
    assert sync_search(output, rebuild=True).then.rows == 10
    (Path(output) / "_search" / STATE).unlink()
    assert sync_search(output).then.rows == 10  # no state: rebuilt, not appended twice
    calls = _through_index(monkeypatch)
    assert _ranked(run_query, output, "--similar-to", f"{ids['b']}:2")[0] == exact and calls
