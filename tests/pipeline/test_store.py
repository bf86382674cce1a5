"""`pipeline.store`: the run commit over Delta tables, what a reader may see of it, the store's
refusals, and claims between overlapping runs.

These replace the tests of the hand-written Parquet layout (`pipeline.sink`): its staging folder,
commit marker, publish and `recover` roll-forward are gone, because each Delta append is atomic
and the `runs` row is the commit point (`pipeline.store.commit`). What stays is the guarantee
they served: a reader sees all of a commit or none of it, and a bad batch or a bad OUTPUT fails
before anything is appended.
"""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from pipeline.store import OutputError, TableStore
from pipeline.store.claims import Claims
from pipeline.store.commit import (PUBLISH_ORDER, RunWriter, indexed_video_ids, retry_counts, visible_rows,
                                   visible_videos)
from pipeline.store.tables import SCHEMA_PROPERTY, LegacyLayout, TableError
from schemas.tables import SCHEMA_VERSION, TABLES, SchemaError, to_table

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def video_row(video_id: str, run_id: str, status: str = "ok", model: str = "tiny-lite") -> dict:
    return {
        "video_id": video_id, "uri": f"/v/{video_id}.mp4", "size_bytes": 10, "etag": None, "duration_s": 1.0,
        "fps": 10.0, "width": 16, "height": 8, "num_frames": 10, "sampled_ts": [0.0, 0.5], "status": status,
        "error": None if status == "ok" else "broken", "model": model, "tracker": "tiny-sam2", "run_id": run_id,
    }


def caption_row(video_id: str, run_id: str, object_id: int = 0) -> dict:
    return {"video_id": video_id, "object_id": object_id, "ts_start": 0.0, "ts_end": 0.5, "caption": "a box",
            "mode": "lite", "model": "tiny-lite", "num_tokens": 2, "run_id": run_id}


def embedding_row(video_id: str, run_id: str, text_run_id: str) -> dict:
    return {"video_id": video_id, "kind": "caption", "object_id": 0, "object_ids": None, "clip_index": 0,
            "ts_start": 0.0, "ts_end": 0.5, "text": "a box", "embedder": "e", "dim": 2, "vector": [1.0, 0.0],
            "text_run_id": text_run_id, "run_id": run_id}


def run_row(run_id: str, commit_index: int = 0, retry: list[str] | None = None, model: str = "tiny-lite") -> dict:
    return {"run_id": run_id, "commit_index": commit_index, "command": "index", "model": model,
            "tracker": "tiny-sam2", "status": "committed", "retry_video_ids": retry or []}


def commit(store: TableStore, run_id: str, videos: list[dict], *, commit_index: int = 0, runs: bool = True,
           retry: list[str] | None = None) -> RunWriter:
    """One commit of `videos` with a caption each; `runs=False` stops before the commit point."""
    writer = RunWriter(store, run_id, commit_index)
    writer.add("captions", [caption_row(v["video_id"], run_id) for v in videos])
    writer.add("videos", videos)
    if runs:
        writer.add("runs", [run_row(run_id, commit_index, retry)])
    writer.commit(T0)
    return writer


def ids(table: pa.Table) -> list[tuple[str, str]]:
    return sorted(zip(table.column("video_id").to_pylist(), table.column("run_id").to_pylist()))


class RecordingStore(TableStore):
    """Records each append and what a reader sees at that moment; can fail the append of one table
    (as a run killed, or a store refusing, at that step)."""

    def __init__(self, output: str, fail_on: str | None = None) -> None:
        super().__init__(output)
        self.fail_on = fail_on
        self.appended: list[tuple[str, int]] = []

    def append(self, table: str, data: pa.Table, commit: str | None = None) -> int:
        self.appended.append((table, visible_videos(self, ["video_id"]).num_rows))
        if table == self.fail_on:
            raise OutputError(f"refused: {table}")
        return super().append(table, data, commit)


# ------------------------------------------------------------------------------------------------
# The commit: order, validation, visibility
# ------------------------------------------------------------------------------------------------


def test_commit_appends_children_then_videos_then_runs_and_nothing_is_visible_before_runs(tmp_path: Path) -> None:
    """`runs` is the commit point: it must be appended last, and until it is, no video shows."""
    store = RecordingStore(str(tmp_path))
    writer = RunWriter(store, "r1")
    writer.add("runs", [run_row("r1")])  # added first on purpose: the order is the writer's, not the caller's
    writer.add("videos", [video_row("a", "r1"), video_row("b", "r1")])
    writer.add("embeddings", [embedding_row("a", "r1", "r1")])
    writer.add("captions", [caption_row("a", "r1")])
    writer.add("objects", [{"video_id": "a", "object_id": 0, "source": "auto", "run_id": "r1"}])
    rows = writer.commit(T0)
    assert [t for t, _ in store.appended] == ["objects", "captions", "embeddings", "videos", "runs"]
    assert [t for t, _ in store.appended] == [t for t in PUBLISH_ORDER if t in {t for t, _ in store.appended}]
    assert [seen for _, seen in store.appended] == [0, 0, 0, 0, 0]  # visible only after the last append
    assert rows["videos"] == 2 and rows["captions"] == 1 and rows["runs"] == 1
    assert ids(visible_videos(store)) == [("a", "r1"), ("b", "r1")]
    assert visible_rows(store, "captions").num_rows == 1
    videos = visible_videos(store, ["commit_index", "indexed_at"]).to_pylist()
    assert {(v["commit_index"], v["indexed_at"]) for v in videos} == {(0, T0)}  # set by the writer
    (run,) = store.read("runs").to_pylist()
    assert run["embeddings_version"] == store.version("embeddings")  # what the search index reads from


def test_a_commit_killed_before_runs_leaves_its_rows_invisible_and_a_rerun_shows_them(tmp_path: Path) -> None:
    """The rows of a commit that never reached `runs` are on disk but no reader counts them, so the
    videos are indexed afresh by the next run (and `indexed_video_ids` does not skip them)."""
    store = RecordingStore(str(tmp_path), fail_on="runs")
    with pytest.raises(OutputError, match="refused: runs"):
        commit(store, "r1", [video_row("a", "r1")])
    assert store.read("videos").num_rows == 1 and store.read("captions").num_rows == 1  # appended...
    assert visible_videos(store).num_rows == 0 and visible_rows(store, "captions").num_rows == 0  # ...not seen
    assert indexed_video_ids(store, "tiny-lite", "tiny-sam2") == set()

    store.fail_on = None
    commit(store, "r2", [video_row("a", "r2")])
    assert ids(visible_videos(store)) == [("a", "r2")]
    assert ids(visible_rows(store, "captions")) == [("a", "r2")]


def test_an_invalid_batch_fails_before_anything_is_appended(tmp_path: Path) -> None:
    store = RecordingStore(str(tmp_path))
    writer = RunWriter(store, "r1")
    writer.add("captions", [caption_row("a", "r1")])  # a good batch, buffered
    with pytest.raises(SchemaError, match="status"):
        writer.add("videos", [video_row("a", "r1", status="maybe")])
    with pytest.raises(SchemaError, match="unexpected columns"):
        writer.add("videos", [{**video_row("a", "r1"), "extra": 1}])
    with pytest.raises(SchemaError, match="has nulls"):
        writer.add("videos", [{**video_row("a", "r1"), "uri": None}])
    writer.abort()
    assert writer.commit(T0) == {t: 0 for t in TABLES}
    assert store.appended == [] and not any(store.exists(t) for t in TABLES)


def test_only_commits_with_a_runs_row_are_visible(tmp_path: Path) -> None:
    """Per commit, not per run: a long run's commit 0 stays visible when its commit 1 was killed.
    Embeddings need both their text's video visible and their own run committed (a backfill)."""
    store = TableStore(str(tmp_path))
    commit(store, "long", [video_row("a", "long")], commit_index=0)
    commit(store, "long", [video_row("b", "long")], commit_index=1, runs=False)
    assert ids(visible_videos(store)) == [("a", "long")]
    assert ids(visible_rows(store, "captions")) == [("a", "long")]
    assert store.read("videos").num_rows == 2

    backfill = RunWriter(store, "embed-1")
    backfill.add("embeddings", [embedding_row("a", "embed-1", "long"), embedding_row("b", "embed-1", "long")])
    backfill.commit(T0)  # no runs row: not committed
    assert visible_rows(store, "embeddings").num_rows == 0
    done = RunWriter(store, "embed-1", 1)
    done.add("runs", [run_row("embed-1", 1)])
    done.commit(T0)
    shown = visible_rows(store, "embeddings", ["video_id", "text_run_id"]).to_pylist()
    assert shown == [{"video_id": "a", "text_run_id": "long"}]  # b's text is of the killed commit


def test_indexed_video_ids_and_retry_counts_count_committed_rows_only(tmp_path: Path) -> None:
    store = TableStore(str(tmp_path))
    assert indexed_video_ids(store, "tiny-lite", "tiny-sam2") == set()  # no tables yet
    commit(store, "r1", [video_row("a", "r1"), video_row("b", "r1", status="failed"),
                         video_row("c", "r1", model="other")], retry=["x", "y"])
    commit(store, "r2", [video_row("d", "r2")], retry=["x"])
    commit(store, "r3", [video_row("e", "r3")], retry=["x", "z"], runs=False)
    assert indexed_video_ids(store, "tiny-lite", "tiny-sam2") == {"a", "b", "d"}
    assert indexed_video_ids(store, "tiny-lite", "tiny-sam2", include_failed=False) == {"a", "d"}
    assert indexed_video_ids(store, "tiny-lite", "other-tracker") == set()
    assert retry_counts(store, "tiny-lite", "tiny-sam2") == {"x": 2, "y": 1}
    assert retry_counts(store, "other", "tiny-sam2") == {}


@pytest.mark.parametrize("run_id", ["../r1", "a/b", "", "..", "-lead", "a b", "x" * 129])
def test_an_invalid_run_id_is_refused_before_anything_is_written(tmp_path: Path, run_id: str) -> None:
    with pytest.raises(OutputError, match="invalid run id"):
        RunWriter(TableStore(str(tmp_path / "out")), run_id)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# TableStore's refusals: foreign, newer, damaged, pre-Delta
# ------------------------------------------------------------------------------------------------


def test_a_foreign_delta_table_is_refused_by_name(tmp_path: Path) -> None:
    import deltalake

    deltalake.write_deltalake(str(tmp_path / "videos"), to_table("videos", [video_row("a", "r1")]))
    store = TableStore(str(tmp_path))
    with pytest.raises(TableError, match=rf"table 'videos' of OUTPUT .*not written by pixelrefer.*{SCHEMA_PROPERTY}"):
        store.read("videos")
    with pytest.raises(TableError, match="table 'videos'"):
        commit(store, "r1", [video_row("a", "r1")])
    assert store.read("captions").num_rows == 1 and not store.exists("runs")  # stopped at videos, before runs


def test_a_table_of_a_newer_schema_is_refused_by_name(tmp_path: Path) -> None:
    import deltalake

    deltalake.DeltaTable.create(str(tmp_path / "runs"), schema=TABLES["runs"],
                                configuration={SCHEMA_PROPERTY: str(SCHEMA_VERSION + 1)},
                                raise_if_key_not_exists=False)  # as `TableStore.ensure` writes it
    with pytest.raises(TableError, match=rf"table 'runs' of OUTPUT .*newer pixelrefer \(schema version "
                                         rf"{SCHEMA_VERSION + 1}.*upgrade"):
        TableStore(str(tmp_path)).read("runs")


def test_a_damaged_delta_log_is_an_output_error_naming_the_table(tmp_path: Path) -> None:
    store = TableStore(str(tmp_path))
    commit(store, "r1", [video_row("a", "r1")])
    (tmp_path / "videos" / "_delta_log" / "00000000000000000001.json").write_text("{not json\n")
    with pytest.raises(OutputError, match=r"table 'videos' of OUTPUT .*_delta_log is damaged") as info:
        visible_videos(TableStore(str(tmp_path)))
    assert "Traceback" not in str(info.value)
    assert TableStore(str(tmp_path)).read("captions").num_rows == 1  # the other tables still read


def test_a_pre_delta_layout_is_refused_naming_migrate(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    folder = tmp_path / "videos" / "run_id=r1"
    folder.mkdir(parents=True)
    pq.write_table(to_table("videos", [video_row("a", "r1")]), folder / "part-c0000-00000.parquet")
    store = TableStore(str(tmp_path))
    with pytest.raises(LegacyLayout, match=r"videos: run_id=.*`pixelrefer migrate "):
        store.check_layout()
    TableStore(str(tmp_path / "fresh")).check_layout()  # an empty OUTPUT is fine
    commit(TableStore(str(tmp_path / "delta")), "r1", [video_row("a", "r1")])
    TableStore(str(tmp_path / "delta")).check_layout()  # and so is our own layout


# ------------------------------------------------------------------------------------------------
# Claims
# ------------------------------------------------------------------------------------------------


def test_two_runs_claiming_overlapping_videos_get_disjoint_sets(tmp_path: Path) -> None:
    """Both claim at the same moment (threads behind a barrier): the Delta MERGE conflict makes
    the loser retry and see the winner's claims, so no video is held twice."""
    store = TableStore(str(tmp_path))
    wanted = [f"v{i}" for i in range(12)]
    claims = [Claims(store, f"run-{i}", "m", "t") for i in range(2)]
    got: dict[int, tuple[list[str], dict[str, str]]] = {}
    barrier = threading.Barrier(2)

    def claim(i: int) -> None:
        barrier.wait()
        got[i] = claims[i].claim(wanted if i == 0 else wanted[4:] + ["w"])

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        (mine0, others0), (mine1, others1) = got[0], got[1]
        assert not set(mine0) & set(mine1)
        assert set(mine0) | set(mine1) == set(wanted) | {"w"}
        assert "w" in mine1 and set(wanted[:4]) <= set(mine0)
        assert others0 == {v: "run-1" for v in wanted if v in mine1}
        assert others1 == {v: "run-0" for v in mine0 if v in wanted[4:]}
        assert Claims(store, "run-2", "other-model", "t").claim(["v0"])[0] == ["v0"]  # per model
    finally:
        for c in claims:
            c.release()


def test_an_expired_claim_is_taken_over_and_a_released_one_is_free(tmp_path: Path) -> None:
    store = TableStore(str(tmp_path))
    crashed = Claims(store, "crashed", "m", "t", ttl=dt.timedelta(milliseconds=300))
    assert crashed.claim(["a"])[0] == ["a"]
    crashed._stop.set()  # a crashed run renews nothing
    live = Claims(store, "live", "m", "t")
    assert live.claim(["a"]) == ([], {"a": "crashed"})  # still held
    later = Claims(store, "later", "m", "t")
    try:
        import time

        time.sleep(0.4)
        assert live.claim(["a"]) == (["a"], {})  # expired: taken over
        assert later.claim(["a", "b"]) == (["b"], {"a": "live"})
        live.release()
        assert live.held == set() and later.claim(["a"]) == (["a"], {})
        assert later.holders(["a", "b"]) == {"a": "later", "b": "later"}
    finally:
        live.release()
        later.release()


# ------------------------------------------------------------------------------------------------
# The loopback S3 that the S3 tests rely on
# ------------------------------------------------------------------------------------------------


def test_loopback_s3_has_conditional_writes(s3_endpoint: str, s3_bucket: tuple[str, dict[str, Any]]) -> None:
    """delta-rs commits a version by creating its log file only if absent (If-None-Match). A store
    that ignored it would let two writers both "win" a version, so the S3 tests would prove
    nothing about concurrent commits: check the fixture, then two appends at once on it."""
    import boto3
    from botocore.exceptions import ClientError

    bucket, options = s3_bucket
    client = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    client.put_object(Bucket=bucket, Key="probe", Body=b"1", IfNoneMatch="*")
    with pytest.raises(ClientError) as info:
        client.put_object(Bucket=bucket, Key="probe", Body=b"2", IfNoneMatch="*")
    assert info.value.response["Error"]["Code"] == "PreconditionFailed"
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert client.get_object(Bucket=bucket, Key="probe")["Body"].read() == b"1"

    output = f"s3://{bucket}/out"
    TableStore(output, options).ensure("captions")
    barrier, errors = threading.Barrier(2), []

    def append(i: int) -> None:
        try:
            store = TableStore(output, options)
            barrier.wait()
            store.append("captions", to_table("captions", [caption_row(f"v{i}", f"r{i}")]), commit=f"r{i}/0")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=append, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    store = TableStore(output, options)
    assert ids(store.read("captions")) == [("v0", "r0"), ("v1", "r1")]
    assert store.version("captions") == 2  # two versions, one each: neither overwrote the other
