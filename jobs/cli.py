"""The `pixelrefer` command: one parser, one subcommand per job (see DESIGN.md, "Command line").

Only this module imports the subcommands; a subcommand never imports it, so each job module can
be run or tested alone (`python -m jobs.query ...`) and submit/demo reuse their peers directly.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    from jobs.demo import add_demo_arguments, demo_main
    from jobs.embed import add_embed_arguments, embed_main
    from jobs.index import add_index_arguments, index_main
    from jobs.migrate import add_migrate_arguments, migrate_main
    from jobs.models import add_models_arguments, models_main
    from jobs.query import add_query_arguments, query_main
    from jobs.report import add_report_arguments, report_main
    from jobs.submit import add_submit_arguments, submit_main

    parser = argparse.ArgumentParser(prog="pixelrefer", description="Object-level video indexing with SAM 2 and PixelRefer on Ray")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    index = sub.add_parser("index", help="index the videos under SOURCE into tables under OUTPUT")
    add_index_arguments(index)
    index.set_defaults(func=index_main, command_name="index")

    nightly = sub.add_parser("nightly", help="incremental index: only new or changed videos (same options as index)")
    add_index_arguments(nightly)
    nightly.set_defaults(func=index_main, command_name="nightly")

    query = sub.add_parser("query", help="query the committed tables (DuckDB)")
    add_query_arguments(query)
    query.set_defaults(func=query_main)

    embed = sub.add_parser("embed", help="add caption and answer embeddings where an index has none, and bring its "
                           "search index (query --like) up to date")
    add_embed_arguments(embed)
    embed.set_defaults(func=embed_main)

    report = sub.add_parser("report", help="HTML report of one video: frames with masks, captions, answers")
    add_report_arguments(report)
    report.set_defaults(func=report_main)

    migrate = sub.add_parser("migrate", help="convert an OUTPUT of the pre-Delta Parquet layout into Delta tables, in place")
    add_migrate_arguments(migrate)
    migrate.set_defaults(func=migrate_main)

    submit = sub.add_parser("submit", help="run a pixelrefer command on a Ray cluster through the Ray Jobs API")
    add_submit_arguments(submit)
    submit.set_defaults(func=submit_main)

    demo = sub.add_parser("demo", help="make sample videos, index them with tiny models, show the tables")
    add_demo_arguments(demo)
    demo.set_defaults(func=demo_main)

    models = sub.add_parser("models", help="download model checkpoints, or check that one loads")
    add_models_arguments(models)
    models.set_defaults(func=models_main)

    from jobs.maintain import add_maintain_arguments, maintain_main
    from jobs.serve.command import add_serve_arguments, serve_main

    maintain = sub.add_parser("maintain", help="compact OUTPUT's tables, remove killed runs' leftovers and old files")
    add_maintain_arguments(maintain)
    maintain.set_defaults(func=maintain_main)

    serve = sub.add_parser("serve", help="local web app over OUTPUT: search, play videos with their masks, inspect objects")
    add_serve_arguments(serve)
    serve.set_defaults(func=serve_main)

    from jobs.evaluate import add_eval_arguments, eval_main
    from jobs.export import add_export_arguments, export_main

    export = sub.add_parser("export", help="write the index's tracks as YouTube-VIS, MOTS, MOT or CVAT for video files")
    add_export_arguments(export)
    export.set_defaults(func=export_main)

    evaluate = sub.add_parser("eval", help="score the index's tracks against ground truth (TrackEval: HOTA, IDF1, "
                              "ID switches, MOTA)")
    add_eval_arguments(evaluate)
    evaluate.set_defaults(func=eval_main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
