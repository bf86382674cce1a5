"""One row per source, removed sources, `--model`, `--as-of`, and readers outside the project.

The index is written through the real commit path (`RunWriter`), and the removal is recorded by a
real `nightly` (`run_index`) whose listing no longer holds a file; no video work is needed for
that, so no Ray."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pyarrow as pa
import pytest

from jobs.cli import main
from jobs.query_sql import open_index
from pipeline.config import IndexConfig
from pipeline.run import run_index
from pipeline.samples import DEFAULT_SHAPES, make_video
from pipeline.search.index import committed, sync
from pipeline.search.reader import SearchIndex
from pipeline.sources import list_videos
from pipeline.store import TableStore
from pipeline.store.commit import RunWriter

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def _commit(out: str, run_id: str, model: str, videos: list[tuple[str, str, str]], when: dt.datetime,
            tracker: str = "tiny-sam2") -> int:
    """Commit `videos` ((video_id, uri, status)) with one labelled object and caption each; returns
    the `runs` table version this commit made."""
    store = TableStore(out)
    writer = RunWriter(store, run_id)
    for vid, uri, status in videos:
        if status == "ok":
            writer.add("objects", [{"video_id": vid, "object_id": 1, "source": "auto", "label": "cat",
                                    "first_ts": 0.0, "last_ts": 1.0, "num_frames": 2, "run_id": run_id}])
            writer.add("captions", [{"video_id": vid, "object_id": 1, "clip_index": 0, "ts_start": 0.0,
                                     "ts_end": 1.0, "caption": f"a cat in {uri}", "mode": "lite", "model": model,
                                     "num_tokens": 4, "run_id": run_id}])
            writer.add("embeddings", [{"video_id": vid, "kind": "caption", "object_id": 1, "object_ids": None,
                                       "clip_index": 0, "ts_start": 0.0, "ts_end": 1.0, "text": f"a cat in {uri}",
                                       "embedder": "e", "dim": 2, "vector": [1.0, 0.0], "text_run_id": run_id,
                                       "run_id": run_id}])
        writer.add("videos", [{"video_id": vid, "uri": uri, "size_bytes": 1, "etag": None, "duration_s": 1.0,
                               "fps": 2.0, "width": 2, "height": 2, "num_frames": 2, "sampled_ts": [0.0, 0.5],
                               "sampled_fps": 2.0, "clips": 1, "status": status, "error": None, "model": model,
                               "tracker": tracker, "run_id": run_id, "indexed_at": when, "commit_index": 0}])
    writer.add("runs", [{"run_id": run_id, "commit_index": 0, "command": "index", "source": "/v", "model": model,
                         "tracker": tracker, "mode": "lite", "started_at": when, "ended_at": when,
                         "status": "committed", "videos_listed": len(videos), "videos_skipped": 0,
                         "videos_ok": len(videos), "videos_failed": 0, "videos_quarantined": 0, "clips": 1,
                         "video_seconds": 1.0, "objects": 1, "captions": 1, "answers": 0, "retry_video_ids": [],
                         "embeddings_version": None}])
    writer.commit(when=when)
    return store.version("runs")


def _latest(out: str, **kwargs) -> list[tuple[str, str]]:
    with open_index(out, **kwargs) as ix:
        rows = ix.sql("SELECT video_id, run_id FROM latest_videos ORDER BY uri").to_pylist()
    return [(r["video_id"], r["run_id"]) for r in rows]


@pytest.fixture
def history(tmp_path: Path) -> dict:
    """a.mp4 and b.mp4 indexed; a.mp4 then replaced (new content) and indexed again; b.mp4 deleted
    and recorded as removed by a real nightly; then a trial run of a.mp4 with another model."""
    source, out = tmp_path / "v", str(tmp_path / "out")
    for name, seed in (("a", 0), ("b", 1)):
        make_video(source / f"{name}.mp4", shapes=DEFAULT_SHAPES[:1], duration_s=0.5, seed=seed)
    first = {Path(v.uri).stem: v for v in list_videos(str(source))}
    v1 = _commit(out, "r1", "tiny-lite", [(first[n].video_id, first[n].uri, "ok") for n in ("a", "b")], T0)
    make_video(source / "a.mp4", shapes=DEFAULT_SHAPES[:1], duration_s=0.8, seed=5)  # replaced in place
    (source / "b.mp4").unlink()
    (a2,) = list_videos(str(source))
    assert a2.video_id != first["a"].video_id
    _commit(out, "r2", "tiny-lite", [(a2.video_id, a2.uri, "ok")], T0 + dt.timedelta(days=1))
    lines: list[str] = []
    summary = run_index(IndexConfig(source=str(source), output=out, command="nightly"), progress=lines.append)
    assert summary.videos_skipped == 1 and any("recorded as removed" in line for line in lines)
    _commit(out, "trial", "other-model", [(a2.video_id, a2.uri, "ok")], T0 + dt.timedelta(days=3))
    return {"out": out, "first": first, "a2": a2, "v1": v1}


def test_one_row_per_source_replaced_and_removed(history: dict) -> None:
    out, first, a2 = history["out"], history["first"], history["a2"]
    assert _latest(out) == [(a2.video_id, "trial")]  # b is removed, a's old content is replaced
    assert _latest(out, model="tiny-lite") == [(a2.video_id, "r2")]  # the trial never hides production
    with open_index(out) as ix:
        removed = ix.sql("SELECT video_id, status FROM videos WHERE status = 'removed'").to_pylist()
        assert removed == [{"video_id": first["b"].video_id, "status": "removed"}]
        labelled = ix.labelled("cat").column("video_id").to_pylist()
        assert set(labelled) == {a2.video_id}


def test_as_of_reads_the_index_as_it_was(history: dict, capsys) -> None:
    out, first = history["out"], history["first"]
    assert _latest(out, as_of=history["v1"]) == [(first["a"].video_id, "r1"), (first["b"].video_id, "r1")]
    assert _latest(out, as_of=T0 - dt.timedelta(days=1) + dt.timedelta(days=400)) == _latest(out)
    assert main(["query", out, "--format", "json"]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert [r["run_id"] for r in runs][:2] == ["r1", "r2"] and all(r["version"] is not None for r in runs)
    assert main(["query", out, "--as-of", str(history["v1"]), "--sql", "SELECT count(*) AS n FROM videos",
                 "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"n": 2}]
    with pytest.raises(SystemExit) as usage:
        main(["query", out, "--as-of", "yesterday"])
    assert usage.value.code == 2 and "neither a version number nor an ISO time" in capsys.readouterr().err


def test_the_search_index_drops_replaced_and_removed_sources(history: dict) -> None:
    out, a2 = history["out"], history["a2"]
    sync(out)
    search, why = SearchIndex.open(out, {}, committed(out))
    assert search is not None, why
    passages = search.dataset.to_table(columns=["video_id", "text_run_id"]).to_pylist()
    assert passages == [{"video_id": a2.video_id, "text_run_id": "trial"}]


def test_every_table_reads_the_same_with_deltalake_alone(history: dict, capsys) -> None:
    """No project code on the reading side: what Polars, Spark or DuckDB's delta reader get."""
    from deltalake import DeltaTable

    out = history["out"]
    for table in ("videos", "objects", "captions", "embeddings", "runs"):
        alone = pa.table(DeltaTable(f"{out}/{table}").to_pyarrow_table())
        assert main(["query", out, "--sql", f"SELECT * FROM {table}", "--format", "json"]) == 0
        shown = json.loads(capsys.readouterr().out)
        key = "run_id"
        assert sorted(r[key] for r in shown) == sorted(alone.column(key).to_pylist()), table
