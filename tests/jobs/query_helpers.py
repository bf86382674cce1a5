"""What the `pixelrefer query` test modules share: the test index's run ids and checks of results."""

from __future__ import annotations

import pyarrow as pa

from index_builders import RUN1, RUN2, RUN3, STAGED_RUN, IndexInfo  # noqa: F401 - re-exported for the tests


def is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def assert_types_match(table: pa.Table, schema: pa.Schema) -> None:
    """Column types as the schema declares them (DuckDB may hand strings back as string views)."""
    def plain(t: pa.DataType) -> pa.DataType:
        if is_text(t):
            return pa.string()
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t):
            return pa.list_(plain(t.value_type))
        if pa.types.is_struct(t):
            return pa.struct([pa.field(f.name, plain(f.type)) for f in t])
        if pa.types.is_timestamp(t):  # DuckDB names UTC "Etc/UTC"
            return pa.timestamp(t.unit, tz="UTC" if t.tz in ("UTC", "Etc/UTC") else t.tz)
        return t

    assert [plain(f.type) for f in table.schema] == [plain(f.type) for f in schema], (table.schema, schema)


def assert_clean_error(code: int, err: str, expected_code: int, *phrases: str) -> None:
    assert code == expected_code, err
    assert "Traceback" not in err
    for phrase in phrases:
        assert phrase.lower() in err.lower(), err
