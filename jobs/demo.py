"""`pixelrefer demo`: the embedded default, end to end on one machine.

Makes a few sample videos with moving shapes, indexes them on local Ray with the `tiny` models
(random weights: the captions are gibberish by construction, and labelled `tiny-*` in every row),
then prints what `pixelrefer query` shows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="demo-output", help="where the sample videos and the tables go")
    parser.add_argument("--videos", type=int, default=3, help="how many sample videos to make")
    parser.add_argument("--mode", choices=("lite", "full"), default="lite")


def demo_main(args: argparse.Namespace) -> int:
    from jobs.cli import build_parser
    from pipeline.samples import make_sample_videos

    work = Path(args.workdir).resolve()
    videos, output = work / "videos", work / "index"
    make_sample_videos(videos, count=args.videos)
    questions = work / "questions.json"
    questions.write_text(json.dumps({"*": ["What is <region> doing?"]}))
    print(f"made {args.videos} sample videos in {videos}", file=sys.stderr)
    parser = build_parser()
    index_args = parser.parse_args([
        "index", str(videos), str(output), "--model", "tiny", "--tracker", "tiny", "--mode", args.mode,
        "--fps", "2", "--max-new-tokens", "12", "--questions", str(questions),
    ])
    code = index_args.func(index_args)
    if code != 0:
        return code
    sql = (
        "SELECT v.uri, c.object_id, round(c.ts_start, 2) AS ts_start, round(c.ts_end, 2) AS ts_end, c.model, c.caption "
        "FROM captions c JOIN videos v USING (video_id) ORDER BY v.uri, c.object_id"
    )
    print(f"\n$ pixelrefer query {output} --sql \"{sql}\"\n", file=sys.stderr)
    query_args = parser.parse_args(["query", str(output), "--sql", sql])
    return query_args.func(query_args)
