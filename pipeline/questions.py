"""The `--questions FILE` format: which questions to ask about the objects of which videos.

Two shapes are accepted, read through fsspec so the file may live next to the videos:

* JSON object: keys are a video URI, a file name, or "*" (every video); values are lists whose
  items are a question string or `{"question": str, "objects": [object_id, ...]}`.
* JSONL: one `{"video": URI|name|"*", "question": str, "objects": [...]}` per line.

`<region>` placeholders refer to objects in order. A question with one placeholder and no explicit
objects is asked of every object of the video; one with k placeholders and no explicit objects
refers to the video's first k objects.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any, Mapping

import fsspec

REGION = "<region>"


class QuestionsError(ValueError):
    """The questions file cannot be read or does not have the expected shape."""


def load_questions(path: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, list[dict]]:
    """Parse the file into {video key: [{"question": str, "objects": list[int] | None}, ...]}."""
    try:
        with fsspec.open(path, "rt", encoding="utf-8", **dict(storage_options or {})) as f:
            text = f.read()
    except Exception as exc:  # noqa: BLE001 - any failure to read is the same problem for the user
        raise QuestionsError(f"cannot read questions file {path!r}: {exc}") from exc
    table: dict[str, list[dict]] = {}
    try:
        data = json.loads(text)
        entries = _from_mapping(data, path)
    except json.JSONDecodeError:
        entries = _from_jsonl(text, path)
    for key, item in entries:
        table.setdefault(key, []).append(item)
    return table


def _item(value: Any, where: str) -> dict:
    if isinstance(value, str):
        question, objects = value, None
    elif isinstance(value, Mapping) and isinstance(value.get("question"), str):
        question, objects = value["question"], value.get("objects")
        if objects is not None and not (isinstance(objects, list) and all(isinstance(o, int) for o in objects)):
            raise QuestionsError(f"{where}: 'objects' must be a list of object ids")
    else:
        raise QuestionsError(f"{where}: expected a question string or {{'question': ..., 'objects': [...]}}")
    count = question.count(REGION)
    if count == 0:
        raise QuestionsError(f"{where}: question {question!r} has no {REGION} placeholder")
    if objects is not None and len(objects) != count:
        raise QuestionsError(f"{where}: question has {count} {REGION} placeholders but {len(objects)} objects")
    return {"question": question, "objects": objects}


def _from_mapping(data: Any, path: str) -> list[tuple[str, dict]]:
    if not isinstance(data, Mapping):
        raise QuestionsError(f"questions file {path!r}: expected a JSON object or JSON lines")
    out = []
    for key, values in data.items():
        if not isinstance(values, list):
            raise QuestionsError(f"questions file {path!r}, video {key!r}: expected a list of questions")
        out += [(key, _item(v, f"questions file {path!r}, video {key!r}")) for v in values]
    return out


def _from_jsonl(text: str, path: str) -> list[tuple[str, dict]]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"questions file {path!r}, line {n}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise QuestionsError(f"{where}: not JSON ({exc})") from exc
        if not isinstance(value, Mapping) or "video" not in value:
            raise QuestionsError(f"{where}: expected an object with 'video' and 'question'")
        out.append((str(value["video"]), _item(value, where)))
    return out


def questions_for(uri: str, table: Mapping[str, list[dict]]) -> list[dict]:
    """Questions for every video first, then those for this video by full URI or by file name."""
    name = posixpath.basename(uri.rstrip("/"))
    return list(table.get("*", [])) + list(table.get(uri, [])) + (list(table.get(name, [])) if name != uri else [])
