"""The DuckDB views of an index: each table's Delta files, and the commit rule applied on top.

`ViewSource` reads what the views need from the Delta logs (`pipeline.store.TableStore`): each
table's current files and, for `--as-of`, the `runs` table at that version. `table_views` writes
the CREATE VIEW statements (see `jobs.query_sql` for the rules they apply).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any, Mapping

from jobs.query_errors import LegacyLayoutError, NoCommittedRun, QueryError
from pipeline.store import OutputError, TableStore
from pipeline.store.commit import split_commit
from pipeline.store.tables import COMMIT_PROPERTY, LegacyLayout
from schemas.tables import TABLES


@dataclasses.dataclass
class ViewSource:
    """Per table, the Parquet files the views read (runs: at `as_of`), and the runs versions."""

    files: dict[str, list[str]]
    runs_versions: dict[tuple[str, int], dict[str, Any]]

    @classmethod
    def open(cls, output: str, storage_options: Mapping[str, Any] | None,
             as_of: int | dt.datetime | None = None) -> "ViewSource":
        try:
            store = TableStore(output, storage_options)
            store.check_layout()
            if not store.exists("runs"):
                raise NoCommittedRun(
                    f"no committed run in OUTPUT {store.shown!r}: it has no runs table (runs become visible only "
                    "when they commit)" if store.fs.exists(store.root) else f"OUTPUT {store.shown!r} does not exist")
            files = {name: store.files(name) for name in TABLES if name != "runs"}
            runs = store.open("runs", version=as_of)
            files["runs"] = list(runs.file_uris())
            versions = _runs_versions(store.history("runs"), runs.version())
        except LegacyLayout as exc:
            raise LegacyLayoutError(str(exc)) from exc
        except OutputError as exc:
            raise QueryError(str(exc)) from exc
        except (ValueError, TypeError) as exc:  # delta-rs: a version or time outside the table's history
            raise QueryError(f"--as-of {as_of}: {exc}") from exc
        return cls(files, versions)


def _runs_versions(history: list[dict[str, Any]], upto: int) -> dict[tuple[str, int], dict[str, Any]]:
    """(run_id, commit_index) -> the `runs` version (and its time) that committed it."""
    found = {}
    for entry in history:
        key = entry.get(COMMIT_PROPERTY)
        if key and int(entry["version"]) <= upto:
            found[split_commit(key)] = {"version": int(entry["version"]), "timestamp": entry.get("timestamp")}
    return found


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _scan(name: str, files: list[str]) -> str:
    """The table's files (as of its log), or the registered empty table of its schema."""
    if not files:
        return f"_empty_{name}"
    listed = ", ".join(_quote(f) for f in files)
    return f"read_parquet([{listed}], union_by_name = true)"


def table_views(source: ViewSource, model: str | None = None) -> list[str]:
    """CREATE VIEW statements: runs, videos (committed, per `model`), the children, latest_videos."""
    def columns(name: str, alias: str) -> str:
        return ", ".join(f'{alias}."{f.name}"' for f in TABLES[name])

    views = [f'CREATE VIEW runs AS SELECT {columns("runs", "r")} FROM {_scan("runs", source.files["runs"])} r']
    by_model = f" AND (v.model = {_quote(model)} OR v.status = 'removed')" if model is not None else ""
    views.append(
        f'CREATE VIEW videos AS SELECT {columns("videos", "v")} FROM {_scan("videos", source.files["videos"])} v '
        "WHERE EXISTS (SELECT 1 FROM runs c WHERE c.run_id = v.run_id "
        f"AND c.commit_index = coalesce(v.commit_index, 0)){by_model}"
    )
    for name in ("clips", "objects", "masks", "captions", "qa", "tracklets"):
        views.append(
            f'CREATE VIEW {name} AS SELECT {columns(name, "t")} FROM {_scan(name, source.files[name])} t '
            "SEMI JOIN videos v ON t.video_id = v.video_id AND t.run_id = v.run_id"
        )
    views.append(
        f'CREATE VIEW embeddings AS SELECT {columns("embeddings", "t")} FROM '
        f'{_scan("embeddings", source.files["embeddings"])} t '
        "SEMI JOIN videos v ON t.video_id = v.video_id AND t.text_run_id = v.run_id "
        "WHERE t.run_id IN (SELECT run_id FROM runs)"
    )
    views.append(
        "CREATE VIEW latest_videos AS SELECT * EXCLUDE (_newest) FROM ("
        "SELECT *, row_number() OVER (PARTITION BY uri ORDER BY indexed_at DESC NULLS LAST, run_id DESC) AS _newest "
        "FROM videos WHERE status IN ('ok', 'removed')) WHERE _newest = 1 AND status = 'ok'"
    )
    return views
