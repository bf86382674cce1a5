"""`pixelrefer demo`: the embedded default, end to end on one machine.

Makes a few sample videos with moving shapes, indexes them on local Ray with the `tiny` models
(random weights: the captions are placeholder text by construction, and labelled `tiny-*` in every
row), then prints what `pixelrefer query` shows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

TINY_NOTE = (
    "note: the `tiny` models have random weights, so their captions and answers are random placeholder "
    "text by construction; index with real checkpoints (`pixelrefer index --model ... --tracker ...`) "
    "for real ones"
)


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="demo-output", help="where the sample videos and the tables go")
    parser.add_argument("--videos", type=int, default=3, help="how many sample videos to make")
    parser.add_argument("--mode", choices=("lite", "full"), default="lite")


def _parse(add_arguments: Callable[[argparse.ArgumentParser], None], argv: list[str]) -> argparse.Namespace:
    """Parse with a subcommand's own options, as `pixelrefer` would, without importing the CLI."""
    parser = argparse.ArgumentParser(prog="pixelrefer")
    add_arguments(parser)
    return parser.parse_args(argv)


def demo_main(args: argparse.Namespace) -> int:
    from jobs.index import add_index_arguments, index_main
    from jobs.query import add_query_arguments, query_main
    from pipeline.samples import make_sample_videos

    work = Path(args.workdir).resolve()
    videos, output = work / "videos", work / "index"
    make_sample_videos(videos, count=args.videos)
    questions = work / "questions.json"
    questions.write_text(json.dumps({"*": ["What is <region> doing?"]}))
    print(f"made {args.videos} sample videos in {videos}", file=sys.stderr)
    index_args = _parse(add_index_arguments, [
        str(videos), str(output), "--model", "tiny", "--tracker", "tiny", "--mode", args.mode,
        "--fps", "2", "--max-new-tokens", "12", "--questions", str(questions),
    ])  # fmt: skip
    index_args.command_name = "index"
    code = index_main(index_args)
    if code != 0:
        return code
    sql = (
        "SELECT v.uri, c.object_id, round(c.ts_start, 2) AS ts_start, round(c.ts_end, 2) AS ts_end, c.model, c.caption "
        "FROM captions c JOIN videos v USING (video_id) ORDER BY v.uri, c.object_id"
    )
    print(f"\n{TINY_NOTE}", file=sys.stderr)  # next to the captions it explains
    print(f"\n$ pixelrefer query {output} --sql \"{sql}\"\n", file=sys.stderr)
    return query_main(_parse(add_query_arguments, [str(output), "--sql", sql]))
