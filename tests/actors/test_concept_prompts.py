"""Concepts for a SAM 3 tracker: `--find` and the prompts file's per-video `concepts`."""

from __future__ import annotations

import json

import pytest

from actors.prompts import ConceptPrompt, ObjectPrompt, PromptsError, parse_concepts, parse_prompts_text, split_prompts
from jobs.cli import build_parser
from jobs.index import config_from_args


def test_concepts_from_a_string_or_a_list_are_stripped_and_unique():
    assert parse_concepts(" person, car ,dog, car") == ["person", "car", "dog"]
    assert parse_concepts(["traffic light", "person"]) == ["traffic light", "person"]


@pytest.mark.parametrize("value,message", [
    ("", "no concept"), ("  ", "no concept"), ([], "no concept"), ("person, ,car", "concept 2 is empty"),
    (["person", 3], "concept 2"), (7, "list of strings"),
])
def test_bad_concepts_name_the_input(value, message):
    with pytest.raises(PromptsError, match=message) as err:
        parse_concepts(value, "--find")
    assert "--find" in str(err.value)


def test_prompts_file_gives_concepts_per_video_in_both_forms():
    table = parse_prompts_text(json.dumps({"a.mp4": {"concepts": "person, car"}, "b.mp4": [{"box": [1, 2, 3, 4]}]}))
    assert split_prompts(table["a.mp4"]) == ([], ["person", "car"])
    objects, concepts = split_prompts(table["b.mp4"])
    assert concepts == [] and objects == [ObjectPrompt(box=(1.0, 2.0, 3.0, 4.0))]
    lines = "\n".join(json.dumps(r) for r in [{"video": "c.mp4", "concepts": ["dog"]}, {"video": "c.mp4", "box": [1, 2, 3, 4]}])
    table = parse_prompts_text(lines)
    assert table["c.mp4"][0] == ConceptPrompt(("dog",)) and split_prompts(table["c.mp4"])[1] == ["dog"]


@pytest.mark.parametrize("doc,message", [
    ({"a.mp4": {"concepts": "person", "objects": []}}, "either 'concepts' or objects"),
    ([{"video": "a.mp4", "concepts": "person", "box": [1, 2, 3, 4]}], "takes no other fields"),
    ({"a.mp4": {"concepts": ""}}, "no concept"),
])
def test_bad_concepts_in_a_prompts_file_name_the_video(doc, message):
    with pytest.raises(PromptsError, match=message) as err:
        parse_prompts_text(json.dumps(doc), source="p.json")
    assert "a.mp4" in str(err.value)


def test_find_with_a_sam2_tracker_is_a_usage_error_that_names_sam3():
    args = build_parser().parse_args(["index", "in", "out", "--find", "person, car"])
    with pytest.raises(ValueError, match="--find needs a SAM 3 tracker.*tiny-sam3"):
        config_from_args(args)
    args = build_parser().parse_args(["index", "in", "out", "--find", " , ", "--tracker", "tiny-sam3"])
    with pytest.raises(ValueError, match="--find: concept 1 is empty"):
        config_from_args(args)
    args = build_parser().parse_args(["index", "in", "out", "--find", "person, car", "--tracker", "tiny-sam3"])
    assert config_from_args(args).find == ("person", "car")
