"""Read-only queries over a committed index: `pixelrefer query`.

The work lives in modules this command imports (they never import it):
`jobs.query_sql` (the read-only DuckDB sandbox, `open_index` for notebooks), `jobs.query_views`
(the views over the Delta tables, with the commit rule),
`jobs.query_search` (BM25 text search in SQL), `jobs.query_like` (`--like`: embeddings fused with
BM25), `jobs.query_similar` (`--similar-to`: objects by appearance), `jobs.query_video` (`--video`'s result),
`jobs.query_formats` (table, json, jsonl, csv) and `jobs.query_errors` (exit codes).

Exit codes: 0 success; 1 data problems (no committed run, unknown video, unreadable OUTPUT or
source video); 2 bad input (SQL errors, refused statements, bad options).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import sys
from typing import Callable, Sequence

import duckdb

from jobs.query_errors import EXIT_ERROR, EXIT_OK, QueryError, UsageError, translate_duckdb_error
from jobs.query_formats import FORMATS, WRITERS, write_video
from jobs.query_like import add_like_arguments, check_like_arguments, search_like
from jobs.query_search import DEFAULT_SEARCH_LIMIT
from jobs.query_similar import add_similar_arguments, search_similar
from jobs.query_sql import open_index, parse_storage_options


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """OUTPUT and its credentials: shared by `query` and `report`."""
    parser.add_argument("output", metavar="OUTPUT", help="index folder or fsspec URL (s3://bucket/index)")
    parser.add_argument(
        "--storage-options",
        metavar="JSON",
        default=None,
        help='fsspec options for OUTPUT and remote source videos, e.g. \'{"profile": "prod"}\'',
    )
    parser.add_argument("--model", metavar="M", default=None,
                        help="only runs of model M (a trial run with another model never hides these results)")
    parser.add_argument("--as-of", metavar="VERSION|TIMESTAMP", default=None, type=parse_as_of,
                        help="read the index as it was: a version of its runs table (listed by `pixelrefer query "
                             "OUTPUT`) or an ISO time, e.g. 2026-12-01T00:00:00Z")


def parse_as_of(text: str) -> int | dt.datetime:
    """`--as-of`: a runs-table version (a whole number) or an ISO 8601 time (UTC when no zone)."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a version number nor an ISO time "
                                         "(e.g. 2026-12-01T06:00:00Z)") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


def add_query_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `pixelrefer query` (added to the umbrella CLI's subparser)."""
    add_common_arguments(parser)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--sql",
        metavar="SQL",
        help="read-only SQL over videos, clips, objects, masks, captions, qa, runs, embeddings, tracklets "
        "(and latest_videos: latest ok run per video)",
    )
    mode.add_argument(
        "--video", metavar="ID|URI", help="one video's clips, objects and per-clip captions (video_id, id prefix or uri)"
    )
    mode.add_argument(
        "--text", metavar="WORDS", help="objects whose captions or answers match, best first, with the matching clip"
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="table",
        help="table (default); json: one JSON document (an array of rows, --video one object); "
        "jsonl: one JSON object per line; csv",
    )
    parser.add_argument("--limit", type=int, default=DEFAULT_SEARCH_LIMIT, help="--text: number of results")
    parser.add_argument("--run", metavar="RUN_ID", default=None, help="--video: show this run, not the latest")
    parser.add_argument("--label", metavar="L", default=None,
                        help="objects labelled L (a --find concept or PixelRefer's category), with their videos and "
                             "spans; with --like or --similar-to, only objects labelled L")
    add_like_arguments(parser)
    add_similar_arguments(parser)


def query_main(args: argparse.Namespace) -> int:
    """`pixelrefer query`: returns the exit code; errors go to stderr as one message."""
    return run_cli("query", lambda: _query(args))


def _query(args: argparse.Namespace) -> None:
    storage_options = parse_storage_options(args.storage_options)
    check_like_arguments(args)
    similar = getattr(args, "similar_to", None)
    if similar is not None and any(v is not None for v in (args.like, args.sql, args.video, args.text)):
        raise UsageError("--similar-to is a search of its own: it does not combine with --like, --sql, --video or "
                         "--text (--top and --label narrow it)")
    if (args.label is not None and args.like is None and similar is None
            and any(v is not None for v in (args.sql, args.video, args.text))):
        raise UsageError("--label lists objects on its own, or narrows --like; it does not combine with "
                         "--sql, --video or --text")
    out = sys.stdout
    with open_index(args.output, storage_options, model=args.model, as_of=args.as_of) as index:
        for note in index.notes:
            print(note, file=sys.stderr)
        writer = WRITERS[args.format]
        if similar is not None:
            writer(search_similar(index, similar, args.top, label=args.label, exact=args.exact,
                                  note=lambda line: print(line, file=sys.stderr)), out)
        elif args.like is not None:
            writer(search_like(index, args.like, args.top, video=args.video, label=args.label,
                               embedder=args.embedder, exact=args.exact,
                               note=lambda line: print(line, file=sys.stderr)), out)
        elif args.sql is not None:
            writer(index.reader(args.sql), out)
        elif args.video is not None:
            write_video(index.video(args.video, run_id=args.run), args.format, out)
        elif args.text is not None:
            writer(index.search(args.text, args.limit), out)
        elif args.label is not None:
            writer(index.labelled(args.label, args.limit), out)
        else:
            writer(index.runs(), out)
    out.flush()


def run_cli(prog: str, body: Callable[[], None]) -> int:
    """Run a command body: known errors become one stderr line and an exit code, never a traceback.

    Set PIXELREFER_DEBUG=1 to see the traceback of an unexpected error.
    """
    try:
        body()
        return EXIT_OK
    except QueryError as exc:
        print(f"pixelrefer {prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except duckdb.Error as exc:
        err = translate_duckdb_error(exc)
        print(f"pixelrefer {prog}: error: {err}", file=sys.stderr)
        return err.exit_code
    except BrokenPipeError:
        # `pixelrefer query ... | head`: the reader left; stop quietly like other Unix tools.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        print(f"pixelrefer {prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI promise: a message, not a traceback
        if os.environ.get("PIXELREFER_DEBUG"):
            raise
        print(f"pixelrefer {prog}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m jobs.query OUTPUT ...`: the same command without the umbrella CLI."""
    parser = argparse.ArgumentParser(prog="pixelrefer query", description=__doc__.split("\n\n")[0])
    add_query_arguments(parser)
    return query_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
