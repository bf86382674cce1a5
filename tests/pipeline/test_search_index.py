"""The search index (`pipeline.search.index`): a Lance copy of each video's latest passages.

The OUTPUTs are written here as an index run writes them: one `RunWriter` commit per (run,
commit) into the Delta tables, `runs` last, so a sync reads each commit's vectors from the
`embeddings` change feed at the version its `runs` row names. The 8-d vectors are chosen so that
the nearest passage of a query is known.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.search import index as search_index
from pipeline.search.index import SearchIndexUnsupported, SearchLocation, committed, lance_s3_options, sync
from pipeline.search.reader import SearchIndex
from pipeline.store import TableStore
from pipeline.store.commit import RunWriter

DIM = 8
T0 = dt.datetime(2024, 6, 1, tzinfo=dt.timezone.utc)


def unit(seed: int) -> list[float]:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return (v / np.linalg.norm(v)).tolist()


def embedding(video: str, object_id: int, text: str, seed: int, run: str, text_run: str | None = None) -> dict[str, Any]:
    return {"run_id": run, "video_id": video, "kind": "caption", "object_id": object_id, "object_ids": None,
            "clip_index": 0, "ts_start": 0.0, "ts_end": 5.0, "text": text, "embedder": "test-8", "dim": DIM,
            "vector": unit(seed), "text_run_id": text_run or run}


def run_row(run: str, videos: int, commit_index: int, when: dt.datetime) -> dict[str, Any]:
    return {"run_id": run, "commit_index": commit_index, "command": "index", "source": "/videos", "model": "m",
            "tracker": "t", "mode": "lite", "started_at": when, "ended_at": when, "status": "committed",
            "videos_listed": videos, "videos_ok": videos, "retry_video_ids": []}


def commit(root: str, run: str, videos: dict[str, str], passages: list[tuple[str, int, str, int]],
           *, when: dt.datetime = T0, commit_index: int = 0, options: dict[str, Any] | None = None,
           objects: list[tuple[str, int, str]] = ()) -> None:
    """One commit of `run`: `videos` {video: status}, `passages` [(video, object, text, seed)]
    (captions; the object's label is its text's first word, upper-cased to show normalisation),
    `objects` more [(video, object, label)] without passages."""
    writer = RunWriter(TableStore(root, options), run, commit_index)
    writer.add("videos", [{
        "run_id": run, "video_id": v, "uri": f"/videos/{v}.mp4", "size_bytes": 1, "etag": v, "duration_s": 10.0,
        "fps": 25.0, "width": 64, "height": 48, "num_frames": 250, "sampled_ts": [], "sampled_fps": 1.0, "clips": 1,
        "status": status, "error": None if status == "ok" else "boom", "model": "m", "tracker": "t",
    } for v, status in videos.items()])
    labels = {(v, o): f" {text.split()[0].upper()} " for v, o, text, _ in passages}
    labels.update({(v, o): label for v, o, label in objects})
    writer.add("objects", [{"run_id": run, "video_id": v, "object_id": o, "source": "auto", "label": label,
                            "first_ts": 0.0, "last_ts": 5.0, "num_frames": 2} for (v, o), label in labels.items()])
    writer.add("embeddings", [embedding(v, o, text, seed, run) for v, o, text, seed in passages])
    writer.add("runs", [run_row(run, len(videos), commit_index, when)])
    writer.commit(when)


def held(output: str, options: dict[str, Any] | None = None) -> list[tuple[str, str, str]]:
    search, why = SearchIndex.open(output, options or {}, committed(output, options or {}))
    assert search is not None, why
    rows = search.dataset.to_table(columns=["video_id", "text_run_id", "text"]).to_pylist()
    return sorted((r["video_id"], r["text_run_id"], r["text"]) for r in rows)


@pytest.fixture
def output(tmp_path: Path) -> tuple[Any, str]:
    import fsspec

    root = tmp_path / "index"
    fs = fsspec.filesystem("file")
    commit(str(root), "run-1", {"a": "ok", "b": "ok"}, [
        ("a", 1, "man carrying a ladder", 1), ("a", 2, "dog chasing ladders", 2), ("b", 1, "cat on a sofa", 3)])
    return fs, str(root)


def test_sync_copies_the_latest_passages_with_their_labels(output: tuple[Any, str]) -> None:
    fs, root = output
    result = sync(root)
    assert (result.rows, result.added, result.removed, result.ann, result.up_to_date) == (3, 3, 0, False, False)
    assert held(root) == [("a", "run-1", "dog chasing ladders"), ("a", "run-1", "man carrying a ladder"),
                          ("b", "run-1", "cat on a sofa")]
    search, _ = SearchIndex.open(root, {}, committed(root))
    rows = search.dataset.to_table(columns=["video_id", "object_ids", "labels"]).to_pylist()
    assert sorted((r["video_id"], r["object_ids"], r["labels"]) for r in rows) == [
        ("a", [1], ["man"]), ("a", [2], ["dog"]), ("b", [1], ["cat"])]
    again = sync(root)
    assert again.up_to_date and again.rows == 3
    assert fs.exists(f"{root}/_search/state.json")


def test_nearest_and_bm25_rank_and_filter_inside_the_index(output: tuple[Any, str]) -> None:
    _, root = output
    sync(root)
    search, _ = SearchIndex.open(root, {}, committed(root))
    near = search.nearest(unit(2), 3).to_pylist()
    assert [r["text"] for r in near][0] == "dog chasing ladders" and near[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert [r["similarity"] for r in near] == sorted((r["similarity"] for r in near), reverse=True)
    # below the ANN threshold too, `similarity` is the cosine (Lance's flat search defaults to L2)
    stored = {r["text"]: np.asarray(r["vector"]) for r in search.dataset.to_table(columns=["text", "vector"]).to_pylist()}
    for r in near:
        v = stored[r["text"]]
        assert r["similarity"] == pytest.approx(float(v @ unit(2) / np.linalg.norm(v)), abs=1e-5)
    assert [r["text"] for r in search.nearest(unit(2), 3, SearchIndex.where("b")).to_pylist()] == ["cat on a sofa"]
    assert [r["text"] for r in search.nearest(unit(2), 3, SearchIndex.where(label=" Man ")).to_pylist()] == ["man carrying a ladder"]
    words = search.bm25("the LADDER", 10).to_pylist()  # stop word dropped, case folded, plural stemmed
    assert sorted(r["text"] for r in words) == ["dog chasing ladders", "man carrying a ladder"]
    assert all(r["score"] > 0 for r in words)
    assert search.bm25("ladder", 10, SearchIndex.where(label="dog")).column("text").to_pylist() == ["dog chasing ladders"]
    assert search.bm25("the of", 10).num_rows == 0


def test_a_reindexed_video_replaces_its_passages_and_a_failed_one_keeps_them(output: tuple[Any, str]) -> None:
    fs, root = output
    sync(root)
    commit(root, "run-2", {"a": "ok", "b": "failed"}, [("a", 1, "woman on a bicycle", 4)],
           when=T0 + dt.timedelta(days=1))
    result = sync(root)
    assert (result.added, result.removed, result.rows) == (1, 2, 2)
    assert held(root) == [("a", "run-2", "woman on a bicycle"), ("b", "run-1", "cat on a sofa")]


def test_a_new_commit_of_a_run_replaces_that_run_without_duplicates(output: tuple[Any, str]) -> None:
    fs, root = output
    sync(root)
    commit(root, "run-1", {"c": "ok"}, [("c", 1, "bus at the station", 5)], commit_index=1)
    assert sync(root).rows == 4
    assert [t for _, _, t in held(root)].count("man carrying a ladder") == 1
    assert ("c", "run-1", "bus at the station") in held(root)


def test_a_stale_index_is_not_opened_and_says_why(output: tuple[Any, str]) -> None:
    fs, root = output
    search, why = SearchIndex.open(root, {}, committed(root))
    assert search is None and why == "OUTPUT has no search index"
    sync(root)
    commit(root, "run-2", {"a": "ok"}, [("a", 1, "woman on a bicycle", 4)], when=T0 + dt.timedelta(days=1))
    search, why = SearchIndex.open(root, {}, committed(root))
    assert search is None and why == "the search index is behind the tables by 1 commit(s)"
    sync(root)
    assert SearchIndex.open(root, {}, committed(root))[0] is not None


def test_rebuild_and_a_lost_dataset_start_again(output: tuple[Any, str]) -> None:
    fs, root = output
    sync(root)
    fs.rm(f"{root}/_search/passages.lance", recursive=True)
    assert sync(root).added == 3  # the state outlived its dataset
    assert sync(root, rebuild=True).added == 3 and held(root)[0][0] == "a"
    state = json.loads(fs.cat_file(f"{root}/_search/state.json"))
    fs.pipe_file(f"{root}/_search/state.json", json.dumps({**state, "layout": 0}).encode())  # an older layout
    assert SearchIndex.open(root, {}, committed(root)) == (None, "OUTPUT has no search index")
    assert sync(root).added == 3


def test_the_ann_index_is_built_at_its_threshold_and_finds_the_nearest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """8-d vectors quantize to one PQ byte each, so the queries ask for 50 candidates (200 re-ranked
    exactly) where 5 would leave the outcome to how Lance's k-means sampled them."""
    import fsspec

    monkeypatch.setattr(search_index, "ANN_MIN_ROWS", 600)
    monkeypatch.setattr(search_index, "ROWS_PER_PARTITION", 100)
    fs, root = fsspec.filesystem("file"), str(tmp_path / "index")
    first = [(f"v{i % 10}", i, f"thing number {i}", i) for i in range(300)]
    commit(root, "run-1", {f"v{i}": "ok" for i in range(10)}, first)
    assert sync(root).ann is False
    second = [(f"w{i % 10}", i, f"other thing {i}", 1000 + i) for i in range(400)]
    commit(root, "run-2", {f"w{i}": "ok" for i in range(10)}, second)
    result = sync(root)
    assert result.ann and result.rows == 700
    search, _ = SearchIndex.open(root, {}, committed(root))
    assert {i.field_names[0] for i in search.dataset.describe_indices()} == {"text", "vector", "video_id", "labels"}
    assert search.nearest(unit(7), 50, SearchIndex.where("v7", "Thing")).column("text").to_pylist()[0] == "thing number 7"
    assert set(search.nearest(unit(7), 50, SearchIndex.where("w3")).column("video_id").to_pylist()) == {"w3"}
    for seed, text in ((7, "thing number 7"), (1234, "other thing 234")):
        top = search.nearest(unit(seed), 50).to_pylist()[0]  # refined on the exact vectors
        assert top["text"] == text and top["similarity"] == pytest.approx(1.0, abs=1e-5)
    commit(root, "run-3", {"z": "ok"}, [("z", 1, "late arrival", 99_999)], when=T0 + dt.timedelta(days=1))
    assert sync(root).rows == 701  # appended rows are searched before and after the index takes them in
    search, _ = SearchIndex.open(root, {}, committed(root))
    assert search.nearest(unit(99_999), 50).column("text").to_pylist()[0] == "late arrival"
    state = lambda: json.loads(fs.cat_file(f"{root}/_search/state.json"))  # noqa: E731
    assert state()["ann_rows"] == 700  # the new row joined the trained lists
    monkeypatch.setattr(search_index, "ANN_RETRAIN_GROWTH", 2)
    grown = [(f"x{i % 10}", i, f"grown thing {i}", 5000 + i) for i in range(700)]
    commit(root, "run-4", {f"x{i}": "ok" for i in range(10)}, grown, when=T0 + dt.timedelta(days=2))
    assert sync(root).rows == 1401 and state()["ann_rows"] == 1401  # twice as many: the lists are trained again
    search, _ = SearchIndex.open(root, {}, committed(root))
    assert search.nearest(unit(5123), 50).column("text").to_pylist()[0] == "grown thing 123"


def test_s3_options_are_translated_and_the_index_lives_in_the_bucket(s3_bucket: tuple[str, dict[str, Any]]) -> None:
    import fsspec

    bucket, options = s3_bucket
    assert lance_s3_options(options) == {
        "aws_access_key_id": "testing", "aws_secret_access_key": "testing", "aws_endpoint": options["endpoint_url"],
        "allow_http": "true", "aws_region": "us-east-1"}
    output = f"s3://{bucket}/index"
    fs = fsspec.filesystem("s3", **options)
    commit(output, "run-1", {"a": "ok"}, [("a", 1, "man carrying a ladder", 1)], options=options)
    assert sync(output, options).rows == 1
    assert held(output, options) == [("a", "run-1", "man carrying a ladder")]
    assert fs.exists(f"{bucket}/index/_search/state.json")
    assert SearchLocation.of(output, options).uri == f"s3://{bucket}/index/_search/passages.lance"


def test_stores_and_options_it_cannot_use_are_named() -> None:
    with pytest.raises(SearchIndexUnsupported, match="memory://"):
        SearchLocation.of("memory://index")
    assert SearchIndex.open("memory://index", {}, []) == (None, None)  # nothing to tell: --like ranks exactly
    with pytest.raises(SearchIndexUnsupported, match="'profile'"):
        lance_s3_options({"profile": "dev"})


def test_a_backfill_committed_later_gets_the_labels_of_the_run_it_embedded(output: tuple[Any, str]) -> None:
    """`pixelrefer embed` commits vectors under its own run id for text of an earlier run: the
    passages must take that earlier run's labels."""
    fs, root = output
    commit(root, "run-2", {"d": "ok"}, [], when=T0 + dt.timedelta(days=1), objects=[("d", 7, "Heron")])
    sync(root)
    writer = RunWriter(TableStore(root), "embed-1")  # what `pixelrefer embed` commits: vectors and a runs row
    writer.add("embeddings", [embedding("d", 7, "a grey bird wading", 9, "embed-1", text_run="run-2")])
    writer.add("runs", [run_row("embed-1", 0, 0, T0 + dt.timedelta(days=2))])
    writer.commit()
    assert sync(root).added == 1
    search, _ = SearchIndex.open(root, {}, committed(root))
    assert search.nearest(unit(9), 1, SearchIndex.where(label="heron")).column("text").to_pylist() == ["a grey bird wading"]


def test_lance_failures_become_one_error_naming_output(output: tuple[Any, str], monkeypatch: pytest.MonkeyPatch) -> None:
    import lance

    _, root = output

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError("LanceError(IO): permission denied")

    monkeypatch.setattr(lance, "write_dataset", refuse)
    with pytest.raises(search_index.SearchIndexError, match=r"search index of OUTPUT '.*index' could not be updated "
                                                            r"\(OSError: .*permission denied\); the tables are unaffected"):
        sync(root)
    assert search_index.read_state(root) is None  # nothing recorded as synced


def test_a_sync_stopped_before_its_state_was_written_adds_nothing_twice(output: tuple[Any, str]) -> None:
    fs, root = output
    sync(root)
    commit(root, "run-1", {"c": "ok"}, [("c", 1, "bus at the station", 5)], commit_index=1)
    state_path = f"{root}/_search/state.json"
    before = fs.cat_file(state_path)
    sync(root)
    fs.pipe_file(state_path, before)  # as if it stopped after Lance committed, before the state
    assert json.loads(fs.cat_file(state_path))["commits"] == ["run-1/0"]
    result = sync(root)
    assert (result.added, result.removed, result.rows) == (1, 1, 4)
    assert [t for _, _, t in held(root)].count("bus at the station") == 1


def test_a_removed_source_leaves_the_index(output: tuple[Any, str]) -> None:
    """`nightly` records a deleted source as a `removed` videos row with no passages: its passages
    must go, though no new vector names it, while the other videos' stay."""
    _, root = output
    sync(root)
    commit(root, "nightly-1", {"b": "removed"}, [], when=T0 + dt.timedelta(days=1))
    result = sync(root)
    assert (result.added, result.removed, result.rows) == (0, 1, 2)
    assert held(root) == [("a", "run-1", "dog chasing ladders"), ("a", "run-1", "man carrying a ladder")]
    assert sync(root, rebuild=True).rows == 2  # a rebuild agrees: a removed source has no latest ok run


def test_a_state_that_is_not_json_is_rebuilt(output: tuple[Any, str]) -> None:
    """A torn or foreign state file says nothing about what was synced: start again from the tables."""
    fs, root = output
    sync(root)
    fs.pipe_file(f"{root}/_search/state.json", b'{"layout": 1, "commits": ["run-1/')
    assert search_index.read_state(root) is None
    result = sync(root)
    assert (result.added, result.rows, result.up_to_date) == (3, 3, False)
    assert json.loads(fs.cat_file(f"{root}/_search/state.json"))["commits"] == ["run-1/0"]


def test_a_state_the_store_cannot_read_is_an_error_and_the_index_is_kept(
        output: tuple[Any, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """An I/O failure is not "no state": rebuilding on it would throw away a good index because of
    one bad request. The sync must fail, and the next one find the index as it was."""
    fs, root = output
    sync(root)
    dataset = f"{root}/_search/passages.lance"
    version = search_index._lance().dataset(dataset).version
    real = type(fs).cat_file

    def failing(self: Any, path: str, *args: Any, **kwargs: Any) -> bytes:
        if str(path).endswith("state.json"):
            raise OSError(5, "Input/output error")
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(type(fs), "cat_file", failing)
    with pytest.raises(search_index.SearchIndexError, match=r"state of OUTPUT '.*index' could not be read "
                                                            r"\(OSError: .*Input/output error\); the index is kept"):
        sync(root)
    monkeypatch.undo()
    assert fs.exists(dataset) and search_index._lance().dataset(dataset).version == version
    assert sync(root).up_to_date
