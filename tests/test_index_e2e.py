"""End to end: `pixelrefer index` on test-made videos, local Ray, the real tiny SAM 2 and PixelRefer.

One module-scoped run serves every check, since a run costs tens of seconds on two cores.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from jobs.cli import main
from pipeline.samples import DEFAULT_SHAPES, GroundTruth, make_video
from schemas.tables import TABLES, validate


def read(output: Path, table: str) -> pa.Table:
    con = duckdb.connect()
    arrow = con.sql(f"SELECT * FROM read_parquet('{output}/{table}/**/*.parquet', hive_partitioning=true)").to_arrow_table()
    return arrow.select(TABLES[table].names).cast(TABLES[table])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("e2e")
    videos = root / "videos"
    truths: dict[str, GroundTruth] = {
        "steady.mp4": make_video(videos / "steady.mp4", shapes=DEFAULT_SHAPES, duration_s=3.0, seed=1),
        "vfr.mp4": make_video(videos / "nested" / "vfr.mp4", shapes=DEFAULT_SHAPES[:2], duration_s=4.0, vfr=True, seed=2),
    }
    (videos / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40)
    (videos / "notes.txt").write_text("not a video")
    gt = truths["steady.mp4"]
    box = gt.shapes[0].box_at(0.0, gt.width, gt.height)
    prompts = root / "prompts.json"
    prompts.write_text(json.dumps({"steady.mp4": [{"box": list(box), "frame": 0}]}))
    questions = root / "questions.json"
    questions.write_text(json.dumps({"*": ["What is <region> doing?"]}))
    return {"root": root, "videos": videos, "truths": truths, "prompts": prompts, "questions": questions}


@pytest.fixture(scope="module")
def indexed(corpus, ray_local) -> dict:
    output = corpus["root"] / "index"
    argv = [
        "index", str(corpus["videos"]), str(output), "--fps", "2", "--max-new-tokens", "6",
        "--prompts", str(corpus["prompts"]), "--questions", str(corpus["questions"]), "--max-objects", "3",
    ]
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        code = main(argv)
    return {"output": output, "code": code, "argv": argv, "log": log.getvalue(), **corpus}


def test_run_commits_and_tables_fit_their_schemas(indexed):
    assert indexed["code"] == 0
    for table in TABLES:
        validate(table, read(indexed["output"], table))
    assert not (indexed["output"] / "_staging").exists()


def test_the_summary_reports_how_busy_each_model_stage_was(indexed):
    line = next(line for line in indexed["log"].splitlines() if "stage busy:" in line)
    shares = dict(re.findall(r"(tracker|referrer) (\d+)%", line))
    assert set(shares) == {"tracker", "referrer"}, line
    assert all(0 < int(v) <= 100 for v in shares.values()), line


def test_videos_rows_and_the_corrupt_one_failed(indexed):
    videos = {Path(r["uri"]).name: r for r in read(indexed["output"], "videos").to_pylist()}
    assert set(videos) == {"steady.mp4", "vfr.mp4", "corrupt.mp4"}
    assert videos["corrupt.mp4"]["status"] == "failed"
    assert "corrupt.mp4" in videos["corrupt.mp4"]["error"]
    for name in ("steady.mp4", "vfr.mp4"):
        row = videos[name]
        assert row["status"] == "ok", row["error"]
        assert row["model"] == "tiny-lite" and row["tracker"] == "tiny-sam2"
        assert (row["width"], row["height"]) == (160, 120)


def test_sampled_timestamps_are_presentation_timestamps(indexed):
    videos = {Path(r["uri"]).name: r for r in read(indexed["output"], "videos").to_pylist()}
    for name, truth in indexed["truths"].items():
        sampled = videos[name]["sampled_ts"]
        assert len(sampled) >= 3
        for ts in sampled:
            assert min(abs(ts - t) for t in truth.timestamps) < 1e-3, (name, ts)
    # In the variable-rate video the second half is at a third of the rate: index/fps would be wrong there.
    vfr = indexed["truths"]["vfr.mp4"]
    slow = [t for t in vfr.timestamps if t >= 2.0]
    assert any(abs(ts - t) < 1e-3 for ts in videos["vfr.mp4"]["sampled_ts"] for t in slow)


def test_objects_have_captions_and_answers(indexed):
    objects = read(indexed["output"], "objects").to_pylist()
    captions = read(indexed["output"], "captions").to_pylist()
    qa = read(indexed["output"], "qa").to_pylist()
    keys = {(o["video_id"], o["object_id"]) for o in objects}
    assert keys, "the prompted object must yield a track"
    assert keys == {(c["video_id"], c["object_id"]) for c in captions}
    assert {(q["video_id"], q["object_ids"][0]) for q in qa} == keys
    assert all(q["question"] == "What is <region> doing?" and q["answer"] is not None for q in qa)
    by_key = {(o["video_id"], o["object_id"]): o for o in objects}
    for c in captions:
        o = by_key[(c["video_id"], c["object_id"])]
        assert (c["ts_start"], c["ts_end"]) == (o["first_ts"], o["last_ts"])
        assert c["mode"] == "lite" and c["model"] == "tiny-lite" and c["num_tokens"] >= 1
    sources = {o["source"] for o in objects}
    assert "prompt" in sources


def test_captions_and_answers_have_embeddings(indexed):
    """The default embedder (WordLlama) vectors every caption and answer at commit, named and sized."""
    captions = [c for c in read(indexed["output"], "captions").to_pylist() if (c["caption"] or "").strip()]
    answers = [a for a in read(indexed["output"], "qa").to_pylist() if (a["answer"] or "").strip()]
    rows = read(indexed["output"], "embeddings").to_pylist()
    assert captions and answers
    assert {(r["embedder"], r["dim"]) for r in rows} == {("wordllama-l2_supercat_256", 256)}
    assert all(len(r["vector"]) == 256 and r["run_id"] == r["text_run_id"] for r in rows)
    key = lambda r: (r["video_id"], r["run_id"], r["clip_index"], r["text"])  # noqa: E731
    assert sorted(key(r) for r in rows if r["kind"] == "caption") == sorted(
        (c["video_id"], c["run_id"], c["clip_index"], c["caption"]) for c in captions)
    assert sorted(key(r) for r in rows if r["kind"] == "answer") == sorted(
        (a["video_id"], a["run_id"], a["clip_index"], a["answer"]) for a in answers)


def test_the_run_leaves_an_up_to_date_search_index(indexed):
    """After its last commit the run copies its passages into the search index `--like` reads."""
    from pipeline.search.index import committed
    from pipeline.search.reader import SearchIndex

    output = str(indexed["output"])
    search, why = SearchIndex.open(output, {}, committed(output))
    assert search is not None, why
    rows = search.dataset.to_table(columns=["video_id", "text_run_id", "kind", "text"]).to_pylist()
    key = lambda r: (r["video_id"], r["text_run_id"], r["kind"], r["text"])  # noqa: E731
    assert sorted(map(key, rows)) == sorted(map(key, read(indexed["output"], "embeddings").to_pylist()))
    assert "search index:" in indexed["log"]


DATA_TABLES = ("videos", "objects", "captions", "qa", "embeddings")


def test_rerun_adds_no_rows(indexed):
    before = {t: read(indexed["output"], t).num_rows for t in DATA_TABLES}
    runs_before = read(indexed["output"], "runs").num_rows
    assert main(indexed["argv"]) == 0
    assert {t: read(indexed["output"], t).num_rows for t in DATA_TABLES} == before
    runs = read(indexed["output"], "runs").to_pylist()
    assert len(runs) == runs_before + 1
    last = max(runs, key=lambda r: r["started_at"])
    assert (last["videos_listed"], last["videos_skipped"], last["videos_ok"]) == (3, 3, 0)
