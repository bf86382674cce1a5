"""`pixelrefer models`: fetch the released checkpoints once, and check a checkpoint before a long run.

`download` exists for clusters without internet (KubeRay pods mount a volume): it fetches, on a machine
that has internet, every file a run needs (the PixelRefer repo, the vision tower its config names, the
SAM 2 repo) into the Hugging Face cache or plain folders, so that runs can then go offline with
`HF_HUB_OFFLINE=1`. `check` answers "will this checkpoint load?" in seconds, without a GPU and without
reading the weights' data: the strict key/shape check runs on the `meta` device against the files'
headers (`--full` reads every tensor on CPU instead).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TINY_PIXELREFER = {"tiny": "lite", "tiny-lite": "lite", "tiny-full": "full"}
TINY_SAM2 = "tiny-sam2"
SAM2_MODEL_TYPES = {"sam2_video", "sam2"}
TINY_SAM3 = "tiny-sam3"


def add_models_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    download = sub.add_parser(
        "download", help="fetch hub repos (and a PixelRefer model's vision tower) for offline runs"
    )
    download.add_argument(
        "names",
        nargs="+",
        metavar="NAME",
        help="hub ids, e.g. Alibaba-DAMO-Academy/PixelRefer-Lite-2B facebook/sam2.1-hiera-large",
    )
    download.add_argument(
        "--to",
        type=Path,
        default=None,
        metavar="DIR",
        help="write plain folders DIR/<repo name> (use them as --model/--tracker) instead of the Hugging Face cache",
    )
    check = sub.add_parser("check", help="check that a checkpoint loads strictly (CPU, meta device) and describe it")
    check.add_argument("model", metavar="M", help="a folder, a hub id, tiny / tiny-lite / tiny-full, tiny-sam2 or tiny-sam3")
    check.add_argument("--full", action="store_true", help="read every tensor and load the model on CPU")


def models_main(args: argparse.Namespace) -> int:
    from models.config import ConfigError
    from models.sam2 import Sam2LoadError
    from models.sam3 import Sam3LoadError
    from models.weights import CheckpointError

    try:
        if args.models_command == "download":
            return _download(args.names, args.to)
        return _check(args.model, full=args.full)
    except (CheckpointError, ConfigError, Sam2LoadError, Sam3LoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _download(names: list[str], to: Path | None) -> int:
    from models.hub import download, hub_cache

    fetched: list[tuple[str, Path]] = []
    for name in names:
        if name in TINY_PIXELREFER or name == TINY_SAM2:
            print(f"{name}: built in (generated locally on first use), nothing to download", file=sys.stderr)
            continue
        fetched += download(name, to=to, log=lambda line: print(line, file=sys.stderr))
    for repo, folder in fetched:
        print(f"{repo}\t{folder}")
    if fetched and to is None:
        print(
            f"\nall files are in the Hugging Face cache {hub_cache()}; on machines that see it (same HF_HOME), run "
            "offline with HF_HUB_OFFLINE=1 and the same hub ids",
            file=sys.stderr,
        )
    elif fetched:
        tops = [str(folder) for repo, folder in fetched if folder.parent == to]
        print(f"\nuse these folders as --model / --tracker: {' '.join(tops)}", file=sys.stderr)
    return 0


def _check(spec: str, *, full: bool) -> int:
    import json

    from models.hub import resolve_checkpoint

    if spec in TINY_PIXELREFER:
        from models.tiny import tiny_checkpoint

        folder = tiny_checkpoint(TINY_PIXELREFER[spec])  # type: ignore[arg-type]
    elif spec == TINY_SAM2:
        from models.sam2 import tiny_checkpoint as tiny_sam2

        folder = tiny_sam2()
    elif spec == TINY_SAM3:
        from models.sam3 import tiny_checkpoint as tiny_sam3

        folder = tiny_sam3()
    else:
        folder = resolve_checkpoint(spec)
    config_path = folder / "config.json"
    model_type = json.loads(config_path.read_text()).get("model_type") if config_path.is_file() else None
    if model_type in SAM2_MODEL_TYPES:
        lines = _check_sam2(folder, full=full)
    elif model_type in sam3_types():
        lines = _check_sam3(folder, full=full)
    else:
        lines = _check_pixelrefer(folder, full=full)
    print(f"{spec}: OK")
    for line in lines:
        print(f"  {line}")
    return 0


def _check_pixelrefer(folder: Path, *, full: bool) -> list[str]:
    import torch

    from models.loading import inspect_checkpoint, load_checkpoint

    report = inspect_checkpoint(folder)
    lines = report.lines()
    if full:
        loaded = load_checkpoint(folder, dtype=torch.bfloat16)
        lines.append(f"full load:   every tensor read; model on {loaded.model.device} in {loaded.model.dtype}")
    return lines


def sam3_types() -> tuple[str, ...]:
    from models.sam3 import SAM3_MODEL_TYPES

    return SAM3_MODEL_TYPES


def _check_sam3(folder: Path, *, full: bool) -> list[str]:
    import torch

    from models.sam3 import read_sam3
    from models.weights import dtype_summary, find_weight_files, read_weights

    model, files = read_sam3(folder, dtype=torch.bfloat16, meta=not full)
    stored = dtype_summary(read_weights(find_weight_files(folder), meta=True))
    return [
        f"folder:      {folder}",
        f"framework:   SAM 3 video ({model.config.model_type}): concept detection and tracking",
        f"weights:     {files}",
        f"stored as:   {stored}",
        f"parameters:  {sum(p.numel() for p in model.parameters()):,} (every one stored; strict check passed)",
        *([f"full load:   every tensor read; model in {model.dtype}"] if full else []),
    ]


def _check_sam2(folder: Path, *, full: bool) -> list[str]:
    import torch

    from models.sam2 import read_sam2
    from models.weights import dtype_summary, find_weight_files, read_weights

    model, files = read_sam2(folder, dtype=torch.bfloat16, meta=not full)
    stored = dtype_summary(read_weights(find_weight_files(folder), meta=True))
    cfg = model.config
    return [
        f"folder:      {folder}",
        f"framework:   SAM 2 video ({cfg.model_type}), image size {cfg.image_size}",
        f"weights:     {files}",
        f"stored as:   {stored}",
        f"parameters:  {sum(p.numel() for p in model.parameters()):,} (every one stored; strict check passed)",
        *([f"full load:   every tensor read; model in {model.dtype}"] if full else []),
    ]
