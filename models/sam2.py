"""SAM 2 checkpoints for the tracker: a local folder, a hub id, or the built-in `tiny`.

Every checkpoint goes through one path: the weights are read by `models.weights` (safetensors or `.bin`,
single or sharded; `.bin` only with `torch.load(weights_only=True)`), handed to transformers'
`Sam2VideoModel.from_pretrained(state_dict=...)` (its own key conversions apply), and the load is strict:
any missing, unexpected or mis-shaped tensor fails it instead of leaving random weights in a tracker.
The official `facebook/sam2.1-hiera-*` weights and our test model share that path.

`tiny` is the real SAM 2 architecture with seeded random weights, shrunk so that CPU tests are fast:
the default `Sam2VideoConfig` (1024 px input, Hiera with 12 blocks, 256-channel heads) tracks a frame
in about 19 s on a 2-core CPU; `tiny` takes 128 px input, a 5-block Hiera of 16..128 channels,
128-channel heads (the memory features stay 64 channels: transformers' memory attention hard-codes
that width) and a short memory (3 mask memories, 4 object pointers, so that tests show the bounded
memory on short videos), and tracks a frame with four objects in well under 0.1 s of CPU time. It is
written once with `save_pretrained` into the cache folder (env `PIXELREFER_CACHE`, else
`~/.cache/pixelrefer-pipeline`), under a name that fingerprints its config, and loaded back like any
other checkpoint.

Two deliberate departures from plain random init, both because random weights would otherwise leave
the tracker's output contract untestable:

- the object-presence head's output bias is +2, so objects are reported present (random logits
  hover around 0 and would drop about half of all frames at random);
- the folder carries `pixelrefer_tracker.json` with relaxed automatic-discovery settings (no
  predicted-IoU / stability filtering, an 8x8 point grid): random masks never pass SAM's quality
  filters, so `tiny` would otherwise discover nothing. Any checkpoint folder may carry this file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.cache import cache_root, write_once
from models.weights import quiet_transformers, read_strict

TINY = "tiny"
TINY_NAME = "tiny-sam2"
TINY_SEED = 0
TINY_IMAGE_SIZE = 128
TINY_PRESENCE_BIAS = 2.0
TRACKER_DEFAULTS_FILE = "pixelrefer_tracker.json"
TINY_TRACKER_DEFAULTS: dict[str, Any] = {
    "points_per_side": 8,
    "pred_iou_thresh": 0.0,
    "stability_score_thresh": 0.0,
}


class Sam2LoadError(RuntimeError):
    """A SAM 2 checkpoint could not be found or loaded."""


@dataclass
class Sam2Bundle:
    """A loaded SAM 2 checkpoint: the video tracker, its processor, and an image model for discovery.

    `image_model` is a transformers `Sam2Model` whose modules *are* the video model's (vision encoder,
    prompt encoder, mask decoder): automatic mask generation needs the image-model API, and sharing
    avoids a second copy of the weights on the GPU.
    """

    name: str
    path: Path
    model: Any  # transformers.Sam2VideoModel
    processor: Any  # transformers.Sam2VideoProcessor
    image_model: Any  # transformers.Sam2Model sharing `model`'s modules
    device: torch.device
    dtype: torch.dtype
    tracker_defaults: dict[str, Any] = field(default_factory=dict)


def resolve_device(device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
                   ) -> tuple[torch.device, torch.dtype]:
    """CUDA with bf16 when available, else CPU with fp32; explicit arguments win.

    bf16 is what SAM 2 was trained and released for on GPUs; CPUs run bf16 matmuls slowly, so fp32.
    """
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        dt = getattr(torch, dtype.replace("torch.", ""))
        if not isinstance(dt, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
    else:
        dt = dtype
    return dev, dt


def tiny_config() -> Any:
    """The reduced `Sam2VideoConfig` of `tiny` (see the module docstring for the sizes and why)."""
    from transformers import Sam2VideoConfig

    size, hidden = TINY_IMAGE_SIZE, 128
    stride = size // 4  # Hiera's patch embedding has stride 4
    backbone = {
        "model_type": "sam2_hiera_det_model",
        "hidden_size": 16,
        "num_attention_heads": 1,
        "image_size": [size, size],
        # A global-attention block must not open a pooling stage, hence 2 blocks in stage 3.
        "blocks_per_stage": [1, 1, 2, 1],
        "embed_dim_per_stage": [16, 32, 64, 128],
        "num_attention_heads_per_stage": [1, 1, 2, 2],
        "window_size_per_stage": [8, 4, 4, 2],
        "global_attention_blocks": [3],
        "window_positional_embedding_background_size": [4, 4],
    }
    vision = {
        "model_type": "sam2_vision_model",
        "backbone_config": backbone,
        "backbone_channel_list": [128, 64, 32, 16],
        "backbone_feature_sizes": [[stride, stride], [stride // 2, stride // 2], [stride // 4, stride // 4]],
        "fpn_hidden_size": hidden,
    }
    return Sam2VideoConfig(
        vision_config=vision,
        image_size=size,
        prompt_encoder_config={"hidden_size": hidden, "image_size": size, "patch_size": 16},
        mask_decoder_config={"hidden_size": hidden, "mlp_dim": 4 * hidden, "num_attention_heads": 4,
                             "iou_head_hidden_dim": hidden},
        memory_attention_hidden_size=hidden,
        memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=4 * hidden,
        memory_attention_rope_feat_sizes=[stride // 4, stride // 4],
        memory_encoder_hidden_size=hidden,
        memory_encoder_output_channels=64,  # fixed by transformers' memory attention (kv_in_dim=64)
        mask_downsampler_embed_dim=hidden,
        memory_fuser_embed_dim=hidden,
        memory_fuser_intermediate_dim=4 * hidden,
        memory_fuser_num_layers=1,
        num_maskmem=3,
        max_object_pointers_in_encoder=4,
    )


def tiny_processor() -> Any:
    """A `Sam2VideoProcessor` resizing to tiny's input size (masks at a quarter of it, as in SAM 2)."""
    from transformers import Sam2ImageProcessor, Sam2VideoProcessor
    from transformers.models.sam2_video.video_processing_sam2_video import Sam2VideoVideoProcessor

    size = {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    mask_size = {"height": TINY_IMAGE_SIZE // 4, "width": TINY_IMAGE_SIZE // 4}
    return Sam2VideoProcessor(image_processor=Sam2ImageProcessor(size=size, mask_size=mask_size),
                              video_processor=Sam2VideoVideoProcessor(size=size))


def build_tiny_model() -> Any:
    """Seeded random `Sam2VideoModel` of `tiny_config()`; the caller's RNG state is left untouched."""
    from transformers import Sam2VideoModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = Sam2VideoModel(tiny_config())
    with torch.no_grad():
        model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(TINY_PRESENCE_BIAS)
    return model.eval()


def tiny_fingerprint() -> str:
    """Short hash of everything that defines tiny's files, so a changed definition gets a new folder."""
    cfg = {k: v for k, v in tiny_config().to_dict().items() if k != "transformers_version"}
    spec = {"config": cfg, "seed": TINY_SEED, "presence_bias": TINY_PRESENCE_BIAS, "defaults": TINY_TRACKER_DEFAULTS,
            "image_size": TINY_IMAGE_SIZE}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:10]


def tiny_checkpoint(root: Path | None = None) -> Path:
    """The tiny checkpoint folder, written on first use (atomically: `models.cache.write_once`)."""
    def fill(tmp: Path) -> None:
        with quiet_transformers():
            build_tiny_model().save_pretrained(tmp)
            tiny_processor().save_pretrained(tmp)
        (tmp / TRACKER_DEFAULTS_FILE).write_text(json.dumps(TINY_TRACKER_DEFAULTS, indent=2))

    folder = (root or cache_root()) / f"{TINY_NAME}-{tiny_fingerprint()}"
    return write_once(folder, fill, marker=TRACKER_DEFAULTS_FILE)


def checkpoint_folder(spec: str) -> Path:
    """`tiny`, a local folder, or a hub id (downloaded, or from the local cache when offline)."""
    if spec == TINY:
        return tiny_checkpoint()
    from models.hub import resolve_checkpoint
    from models.weights import CheckpointError

    try:
        return resolve_checkpoint(spec)
    except CheckpointError as exc:
        raise Sam2LoadError(f"SAM 2 checkpoint {spec!r}: {exc}") from exc


def image_model_sharing(video_model: Any) -> Any:
    """A `Sam2Model` (the image API that automatic mask generation needs) on the video model's modules.

    Built on the meta device and pointed at the video model's vision encoder, prompt encoder, mask
    decoder and embeddings: no weights are allocated twice. transformers generates the video model's
    prompt encoder and mask decoder from the image model's code, so the modules are interchangeable.
    """
    from transformers import Sam2Config, Sam2Model

    cfg = video_model.config
    image_cfg = Sam2Config(
        vision_config=cfg.vision_config.to_dict(),
        prompt_encoder_config=cfg.prompt_encoder_config.to_dict(),
        mask_decoder_config=cfg.mask_decoder_config.to_dict(),
        initializer_range=cfg.initializer_range,
    )
    with torch.device("meta"):
        image_model = Sam2Model(image_cfg)
    for name in ("shared_image_embedding", "vision_encoder", "prompt_encoder", "mask_decoder"):
        setattr(image_model, name, getattr(video_model, name))
    image_model.no_memory_embedding = video_model.no_memory_embedding
    leftovers = [n for n, t in [*image_model.named_parameters(), *image_model.named_buffers()] if t.is_meta]
    if leftovers:
        raise Sam2LoadError(f"image model has unshared tensors {leftovers}; transformers' Sam2Model changed")
    return image_model.eval()


def read_sam2(folder: Path, *, dtype: torch.dtype, meta: bool = False) -> tuple[Any, str]:
    """`Sam2VideoModel` of a folder's config with its weights, strictly; also the weight files read.

    `meta=True` checks names and shapes against the files' headers without reading tensor data.
    """
    from transformers import Sam2VideoConfig, Sam2VideoModel

    model, problems, files = read_strict(folder, Sam2VideoModel, Sam2VideoConfig, dtype=dtype, meta=meta)
    if problems:
        raise Sam2LoadError(f"SAM 2 checkpoint {folder} does not match its config: " + " | ".join(problems))
    return model, files


def load_sam2(spec: str = TINY, *, device: str | torch.device | None = None,
              dtype: str | torch.dtype | None = None) -> Sam2Bundle:
    """Load a SAM 2 checkpoint for tracking (`tiny`, a local folder or a hub id) onto a device."""
    from transformers import Sam2VideoProcessor

    dev, dt = resolve_device(device, dtype)
    folder = checkpoint_folder(spec)
    try:
        with quiet_transformers():
            model = read_sam2(folder, dtype=dt)[0].to(dev).eval()
            processor = Sam2VideoProcessor.from_pretrained(folder)
    except Sam2LoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a bad folder
        raise Sam2LoadError(f"cannot load SAM 2 from {spec!r} ({folder}): {exc}") from exc
    defaults_file = folder / TRACKER_DEFAULTS_FILE
    defaults = json.loads(defaults_file.read_text()) if defaults_file.is_file() else {}
    return Sam2Bundle(name=TINY_NAME if spec == TINY else str(spec), path=folder, model=model, processor=processor,
                      image_model=image_model_sharing(model), device=dev, dtype=dt, tracker_defaults=defaults)
