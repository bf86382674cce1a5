from __future__ import annotations

import json

import pytest

from actors.requests import expand_questions
from pipeline.questions import QuestionsError, load_questions, questions_for


def test_json_mapping_and_lookup(tmp_path):
    path = tmp_path / "q.json"
    path.write_text(json.dumps({
        "*": ["What is <region> doing?"],
        "a.mp4": [{"question": "Is <region> left of <region>?", "objects": [1, 0]}],
    }))
    table = load_questions(str(path))
    assert [q["question"] for q in questions_for("/data/a.mp4", table)] == ["What is <region> doing?", "Is <region> left of <region>?"]
    assert len(questions_for("/data/b.mp4", table)) == 1


def test_jsonl(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"video": "*", "question": "Color of <region>?"}\n\n{"video": "x.mp4", "question": "<region> and <region>?"}\n')
    table = load_questions(str(path))
    assert set(table) == {"*", "x.mp4"}


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"*": ["no placeholder"]}), "no <region>"),
    (json.dumps({"*": [{"question": "<region>?", "objects": [1, 2]}]}), "1 <region> placeholders but 2"),
    ("{not json\n", "not JSON"),
])
def test_bad_files(tmp_path, content, message):
    path = tmp_path / "q.json"
    path.write_text(content)
    with pytest.raises(QuestionsError, match=message):
        load_questions(str(path))


def test_missing_file_names_it(tmp_path):
    with pytest.raises(QuestionsError, match="nope.json"):
        load_questions(str(tmp_path / "nope.json"))


def test_expand_questions():
    specs = [
        {"question": "What is <region>?", "objects": None},
        {"question": "<region> vs <region>?", "objects": None},
        {"question": "<region> near <region>?", "objects": [3, 1]},
        {"question": "<region> with <region>?", "objects": [9, 1]},
    ]
    pairs, skipped = expand_questions(specs, [1, 3])
    assert pairs == [("What is <region>?", [1]), ("What is <region>?", [3]), ("<region> vs <region>?", [1, 3]), ("<region> near <region>?", [3, 1])]
    assert len(skipped) == 1 and "[9]" in skipped[0]
    pairs, skipped = expand_questions(specs[1:2], [1])
    assert pairs == [] and "needs 2 objects" in skipped[0]
