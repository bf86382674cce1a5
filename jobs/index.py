"""`pixelrefer index` / `pixelrefer nightly`: build the config from the command line, run, summarise.

Exit status (DESIGN.md): 0 when the run committed, even if some videos failed (they are rows with
status 'failed'); non-zero when it could not commit.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.config import DEFAULT_CLIP_SECONDS, DISCOVERY_POLICIES, MAX_CLIP_SECONDS, IndexConfig

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_NOT_COMMITTED = 1
EXIT_USAGE = 2


def add_index_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SOURCE", help="folder, file or fsspec URL (s3://bucket/prefix) of videos")
    parser.add_argument("output", metavar="OUTPUT", help="folder or fsspec URL for the Parquet tables")
    parser.add_argument("--model", default="tiny", help="PixelRefer checkpoint: local folder, hub id, or 'tiny'")
    parser.add_argument("--tracker", default="tiny", help="SAM 2 or SAM 3 checkpoint: local folder, hub id, 'tiny' (SAM 2) or 'tiny-sam3'")
    parser.add_argument("--mode", choices=("lite", "full"), default="lite", help="lite: Object-Only (default); full: Vision-Object")
    rate = parser.add_mutually_exclusive_group()
    rate.add_argument("--fps", type=float, default=1.0, help="frames sampled per second (default 1)")
    rate.add_argument("--num-frames", type=int, default=None, help="frames sampled uniformly per video")
    parser.add_argument("--max-frames", type=int, default=None,
                        help="frame budget per video: longer videos are sampled more sparsely (recorded in "
                             "videos.sampled_fps, named in the summary); default: none, --fps holds for any length")
    parser.add_argument("--clip-seconds", type=float, default=DEFAULT_CLIP_SECONDS,
                        help=f"longest clip, the unit of work (default {DEFAULT_CLIP_SECONDS:g}, at most "
                             f"{MAX_CLIP_SECONDS:g}); clips also end at shot cuts")
    parser.add_argument("--cuts", choices=("shot", "none"), default="shot",
                        help="shot: split at shot cuts (TransNetV2) within --clip-seconds; none: fixed windows")
    parser.add_argument("--commit-every", type=float, default=10.0, metavar="MINUTES",
                        help="publish the videos finished so far every MINUTES (default 10); a killed run "
                             "resumes from its last commit")
    parser.add_argument("--max-side", type=int, default=1920, help="downscale frames whose longer side exceeds this")
    parser.add_argument("--prompts", default=None, help="JSON/JSONL file of objects to follow per video")
    parser.add_argument("--questions", default=None, help="JSON/JSONL file of questions per video or for all ('*')")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local instance)")
    parser.add_argument("--storage-options", default=None, help="JSON object passed to fsspec for SOURCE and OUTPUT (credentials, endpoint_url, "
                             "retries: {\"config_kwargs\": {\"retries\": {\"max_attempts\": 10}}})")
    parser.add_argument("--find", default=None, metavar="CONCEPTS",
                        help="concepts to find and track in every video, e.g. 'person, car, dog' (needs a SAM 3 "
                             "tracker: --tracker tiny-sam3, facebook/sam3 or a folder); objects get the concept as label")
    parser.add_argument("--max-objects", type=int, default=8, help="objects kept per video in automatic discovery")
    parser.add_argument("--discovery", choices=DISCOVERY_POLICIES, default="changed",
                        help="when later keyframes of a clip run SAM 2's object discovery: changed (default: only "
                             "where something may have entered) or every (each keyframe)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per caption or answer")
    parser.add_argument("--object-frames", type=int, default=8, metavar="K",
                        help="masked frames of an object shown to PixelRefer per caption, evenly spread over its "
                             "span in the clip (and over its whole track); default 8, Lite's cost grows about "
                             "linearly with K")
    parser.add_argument("--decode-timeout", type=float, default=120.0, help="seconds allowed to decode one video")
    parser.add_argument("--upstream-local-crop", action="store_true",
                        help="reproduce upstream Lite's per-frame cached local crop (quirk L3) instead of one crop per object")
    parser.add_argument("--retry-failed", action="store_true", help="index again videos whose earlier run failed")
    parser.add_argument("--max-attempts", type=int, default=3,
                        help="runs whose workers crash on a video before it is quarantined (default 3)")
    parser.add_argument("--max-gpus", type=float, default=None,
                        help="GPUs the cluster may grow to (an autoscaler adding nodes): the model pools may grow "
                             "that far; default: the GPUs present as each wave starts")
    parser.add_argument("--clips-per-call", type=int, default=16,
                        help="clips the referrer takes a call, sharing its model batches (default 16); fewer "
                             "finish each video sooner, more fill a large GPU")
    parser.add_argument("--embedder", default="wordllama", metavar="E|none",
                        help="sentence embedder of captions and answers for `query --like`: wordllama (default, "
                             "ships in its wheel), a transformers model folder or hub id, or none")
    parser.add_argument("--reid", choices=("on", "off"), default="on",
                        help="on (default): one object keeps one id across shot cuts and re-entries, merged by "
                             "appearance (tracklets table; `query --similar-to`); off: ids only as IoU linking gives them")
    parser.add_argument("--run-id", default=None, help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> IndexConfig:
    from actors.prompts import parse_concepts

    find = tuple(parse_concepts(args.find, "--find")) if getattr(args, "find", None) is not None else ()
    return IndexConfig(
        source=args.source, output=args.output, model=args.model, tracker=args.tracker, mode=args.mode,
        fps=args.fps, num_frames=args.num_frames, max_frames=args.max_frames, max_side=args.max_side,
        prompts=args.prompts, questions=args.questions, address=args.address,
        storage_options=IndexConfig.parse_storage_options(args.storage_options),
        max_objects=args.max_objects, max_new_tokens=args.max_new_tokens, object_frames=args.object_frames,
        decode_timeout_s=args.decode_timeout,
        upstream_local_crop=args.upstream_local_crop, retry_failed=args.retry_failed, run_id=args.run_id,
        max_attempts=args.max_attempts, command=getattr(args, "command_name", "index"),
        clip_seconds=args.clip_seconds, cuts=args.cuts, commit_every_min=args.commit_every,
        max_gpus=getattr(args, "max_gpus", None), clips_per_call=getattr(args, "clips_per_call", 16),
        embedder=getattr(args, "embedder", "wordllama"), find=find, reid=getattr(args, "reid", "on") == "on",
        discovery=getattr(args, "discovery", "changed"),
    )


def index_main(args: argparse.Namespace) -> int:
    from actors.prompts import PromptsError
    from models.embedders import EmbedderError
    from models.sam3 import ConceptError
    from pipeline.questions import QuestionsError
    from pipeline.run import run_index
    from pipeline.sizing import PlacementError
    from pipeline.store import OutputError
    from pipeline.sources import SourceError
    from pipeline.storage_errors import explain, is_storage_exception, redact

    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        summary = run_index(cfg)
    except (SourceError, OutputError, PromptsError, QuestionsError, EmbedderError, ConceptError) as exc:
        print(f"error: {redact(str(exc), cfg.storage_options)}", file=sys.stderr)
        return EXIT_NOT_COMMITTED
    except PlacementError as exc:
        print(f"error: this cluster cannot run the index: {exc}", file=sys.stderr)
        return EXIT_NOT_COMMITTED
    except Exception as exc:
        # A storage failure that no stage turned into a SourceError/OutputError is still the user's
        # problem to fix, not a crash: one line, without the botocore stack and without credentials.
        if not is_storage_exception(exc):
            raise
        log.debug("storage failure", exc_info=True)
        reason = explain(exc, "", role="storage", action="running the index", storage_options=cfg.storage_options)
        print(f"error: {reason}; nothing of this run was committed", file=sys.stderr)
        return EXIT_NOT_COMMITTED
    except KeyboardInterrupt:
        print("interrupted: this run was not committed (a publish cut short is completed by the next run)", file=sys.stderr)
        return 130
    for line in summary.lines():
        print(line, file=sys.stderr)
    return EXIT_OK if summary.committed else EXIT_NOT_COMMITTED
