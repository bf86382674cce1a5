"""`pixelrefer eval`: the committed index's tracks scored against a ground-truth file (YTVIS JSON
or MOTS text: masks; CVAT for video XML: boxes) with TrackEval: HOTA (with DetA, AssA), IDF1, ID
switches and MOTA per video and overall. How videos and frames are matched is in `pipeline.evaluate.scores`.

Exit codes: 0 scored; 1 OUTPUT unreadable; 2 bad input (unknown format, malformed ground truth,
ground truth of another video set, empty selection, bad options).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from jobs.store_command import run_on_output

COLUMNS = ("video", "frames", "gt_frames", "gt_tracks", "tracks", "HOTA", "DetA", "AssA", "IDF1", "IDSW", "MOTA")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.evaluate import GT_FORMATS

    parser.add_argument("output", metavar="OUTPUT", help="index folder or fsspec URL (s3://bucket/index)")
    parser.add_argument("--gt", required=True, metavar="FILE",
                        help="ground truth: a YTVIS JSON file; a MOTS <video>.txt or a folder of them; a CVAT for "
                             "video 1.1 .xml or a folder of them (boxes: compared with the index's boxes)")
    parser.add_argument("--format", default=None, choices=GT_FORMATS,
                        help="the ground truth's format (as `export --format` names it); default: from its name "
                             "(.json ytvis, .txt mots, .xml cvat; for a folder, its files')")
    parser.add_argument("--video", metavar="ID|URI", action="append", default=None,
                        help="only this video (repeat for more); ground-truth videos outside the selection are "
                             "left out")
    parser.add_argument("--scores-format", choices=("table", "json"), default="table",
                        help="how the scores are printed: table (default) or json, one document for scripts "
                             "(not --format, which names the ground truth's format here)")
    parser.add_argument("--storage-options", metavar="JSON", default=None,
                        help="fsspec options for OUTPUT and --gt, e.g. '{\"profile\": \"prod\"}'")


def eval_main(args: argparse.Namespace) -> int:
    from pipeline.export import ExportError

    def work(storage_options: dict) -> None:
        from pipeline.evaluate import score

        result = score(args.output, args.gt, args.format, storage_options, videos=args.video)
        if args.scores_format == "json":
            json.dump(result, sys.stdout, indent=1)
            sys.stdout.write("\n")
        else:
            sys.stdout.write(table([*result["videos"], result["overall"]]))

    return run_on_output(args.storage_options, work, "nothing was scored", usage_errors=(ExportError,))


def table(rows: list[dict[str, Any]]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    cells = [list(COLUMNS)] + [[cell(row[c]) for c in COLUMNS] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    return "".join("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))).rstrip() + "\n"
                   for r in cells)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pixelrefer eval", description=__doc__.split("\n\n")[0])
    add_eval_arguments(parser)
    return eval_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
