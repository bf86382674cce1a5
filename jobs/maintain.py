"""`pixelrefer maintain OUTPUT`: compact OUTPUT's tables and delete what no reader needs any more.

Each commit of an index run adds small files to every table; reads slow down with their number.
This job (`pipeline.store.maintain`) removes the leftovers of killed runs older than the retention,
merges the small files, checkpoints and vacuums each table, and compacts the search index. It is
safe beside running index runs and queries as long as `--retain-hours` exceeds the longest of them.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Iterable, Mapping

from jobs.store_command import EXIT_USAGE, run_on_output

COLUMNS = ("table", "files", "rows", "leftovers", "vacuumed", "seconds", "note")


def add_maintain_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `pixelrefer maintain` (added to the umbrella CLI's subparser)."""
    from pipeline.store.maintain import DEFAULT_RETAIN_HOURS

    parser.add_argument("output", metavar="OUTPUT", help="index folder or fsspec URL (s3://bucket/index)")
    parser.add_argument(
        "--retain-hours", type=int, default=DEFAULT_RETAIN_HOURS, metavar="H",
        help=f"keep files and leftovers younger than H hours (default {DEFAULT_RETAIN_HOURS}): must exceed the "
        "longest index run and query that may be reading OUTPUT; 0 only when nothing else uses OUTPUT",
    )
    parser.add_argument("--storage-options", metavar="JSON", default=None,
                        help='fsspec options for OUTPUT, e.g. \'{"profile": "prod"}\'')


def maintain_main(args: argparse.Namespace) -> int:
    """Exit 0 when every table was maintained, 1 when the store or a table failed, 2 for bad input."""
    if args.retain_hours < 0:
        print(f"error: --retain-hours must be 0 or more, not {args.retain_hours}", file=sys.stderr)
        return EXIT_USAGE
    return run_on_output(args.storage_options, lambda options: _maintain(args, options),
                         "every step commits alone, so the tables hold all their rows; run it again")


def _maintain(args: argparse.Namespace, storage_options: dict[str, Any]) -> None:
    from pipeline.store import TableStore
    from pipeline.store.maintain import maintain, summary_rows

    store = TableStore(args.output, storage_options)
    result = maintain(store, retain_hours=args.retain_hours,
                      progress=lambda text: print(text, file=sys.stderr, flush=True))
    rows = list(summary_rows(result))
    if not rows:
        print(f"OUTPUT {store.shown} holds no tables yet: nothing to maintain")
        return
    print(render(rows))
    if result.search is not None:
        search = result.search
        print(search.note or f"search index: {search.fragments_before} -> {search.fragments_after} fragments, "
                             f"{search.rows} passages ({search.seconds:.1f} s)")
    print(f"done in {result.seconds:.1f} s (retention {result.retain_hours} h)")


def render(rows: Iterable[Mapping[str, Any]]) -> str:
    """A plain aligned table: readable in a terminal and in a job log."""
    cells = [[str(c) for c in COLUMNS]] + [[str(row.get(c, "")) for c in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in cells)
