"""User prompts: which objects to follow in which video, and the prompts-file parser.

A prompts file names videos (by full URI or by file name) and, for each, the objects to track, each
given as a box, points (positive / negative), or a mask (COCO RLE), on a timestamp or a frame:

JSON, a mapping from video to objects::

    {"s3://bucket/cam1.mp4": [{"box": [10, 20, 60, 80], "ts": 1.5}],
     "cam2.mp4": [{"points": [[40, 50], [70, 20]], "labels": [1, 0], "frame": 0, "object_id": 7},
                  {"mask": {"size": [120, 160], "counts": "..."}, "ts": 0.0}]}

or JSON Lines (or a JSON list) of records, each either one video with its objects or one object::

    {"video": "cam1.mp4", "objects": [{"box": [10, 20, 60, 80]}]}
    {"video": "cam2.mp4", "box": [5, 5, 40, 40], "ts": 2.0, "object_id": 3}

Object fields: `box` (x0, y0, x1, y1 in pixels), `points` ([[x, y], ...]) with `labels` (1 positive,
0 negative; default all positive), `mask` (COCO RLE `{"size": [h, w], "counts": str}`; uncompressed
integer counts are accepted and compressed), `ts` (seconds, the decoder's presentation time; the
nearest sampled frame is used) or `frame` (index among the video's *sampled* frames; default 0), and
`object_id` (optional; otherwise ids are assigned). A box may be combined with points; a mask stands
alone (SAM 2 takes a mask prompt instead of, not besides, points and boxes).

Concepts (for a SAM 3 tracker: every object of that kind is found and tracked) are given per video
instead of objects, as a list or one comma-separated string::

    {"cam1.mp4": {"concepts": ["person", "forklift"]}}
    {"video": "cam2.mp4", "concepts": "car, dog"}

This module checks only the file's structure (types, field names), so that a broken file fails the
run with a message naming the place. Whether a prompt fits its video (frame exists, box inside the
frame, mask of the frame's size) is checked by the tracker against the decoded frames, and a misfit
fails only that video.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

OBJECT_FIELDS = frozenset({"box", "points", "labels", "mask", "ts", "frame", "object_id"})
VIDEO_FIELDS = ("video", "uri")


class PromptsError(ValueError):
    """The prompts file (or a prompts JSON string) cannot be read or does not have the documented form."""


@dataclass(frozen=True)
class ObjectPrompt:
    """One object to follow, and where in the video it is given."""

    box: tuple[float, float, float, float] | None = None  # xyxy pixels
    points: tuple[tuple[float, float], ...] = ()  # (x, y)
    labels: tuple[int, ...] = ()  # 1 positive, 0 negative
    mask_rle: dict | None = None  # COCO RLE {"size": [h, w], "counts": str}
    ts: float | None = None
    frame: int | None = None  # one of ts / frame; neither means frame 0
    object_id: int | None = None

    @property
    def kind(self) -> str:
        """`mask`, `box`, `points` or `box+points`: used in messages and tests."""
        if self.mask_rle is not None:
            return "mask"
        if self.box is not None:
            return "box+points" if self.points else "box"
        return "points"

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (the prompts-file object fields), set fields only."""
        out: dict[str, Any] = {}
        if self.box is not None:
            out["box"] = list(self.box)
        if self.points:
            out["points"] = [list(p) for p in self.points]
            out["labels"] = list(self.labels)
        if self.mask_rle is not None:
            out["mask"] = dict(self.mask_rle)
        if self.ts is not None:
            out["ts"] = self.ts
        if self.frame is not None:
            out["frame"] = self.frame
        if self.object_id is not None:
            out["object_id"] = self.object_id
        return out


@dataclass(frozen=True)
class ConceptPrompt:
    """Concepts to find in a video (SAM 3): an entry of a prompts table beside the objects."""

    concepts: tuple[str, ...]


PromptEntry = ObjectPrompt | ConceptPrompt


def split_prompts(entries: Sequence[ObjectPrompt | ConceptPrompt]) -> tuple[list[ObjectPrompt], list[str]]:
    """A video's prompts-table entries as (objects, concepts), each concept once."""
    objects = [e for e in entries if isinstance(e, ObjectPrompt)]
    concepts: list[str] = []
    for e in entries:
        if isinstance(e, ConceptPrompt):
            concepts += [c for c in e.concepts if c not in concepts]
    return objects, concepts


def _number(value: Any, where: str, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PromptsError(f"{where}: {name} must be a finite number, got {value!r}")
    return float(value)


def _integer(value: Any, where: str, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PromptsError(f"{where}: {name} must be an integer, got {value!r}")
    return value


def _parse_box(value: Any, where: str) -> tuple[float, float, float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise PromptsError(f"{where}: box must be [x0, y0, x1, y1], got {value!r}")
    x0, y0, x1, y1 = (_number(v, where, "box coordinate") for v in value)
    return (x0, y0, x1, y1)


def _parse_points(points: Any, labels: Any, where: str) -> tuple[tuple[tuple[float, float], ...], tuple[int, ...]]:
    if not isinstance(points, (list, tuple)) or not points:
        raise PromptsError(f"{where}: points must be a non-empty list of [x, y], got {points!r}")
    parsed = []
    for p in points:
        if not isinstance(p, (list, tuple)) or len(p) != 2:
            raise PromptsError(f"{where}: each point must be [x, y], got {p!r}")
        parsed.append((_number(p[0], where, "point x"), _number(p[1], where, "point y")))
    if labels is None:
        return tuple(parsed), (1,) * len(parsed)
    if not isinstance(labels, (list, tuple)) or len(labels) != len(parsed):
        raise PromptsError(f"{where}: labels must be a list with one 1/0 per point ({len(parsed)}), got {labels!r}")
    if any(isinstance(lab, bool) or lab not in (0, 1) for lab in labels):
        raise PromptsError(f"{where}: labels must be 1 (positive) or 0 (negative), got {labels!r}")
    return tuple(parsed), tuple(int(lab) for lab in labels)


def _parse_mask(value: Any, where: str) -> dict:
    """A COCO RLE dict with string counts (uncompressed integer counts are compressed here)."""
    if not isinstance(value, Mapping) or set(value) != {"size", "counts"}:
        raise PromptsError(f"{where}: mask must be a COCO RLE {{\"size\": [h, w], \"counts\": ...}}")
    size = value["size"]
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in size)):
        raise PromptsError(f"{where}: mask size must be [height, width] of positive integers, got {size!r}")
    counts = value["counts"]
    if isinstance(counts, str):
        return {"size": [int(size[0]), int(size[1])], "counts": counts}
    if isinstance(counts, list) and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
        if sum(counts) != size[0] * size[1]:
            raise PromptsError(f"{where}: mask counts sum to {sum(counts)}, not height*width = {size[0] * size[1]}")
        from pycocotools import mask as mask_util

        rle = mask_util.frPyObjects({"size": list(size), "counts": counts}, size[0], size[1])
        return {"size": [int(size[0]), int(size[1])], "counts": rle["counts"].decode("ascii")}
    raise PromptsError(f"{where}: mask counts must be a COCO RLE string or a list of run lengths")


def parse_object(obj: Any, where: str = "prompt") -> ObjectPrompt:
    """One object's fields (see the module docstring) as an `ObjectPrompt`; raises `PromptsError`."""
    if not isinstance(obj, Mapping):
        raise PromptsError(f"{where}: an object must be a JSON object, got {type(obj).__name__}")
    unknown = set(obj) - OBJECT_FIELDS
    if unknown:
        raise PromptsError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {sorted(OBJECT_FIELDS)}")
    box = _parse_box(obj["box"], where) if obj.get("box") is not None else None
    points, labels = ((), ())
    if obj.get("points") is not None:
        points, labels = _parse_points(obj["points"], obj.get("labels"), where)
    elif obj.get("labels") is not None:
        raise PromptsError(f"{where}: labels given without points")
    mask = _parse_mask(obj["mask"], where) if obj.get("mask") is not None else None
    if box is None and not points and mask is None:
        raise PromptsError(f"{where}: an object needs a box, points or a mask")
    if mask is not None and (box is not None or points):
        raise PromptsError(f"{where}: a mask prompt cannot be combined with a box or points")
    ts = _number(obj["ts"], where, "ts") if obj.get("ts") is not None else None
    frame = _integer(obj["frame"], where, "frame") if obj.get("frame") is not None else None
    if ts is not None and frame is not None:
        raise PromptsError(f"{where}: give either ts or frame, not both")
    object_id = _integer(obj["object_id"], where, "object_id") if obj.get("object_id") is not None else None
    return ObjectPrompt(box=box, points=points, labels=labels, mask_rle=mask, ts=ts, frame=frame, object_id=object_id)


def _objects(value: Any, where: str) -> list[ObjectPrompt]:
    if not isinstance(value, list):
        raise PromptsError(f"{where}: expected a list of objects, got {type(value).__name__}")
    return [parse_object(o, f"{where}, object {i}") for i, o in enumerate(value)]


def parse_concepts(value: Any, where: str = "--find") -> list[str]:
    """Concepts from `"person, car"` or `["person", "car"]`: stripped, in order, each once.

    Raises `PromptsError` naming `where` for an empty list or an empty or non-string concept.
    """
    if isinstance(value, str):
        items: list[Any] = value.split(",")
        if not value.strip():
            raise PromptsError(f"{where}: no concept given (expected e.g. 'person, car')")
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise PromptsError(f"{where}: concepts must be a list of strings or one comma-separated string, got {value!r}")
    out: list[str] = []
    for k, item in enumerate(items):
        if not isinstance(item, str) or not item.strip():
            raise PromptsError(f"{where}: concept {k + 1} is empty or not a string ({item!r}) in {value!r}")
        if item.strip() not in out:
            out.append(item.strip())
    if not out:
        raise PromptsError(f"{where}: no concept given (expected e.g. 'person, car')")
    return out


def _record(record: Any, where: str) -> tuple[str, list[PromptEntry]]:
    """A JSONL / list record: `{"video": ..., "objects": [...]}` or `{"video": ..., <object fields>}`."""
    if not isinstance(record, Mapping):
        raise PromptsError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    keys = [k for k in VIDEO_FIELDS if k in record]
    if len(keys) != 1 or not isinstance(record[keys[0]], str) or not record[keys[0]]:
        raise PromptsError(f"{where}: a record needs exactly one of {list(VIDEO_FIELDS)} naming the video")
    video = record[keys[0]]
    rest = {k: v for k, v in record.items() if k != keys[0]}
    if "concepts" in rest:
        if len(rest) != 1:
            raise PromptsError(f"{where} ({video}): a record with 'concepts' takes no other fields, got {sorted(rest)}")
        return video, [ConceptPrompt(tuple(parse_concepts(rest["concepts"], f"{where} ({video})")))]
    if "objects" in rest:
        if len(rest) != 1:
            raise PromptsError(f"{where}: a record with 'objects' takes no other fields, got {sorted(rest)}")
        return video, _objects(rest["objects"], f"{where} ({video})")
    return video, [parse_object(rest, f"{where} ({video})")]


def _add(table: dict[str, list[PromptEntry]], video: str, objects: Iterable[PromptEntry]) -> None:
    table.setdefault(video, []).extend(objects)


def parse_prompts_text(text: str, source: str = "prompts") -> dict[str, list[PromptEntry]]:
    """Parse a prompts file's text (JSON mapping, JSON list of records, or JSON Lines)."""
    table: dict[str, list[PromptEntry]] = {}
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as doc_error:
        lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        for k, (n, line) in enumerate(lines):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                if k == 0:  # not JSON Lines either: the document's own error says where it breaks
                    raise PromptsError(f"{source}: not valid JSON or JSON Lines: {doc_error}") from doc_error
                raise PromptsError(f"{source}, line {n}: not valid JSON: {exc}") from exc
            _add(table, *_record(record, f"{source}, line {n}"))
        return table
    if isinstance(doc, Mapping) and any(isinstance(doc.get(k), str) for k in VIDEO_FIELDS):
        doc = [doc]  # a JSON Lines file of one record is also one JSON document
    if isinstance(doc, Mapping):
        for video, value in doc.items():
            where = f"{source}, video {video!r}"
            if isinstance(value, Mapping) and "concepts" in value:
                if set(value) != {"concepts"}:
                    raise PromptsError(f"{where}: give either 'concepts' or objects for a video, got {sorted(value)}")
                _add(table, video, [ConceptPrompt(tuple(parse_concepts(value["concepts"], where)))])
                continue
            if isinstance(value, Mapping) and set(value) == {"objects"}:
                value = value["objects"]
            _add(table, video, _objects(value, where))
    elif isinstance(doc, list):
        for i, record in enumerate(doc):
            _add(table, *_record(record, f"{source}, record {i}"))
    else:
        raise PromptsError(f"{source}: expected a JSON object or list at the top level, got {type(doc).__name__}")
    return table


def load_prompts(path_or_url: str, storage_options: dict | None = None) -> dict[str, list[PromptEntry]]:
    """Read a prompts file from any fsspec URL (local, s3://, ...); key: video URI or file name."""
    import fsspec

    try:
        with fsspec.open(path_or_url, "rt", encoding="utf-8", **(storage_options or {})) as f:
            text = f.read()
    except Exception as exc:  # noqa: BLE001 - fsspec backends raise many types (OSError, botocore, ...)
        raise PromptsError(f"cannot read prompts file {path_or_url}: {type(exc).__name__}: {exc}") from exc
    return parse_prompts_text(text, source=str(path_or_url))


def _normalise(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


def _basename(uri: str) -> str:
    return _normalise(uri).split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]


def prompts_for(video_uri: str, table: Mapping[str, list[PromptEntry]]) -> list[PromptEntry] | None:
    """The prompts of one video: its full URI first (with or without `file://`), then its file name."""
    if video_uri in table:
        return list(table[video_uri])
    target = _normalise(video_uri)
    for key, value in table.items():
        if _normalise(key) == target:
            return list(value)
    name = _basename(video_uri)
    if name in table:
        return list(table[name])
    return None


def prompts_to_json(prompts: Sequence[ObjectPrompt]) -> str:
    """The JSON string the pipeline carries in a row (a list of prompts-file object fields)."""
    return json.dumps([p.to_dict() for p in prompts], separators=(",", ":"))


def prompts_from_json(s: str) -> list[ObjectPrompt]:
    """Inverse of `prompts_to_json`; raises `PromptsError` for a malformed string."""
    try:
        doc = json.loads(s)
    except (json.JSONDecodeError, TypeError) as exc:
        raise PromptsError(f"prompts JSON is not valid JSON: {exc}") from exc
    return _objects(doc, "prompts")
