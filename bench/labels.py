"""What an object's category label costs: captions alone vs captions plus one category question each.

`actors.labels` asks every unlabelled object "what kind of object is this?" beside its caption, in
the same LLM batches, with its own cap of `CATEGORY_TOKENS` new tokens. This bench runs the
referrer's own path (`Referrer.prepare` + `Referrer.decode`) on `bench.referrer`'s synthetic track
(Lite, K=8 of 20 masked frames per object), for 8 objects at tiny and 2B widths (2 layers, eos
disabled so every answer runs to its cap, the worst case), and prints the extra seconds per object.

    python -m bench.labels [--json FILE] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from actors.labels import CATEGORY_PROMPT, CATEGORY_TOKENS
from actors.requests import spread_frames
from bench.referrer import load, synthetic_video, timed
from models.referrer import DEFAULT_CAPTION_PROMPT, Request
from models.tiny import TINY_DIMS, CheckpointDims, real_2b_dims

OBJECTS = 8
K = 8


def measure(label: str, dims: CheckpointDims, *, new_tokens: int, repeats: int) -> dict[str, Any]:
    """Seconds per object for a clip's captions, with and without the category questions."""
    referrer = load("lite", dims)
    frames, times, objects = synthetic_video(OBJECTS, seed=3)
    objs = [{i: o[i] for i in spread_frames(list(o), K)} for o in objects]
    captions = [Request(DEFAULT_CAPTION_PROMPT, [k]) for k in range(OBJECTS)]
    categories = [Request(CATEGORY_PROMPT, [k], max_new_tokens=CATEGORY_TOKENS) for k in range(OBJECTS)]

    def run(requests: list[Request]) -> Any:
        return referrer.decode([referrer.prepare(frames, times, objs, requests)], max_new_tokens=new_tokens,
                               batch_size=64)

    run(captions[:1])  # warm-up: allocator, lazy imports
    plain, plain_samples, _ = timed(lambda: run(captions), repeats)
    both, both_samples, out = timed(lambda: run(captions + categories), repeats)
    capped = all(len(g.token_ids) <= CATEGORY_TOKENS for g in out[0][OBJECTS:])
    return {
        f"{label}.captions_s_per_object": plain / OBJECTS,
        f"{label}.captions_and_category_s_per_object": both / OBJECTS,
        f"{label}.category_s_per_object": (both - plain) / OBJECTS,
        f"{label}.category_share": (both - plain) / both if both else None,
        f"{label}.category_answers_within_cap": capped,
        f"{label}.samples": {"captions": plain_samples, "with_category": both_samples},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.labels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--quick", action="store_true", help="tiny widths only")
    parser.add_argument("--new-tokens", type=int, default=32, help="caption tokens (32)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    torch.set_grad_enabled(False)
    figures: dict[str, Any] = {"objects": OBJECTS, "object_frames": K, "category_tokens": CATEGORY_TOKENS,
                               "caption_tokens": args.new_tokens}
    figures.update(measure("tiny", TINY_DIMS, new_tokens=args.new_tokens, repeats=args.repeats))
    if not args.quick:
        figures.update(measure("2B-w/2L", real_2b_dims(), new_tokens=args.new_tokens, repeats=max(1, args.repeats - 1)))
    for key, value in figures.items():
        if not key.endswith("samples"):
            print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
