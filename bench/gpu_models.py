"""Random-weight models at the released sizes for `bench.gpu`, and its device-side timing helpers.

Why random weights: the GPU machine has no network and the released checkpoints are gigabytes; the
cost of a forward pass depends on the shapes (widths, depths, vocabulary, token counts), not on the
values, so a model of the real architecture at the real sizes costs what the released one costs.
Two things do depend on values, and are pinned the way `models.sam2`'s `tiny` pins them: SAM 2's
object-presence head gets a positive bias (random logits would drop half the frames at random), and
PixelRefer decodes with eos off (random logits would end captions at random lengths).

Sizes come from the project's own records: `models.flops.RELEASED_DIMS` (Qwen2.5-1.5B / -7B and the
VL3-SigLIP-NaViT tower) through `models.tiny.real_2b_dims` (which also carries the released frame
budget), and transformers' own SAM 2.1 configurations (hiera-tiny is `Sam2VideoConfig`'s default;
hiera-large is set below, as transformers' conversion script sets it).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

#: SAM 2.1 hiera-large's image encoder (transformers' `Sam2HieraDetConfig` fields).
SAM2_LARGE_BACKBONE: dict[str, Any] = {
    "model_type": "sam2_hiera_det_model", "hidden_size": 144, "num_attention_heads": 2,
    "blocks_per_stage": [2, 6, 36, 4], "embed_dim_per_stage": [144, 288, 576, 1152],
    "num_attention_heads_per_stage": [2, 4, 8, 16], "window_size_per_stage": [8, 4, 16, 8],
    "global_attention_blocks": [23, 33, 43], "window_positional_embedding_background_size": [7, 7],
}
SAM2_LARGE_CHANNELS = [1152, 576, 288, 144]

#: Qwen2.5-Instruct's generation_config carries a repetition penalty that the released checkpoints
#: inherit; any value other than 1 keeps its per-step cost in the measurement.
REPETITION_PENALTY = 1.05


def sync() -> None:
    """Wait for queued kernels, so that a wall-clock interval holds its own GPU work."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], repeats: int = 1) -> tuple[float, Any]:
    """Best wall seconds of `repeats` calls (synchronised), and the last result."""
    best, out = float("inf"), None
    for _ in range(max(1, repeats)):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best, out


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gpu_mib() -> float:
    """Peak allocated GPU memory since the last `reset_peak`, MiB (0 on CPU: nothing to measure)."""
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0


def release() -> None:
    """Give the caching allocator's blocks back, so the next section's peak is its own."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- SAM 2 ------------------------------------------------------------------------------------------


def transformers_compat() -> list[str]:
    """Work around known bugs of the installed transformers that stop the bench; returns their names.

    transformers 5.17 (the GPU machine's) builds a `Sam2VideoConfig`'s ``mask_decoder_config`` given
    as a dict, which is how every saved config.json is read, as a *prompt-encoder* config
    (``configuration_sam2_video.py``, ``__post_init__``), so no SAM 2 folder loads (AttributeError
    ``num_multimask_outputs``); later releases build a mask-decoder config. Only this process is
    patched, and only where the bug shows, so the figures stay those of unpatched model code.
    """
    from transformers.models.sam2_video import configuration_sam2_video as sam2_video

    cls = sam2_video.Sam2VideoConfig
    if getattr(cls, "_gpu_bench_patched", False):
        return ["sam2_video_mask_decoder_config"]
    probe = cls(mask_decoder_config={"hidden_size": 256})
    if isinstance(probe.mask_decoder_config, sam2_video.Sam2VideoMaskDecoderConfig):
        return []
    original = cls.__post_init__

    def __post_init__(self: Any, **kwargs: Any) -> None:
        if isinstance(self.mask_decoder_config, dict):
            self.mask_decoder_config = sam2_video.Sam2VideoMaskDecoderConfig(**self.mask_decoder_config)
        original(self, **kwargs)

    cls.__post_init__ = __post_init__
    cls._gpu_bench_patched = True
    if not isinstance(cls(mask_decoder_config={"hidden_size": 256}).mask_decoder_config,
                      sam2_video.Sam2VideoMaskDecoderConfig):
        raise RuntimeError("could not work around transformers' Sam2VideoConfig mask_decoder_config bug")
    return ["sam2_video_mask_decoder_config"]


def sam2_folder(size: str, root: Path, smoke: bool) -> Path:
    """A random SAM 2.1 checkpoint of `size` ("tiny" or "large"), saved as the released repos are
    (config, safetensors, processor), so that the tracker loads it through `models.sam2.load_sam2`
    exactly like a downloaded one. `smoke`: the project's own `tiny` folder."""
    from models.sam2 import TINY_PRESENCE_BIAS, tiny_checkpoint

    if smoke:
        return tiny_checkpoint()
    folder = root / f"random-sam2.1-hiera-{size}"
    if (folder / "config.json").is_file():
        return folder
    from transformers import Sam2ImageProcessor, Sam2VideoConfig, Sam2VideoModel, Sam2VideoProcessor
    from transformers.models.sam2_video.video_processing_sam2_video import Sam2VideoVideoProcessor

    if size == "large":
        vision = {"model_type": "sam2_vision_model", "backbone_config": SAM2_LARGE_BACKBONE,
                  "backbone_channel_list": SAM2_LARGE_CHANNELS}
        config = Sam2VideoConfig(vision_config=vision)
    elif size == "tiny":
        config = Sam2VideoConfig()  # transformers' defaults are SAM 2.1 hiera-tiny
    else:
        raise ValueError(f"unknown SAM 2.1 size {size!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Sam2VideoModel(config)
    with torch.no_grad():  # random presence logits hover around 0: objects would vanish at random
        model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(TINY_PRESENCE_BIAS)
    model.save_pretrained(folder)
    Sam2VideoProcessor(image_processor=Sam2ImageProcessor(),
                       video_processor=Sam2VideoVideoProcessor()).save_pretrained(folder)
    return folder


# -- PixelRefer -------------------------------------------------------------------------------------


def referrer_dims(size: str, smoke: bool) -> tuple[Any, int | None]:
    """(`CheckpointDims`, vocabulary size) of a released size ("2B", "7B"); tiny ones for `smoke`
    (vocabulary None: the tiny tokenizer's own)."""
    from models.flops import released_dims
    from models.tiny import TINY_DIMS, real_2b_dims

    if smoke:
        return TINY_DIMS, None
    real = released_dims(size)
    dims = dataclasses.replace(
        real_2b_dims(layers=real.llm.layers, vision_layers=real.vision.layers),
        hidden=real.llm.hidden, intermediate=real.llm.intermediate, heads=real.llm.heads, kv_heads=real.llm.kv_heads,
        vision_hidden=real.vision.hidden, vision_intermediate=real.vision.intermediate,
        vision_heads=real.vision.heads,
    )
    return dims, real.llm.vocab_size


@functools.lru_cache(maxsize=1)
def tokenizer_folder() -> Path:
    """The tiny tokenizer's files, written once per process (training its merges takes a second or two)."""
    from models.tiny import build_tokenizer

    folder = Path(tempfile.mkdtemp(prefix="gpu-bench-tokenizer-"))
    build_tokenizer(folder)
    return folder


def build_referrer(mode: str, size: str, *, device: str, dtype: torch.dtype, attn: str, smoke: bool) -> Any:
    """A `models.referrer.Referrer` with random weights at a released size, built on the device.

    Built in memory rather than saved and loaded: a 7B checkpoint would be a 15 GB write and read
    that says nothing about inference. The tokenizer is the tiny one (the model's vocabulary is the
    released size; ids past the tokenizer's decode to nothing), so prompts tokenise to a few more
    pieces than Qwen's would: the LLM inputs are dominated by the 32 object tokens per mask.
    """
    from models.generation import GenerationSettings
    from models.loading import LoadedCheckpoint, build_model, load_tokenizer
    from models.referrer import Referrer
    from models.tiny import tiny_config

    dims, vocab = referrer_dims(size, smoke)
    folder = tokenizer_folder()
    ids = json.loads((folder / "added_tokens.json").read_text())
    vocab = vocab or ((max(ids.values()) + 1 + 63) // 64) * 64
    config = tiny_config(mode, vocab, ids, dims)  # type: ignore[arg-type]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(config, device=torch.device(device), dtype=dtype, attn_implementation=attn,
                            init_weights=True)
    model.requires_grad_(False)
    settings = GenerationSettings(eos_token_ids=(), repetition_penalty=REPETITION_PENALTY)
    ckpt = LoadedCheckpoint(model.eval(), load_tokenizer(folder, config), config, folder, settings)
    return Referrer(ckpt, f"random-{mode}-{size}{'-smoke' if smoke else ''}")


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
