"""Output formats of `pixelrefer query`: table, json, jsonl, csv.

Every writer streams: it writes each record batch as it arrives and never collects the result, so
a query over a large index starts printing at once and its memory stays bounded. `json` is one
JSON document (an array of row objects; `--video` one object) so that `json.load` and `jq '.[0]'`
work; `jsonl` is one object per line for tools that read rows one at a time.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import decimal
import json
import math
from typing import Any, Callable, Iterator, Sequence, TextIO

import pyarrow as pa

from jobs.query_errors import QueryError, duckdb_errors
from jobs.query_video import VideoResult

FORMATS = ("table", "json", "jsonl", "csv")
TABLE_CELL_WIDTH = 60

Rows = pa.RecordBatchReader | pa.Table


def to_jsonable(value: Any) -> Any:
    """Plain JSON values: timestamps as ISO 8601, bytes as base64, NaN/inf as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, pa.MonthDayNano):  # DuckDB's INTERVAL, e.g. `ended_at - started_at`
        interval = _interval(value)
        return interval.total_seconds() if isinstance(interval, dt.timedelta) else interval
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        # pyarrow gives maps as lists of (key, value) pairs; keep them as lists.
        return [to_jsonable(v) for v in value]
    return value


def _interval(value: "pa.MonthDayNano") -> dt.timedelta | str:
    """A timedelta when the interval has no months (their length varies), else ISO 8601 text."""
    delta = dt.timedelta(days=value.days, microseconds=value.nanoseconds / 1000)
    if not value.months:
        return delta
    return f"P{value.months}M{value.days}DT{value.nanoseconds / 1e9:g}S"


def _json_text(value: Any) -> str:
    return json.dumps(to_jsonable(value), ensure_ascii=False)


def _cell_text(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, pa.MonthDayNano):
        return str(_interval(value))
    if isinstance(value, (dict, list, tuple)):
        return _json_text(value)
    if isinstance(value, dt.datetime):
        return value.isoformat(sep=" ")
    return str(value).replace("\n", " ")


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _batches(reader: Rows) -> Iterator[pa.RecordBatch]:
    """Batches as they arrive; an error met mid-stream (a file unreadable) becomes a QueryError."""
    with duckdb_errors():
        if isinstance(reader, pa.Table):
            yield from reader.to_batches()
            return
        try:
            yield from reader
        except pa.ArrowException as exc:  # DuckDB errors can surface through the Arrow stream
            raise QueryError(f"query failed while reading: {exc}") from exc


def _rows(reader: Rows) -> Iterator[dict[str, Any]]:
    for batch in _batches(reader):
        yield from batch.to_pylist()


def write_table(reader: Rows, out: TextIO) -> int:
    """Aligned text columns. Widths come from the first batch so output can start immediately."""
    schema = reader.schema
    numeric = [pa.types.is_integer(f.type) or pa.types.is_floating(f.type) for f in schema]
    widths: list[int] | None = None
    count = 0
    for batch in _batches(reader):
        rows = [[_clip(_cell_text(v), TABLE_CELL_WIDTH) for v in row.values()] for row in batch.to_pylist()]
        if widths is None:
            widths = [max([len(f.name)] + [len(r[i]) for r in rows]) for i, f in enumerate(schema)]
            _write_row([f.name for f in schema], widths, [False] * len(widths), out)
            out.write("  ".join("-" * w for w in widths).rstrip() + "\n")
        for row in rows:
            _write_row(row, widths, numeric, out)
        count += len(rows)
    if widths is None:  # no rows at all: still show the header
        widths = [len(f.name) for f in schema]
        _write_row([f.name for f in schema], widths, [False] * len(widths), out)
    out.write(f"({count} row{'s' if count != 1 else ''})\n")
    return count


def _write_row(cells: Sequence[str], widths: Sequence[int], right: Sequence[bool], out: TextIO) -> None:
    parts = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)]
    out.write("  ".join(parts).rstrip() + "\n")


def write_json(reader: Rows, out: TextIO) -> int:
    """One JSON array of row objects, one row a line, streamed.

    The opening bracket waits for the first row, so a query that fails before any row leaves
    stdout empty rather than holding half a document.
    """
    count = 0
    for row in _rows(reader):
        out.write(("[\n" if count == 0 else ",\n") + _json_text(row))
        count += 1
    out.write("\n]\n" if count else "[]\n")
    return count


def write_jsonl(reader: Rows, out: TextIO) -> int:
    """JSON Lines: one object per row, written as each batch arrives."""
    count = 0
    for row in _rows(reader):
        out.write(_json_text(row) + "\n")
        count += 1
    return count


def write_csv(reader: Rows, out: TextIO) -> int:
    """CSV with a header; nested values (lists, structs) are written as JSON text in their cell."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(reader.schema.names)
    count = 0
    for row in _rows(reader):
        writer.writerow([_csv_cell(v) for v in row.values()])
        count += 1
    return count


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, pa.MonthDayNano):
        return to_jsonable(value)
    if isinstance(value, (dict, list, tuple)):
        return _json_text(value)
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return value


WRITERS: dict[str, Callable[[Rows, TextIO], int]] = {
    "table": write_table,
    "json": write_json,
    "jsonl": write_jsonl,
    "csv": write_csv,
}


def write_video(result: VideoResult, fmt: str, out: TextIO) -> None:
    """`--video` output: sections for people (table), one document (json, jsonl), one flat table (csv)."""
    if fmt == "json":
        out.write(json.dumps(to_jsonable(result.to_dict()), ensure_ascii=False, indent=2) + "\n")
        return
    if fmt == "jsonl":
        out.write(_json_text(result.to_dict()) + "\n")
        return
    if fmt == "csv":
        write_csv(result.timeline(), out)
        return
    doc = result.to_dict()
    video = doc["video"]
    out.write(f"video {video['video_id']}  ({video['uri']})\n")
    keys = ("status", "error", "run_id", "model", "tracker", "indexed_at", "duration_s", "width", "height",
            "sampled_fps", "num_sampled", "clips")  # fmt: skip
    for key in keys:
        if video.get(key) is not None:
            out.write(f"  {key:<11} {_cell_text(video[key])}\n")
    if len(doc["runs"]) > 1:
        others = ", ".join(f"{r['run_id']} ({r['status']}, {r['model']})" for r in doc["runs"])
        out.write(f"  runs        {others}\n")
    objects = [{**o, "clips": _ranges(o["clips"]), "spans": "; ".join(f"{a:g}-{b:g}" for a, b in o["spans"])}
               for o in doc["objects"]]  # fmt: skip
    clips = [{**c, "object_ids": _ranges(c["object_ids"])} for c in doc["clips"]]
    sections = (
        ("clips", clips, ["clip_index", "ts_start", "ts_end", "boundary", "status", "num_sampled", "object_ids",
                          "error"]),
        ("objects", objects, ["object_id", "source", "label", "first_ts", "last_ts", "num_frames", "clips",
                              "spans"]),
        ("timeline", _timeline_rows(doc), ["clip", "ts_start", "ts_end", "object_ids", "text"]),
    )  # fmt: skip
    for title, rows, columns in sections:
        out.write(f"\n{title}:\n")
        table = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows]) if rows else None
        write_table(table if table is not None else pa.table({c: [] for c in columns}), out)


def _ranges(values: Sequence[int]) -> str:
    """`[0, 1, 2, 5]` as "0-2, 5": an object seen in 200 clips still fits a table cell."""
    parts: list[list[int]] = []
    for v in sorted(values):
        if parts and parts[-1][1] == v - 1:
            parts[-1][1] = v
        else:
            parts.append([v, v])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)


def _timeline_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Captions and answers clip by clip, then the whole-track captions (`clip` "track")."""
    rows: list[dict[str, Any]] = []
    for clip in doc["clips"]:
        for cap in clip["captions"]:
            rows.append({"clip": str(clip["clip_index"]), "ts_start": cap["ts_start"], "ts_end": cap["ts_end"],
                         "object_ids": str(cap["object_id"]), "text": cap["caption"]})  # fmt: skip
        for qa in clip["answers"]:
            rows.append({"clip": str(clip["clip_index"]), "ts_start": clip["ts_start"], "ts_end": clip["ts_end"],
                         "object_ids": " ".join(str(i) for i in qa["object_ids"] or []),
                         "text": f"Q: {qa['question']} A: {qa['answer']}"})  # fmt: skip
    for cap in doc["captions"]:
        if cap["clip_index"] is None:
            rows.append({"clip": "track", "ts_start": cap["ts_start"], "ts_end": cap["ts_end"],
                         "object_ids": str(cap["object_id"]), "text": cap["caption"]})  # fmt: skip
    for qa in doc["qa"]:
        if qa["clip_index"] is None:
            rows.append({"clip": "video", "ts_start": qa["ts_start"], "ts_end": qa["ts_end"],
                         "object_ids": " ".join(str(i) for i in qa["object_ids"] or []),
                         "text": f"Q: {qa['question']} A: {qa['answer']}"})  # fmt: skip
    return rows
