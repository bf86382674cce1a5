"""`pipeline.store.maintain` and `pixelrefer maintain`: fewer files, the same visible rows, and
leftovers of killed commits removed only once they are older than the retention.

The 200-commit index is written through `RunWriter` as an index run writes it, on a store that
keeps each table open between appends (`QuickStore`): the store's own append opens each table
twice to check and find its version, which is right for a run and makes 200 commits take a minute.
"""

from __future__ import annotations

import datetime as dt
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from jobs.cli import main as cli
from pipeline.store import TableStore
from pipeline.store.claims import CLAIMS, Claims
from pipeline.store.commit import RunWriter, visible_rows, visible_videos
from pipeline.store.maintain import maintain, needs_maintenance
from pipeline.store.tables import COMMIT_PROPERTY
from schemas.tables import TABLES

COMMITS = 200
T0 = dt.datetime(2025, 3, 1, tzinfo=dt.timezone.utc)


class QuickStore(TableStore):
    """A `TableStore` whose appends go to one open handle per table, each table on its own thread
    (the tables are independent files; the order between them matters to readers, not to a fixture
    read only after `wait`). See the module docstring."""

    def __init__(self, output: str) -> None:
        super().__init__(output)
        self._handles: dict[str, Any] = {}
        self._writers: dict[str, ThreadPoolExecutor] = {}
        self._pending: list[Future[None]] = []

    def append(self, table: str, data: pa.Table, commit: str | None = None) -> int:
        if table not in self._writers:
            self._handles[table] = self.ensure(table)
            self._writers[table] = ThreadPoolExecutor(max_workers=1)
        self._pending.append(self._writers[table].submit(self._write, table, data, commit))
        return 0

    def _write(self, table: str, data: pa.Table, commit: str | None) -> None:
        import deltalake

        deltalake.write_deltalake(self._handles[table], data.cast(TABLES[table]), mode="append",
                                  commit_properties=deltalake.CommitProperties(
                                      custom_metadata={COMMIT_PROPERTY: commit} if commit else None))

    def wait(self) -> None:
        for future in self._pending:
            future.result()
        for writer in self._writers.values():
            writer.shutdown()


def video(run: str, vid: str) -> dict[str, Any]:
    return {"video_id": vid, "uri": f"/videos/{vid}.mp4", "size_bytes": 10, "etag": vid, "duration_s": 4.0,
            "fps": 25.0, "width": 64, "height": 48, "num_frames": 100, "sampled_ts": [0.0, 2.0], "sampled_fps": 0.5,
            "clips": 1, "status": "ok", "model": "m", "tracker": "t", "run_id": run}


def obj(run: str, vid: str) -> dict[str, Any]:
    return {"video_id": vid, "object_id": 1, "source": "auto", "label": "cat", "first_ts": 0.0, "last_ts": 2.0,
            "num_frames": 2, "run_id": run}


def caption(run: str, vid: str) -> dict[str, Any]:
    return {"video_id": vid, "object_id": 1, "clip_index": 0, "ts_start": 0.0, "ts_end": 2.0, "caption": "a cat",
            "mode": "lite", "model": "m", "num_tokens": 2, "run_id": run}


def run_row(run: str, index: int = 0) -> dict[str, Any]:
    return {"run_id": run, "commit_index": index, "command": "nightly", "source": "/videos", "model": "m",
            "tracker": "t", "mode": "lite", "status": "committed", "videos_ok": 1, "retry_video_ids": []}


def write_commit(store: TableStore, run: str, vid: str, *, index: int = 0,
                 children: tuple[str, ...] = ("objects", "captions"), committed: bool = True,
                 videos: bool = True) -> None:
    """One run commit; `committed=False` stops before `runs` like a run killed at its commit point."""
    writer = RunWriter(store, run, index)
    builders = {"objects": obj, "captions": caption}
    for table in children:
        writer.add(table, [builders[table](run, vid)])
    if videos:
        writer.add("videos", [video(run, vid)])
    if committed:
        writer.add("runs", [run_row(run, index)])
    writer.commit(T0)


def snapshot(store: TableStore) -> dict[str, list[tuple[str, str]]]:
    """What readers see: visible videos and visible child rows, as sorted keys."""
    seen = {"videos": sorted(zip(*visible_videos(store, ["video_id", "run_id"]).to_pydict().values()))}
    for table in ("objects", "captions"):
        seen[table] = sorted(zip(*visible_rows(store, table, ["video_id", "run_id"]).to_pydict().values()))
    return seen


@pytest.fixture()
def grown(tmp_path: Path) -> Path:
    """200 nightly commits of one video each, with its object (captions in every tenth)."""
    root = tmp_path / "out"
    store = QuickStore(str(root))
    for c in range(COMMITS):
        write_commit(store, f"run-{c:03d}", f"v{c:03d}", children=("objects", "captions") if c % 10 == 0 else ("objects",))
    store.wait()
    return root


def test_two_hundred_commits_become_one_file_per_table(grown: Path) -> None:
    store = TableStore(str(grown))
    before = snapshot(store)
    files = {t: len(store.files(t)) for t in ("videos", "objects", "captions", "runs")}
    assert files == {"videos": COMMITS, "objects": COMMITS, "captions": COMMITS // 10, "runs": COMMITS}
    assert needs_maintenance(store, max_files=64)

    result = maintain(store)

    assert not needs_maintenance(store, max_files=64)
    for table, count in files.items():
        got = result.tables[table]
        assert (got.files_before, got.rows_before, got.rows_after, got.leftover_rows) == (count, count, count, 0)
        assert 1 <= got.files_after <= 2
        assert len(store.files(table)) == got.files_after
    assert snapshot(store) == before
    assert len(before["videos"]) == COMMITS


@pytest.fixture()
def killed(tmp_path: Path) -> TableStore:
    """Three committed runs; run "lost" killed at its commit point; run "long" committed its first
    commit and was killed at its second, after appending `videos`."""
    store = TableStore(str(tmp_path / "out"))
    for c in range(3):
        write_commit(store, f"run-{c}", f"v{c}")
    write_commit(store, "lost", "v9", committed=False)
    write_commit(store, "long", "v5")
    write_commit(store, "long", "v6", index=1, committed=False)
    return store


def rows_of(store: TableStore, table: str) -> list[tuple[str, str]]:
    return sorted(zip(*store.read(table, columns=["video_id", "run_id"]).to_pydict().values()))


def test_leftovers_are_kept_within_the_retention(killed: TableStore) -> None:
    before = {t: rows_of(killed, t) for t in ("videos", "objects", "captions")}
    seen = snapshot(killed)

    result = maintain(killed, retain_hours=168)

    assert {t: rows_of(killed, t) for t in before} == before
    assert all(r.leftover_rows == 0 for r in result.tables.values())
    assert snapshot(killed) == seen


def test_leftovers_older_than_the_retention_are_removed(killed: TableStore) -> None:
    seen = snapshot(killed)

    result = maintain(killed, retain_hours=0)

    assert ("v9", "lost") not in rows_of(killed, "videos") + rows_of(killed, "objects") + rows_of(killed, "captions")
    assert ("v6", "long") not in rows_of(killed, "videos")  # its commit never reached runs
    assert ("v6", "long") in rows_of(killed, "objects")  # the run committed once: its children are kept
    assert result.tables["videos"].leftover_commits == ["long/1", "lost/0"]
    assert result.tables["objects"].leftover_commits == ["lost"]
    assert (result.tables["videos"].leftover_rows, result.tables["captions"].leftover_rows) == (2, 1)
    assert result.tables["runs"].rows_after == result.tables["runs"].rows_before == 4
    assert result.tables["videos"].vacuumed_files >= result.tables["videos"].files_before == 6
    assert snapshot(killed) == seen


def test_nothing_is_deleted_before_the_first_commit(tmp_path: Path) -> None:
    store = TableStore(str(tmp_path / "out"))
    write_commit(store, "first", "v1", committed=False)

    result = maintain(store, retain_hours=0)

    assert rows_of(store, "objects") == [("v1", "first")]
    assert "leftovers kept" in (result.tables["objects"].note or "")


def test_expired_claims_are_removed(killed: TableStore) -> None:
    Claims(killed, "run-x", "m", "t", ttl=dt.timedelta(seconds=-1)).claim(["v1", "v2"])
    live = Claims(killed, "run-y", "m", "t")
    live.claim(["v3"])
    live._stop.set()

    result = maintain(killed, retain_hours=0)

    assert result.claims is not None and result.claims.leftover_rows == 2
    assert live.holders(["v1", "v2", "v3"]) == {"v3": "run-y"}
    assert killed.exists(CLAIMS)


def test_cli_prints_files_and_rows_per_table(killed: TableStore, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["maintain", killed.output, "--retain-hours", "0"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert lines["videos"][1:7] == ["6", "->", "1", "6", "->", "4"]  # two leftover videos removed
    assert lines["runs"][1:7] == ["4", "->", "1", "4", "->", "4"]
    assert len(killed.files("objects")) == 1


def test_cli_refuses_a_negative_retention(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["maintain", str(tmp_path), "--retain-hours", "-1"]) == 2
    assert "--retain-hours" in capsys.readouterr().err
