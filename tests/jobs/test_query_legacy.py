"""Indexes written before the Delta tables: refused by every reader, converted by `pixelrefer migrate`.

Two older layouts exist. The pre-Delta one (`<table>/run_id=<id>/part-cCCCC-NNNNN.parquet`, no
`_delta_log`) is refused by `query`, `report` and `embed` with a message naming `pixelrefer
migrate`, which converts it in place; after that the index reads as if it had been written as
Delta tables. The first contract (masks nested in `objects.frames`, no `clips`) cannot be
converted: `migrate` refuses it and says to re-index.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import main as cli_main
from pipeline.store import TableStore
from pipeline.store.migrate import LEGACY_TABLES, old_schema
from schemas.tables import MASKS, TABLES

from index_builders import index_tables, video_id_for
from query_helpers import RUN1, RUN2, RUN3, IndexInfo, assert_clean_error

pytestmark = pytest.mark.timeout(120)

READERS = [
    ["query"],
    ["query", "--sql", "SELECT count(*) FROM objects"],
    ["query", "--video", "{a}"],
    ["query", "--text", "edge"],
    ["report", "--video", "{a}", "--out", "{tmp}/report.html"],
    ["embed"],
]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """`pixelrefer ARGV...` through the real CLI; returns (exit code, stdout, stderr)."""
    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = cli_main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def reader_argv(argv: list[str], index: IndexInfo, tmp: Any) -> list[str]:
    """`pixelrefer COMMAND OUTPUT [--storage-options ...] OPTIONS...` for one of `READERS`."""
    command, *options = argv
    return [command, *index.cli(), *(o.format(a=index.video_ids["a"], tmp=tmp) for o in options)]


def delta_tables(index: IndexInfo) -> list[str]:
    store = TableStore(index.output, index.storage_options)
    return [t for t in TABLES if store.exists(t)]


# --------------------------------------------------------------------------------------------
# The pre-Delta layout: refused by name, converted by `pixelrefer migrate`.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", READERS, ids=lambda a: " ".join(a[:2]))
def test_readers_refuse_a_pre_delta_index_naming_migrate(pre_delta_index: IndexInfo, cli, tmp_path,
                                                         argv: list[str]) -> None:
    code, out, err = cli(*reader_argv(argv, pre_delta_index, tmp_path))
    assert_clean_error(code, err, 1, "pre-Delta layout", f"pixelrefer migrate {pre_delta_index.output}")
    assert out == "" and list(tmp_path.glob("*.html")) == []
    assert delta_tables(pre_delta_index) == []  # refused before anything was written: embed added no table
    assert TableStore(pre_delta_index.output, pre_delta_index.storage_options).legacy_tables() == [
        "videos", "clips", "objects", "masks", "captions", "qa", "runs"]  # fmt: skip


@pytest.mark.parametrize("pre_delta_index", ["local"], indirect=True)  # on S3: tests/pipeline/test_migrate.py
def test_migrate_then_query_reads_what_the_delta_index_holds(pre_delta_index: IndexInfo, local_index: IndexInfo,
                                                             cli) -> None:
    """Converted in place, the old index answers `--video`, `--sql` and the run list exactly as the
    same rows written as Delta tables (the conftest's index) do."""
    same = local_index
    assert same.uris["a"] == pre_delta_index.uris["a"]
    code, out, err = cli("migrate", *pre_delta_index.cli())
    assert code == 0 and "Traceback" not in err, err
    assert "videos: 5 old rows -> 5 Delta rows" in out and "runs: 4 old rows -> 4 Delta rows" in out
    assert "is migrated to Delta tables" in out
    store = TableStore(pre_delta_index.output, pre_delta_index.storage_options)
    assert store.legacy_tables() == [] and delta_tables(pre_delta_index) == [t for t in TABLES if t in LEGACY_TABLES and t != "embeddings"]

    def query(index: IndexInfo, *argv: str) -> Any:
        code, out, err = cli("query", *index.cli(), *argv, "--format", "json")
        assert code == 0 and err == "", err
        return json.loads(out)

    for name in ("a", "b"):
        doc = query(pre_delta_index, "--video", pre_delta_index.video_ids[name])
        assert doc == query(same, "--video", same.video_ids[name])
        assert doc["video"]["video_id"] == video_id_for(pre_delta_index.uris[name]) and doc["objects"]
    a = query(pre_delta_index, "--video", pre_delta_index.video_ids["a"])
    assert a["video"]["run_id"] == RUN2 and [r["run_id"] for r in a["runs"]] == [RUN3, RUN2, RUN1]
    counts = "SELECT " + ", ".join(f"(SELECT count(*) FROM {t}) AS {t}" for t in TABLES)
    assert query(pre_delta_index, "--sql", counts) == query(same, "--sql", counts)  # the staged run is hidden in both
    unversioned = lambda runs: [{k: v for k, v in r.items() if k != "version"} for r in runs]  # noqa: E731
    assert unversioned(query(pre_delta_index)) == unversioned(query(same))  # versions: the migration's own commits
    code, out, _ = cli("migrate", *pre_delta_index.cli())
    assert code == 0 and "already migrated" in out


# --------------------------------------------------------------------------------------------
# The first contract: masks in objects.frames, no clips table. Not convertible.
# --------------------------------------------------------------------------------------------

FRAME = pa.struct([MASKS.field(n) for n in ("frame_index", "ts", "bbox", "area", "score", "rle")])


def _without(table: str, *names: str) -> pa.Schema:
    return pa.schema([f for f in old_schema(table) if f.name not in names])


#: The first contract's tables and schemas: today's pre-Delta ones less what clips brought.
FIRST_CONTRACT = {
    "videos": _without("videos", "sampled_fps", "clips"),
    "objects": _without("objects", "label", "num_frames").append(pa.field("frames", pa.list_(FRAME))),
    "captions": _without("captions", "clip_index"),
    "qa": _without("qa", "clip_index", "ts_start", "ts_end"),
    "runs": _without("runs", "commit_index", "clips", "video_seconds"),
}


def write_first_contract(index: IndexInfo, root: str, runs: list[str]) -> None:
    """`runs` of the test index as the first pixelrefer wrote them (`part-NNNNN.parquet`, one commit)."""
    tables = index_tables(index.uris, index.truths)
    for run_id in runs:
        frames: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for m in tables[run_id]["masks"]:
            frames.setdefault((m["video_id"], m["object_id"]), []).append(m)
        rows = {
            **{t: tables[run_id][t] for t in ("videos", "captions", "qa")},
            "objects": [{**o, "frames": frames.get((o["video_id"], o["object_id"]), [])} for o in tables[run_id]["objects"]],
            "runs": [r for r in tables[run_id]["runs"] if r["commit_index"] == 0],
        }  # fmt: skip
        for name, schema in FIRST_CONTRACT.items():
            if rows[name]:
                folder = f"{root}/{name}/run_id={run_id}"
                index.fs.makedirs(folder, exist_ok=True)
                pq.write_table(pa.Table.from_pylist(rows[name], schema=schema), f"{folder}/part-00000.parquet",
                               filesystem=index.fs)  # fmt: skip


def old_files(index: IndexInfo, root: str) -> list[str]:
    index.fs.invalidate_cache()
    return sorted(p for p in index.fs.find(root) if p.endswith(".parquet"))


def test_first_contract_is_refused_by_readers_and_by_migrate(pre_delta_index: IndexInfo, cli, tmp_path) -> None:
    root = f"{pre_delta_index.root}-first"
    output = pre_delta_index.output.replace(pre_delta_index.root, root)
    write_first_contract(pre_delta_index, root, [RUN1, RUN2, RUN3])
    first = IndexInfo(**{**vars(pre_delta_index), "output": output, "root": root})
    before = old_files(first, root)
    assert len(before) == 5 + 5 + 2  # RUN1, RUN2: five tables each; RUN3 (failed): videos and runs
    for argv in READERS:
        code, out, err = cli(*reader_argv(argv, first, tmp_path))
        assert_clean_error(code, err, 1, "pre-Delta layout", f"pixelrefer migrate {output}")
    code, out, err = cli("migrate", *first.cli())
    assert_clean_error(code, err, 1, "first pixelrefer layout", "masks in objects.frames", "re-index",
                       "pixelrefer index SOURCE NEW_OUTPUT")
    assert out == "" and delta_tables(first) == [] and old_files(first, root) == before  # nothing converted or lost


def test_first_contract_runs_among_later_ones_are_refused_by_migrate(pre_delta_index: IndexInfo, cli) -> None:
    """One first-contract run in an otherwise convertible index: refused whole, naming that run."""
    objects = index_tables(pre_delta_index.uris, pre_delta_index.truths)[RUN1]["objects"]
    folder = f"{pre_delta_index.root}/objects/run_id=ancient"
    pre_delta_index.fs.makedirs(folder, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([{**o, "frames": [], "run_id": "ancient"} for o in objects],
                                        schema=FIRST_CONTRACT["objects"]),
                   f"{folder}/part-00000.parquet", filesystem=pre_delta_index.fs)  # fmt: skip
    before = old_files(pre_delta_index, pre_delta_index.root)
    code, out, err = cli("migrate", *pre_delta_index.cli())
    assert_clean_error(code, err, 1, "mixes runs of the first pixelrefer layout", "run ancient", "re-index")
    assert out == "" and delta_tables(pre_delta_index) == []
    assert old_files(pre_delta_index, pre_delta_index.root) == before
