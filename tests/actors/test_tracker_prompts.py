"""The prompts file: formats, matching videos to entries, the JSON carried in rows, and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from actors.prompts import (
    ObjectPrompt,
    PromptsError,
    load_prompts,
    parse_prompts_text,
    prompts_for,
    prompts_from_json,
    prompts_to_json,
)
from actors.rle import decode_rle, encode_masks

MASK = np.zeros((4, 6), bool)
MASK[1:3, 2:5] = True
RLE = encode_masks(MASK[None])[0]


def test_json_mapping_with_every_kind(tmp_path):
    doc = {
        "s3://bucket/cam1.mp4": [{"box": [10, 20, 60, 80], "ts": 1.5}],
        "cam2.mp4": [
            {"points": [[40, 50], [70, 20]], "labels": [1, 0], "frame": 3, "object_id": 7},
            {"mask": RLE},
            {"box": [1, 2, 3, 4], "points": [[2, 3]]},
        ],
    }
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(doc))
    table = load_prompts(str(path))
    assert table["s3://bucket/cam1.mp4"] == [ObjectPrompt(box=(10.0, 20.0, 60.0, 80.0), ts=1.5)]
    points, mask, both = table["cam2.mp4"]
    assert points == ObjectPrompt(points=((40.0, 50.0), (70.0, 20.0)), labels=(1, 0), frame=3, object_id=7)
    assert mask.mask_rle == RLE and mask.kind == "mask" and mask.frame is None and mask.ts is None
    assert both.kind == "box+points" and both.labels == (1,)  # labels default to positive


def test_jsonl_records_per_video_or_per_object_are_merged():
    text = "\n".join([
        json.dumps({"video": "a.mp4", "objects": [{"box": [0, 0, 5, 5]}]}),
        "",
        json.dumps({"uri": "a.mp4", "box": [1, 1, 6, 6], "ts": 2.0, "object_id": 4}),
        json.dumps({"video": "b.mp4", "points": [[3, 3]]}),
    ])
    table = parse_prompts_text(text)
    assert [p.box for p in table["a.mp4"]] == [(0.0, 0.0, 5.0, 5.0), (1.0, 1.0, 6.0, 6.0)]
    assert table["a.mp4"][1].object_id == 4 and table["b.mp4"][0].points == ((3.0, 3.0),)
    as_list = parse_prompts_text(json.dumps([{"video": "c.mp4", "box": [0, 0, 2, 2]}]))
    assert list(as_list) == ["c.mp4"]


def test_uncompressed_rle_counts_are_compressed():
    h, w = MASK.shape
    flat = MASK.flatten(order="F").astype(int)
    counts, current, run = [], 0, 0
    for value in flat:  # column-major run lengths starting with zeros
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    (prompt,) = parse_prompts_text(json.dumps({"v.mp4": [{"mask": {"size": [h, w], "counts": counts}}]}))["v.mp4"]
    assert isinstance(prompt.mask_rle["counts"], str)
    assert np.array_equal(decode_rle(prompt.mask_rle), MASK)


def test_prompts_for_matches_full_uri_then_file_name():
    table = {"s3://b/x/cam1.mp4": [ObjectPrompt(box=(0, 0, 1, 1))], "cam1.mp4": [ObjectPrompt(box=(0, 0, 2, 2))],
             "file:///data/cam3.mp4": [ObjectPrompt(box=(0, 0, 3, 3))]}
    assert prompts_for("s3://b/x/cam1.mp4", table)[0].box == (0, 0, 1, 1)
    assert prompts_for("s3://other/cam1.mp4", table)[0].box == (0, 0, 2, 2)
    assert prompts_for("/data/cam3.mp4", table)[0].box == (0, 0, 3, 3)
    assert prompts_for("s3://b/x/cam2.mp4", table) is None


def test_json_round_trip_for_rows():
    prompts = [ObjectPrompt(box=(1.0, 2.0, 3.0, 4.0), ts=0.5, object_id=2),
               ObjectPrompt(points=((1.0, 1.0), (2.0, 2.0)), labels=(1, 0), frame=4), ObjectPrompt(mask_rle=RLE)]
    text = prompts_to_json(prompts)
    assert isinstance(text, str) and prompts_from_json(text) == prompts
    assert prompts_from_json("[]") == []


def test_storage_through_fsspec(tmp_path):
    import fsspec

    with fsspec.open("memory://prompts/p.jsonl", "wt") as f:
        f.write(json.dumps({"video": "m.mp4", "box": [0, 0, 4, 4]}) + "\n")
    assert load_prompts("memory://prompts/p.jsonl")["m.mp4"][0].box == (0.0, 0.0, 4.0, 4.0)


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"a.mp4": [{"box": [1, 2, 3]}]}', "video 'a.mp4', object 0: box must be [x0, y0, x1, y1]"),
        ('{"a.mp4": [{"bbox": [1, 2, 3, 4]}]}', "unknown field(s) ['bbox']"),
        ('{"a.mp4": [{"box": [1, 2, 3, 4], "ts": 1, "frame": 2}]}', "either ts or frame"),
        ('{"a.mp4": [{"points": [[1, 2]], "labels": [1, 0]}]}', "one 1/0 per point"),
        ('{"a.mp4": [{"points": [[1, 2]], "labels": [2]}]}', "labels must be 1 (positive) or 0"),
        ('{"a.mp4": [{"ts": 1.0}]}', "needs a box, points or a mask"),
        ('{"a.mp4": [{"box": [1, 2, 3, 4], "mask": {"size": [4, 6], "counts": "abc"}}]}', "cannot be combined"),
        ('{"a.mp4": [{"mask": {"size": [4, 6], "counts": [1, 2]}}]}', "counts sum to 3"),
        ('{"a.mp4": [{"box": [1, 2, 3, "x"]}]}', "must be a finite number"),
        ('{"a.mp4": [{"box": [1, 2, 3, 4], "frame": 1.5}]}', "frame must be an integer"),
        ('{"a.mp4": {"box": [1, 2, 3, 4]}}', "expected a list of objects"),
        ('{"video": "a.mp4", "box": [0, 0, 1, 1]}\n{"box": [0, 0, 1, 1]}', "line 2: a record needs exactly one of"),
        ('{"video": "a.mp4", "box": [0, 0, 1, 1]}\n{"video": ', "line 2: not valid JSON"),
        ('{"a.mp4": [{"box": [1, 2, 3, 4]}\n', "not valid JSON or JSON Lines"),
        ('42', "expected a JSON object or list"),
    ],
)
def test_malformed_files_name_the_problem(text, message):
    with pytest.raises(PromptsError) as err:
        parse_prompts_text(text, source="p.json")
    assert message in str(err.value) and str(err.value).startswith("p.json")


def test_unreadable_file_is_a_prompts_error(tmp_path):
    with pytest.raises(PromptsError, match="cannot read prompts file"):
        load_prompts(str(tmp_path / "missing.json"))
    bad = tmp_path / "binary.json"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(PromptsError):
        load_prompts(str(bad))
    with pytest.raises(PromptsError, match="not valid JSON"):
        prompts_from_json("{oops")
