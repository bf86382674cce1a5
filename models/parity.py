"""Run the native model on an upstream parity fixture folder and write its outputs.

Usage::

    python -m models.parity FIXTURE_DIR --out OUT.npz [--dtype float32|bfloat16] [--max-new-tokens 8] [--threads 1]

The checkpoint in ``FIXTURE_DIR`` is loaded through the product loader (the same path as
``--model FIXTURE_DIR``); the framework comes from its ``config.json``. ``inputs.npz`` is mapped as the
fixture README describes:

* Lite: object k owns the masks listed by ``mask_ids_raw[k]`` (frame indices, -1 padded), stored object
  after object in ``masks``; mask i lies on frame ``mask_ids[i]``.
* Full: one ``<region>`` per mask; mask i lies on frame ``additional_frame_ids[mask_ids[i]]``.

Upstream-compatible behaviour is on (quirk L3's per-frame local crop) and k-means draws from
``torch.Generator().manual_seed(1234)``. The output holds ``input_ids`` (1, L) after region expansion
(before full's compression), ``region_tokens`` (R, D), ``logits`` (1, L', V) float32 from one forward
pass over what the LLM sees, and ``generated_ids`` (1, N) from greedy decoding with the checkpoint's
``generation_config.json`` (its repetition penalty and eos ids, as upstream's ``generate(do_sample=False)``
inherits them). Reference files of the fixture are never read.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .loading import LoadedCheckpoint, load_checkpoint
from .modeling_pixelrefer import SequenceEmbeds, Trace
from .processing_pixelrefer import (
    IMAGE_TAG,
    EncoderPlan,
    FrameInput,
    PromptBuilder,
    RegionInput,
    SequenceInput,
    make_crop,
    normalise_mask,
    plan_encoder_inputs,
    prepare_frames,
)

KMEANS_SEED = 1234
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class FixtureInputs:
    frames: np.ndarray  # (T, H, W, 3) uint8
    masks: np.ndarray  # (M, H, W)
    mask_ids: np.ndarray  # (M,)
    timestamps: np.ndarray  # (T,)
    prompt: str
    mask_ids_raw: np.ndarray | None = None  # Lite: (K, F) frame indices, -1 padded
    additional_frame_ids: np.ndarray | None = None  # full


def read_inputs(folder: Path) -> FixtureInputs:
    with np.load(folder / "inputs.npz", allow_pickle=False) as data:
        get = lambda k: data[k] if k in data.files else None  # noqa: E731
        frames = np.asarray(data["frames"])
        if frames.ndim == 4 and frames.shape[1] == 3 and frames.shape[-1] != 3:
            frames = frames.transpose(0, 2, 3, 1)  # (T, C, H, W) as upstream's load_video returns
        return FixtureInputs(
            frames=np.ascontiguousarray(frames),
            masks=np.asarray(data["masks"]),
            mask_ids=np.asarray(data["mask_ids"]).astype(int).reshape(-1),
            timestamps=np.asarray(data["timestamps"], dtype=np.float64).reshape(-1),
            prompt=str(data["prompt"]),
            mask_ids_raw=get("mask_ids_raw"),
            additional_frame_ids=get("additional_frame_ids"),
        )


@dataclass
class ParityRun:
    sequence: SequenceInput
    embeds: SequenceEmbeds
    logits: torch.Tensor
    generated_ids: list[int]
    trace: Trace
    plan: EncoderPlan
    frames: FrameInput | None
    checkpoint: LoadedCheckpoint


def build_sequence(ckpt: LoadedCheckpoint, inputs: FixtureInputs, *, upstream_local_crop: bool = True):
    """Crops, prompt ids and the encoder plan of a fixture, the way upstream's ``mm_infer`` sees them."""
    cfg = ckpt.config
    frames = [np.ascontiguousarray(f) for f in inputs.frames]
    hw = frames[0].shape[:2]
    builder = PromptBuilder(cfg.mode, ckpt.tokenizer, cfg.region_token_index, cfg.image_token_index)
    frame_input = None
    if cfg.is_lite:
        frame_of_mask = [int(i) for i in inputs.mask_ids]
    else:
        extra = inputs.additional_frame_ids if inputs.additional_frame_ids is not None else np.arange(len(frames))
        frame_of_mask = [int(extra[int(i)]) for i in inputs.mask_ids]
    regions = []
    for i, frame_index in enumerate(frame_of_mask):
        mask = normalise_mask(inputs.masks[i], hw, f"mask {i}")
        crop = make_crop(cfg.mode, frames[frame_index], mask, cfg.mask_num)
        regions.append(RegionInput(crop, frame_index, ("mask", i)))
    if cfg.is_lite:
        raw = inputs.mask_ids_raw if inputs.mask_ids_raw is not None else np.asarray(inputs.mask_ids)[:, None]
        objects, start = [], 0
        for row in np.atleast_2d(raw):
            count = int((np.asarray(row) >= 0).sum())
            objects.append(regions[start : start + count])
            start += count
        if start != len(regions):
            raise ValueError(f"mask_ids_raw lists {start} masks but masks holds {len(regions)}")
        seq = builder.lite(inputs.prompt, objects, [float(t) for t in inputs.timestamps])
    else:
        video = IMAGE_TAG not in inputs.prompt
        frame_input = prepare_frames(
            frames, inputs.timestamps, cfg.image_processor, cfg.spatial_merge_size, video=video
        )
        seq = builder.full(inputs.prompt, regions, frame_input)
    plan = plan_encoder_inputs(cfg.mode, [seq], frames, cfg.image_processor, upstream_local_crop=upstream_local_crop)
    return seq, plan, frame_input


def run_fixture(
    folder: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    max_new_tokens: int = 8,
    device: str = "cpu",
    kmeans_seed: int = KMEANS_SEED,
) -> ParityRun:
    folder = Path(folder)
    ckpt = load_checkpoint(folder, device=device, dtype=dtype, attn_implementation="sdpa")
    inputs = read_inputs(folder)
    seq, plan, frame_input = build_sequence(ckpt, inputs)
    trace = Trace()
    model = ckpt.model
    embeds = model.build_embeds([seq], plan, frames=frame_input, kmeans_seed=kmeans_seed, trace=trace)[0]
    logits = model.logits(embeds)
    generated = model.generate([embeds], max_new_tokens=max_new_tokens, settings=ckpt.generation)[0]
    return ParityRun(seq, embeds, logits, generated, trace, plan, frame_input, ckpt)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.parity", description=__doc__.split("\n\n")[0])
    parser.add_argument("fixture", type=Path, help="folder with a checkpoint and inputs.npz")
    parser.add_argument("--out", type=Path, required=True, help="output .npz")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (the references were made with 1; tiny models need no more)",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(max(1, args.threads))
    torch.set_grad_enabled(False)
    run = run_fixture(args.fixture, dtype=DTYPES[args.dtype], max_new_tokens=args.max_new_tokens)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        args.out,
        input_ids=np.asarray(run.sequence.input_ids, dtype=np.int64)[None],
        region_tokens=run.embeds.region_tokens.float().cpu().numpy(),
        logits=run.logits.float().cpu().numpy(),
        generated_ids=np.asarray(run.generated_ids, dtype=np.int64)[None],
    )
    print(
        f"{args.fixture}: input_ids {len(run.sequence.input_ids)}, LLM length {run.embeds.inputs_embeds.shape[0]}, "
        f"region_tokens {tuple(run.embeds.region_tokens.shape)}, generated {run.generated_ids} "
        f"({time.perf_counter() - started:.1f} s) -> {args.out}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
