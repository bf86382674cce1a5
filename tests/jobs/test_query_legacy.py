"""Indexes of the first contract (masks in objects.frames, no clips table) read through today's views."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.query_sql import open_index
from schemas.tables import TABLES

from query_helpers import RUN1, RUN2, RUN3, IndexInfo, assert_clean_error, assert_types_match

pytestmark = pytest.mark.timeout(120)


# --------------------------------------------------------------------------------------------
# Indexes written under the first contract (objects.frames, no clips table).
# --------------------------------------------------------------------------------------------


def test_legacy_index_is_read_as_one_clip_per_video(legacy_index: IndexInfo, run_query, data) -> None:
    current = data.index_tables(legacy_index.uris, legacy_index.truths)
    with open_index(legacy_index.output, legacy_index.storage_options) as ix:
        assert ix.layout.legacy and "older pixelrefer" in ix.notes[0] and "pixelrefer index" in ix.notes[0]
        for name, schema in TABLES.items():
            table = ix.sql(f"SELECT * FROM {name}")
            assert table.column_names == schema.names, name
            assert_types_match(table, schema)
        # Every mask of the old objects.frames is a row of `masks`, unchanged.
        key = lambda m: (m["run_id"], m["video_id"], m["object_id"], m["frame_index"])  # noqa: E731
        cols = "run_id, video_id, object_id, frame_index, ts, bbox, area, score, rle"
        rounded = lambda m: {**m, "score": round(m["score"], 5)}  # noqa: E731 - stored as float32
        masks = sorted((rounded(m) for m in ix.sql(f"SELECT {cols} FROM masks").to_pylist()), key=key)
        want = sorted((rounded({k: m[k] for k in cols.split(", ")}) for r in current.values() for m in r["masks"]), key=key)
        assert masks == want and len(masks) == 69  # a: 10 + 10 + 5 (twice), b: 10 + 9
        counts = ix.sql("SELECT object_id, num_frames, label FROM objects WHERE run_id = $r AND video_id = $v "
                        "ORDER BY object_id", {"r": RUN1, "v": legacy_index.video_ids["b"]}).to_pylist()  # fmt: skip
        assert counts == [{"object_id": 1, "num_frames": 10, "label": None}, {"object_id": 2, "num_frames": 9, "label": None}]
        clips = ix.sql("SELECT * FROM clips ORDER BY run_id, video_id").to_pylist()
        assert [(c["clip_index"], c["ts_start"], c["ts_end"], c["num_sampled"], c["boundary"]) for c in clips] == [
            (0, 0.0, 2.0, 10, "end")] * 3  # the ok videos only; "c" and RUN3 failed
        video = ix.sql("SELECT sampled_fps, clips FROM videos WHERE run_id = $r", {"r": RUN2}).to_pylist()
        assert video == [{"sampled_fps": pytest.approx(5.0), "clips": 1}]
    doc = json.loads(run_query(*legacy_index.cli(), "--video", legacy_index.video_ids["a"], "--format", "json")[1])
    assert [c["clip_index"] for c in doc["clips"]] == [0] and doc["clips"][0]["object_ids"] == [1, 2, 3]
    objects = {o["object_id"]: o for o in doc["objects"]}
    assert objects[3]["spans"] == [[1.0, 1.8]] and objects[1]["num_frames"] == 10
    assert [c["caption"] for c in doc["clips"][0]["captions"]] == [
        data.CAPTIONS[(RUN2, "a")][k] for k in ((1, None), (2, None), (3, 1))]  # fmt: skip
    assert [(a["clip_index"], a["ts_start"], a["ts_end"]) for a in doc["qa"]] == [(0, 0.0, 2.0)] * 2
    code, out, err = run_query(*legacy_index.cli(), "--text", "edge", "--format", "json")
    assert code == 0 and "older pixelrefer" in err and "Traceback" not in err
    assert [(r["object_id"], r["clip_index"]) for r in json.loads(out)] == [(1, 0)]


def test_mixed_layouts_are_refused_with_how_to_reindex(tmp_path: Path, local_index: IndexInfo, run_query, data) -> None:
    """Old runs next to new ones would bind one file's schema for all: refuse, never misread."""
    import fsspec

    fs = fsspec.filesystem("file")
    runs = data.index_tables(local_index.uris, local_index.truths)
    for new, old in ((RUN2, RUN1), (RUN1, RUN2)):  # either layout first in file order
        out = str(tmp_path / f"mixed-{new}")
        data.write_legacy_index(fs, out, data.legacy_tables({old: runs[old]}))
        data.write_index(fs, out, {new: runs[new]})
        for argv in (["--sql", "SELECT count(*) FROM objects"], ["--video", local_index.video_ids["a"]], []):
            code, stdout, err = run_query(out, *argv)
            assert_clean_error(code, err, 1, "older pixelrefer", "objects.frames", f"run {old}", "pixelrefer index")
            assert stdout == ""


def test_legacy_index_without_objects_is_still_recognised(tmp_path: Path, local_index: IndexInfo, data) -> None:
    """Only failed videos: no objects file to look at, so the videos footer tells the layout."""
    import fsspec

    runs = data.legacy_tables(data.index_tables(local_index.uris, local_index.truths))
    only_failed = {RUN3: {"videos": runs[RUN3]["videos"]}}
    data.write_legacy_index(fsspec.filesystem("file"), str(tmp_path / "out"), only_failed)
    with open_index(str(tmp_path / "out")) as ix:
        assert ix.layout.legacy
        rows = ix.sql("SELECT status, clips, sampled_fps FROM videos").to_pylist()
        assert rows == [{"status": "failed", "clips": 0, "sampled_fps": pytest.approx(5.0)}]
        assert ix.sql("SELECT * FROM clips").num_rows == 0
