"""Strict loading (and saving) of PixelRefer checkpoints in the released layout.

A checkpoint is a folder (or a Hugging Face repo id, resolved by ``models.hub`` from the local cache
when offline) with ``config.json``, the weights in any layout ``models.weights`` reads (safetensors or
``.bin``, single or sharded), ``generation_config.json``, the tokenizer files, and a vision tower named by
``mm_vision_encoder``: a folder next to the weights, an absolute folder, a hub id, or an inline config.

Loading is strict: every tensor in the files must map onto a parameter (unexpected keys are listed in
the error), every parameter must be in the files (missing keys are listed), and shapes must agree.
The one tolerated absence is tied embeddings: with ``tie_word_embeddings`` true, whichever of
``lm_head.weight`` / ``model.embed_tokens.weight`` is stored fills the other (transformers omits the
head when it saves a tied model); with it false both must be stored.

The model is built under ``transformers.initialization.no_init_weights`` with the target device and
dtype as defaults: no time is spent on random init that the checkpoint overwrites, and the rotary
``inv_freq`` buffers stay float32 like in upstream's ``from_pretrained(torch_dtype=...)`` (casting a
built model with ``.to(bfloat16)`` would round them). :func:`inspect_checkpoint` runs the same checks on
the ``meta`` device against the files' headers, without reading any weight data.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import torch

from .config import IMAGE_TOKEN, REGION_TOKEN, PixelReferConfig, VisionTower, read_config_json
from .generation import GENERATION_CONFIG, GenerationSettings
from .hub import hub_offline, resolve_checkpoint, resolve_vision_tower
from .modeling_pixelrefer import PixelReferModel, internal_to_released, released_to_internal
from .weights import SAFE_WEIGHTS, CheckpointError, WeightFiles, dtype_summary, find_weight_files, read_weights

__all__ = [
    "CheckpointError",
    "CheckpointReport",
    "LoadedCheckpoint",
    "build_model",
    "hub_offline",
    "inspect_checkpoint",
    "load_checkpoint",
    "load_tokenizer",
    "map_released_state",
    "read_config",
    "resolve_checkpoint",
    "save_checkpoint",
]

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
)
_HEAD = "llm.lm_head.weight"
_EMBED = "llm.model.embed_tokens.weight"


def read_config(folder: Path) -> tuple[PixelReferConfig, VisionTower | None]:
    """The checkpoint's config with its vision tower resolved (local, inline, or hub cache / download)."""
    raw = read_config_json(folder)
    tower = resolve_vision_tower(folder, raw)
    return PixelReferConfig.from_folder(folder, tower), tower


@contextlib.contextmanager
def _build_defaults(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    from transformers.initialization import no_init_weights

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights(), torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_model(
    config: PixelReferConfig,
    *,
    device: torch.device,
    dtype: torch.dtype,
    attn_implementation: str,
    init_weights: bool = False,
) -> PixelReferModel:
    """Instantiate the architecture of ``config`` on ``device``/``dtype`` (uninitialised unless asked)."""
    if init_weights:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = PixelReferModel(config, attn_implementation=attn_implementation)
        finally:
            torch.set_default_dtype(previous)
    else:
        with _build_defaults(device, dtype):
            model = PixelReferModel(config, attn_implementation=attn_implementation)
    return model.eval()


def _tie(mapped: dict[str, torch.Tensor]) -> None:
    """Fill the missing one of a tied head / embedding pair; both stored must be the same tensor values."""
    if _HEAD in mapped and _EMBED in mapped:
        head, embed = mapped[_HEAD], mapped[_EMBED]
        if not (head.is_meta or embed.is_meta) and not torch.equal(head, embed):
            raise CheckpointError(
                "tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight"
            )
    elif _HEAD in mapped:
        mapped[_EMBED] = mapped[_HEAD]
    elif _EMBED in mapped:
        mapped[_HEAD] = mapped[_EMBED]


def map_released_state(state: dict[str, torch.Tensor], model: PixelReferModel) -> dict[str, torch.Tensor]:
    """Released keys -> internal keys, failing with the full list of missing / unexpected / mis-shaped keys."""
    expected = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, tensor in state.items():
        try:
            internal = released_to_internal(key)
        except KeyError:
            unexpected.append(key)
            continue
        if internal in expected:
            mapped[internal] = tensor
        else:
            unexpected.append(key)
    tied = bool(model.config.text["tie_word_embeddings"])
    if tied:
        _tie(mapped)
    missing = sorted(internal_to_released(k) for k in expected if k not in mapped)
    wrong_shape = sorted(
        f"{internal_to_released(k)}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in mapped.items()
        if tuple(v.shape) != tuple(expected[k].shape)
    )
    problems = []
    if missing:
        hint = ""
        if not tied and {internal_to_released(_HEAD), internal_to_released(_EMBED)} & set(missing):
            hint = (
                " (tie_word_embeddings is false, so lm_head.weight and model.embed_tokens.weight must both be stored)"
            )
        problems.append(f"missing tensors ({len(missing)}): {', '.join(missing)}{hint}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {', '.join(sorted(unexpected))}")
    if wrong_shape:
        problems.append(f"shape mismatches ({len(wrong_shape)}): {'; '.join(wrong_shape)}")
    if problems:
        raise CheckpointError(
            f"checkpoint does not match the {model.config.mode} architecture of its config: " + " | ".join(problems)
        )
    return mapped


def load_tokenizer(folder: Path, config: PixelReferConfig) -> Any:
    """The checkpoint's tokenizer; it must know ``<REGION>`` (and ``<image>`` for full) as single tokens."""
    tokenizer_config = folder / "tokenizer_config.json"
    if not tokenizer_config.is_file() and not (folder / "tokenizer.json").is_file():
        raise CheckpointError(f"{folder}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    cls_name = ""
    if tokenizer_config.is_file():
        cls_name = str(json.loads(tokenizer_config.read_text()).get("tokenizer_class") or "")
    if cls_name.startswith("Qwen2Tokenizer"):
        from transformers import Qwen2Tokenizer as tokenizer_cls
    else:
        from transformers import AutoTokenizer as tokenizer_cls  # type: ignore[no-redef]
    try:
        tokenizer = tokenizer_cls.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{folder}: cannot load the tokenizer: {exc}") from exc
    needed = [REGION_TOKEN] + ([] if config.is_lite else [IMAGE_TOKEN])
    for token in needed:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] >= config.text["vocab_size"]:
            raise CheckpointError(
                f"{folder}: tokenizer does not have {token} as one token inside the "
                f"vocabulary of {config.text['vocab_size']} (got ids {ids})"
            )
    return tokenizer


@dataclass
class LoadedCheckpoint:
    model: PixelReferModel
    tokenizer: Any
    config: PixelReferConfig
    folder: Path
    generation: GenerationSettings = GenerationSettings()
    weights: WeightFiles | None = None
    tower: VisionTower | None = None


def _prepare(name_or_path: str | os.PathLike[str]):
    """Folder, config (token ids from the tokenizer, as upstream's ``model_init`` overwrites them),
    tokenizer, decoding settings, tower and weight files: everything but the tensors."""
    folder = resolve_checkpoint(name_or_path)
    config, tower = read_config(folder)
    weights = find_weight_files(folder)
    tokenizer = load_tokenizer(folder, config)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.eos_token_id
    config = replace(
        config,
        region_token_index=tokenizer.convert_tokens_to_ids(REGION_TOKEN),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        eos_token_id=eos,
    )
    generation = GenerationSettings.from_file(
        folder / GENERATION_CONFIG, tokenizer_eos=eos, tokenizer_pad=tokenizer.pad_token_id
    )
    return folder, config, tokenizer, generation, tower, weights


def load_checkpoint(
    name_or_path: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> LoadedCheckpoint:
    """Load model, tokenizer, config and decoding settings from a folder or hub id, strictly."""
    folder, config, tokenizer, generation, tower, weights = _prepare(name_or_path)
    state = read_weights(weights)
    model = build_model(config, device=torch.device(device), dtype=dtype, attn_implementation=attn_implementation)
    model.load_state_dict(map_released_state(state, model), strict=True)
    if config.text["tie_word_embeddings"]:
        model.llm.lm_head.weight = model.llm.model.embed_tokens.weight
    model.requires_grad_(False)  # inference only
    return LoadedCheckpoint(model.eval(), tokenizer, config, folder, generation, weights, tower)


@dataclass
class CheckpointReport:
    """What ``pixelrefer models check`` prints: resolved files and the strict check's outcome."""

    folder: Path
    config: PixelReferConfig
    weights: WeightFiles
    tower: VisionTower | None
    generation: GenerationSettings
    parameters: int
    stored_dtypes: str
    tokenizer_class: str

    def lines(self) -> list[str]:
        cfg = self.config
        return [
            f"folder:      {self.folder}",
            f"framework:   {cfg.mode} ({cfg.model_type})",
            f"weights:     {self.weights.describe()}",
            f"stored as:   {self.stored_dtypes} (config torch_dtype {cfg.raw.get('torch_dtype')})",
            f"parameters:  {self.parameters:,} (every one stored; strict check passed)",
            f"llm:         {cfg.text['num_hidden_layers']} layers, hidden {cfg.hidden_size}, "
            f"vocab {cfg.text['vocab_size']}, tie_word_embeddings {bool(cfg.text['tie_word_embeddings'])}",
            f"vision:      {self.tower.describe() if self.tower else '(none)'}; {cfg.vision.num_hidden_layers} "
            f"layers, hidden {cfg.vision.hidden_size}, patch {cfg.vision.patch_size}",
            f"tokenizer:   {self.tokenizer_class}; <REGION> {cfg.region_token_index}, <image> {cfg.image_token_index}",
            f"generation:  {self.generation.describe()}",
        ]


def inspect_checkpoint(name_or_path: str | os.PathLike[str]) -> CheckpointReport:
    """The strict load's checks (keys, shapes, tied pair, tokenizer, tower) on the ``meta`` device: the
    weight files' headers are read, their data is not, so a 7B checkpoint checks in seconds."""
    folder, config, tokenizer, generation, tower, weights = _prepare(name_or_path)
    state = read_weights(weights, meta=True)
    model = build_model(config, device=torch.device("meta"), dtype=torch.float32, attn_implementation="sdpa")
    map_released_state(state, model)
    unique = {id(p): p.numel() for p in model.parameters()}
    return CheckpointReport(
        folder=folder,
        config=config,
        weights=weights,
        tower=tower,
        generation=generation,
        parameters=sum(unique.values()),
        stored_dtypes=dtype_summary(state),
        tokenizer_class=type(tokenizer).__name__,
    )


def save_checkpoint(
    model: PixelReferModel,
    folder: str | os.PathLike[str],
    *,
    tokenizer_dir: Path | None = None,
    vision_preprocessor: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` in the released layout (used by ``models.tiny``; bf16 like upstream's release).

    Writes ``config.json``, ``generation_config.json``, ``model.safetensors``, the vision sub-folder
    (its ``config.json``, ``preprocessor_config.json`` and the tower's own weights, as upstream ships
    them) and copies the tokenizer files from ``tokenizer_dir``.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    vision_dir = config.vision_folder or "VL3-SigLIP-NaViT-tiny"
    released = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in model.released_state_dict().items()}
    if config.text["tie_word_embeddings"]:
        released.pop("lm_head.weight", None)
    save_file(released, str(folder / SAFE_WEIGHTS), metadata={"format": "pt"})
    raw = config.to_released_dict()
    raw["mm_vision_encoder"] = raw["vision_encoder"] = vision_dir
    (folder / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": config.eos_token_id}, indent=2))
    vdir = folder / vision_dir
    vdir.mkdir(parents=True, exist_ok=True)
    (vdir / "config.json").write_text(json.dumps(config.vision.to_damovl_dict(), indent=2, sort_keys=True))
    pre = vision_preprocessor or {
        "image_processor_type": "DAMOVLImageProcessor",
        "image_mean": list(config.image_processor.image_mean),
        "image_std": list(config.image_processor.image_std),
        "rescale_factor": config.image_processor.rescale_factor,
        "min_pixels": config.image_processor.min_pixels,
        "max_pixels": config.image_processor.max_pixels,
        "patch_size": config.image_processor.patch_size,
        "merge_size": 1,
        "resample": config.image_processor.resample,
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
    }
    (vdir / "preprocessor_config.json").write_text(json.dumps(pre, indent=2, sort_keys=True))
    prefix = "model.vision_encoder.vision_encoder."
    save_file(
        {k[len(prefix) :]: v for k, v in released.items() if k.startswith(prefix)},
        str(vdir / SAFE_WEIGHTS),
        metadata={"format": "pt"},
    )
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file():
                (folder / name).write_bytes(src.read_bytes())
    return folder
