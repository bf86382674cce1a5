"""`pixelrefer migrate OUTPUT`: convert an index of the pre-Delta Parquet layout into Delta tables, in place.

Commands of this version refuse an OUTPUT of the old layout (``<table>/run_id=<id>/*.parquet``
without a ``_delta_log``) and name this command. It converts every table, checks the row counts,
and only then deletes the old folders, ``_staging/`` and ``_search/`` (the search index is rebuilt
by `pixelrefer embed` or the next index run). Interrupted, it is run again and resumes
(`pipeline.store.migrate`). A run the previous version was still publishing is refused unless
``--drop-unfinished`` accepts losing it; an index of the first layout (masks in
``objects.frames``) is refused: re-index it into a new OUTPUT.
"""

from __future__ import annotations

import argparse
from typing import Any

from jobs.store_command import run_on_output


def add_migrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", metavar="OUTPUT", help="index folder or fsspec URL (s3://bucket/index)")
    parser.add_argument("--storage-options", default=None, metavar="JSON", help="JSON object passed to fsspec for OUTPUT")
    parser.add_argument("--drop-unfinished", action="store_true",
                        help="migrate even though the previous pixelrefer left a run half-published (_staging/<run>/"
                             "_COMMIT); that run's rows are lost. Without it such an OUTPUT is refused: finish the "
                             "run with the previous version first")


def migrate_main(args: argparse.Namespace) -> int:
    """Exit 0 when migrated (or already), 1 when it could not migrate (nothing old deleted), 2 for bad input."""
    return run_on_output(args.storage_options, lambda options: _migrate(args, options),
                         "no old file was deleted unless every table was converted; run migrate again to finish")


def _migrate(args: argparse.Namespace, storage_options: dict[str, Any]) -> None:
    import sys

    from pipeline.storage_errors import redact_url
    from pipeline.store import TableStore
    from pipeline.store.migrate import migrate

    store = TableStore(args.output, storage_options)
    report = migrate(store, drop_unfinished=args.drop_unfinished,
                     progress=lambda message: print(message, file=sys.stderr, flush=True))
    for line in report.lines(redact_url(args.output)):
        print(line)
