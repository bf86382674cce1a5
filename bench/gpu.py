"""GPU benchmark at the released models' sizes with random weights: what one GPU-hour indexes.

    bash bench/gpu.sh [--json FILE] [--budget-s 400] [--only SECTION]   # on a machine with one GPU
    python -m bench.gpu --smoke [--json FILE] [--dtype bfloat16]   # every section, tiny sizes, CPU

With this workplace's device tool (`bash bench/gpu.sh --fetch-wheels` here first: see bench/gpu.sh):

    run(command="bash bench/gpu.sh --json $OUT/gpu.json", carry=[".whl"], timeout_s=540)

`tests/infra/test_gpu_bench.py` runs the smoke mode (about 15 s on 2 cores).

What it measures (bf16 on CUDA, flash-attention 2 when `flash_attn` imports, else SDPA):

* ``sam2`` (`bench.gpu_sections`): SAM 2.1 hiera-tiny and -large tracking frames/s at 1 and 8
  objects (`sam2_{tiny,large}_fps_{1,8}obj`), through the tracker stage's own `Tracker`.
* ``lite2b``, ``full2b``, ``lite7b``: PixelRefer-Lite-2B, full PixelRefer-2B, PixelRefer-Lite-7B:
  one caption of one object on 20 frames with 64 new tokens (`*_caption_latency_s`, and its
  phases), objects/s at batch 1/16/64 (`*_objects_per_s_b{1,16,64}`), peak GPU memory; then full
  vs Lite (`full_over_lite_caption_time`, `full_over_lite_peak_gpu_memory`, per caption).
* ``loop`` (`bench.gpu_loop`): the tracker and referrer stages as one plain loop (no Ray) over a
  10-minute video at 1 fps, SAM 2.1-tiny + Lite-2B: `video_hours_per_gpu_hour` and the share of
  the loop's wall time spent decoding, tracking and captioning (`busy_share_{decode,tracker,referrer}`),
  with each stage's phases (`loop_phase_s_*`).
* ``discovery`` (`bench.gpu_discovery`): SAM 2.1 tiny and large automatic mask generation, seconds
  per keyframe at 32 x 32 and 16 x 16 point grids (`discovery_{tiny,large}_s_per_keyframe[_coarse]`),
  GPU-seconds per video-hour when every keyframe is searched, and the "changed" schedule's check.
* ``shots`` (`bench.gpu_shots`): TransNetV2, clip planning's shot detector, frames/s at batch 1
  and 16 windows (`shots_model_frames_per_s_{b1,batched}`) and GPU-seconds per 25-fps video-hour.

Random weights cost what the released ones cost (same shapes); `bench.gpu_models` says what is
pinned so that random values do not change the work. Each section is guarded: one that fails
records its error under `errors` and the others still run. A time budget (`--budget-s`, wall
seconds from the start) keeps the whole run under 8 minutes: a section that would start with less
than its minimum (`MIN_REMAINING_S`) left is listed in `skipped`, the model sections skip their
larger batches past it, and the loop stops taking clips at it (its rates are over the clips done).
The JSON is rewritten after every section, and a watchdog writes it and exits if a section hangs
past the budget, so a killed run still leaves its figures. Exit status: 0 when no section failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from bench.gpu_discovery import section_discovery
from bench.gpu_loop import section_loop, start_video
from bench.gpu_models import release, transformers_compat
from bench.gpu_sections import referrer_section, section_sam2
from bench.gpu_shots import section_shots

#: Order matters: the budget skips from the end. The loop (the headline figure) comes before the
#: 7B, and takes clips for at most `bench.gpu_loop.LOOP_MAX_S`, so that both usually fit.
SECTIONS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "shots": section_shots,  # short (about 20 s): first, so the budget never skips it
    "sam2": section_sam2,
    "lite2b": referrer_section("lite", "2B"),
    "full2b": referrer_section("full", "2B"),
    "loop": section_loop,
    "discovery": section_discovery,
    "lite7b": referrer_section("lite", "7B"),
}

#: Seconds a section needs at the least (guesses for an H100: model build, warm-up, the first
#: measurement); one that would start with less of the budget left is skipped rather than abandoned.
MIN_REMAINING_S = {"sam2": 30.0, "lite2b": 30.0, "full2b": 30.0, "lite7b": 60.0, "loop": 45.0, "discovery": 30.0,
                   "shots": 25.0}

#: Modules that the GPU machine lacks: none of them may be imported along the bench's path.
ABSENT_ON_DEVICE = ("ray", "av", "decord", "duckdb", "ffmpeg")

#: Seconds past the budget after which the watchdog gives up on a hung section.
WATCHDOG_GRACE_S = 45.0


@dataclass
class Context:
    """What every section reads: where and how to run, the deadline, a cache and a note list."""

    smoke: bool
    device: str
    dtype: torch.dtype
    attn: str
    root: Path
    deadline: float
    video: Any = None  # the loop video's Future (bench.gpu_loop.start_video)
    video_spec: dict[str, Any] = field(default_factory=dict)
    cache: dict[Any, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        print(f"note: {text}", file=sys.stderr, flush=True)
        self.notes.append(text)


def default_json_path() -> str:
    """$OUT/gpu-bench.json where the device tool provides $OUT (it comes back from there), else ./."""
    return os.path.join(os.environ["OUT"], "gpu-bench.json") if os.environ.get("OUT") else "gpu-bench.json"


def write_record(record: dict[str, Any], path: str) -> None:
    """Write atomically, so that a watchdog exit or a kill mid-write never leaves half a file."""
    text = json.dumps(record, indent=2, default=str, allow_nan=False)
    tmp = f"{path}.tmp"
    Path(tmp).write_text(text)
    os.replace(tmp, path)


def _finite(record: dict[str, Any]) -> dict[str, Any]:
    """NaN and infinity become null (JSON has neither); such a value is a bug worth seeing."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def derived(record: dict[str, Any]) -> dict[str, Any]:
    """Full vs Lite ratios, when both sections ran."""
    out = {}
    pairs = {"full_over_lite_caption_time": "caption_latency_s",
             "full_over_lite_peak_gpu_memory": "caption_peak_gpu_mib"}
    for name, key in pairs.items():
        lite, full = record.get(f"lite2b_{key}"), record.get(f"full2b_{key}")
        if lite and full:
            out[name] = full / lite
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny models on CPU: checks that every section runs")
    parser.add_argument("--json", dest="json_path", default=None,
                        help="output file (default $OUT/gpu-bench.json, else ./gpu-bench.json)")
    parser.add_argument("--budget-s", type=float, default=400.0,
                        help="no section starts, and the loop takes no clip, after this many seconds")
    parser.add_argument("--only", action="append", choices=list(SECTIONS), default=None, help="run only these")
    parser.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                        help="auto: bf16 on CUDA, fp32 on CPU (--smoke --dtype bfloat16 checks bf16 paths on CPU)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    path = args.json_path or default_json_path()
    Path(path).parent.mkdir(parents=True, exist_ok=True)

    from models.referrer import pick_device

    device, dtype, attn = pick_device("cpu" if args.smoke else None,
                                      None if args.dtype == "auto" else getattr(torch, args.dtype))
    if not args.smoke and device.type != "cuda":
        print("no CUDA device: run with --smoke for the CPU check", file=sys.stderr)
        return 2
    import transformers

    try:
        patches = transformers_compat()
    except Exception as exc:  # noqa: BLE001 - without it only the SAM 2 sections fail, and say why
        patches = [f"failed: {type(exc).__name__}: {exc}"]
    root = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    ctx = Context(smoke=args.smoke, device=str(device), dtype=dtype, attn=attn, root=root,
                  deadline=started + args.budget_s)
    names = args.only or list(SECTIONS)
    if "loop" in names:
        ctx.video, ctx.video_spec = start_video(root, args.smoke)
    record: dict[str, Any] = {
        "bench": "gpu", "smoke": args.smoke,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if device.type == "cuda" else 0.0,
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "python": platform.python_version(), "dtype": str(dtype).replace("torch.", ""), "attention": attn,
        "compat_patches": patches, "budget_s": args.budget_s, "sections": names,
        "errors": {}, "skipped": [], "notes": ctx.notes,
    }
    lock = threading.Lock()

    def save() -> None:
        with lock:
            record["elapsed_s"] = time.perf_counter() - started
            record["absent_on_device_imported"] = sorted(m for m in ABSENT_ON_DEVICE if m in sys.modules)
            write_record(_finite({**record, **derived(record)}), path)

    done = threading.Event()

    def watchdog() -> None:
        """A section hung past the budget: keep what was measured, and leave."""
        if done.wait(args.budget_s + WATCHDOG_GRACE_S):
            return
        ctx.note(f"watchdog: still running {WATCHDOG_GRACE_S:g} s past the budget; exiting with what was measured")
        record["errors"]["watchdog"] = "a section overran the budget and was abandoned"
        try:
            save()
        finally:
            os._exit(3)

    threading.Thread(target=watchdog, daemon=True, name="gpu-bench-watchdog").start()
    try:
        run_sections(ctx, record, names, args.budget_s, save)
    finally:
        done.set()
    record["total_s"] = time.perf_counter() - started
    save()
    print(Path(path).read_text())
    return 0 if not record["errors"] else 1


def run_sections(ctx: Context, record: dict[str, Any], names: list[str], budget_s: float,
                 save: Callable[[], None]) -> None:
    """Each section in turn, guarded, skipped past the deadline; the JSON rewritten after each."""
    for name in names:
        left = ctx.deadline - time.perf_counter()
        if left <= (0.0 if ctx.smoke else MIN_REMAINING_S.get(name, 0.0)):
            record["skipped"].append(name)
            ctx.note(f"{name}: skipped, {max(0.0, left):.0f} s of the {budget_s:g} s budget left")
            continue
        t = time.perf_counter()
        try:
            record.update(SECTIONS[name](ctx))
        except Exception as exc:  # noqa: BLE001 - one section's failure must not lose the others' figures
            traceback.print_exc()
            record["errors"][name] = f"{type(exc).__name__}: {exc}"[:2000]
        release()  # the section's models are unreferenced now: the next one's peak memory is its own
        record[f"section_s_{name}"] = time.perf_counter() - t
        save()
        failed = f" FAILED {record['errors'][name]}" if name in record["errors"] else ""
        print(f"{name}: {record[f'section_s_{name}']:.1f} s{failed}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
