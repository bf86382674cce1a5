"""Deterministic tiny PixelRefer-Lite / PixelRefer checkpoints in the released layout.

``tiny`` is the built-in model name of the pipeline: the real architecture with small dimensions and
seeded random weights, written in exactly the released layout (``config.json``, ``model.safetensors`` in
bf16, ``generation_config.json``, the tokenizer files and the vision tower sub-folder) and then loaded
through the same strict loader as a real checkpoint. Nothing is downloaded: the tokenizer is a
byte-level BPE trained offline with ``tokenizers`` on a fixed corpus, loaded through the same
``Qwen2Tokenizer`` class as the released checkpoints.

Printable vocabulary: random weights emit random token ids, so every id must decode to readable text on
its own. A full byte-level alphabet has tokens for single bytes of multi-byte UTF-8 characters, and a
random sequence of those decodes to U+FFFD replacement characters. The alphabet here is
printable ASCII only (no control bytes, no newline), and the corpus adds *lorem ipsum* so that many
tokens are whole placeholder words: tiny captions read as obvious filler. Characters outside the
alphabet (accents, newlines) are dropped when tiny encodes a prompt, which does not matter for a model
whose answers are random by construction.

Determinism: the corpus, the BPE trainer settings, the config and the weight draws
(``torch.Generator().manual_seed(seed)`` over the parameters sorted by released name) are fixed, so the
same version always produces the same files. Folders are built in a temporary directory next to the
cache entry and renamed into place, so concurrent workers (Ray actors) never see half-written
checkpoints.

Dims: LLM hidden 64, 2 layers, 4 heads / 2 KV heads; vision tower hidden 64, 2 layers, 4 heads, patch
14. ``mm_max_length`` is 1024 (released: 8192) so that the per-image pixel budget keeps small objects'
up-scaled crops cheap on CPU.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

import torch

from .cache import cache_root, write_once
from .config import (
    FULL_MODEL_TYPE,
    IMAGE_TOKEN,
    LITE_MODEL_TYPE,
    REGION_TOKEN,
    ImageProcessorSettings,
    PixelReferConfig,
    VisionSettings,
)

TINY_VERSION = "v2"  # bump when anything below changes the files
TINY_SEED = 0
VISION_FOLDER = "VL3-SigLIP-NaViT-tiny"
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    IMAGE_TOKEN,
    "<|stream_start|>",
    "<|stream_end|>",
    REGION_TOKEN,
]
# A special token only so that random answers never hold a line break (captions print in tables), while
# prompts keep theirs; the alphabet has no control characters.
NEWLINE_TOKEN = "\n"
# Qwen2's pre-tokenizer split (public regex of the Qwen2 tokenizer).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
CORPUS = (
    "There is one object in the video: the marked object.",
    "Please describe in detail the marked object in the video.",
    "A red car drives along the road and turns left at the corner.",
    "A person in a blue shirt walks across the room and sits on a chair.",
    "The small white dog runs on the grass next to the large tree.",
    "Describe the region in the image in detail. Do not describe anything else.",
    "What is the object doing? It is moving from the left to the right side of the frame.",
    "A green square and a yellow circle move slowly over a dark background.",
    "The cat is sleeping on the sofa while the light changes in the window.",
    "Time 0.0: Time 1.0: the object appears, then it disappears behind the wall.",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore.",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore.",
)
NUM_MERGES = 160
PRINTABLE_ASCII = tuple(chr(c) for c in range(0x20, 0x7F))


def build_tokenizer(folder: Path) -> None:
    """Train the tiny byte-level BPE (printable ASCII alphabet) offline and write a Qwen2 checkpoint's
    tokenizer files."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    alphabet = [byte_level.pre_tokenize_str(c)[0][0] for c in PRINTABLE_ASCII]
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + NUM_MERGES,
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        special_tokens=[],
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(CORPUS), trainer=trainer)
    tokenizer.add_special_tokens([*SPECIAL_TOKENS, NEWLINE_TOKEN])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    tokenizer.model.save(str(folder))  # vocab.json + merges.txt, as the released folders hold them
    added = {tok: tokenizer.token_to_id(tok) for tok in [*SPECIAL_TOKENS, NEWLINE_TOKEN]}
    (folder / "added_tokens.json").write_text(json.dumps(added, indent=2, sort_keys=True))
    decoder = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t, i in added.items()
    }
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "Qwen2Tokenizer",
                "added_tokens_decoder": decoder,
                "additional_special_tokens": SPECIAL_TOKENS[1:],
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "unk_token": None,
                "padding_side": "right",  # upstream's processor needs the key (quirk L10)
                "model_max_length": 32768,
                "clean_up_tokenization_spaces": False,
                "errors": "replace",
                "split_special_tokens": False,
                "chat_template": (
                    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
                    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
                    "{{ '<|im_start|>assistant\n' }}{% endif %}"
                ),
            },
            indent=2,
            sort_keys=True,
        )
    )
    (folder / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "additional_special_tokens": SPECIAL_TOKENS[1:],
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
            },
            indent=2,
            sort_keys=True,
        )
    )


@dataclass(frozen=True)
class CheckpointDims:
    """Network dimensions of a generated checkpoint (random weights, real architecture).

    ``TINY_DIMS`` is the built-in ``tiny`` model. :func:`real_2b_dims` keeps the widths of the released
    2B models (Qwen2.5-1.5B: hidden 1536, 12 heads, 2 KV heads, intermediate 8960; VL3-SigLIP-NaViT:
    hidden 1152, 16 heads, intermediate 4304, patch 14) with only a few layers, so that per-token and
    per-patch costs (FLOPs, memory traffic, kernel shapes) are those of the real model while a CPU can
    still run it. The vocabulary stays the tiny tokenizer's (the released 151936-entry embedding would
    be ~0.9 GB of random fp32 weights and only matters for the lm_head of each decode step).
    """

    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vision_hidden: int = 64
    vision_intermediate: int = 128
    vision_layers: int = 2
    vision_heads: int = 4
    mm_max_length: int = 1024

    def slug(self) -> str:
        """A short stable name for cache folders (every field, in order)."""
        return "d" + "-".join(str(getattr(self, f.name)) for f in fields(self))


TINY_DIMS = CheckpointDims()


def real_2b_dims(layers: int = 2, vision_layers: int = 2, mm_max_length: int = 8192) -> CheckpointDims:
    """The released 2B widths with ``layers`` LLM and ``vision_layers`` tower layers (released: 28 / 27)."""
    return CheckpointDims(
        hidden=1536,
        intermediate=8960,
        layers=layers,
        heads=12,
        kv_heads=2,
        vision_hidden=1152,
        vision_intermediate=4304,
        vision_layers=vision_layers,
        vision_heads=16,
        mm_max_length=mm_max_length,
    )


def tiny_config(
    mode: Literal["lite", "full"], vocab_size: int, token_ids: dict[str, int], dims: CheckpointDims = TINY_DIMS
) -> PixelReferConfig:
    vision = VisionSettings(
        hidden_size=dims.vision_hidden,
        intermediate_size=dims.vision_intermediate,
        num_hidden_layers=dims.vision_layers,
        num_attention_heads=dims.vision_heads,
    )
    text = {
        "hidden_size": dims.hidden,
        "intermediate_size": dims.intermediate,
        "num_hidden_layers": dims.layers,
        "num_attention_heads": dims.heads,
        "vocab_size": vocab_size,
        "num_key_value_heads": dims.kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": dims.layers,
        "attention_dropout": 0.0,
    }
    mm_max_length = dims.mm_max_length
    return PixelReferConfig(
        mode=mode,
        model_type=LITE_MODEL_TYPE if mode == "lite" else FULL_MODEL_TYPE,
        text=text,
        vision=vision,
        image_processor=ImageProcessorSettings.from_sources(None, 2, mm_max_length, 14),
        mask_num=32,
        spatial_merge_size=2,
        mm_projector_type="mlp2x_gelu",
        mm_max_length=mm_max_length,
        region_token_index=token_ids[REGION_TOKEN],
        image_token_index=token_ids[IMAGE_TOKEN],
        eos_token_id=token_ids["<|im_end|>"],
        vision_folder=VISION_FOLDER,
    )


def seeded_init(model: torch.nn.Module, names: dict[str, str], seed: int) -> None:
    """Fill every parameter from one generator, in the sorted order of the released names.

    Weights and biases ~ N(0, 0.02^2), norm scales ~ 1 + N(0, 0.1^2) (norm biases N(0, 0.02^2)),
    token embeddings and ``lm_head`` ~ N(0, 0.1^2) so the logits are not flat, and the weights of
    ``feat_linear`` / ``mm_projector`` ~ N(0, 0.1^2) so object and frame tokens reach the size of token
    embeddings (with 0.02 they are ~100x smaller and every object gets the same caption).
    """
    generator = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    for released in sorted(names):
        internal = names[released]
        p = params[internal]
        noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
        is_norm = any(part in released for part in ("norm", "ln_local", "ln_global", "layer_norm"))
        if is_norm and released.endswith("weight"):
            value = 1.0 + 0.1 * noise
        elif "embed_tokens" in released or released.startswith("lm_head"):
            value = 0.1 * noise
        elif released.endswith("weight") and ("feat_linear" in released or "mm_projector" in released):
            value = 0.1 * noise
        else:
            value = 0.02 * noise
        with torch.no_grad():
            p.copy_(value.to(p.dtype))


def create_tiny_checkpoint(
    folder: str | os.PathLike[str],
    mode: Literal["lite", "full"] = "lite",
    seed: int = TINY_SEED,
    dims: CheckpointDims = TINY_DIMS,
) -> Path:
    """Write a checkpoint of ``mode`` with ``dims`` (default: the tiny model) into ``folder`` (created; must
    not hold another checkpoint), in the released layout that the normal loader reads."""
    from .loading import build_model, save_checkpoint
    from .modeling_pixelrefer import internal_to_released

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer(folder)
    ids = json.loads((folder / "added_tokens.json").read_text())
    vocab_size = ((max(ids.values()) + 1 + 63) // 64) * 64
    config = tiny_config(mode, vocab_size, ids, dims)
    model = build_model(
        config, device=torch.device("cpu"), dtype=torch.float32, attn_implementation="sdpa", init_weights=True
    )
    names = {internal_to_released(k): k for k, _ in model.named_parameters()}
    seeded_init(model, names, seed)
    save_checkpoint(model, folder)
    meta = {"mode": mode, "seed": seed, "version": TINY_VERSION}
    if dims != TINY_DIMS:
        meta["dims"] = asdict(dims)
    (folder / "tiny.json").write_text(json.dumps(meta))
    return folder


def tiny_checkpoint(
    mode: Literal["lite", "full"] = "lite",
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = TINY_SEED,
    dims: CheckpointDims = TINY_DIMS,
) -> Path:
    """Path of the cached checkpoint of ``mode`` (and ``dims``), creating it atomically on first use."""
    if mode not in ("lite", "full"):
        raise ValueError(f"tiny mode must be 'lite' or 'full', got {mode!r}")
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    suffix = "" if dims == TINY_DIMS else f"-{dims.slug()}"
    final = root / f"tiny-{mode}-{TINY_VERSION}-seed{seed}{suffix}"
    return write_once(final, lambda tmp: create_tiny_checkpoint(tmp, mode, seed, dims), marker="tiny.json")
