"""The errors of `pixelrefer query` and `report`: each carries its exit code.

They sit below every other query module (the SQL sandbox, the output formats, the commands all
raise or catch them), so the CLI prints one line and exits with the right status, never a
traceback. DuckDB's own exceptions are translated here into messages that say what to change.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import duckdb

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2

# What a user query may read; named in the messages of refused and unknown-table errors.
USER_VIEWS = ("videos", "clips", "objects", "masks", "captions", "qa", "runs", "embeddings", "tracklets",
              "latest_videos")


class QueryError(Exception):
    """A problem with the data or the environment (exit 1)."""

    exit_code = EXIT_ERROR


class UsageError(QueryError):
    """A problem with what the user typed (exit 2)."""

    exit_code = EXIT_USAGE


class RefusedQuery(UsageError):
    """A statement that would write, attach, change settings or read outside OUTPUT's tables."""


class NoCommittedRun(QueryError):
    """OUTPUT holds no committed run (maybe only the leftovers of a crashed or running job)."""


class VideoNotFound(QueryError):
    """No video matches the given id, id prefix or URI."""


class LegacyLayoutError(QueryError):
    """OUTPUT holds tables of the pre-Delta layout: `pixelrefer migrate` converts them."""


def translate_duckdb_error(exc: duckdb.Error) -> QueryError:
    """Map DuckDB's exception classes onto messages that tell the user what to change."""
    message = str(exc).strip()
    if isinstance(exc, duckdb.PermissionException):
        return RefusedQuery(
            "refused: the index is read-only and queries may only read the tables "
            f"{', '.join(USER_VIEWS)} under OUTPUT ({message})"
        )
    if isinstance(exc, duckdb.InvalidInputException) and "configuration has been locked" in message:
        return RefusedQuery(f"refused: settings cannot be changed on a read-only index ({message})")
    if isinstance(exc, duckdb.ParserException):
        return UsageError(f"SQL syntax error: {message}")
    if isinstance(exc, duckdb.CatalogException):
        return UsageError(f"{message}\n(the tables are: {', '.join(USER_VIEWS)})")
    if isinstance(exc, (duckdb.BinderException, duckdb.ConversionException)):
        return UsageError(message)
    if isinstance(exc, duckdb.IOException):
        return QueryError(f"could not read OUTPUT: {message}")
    return QueryError(f"query failed: {message}")


@contextlib.contextmanager
def duckdb_errors() -> Iterator[None]:
    """Re-raise DuckDB errors as QueryError so callers handle one exception family."""
    try:
        yield
    except duckdb.Error as exc:
        raise translate_duckdb_error(exc) from exc

