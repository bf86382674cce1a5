"""Strict loading (and saving) of PixelRefer checkpoints in the released layout.

A checkpoint is a folder (or a Hugging Face repo id resolved through ``huggingface_hub.snapshot_download``,
from the local cache only when the machine is offline) with ``config.json``, ``model.safetensors`` (or a
sharded ``model.safetensors.index.json``), the tokenizer files and the vision tower's sub-folder.

Loading is strict: every tensor in the files must map onto a parameter (unexpected keys are listed in
the error), every parameter must be in the files (missing keys are listed), and shapes must agree.
The only tolerated absence is ``lm_head.weight`` when ``tie_word_embeddings`` is true (transformers
omits a tied head when it saves).

The model is built under ``transformers.initialization.no_init_weights`` with the target device and
dtype as defaults: no time is spent on random init that the checkpoint overwrites, and the rotary
``inv_freq`` buffers stay float32 like in upstream's ``from_pretrained(torch_dtype=...)`` (casting a
built model with ``.to(bfloat16)`` would round them).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from .config import IMAGE_TOKEN, REGION_TOKEN, ConfigError, PixelReferConfig
from .modeling_pixelrefer import PixelReferModel, internal_to_released, released_to_internal

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be found, or its tensors do not match the architecture its config describes."""


def hub_offline() -> bool:
    """True when the environment forbids network access to the hub (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    return any(
        os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def resolve_checkpoint(name_or_path: str | os.PathLike[str]) -> Path:
    """A local folder as is; otherwise a hub repo id downloaded (or found in the cache) as a snapshot."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file, not a checkpoint folder")
    name = str(name_or_path)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise CheckpointError(f"checkpoint {name!r} is neither an existing folder nor a hub id (owner/name)")
    from huggingface_hub import snapshot_download

    offline = hub_offline()
    try:
        return Path(snapshot_download(name, local_files_only=offline))
    except Exception as first:  # noqa: BLE001 - network errors come in many types
        if not offline:
            try:  # online but unreachable: the local cache may still hold it
                return Path(snapshot_download(name, local_files_only=True))
            except Exception:  # noqa: BLE001
                pass
        raise CheckpointError(
            f"cannot get {name!r} from the Hugging Face hub or its local cache "
            f"({'offline' if offline else 'online'}): {first}"
        ) from first


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder (single or sharded safetensors), under their stored names."""
    from safetensors.torch import load_file

    single = folder / WEIGHTS_NAME
    index = folder / WEIGHTS_INDEX_NAME
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            if not (folder / shard).is_file():
                raise CheckpointError(f"{folder}: shard {shard} listed in {WEIGHTS_INDEX_NAME} is missing")
            state.update(load_file(str(folder / shard)))
        return state
    raise CheckpointError(f"{folder}: no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} (only safetensors are supported)")


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
    if tied and "llm.lm_head.weight" not in mapped and "llm.model.embed_tokens.weight" in mapped:
        mapped["llm.lm_head.weight"] = mapped["llm.model.embed_tokens.weight"]
    elif tied and "llm.lm_head.weight" in mapped and "llm.model.embed_tokens.weight" in mapped:
        if not torch.equal(mapped["llm.lm_head.weight"], mapped["llm.model.embed_tokens.weight"]):
            raise CheckpointError(
                "tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight"
            )
    missing = sorted(internal_to_released(k) for k in expected if k not in mapped)
    wrong_shape = sorted(
        f"{internal_to_released(k)}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in mapped.items()
        if tuple(v.shape) != tuple(expected[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {', '.join(missing)}")
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


def load_checkpoint(
    name_or_path: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> LoadedCheckpoint:
    """Load model, tokenizer and config from a folder or hub id, strictly (see the module docstring).

    Token ids of ``<REGION>`` and ``<image>`` are taken from the tokenizer, as upstream's ``model_init``
    does (it overwrites the config's values).
    """
    folder = resolve_checkpoint(name_or_path)
    try:
        config = PixelReferConfig.from_folder(folder)
    except ConfigError:
        raise
    tokenizer = load_tokenizer(folder, config)
    region_id = tokenizer.convert_tokens_to_ids(REGION_TOKEN)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.eos_token_id
    config = _replace(config, region_token_index=region_id, image_token_index=image_id, eos_token_id=eos)
    state = read_state_dict(folder)
    device = torch.device(device)
    model = build_model(config, device=device, dtype=dtype, attn_implementation=attn_implementation)
    mapped = map_released_state(state, model)
    model.load_state_dict(mapped, strict=True)
    if config.text["tie_word_embeddings"]:
        model.llm.lm_head.weight = model.llm.model.embed_tokens.weight
    model.requires_grad_(False)  # inference only
    return LoadedCheckpoint(model.eval(), tokenizer, config, folder)


def _replace(config: PixelReferConfig, **changes: Any) -> PixelReferConfig:
    from dataclasses import replace

    return replace(config, **changes)


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
    save_file(released, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
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
        str(vdir / WEIGHTS_NAME),
        metadata={"format": "pt"},
    )
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file():
                (folder / name).write_bytes(src.read_bytes())
    return folder
