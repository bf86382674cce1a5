"""`pixelrefer export`: the committed index's tracks in the formats other tools read (YouTube-VIS,
MOTS, MOT, CVAT for video); the writers live in `pipeline.export`.

Exit codes: 0 written; 1 OUTPUT or --out unreadable/unwritable; 2 bad input (unknown format or
video, empty selection, bad options).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from jobs.store_command import run_on_output


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.export import FORMATS

    parser.add_argument("output", metavar="OUTPUT", help="index folder or fsspec URL (s3://bucket/index)")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="ytvis: one YouTube-VIS JSON file; mots: MOTS txt + PNG per video; mot: MOT boxes per "
                             "video; cvat: CVAT for video 1.1 XML per video (see the README for numbering)")
    parser.add_argument("--out", required=True, metavar="PATH",
                        help="where to write: a file for ytvis, a folder for the others (local or fsspec URL)")
    parser.add_argument("--video", metavar="ID|URI", action="append", default=None,
                        help="only this video (id, unique id prefix or uri); repeat for more (default: all)")
    parser.add_argument("--label", metavar="L", default=None, help="only objects labelled L")
    parser.add_argument("--storage-options", metavar="JSON", default=None,
                        help="fsspec options for OUTPUT and --out, e.g. '{\"profile\": \"prod\"}'")


def export_main(args: argparse.Namespace) -> int:
    from pipeline.export import ExportError, export

    def work(storage_options: dict) -> None:
        counts = export(args.output, args.format, args.out, storage_options, videos=args.video, label=args.label,
                        note=lambda line: print(line, file=sys.stderr))
        print(f"exported {', '.join(f'{v} {k}' for k, v in counts.items())} as {args.format} to {args.out}",
              file=sys.stderr)

    return run_on_output(args.storage_options, work, "the export is incomplete", usage_errors=(ExportError,))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pixelrefer export", description=__doc__.split("\n\n")[0])
    add_export_arguments(parser)
    return export_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
