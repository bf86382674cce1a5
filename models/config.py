"""Checkpoint configuration of PixelRefer / PixelRefer-Lite, read from the released layout.

A released checkpoint folder holds a flat ``config.json`` (the Qwen2 LLM fields plus the multimodal
fields ``mm_*``, ``mask_num``, ``spatial_merge_size`` ...) and names its vision tower in
``mm_vision_encoder``. Upstream builds the tower from that name (a sub-folder or a hub id holding a
``damovl`` config and a ``preprocessor_config.json``), so we read the vision fields from there, or from
an inline ``vision_config`` dict when a checkpoint carries one. This module is the contract and reads
local files only; ``models.hub`` resolves a tower named by hub id (cache or download) and hands the
result in as a :class:`VisionTower`.

``model_type`` decides the framework:

* ``pixelreferlite_qwen2`` -> ``"lite"`` (Object-Only: SAOT + OCI, only object tokens reach the LLM);
* ``pixelrefer_qwen2`` -> ``"full"`` (Vision-Object: frame tokens through ``mm_projector`` + object tokens).

Everything that differs between the two frameworks in the authors' code (large-object threshold,
k-means iterations, padding) is a property of :class:`PixelReferConfig` so that no other module has to
branch on strings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

Mode = Literal["lite", "full"]

LITE_MODEL_TYPE = "pixelreferlite_qwen2"
FULL_MODEL_TYPE = "pixelrefer_qwen2"
MODEL_TYPES: dict[str, Mode] = {LITE_MODEL_TYPE: "lite", FULL_MODEL_TYPE: "full"}
LITE_ARCHITECTURE = "PixelreferliteQwen2ForCausalLM"
FULL_ARCHITECTURE = "PixelreferQwen2ForCausalLM"

REGION_TOKEN = "<REGION>"
IMAGE_TOKEN = "<image>"
REGION_PLACEHOLDER = "<region>"
VIDEO_TAG = "<video>"
IMAGE_TAG = "<image>"


class ConfigError(ValueError):
    """A checkpoint's configuration is missing, inconsistent or not a PixelRefer configuration."""


_TEXT_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_TEXT_OPTIONAL: dict[str, Any] = {
    "num_key_value_heads": None,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "sliding_window": None,
    "max_window_layers": 28,
    "attention_dropout": 0.0,
}
_VISION_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size")


def _require_int(source: Mapping[str, Any], key: str, where: str) -> int:
    if key not in source:
        raise ConfigError(f"{where}: required field {key!r} is missing")
    value = source[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{where}: field {key!r} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class VisionSettings:
    """Fields of the VL3-SigLIP-NaViT tower (upstream ``damovl`` config) that define the network."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    model_type: str = "damovl"

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str) -> "VisionSettings":
        values = {key: _require_int(raw, key, where) for key in _VISION_REQUIRED}
        if values["hidden_size"] % values["num_attention_heads"]:
            raise ConfigError(
                f"{where}: hidden_size {values['hidden_size']} is not divisible by "
                f"num_attention_heads {values['num_attention_heads']}"
            )
        head_dim = values["hidden_size"] // values["num_attention_heads"]
        if head_dim % 4:
            # The axial 2D RoPE splits each head into h/w halves of cos/sin pairs.
            raise ConfigError(f"{where}: head_dim {head_dim} must be a multiple of 4 for the 2D RoPE")
        return cls(
            **values,
            num_channels=int(raw.get("num_channels", 3)),
            hidden_act=str(raw.get("hidden_act", "gelu_pytorch_tanh")),
            layer_norm_eps=float(raw.get("layer_norm_eps", 1e-6)),
            attention_dropout=float(raw.get("attention_dropout", 0.0)),
            model_type=str(raw.get("model_type", "damovl")),
        )

    def to_hf(self, attn_implementation: str | None = None):
        """Build transformers' ``VideoLlama3VisionConfig`` (same network as upstream's DAMOVL tower).

        The default rope of that config (axial, theta 10000) is upstream's, so it is left alone.
        """
        from transformers.models.video_llama_3 import VideoLlama3VisionConfig

        cfg = VideoLlama3VisionConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_channels=self.num_channels,
            patch_size=self.patch_size,
            hidden_act=self.hidden_act,
            layer_norm_eps=self.layer_norm_eps,
            attention_dropout=self.attention_dropout,
        )
        if attn_implementation is not None:
            cfg._attn_implementation = attn_implementation
        return cfg

    def to_damovl_dict(self) -> dict[str, Any]:
        """The vision sub-folder's ``config.json`` as upstream writes it (used by ``models.tiny``)."""
        return {
            "architectures": ["DAMOVLVisionModel"],
            "model_type": "damovl",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_channels": self.num_channels,
            "patch_size": self.patch_size,
            "hidden_act": self.hidden_act,
            "layer_norm_eps": self.layer_norm_eps,
            "attention_dropout": self.attention_dropout,
        }


@dataclass(frozen=True)
class ImageProcessorSettings:
    """Upstream's DAMOVL image processor as ``load_pretrained_model`` configures it.

    ``merge_size`` is overwritten with the checkpoint's ``spatial_merge_size`` and ``max_pixels`` with
    ``mm_max_length * merge_size**2 * patch_size**2`` (upstream ``encoder.py`` ``load_model``); both
    feed the per-image pixel budget (see ``processing_pixelrefer.pixel_budget``).
    """

    patch_size: int = 14
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 8192 * 4 * 14 * 14
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: int = 3  # PIL bicubic, as in the released preprocessor_config.json

    @classmethod
    def from_sources(
        cls, preprocessor: Mapping[str, Any] | None, merge_size: int, mm_max_length: int | None, patch_size: int
    ) -> "ImageProcessorSettings":
        pre = dict(preprocessor or {})
        if mm_max_length is None:
            mm_max_length = 9477 // (merge_size**2)  # upstream's default when the field is absent
        mean = tuple(float(v) for v in pre.get("image_mean", (0.5, 0.5, 0.5)))
        std = tuple(float(v) for v in pre.get("image_std", (0.5, 0.5, 0.5)))
        if len(mean) != 3 or len(std) != 3:
            raise ConfigError("preprocessor_config.json: image_mean/image_std must have 3 entries")
        return cls(
            patch_size=patch_size,
            merge_size=merge_size,
            min_pixels=int(pre.get("min_pixels", 56 * 56)),
            max_pixels=int(mm_max_length * merge_size**2 * patch_size**2),
            image_mean=mean,  # type: ignore[arg-type]
            image_std=std,  # type: ignore[arg-type]
            rescale_factor=float(pre.get("rescale_factor", 1 / 255)),
            resample=int(pre.get("resample", 3)),
        )


@dataclass(frozen=True)
class PixelReferConfig:
    """Everything the native model needs from a checkpoint folder, validated once at load time."""

    mode: Mode
    model_type: str
    text: dict[str, Any]
    vision: VisionSettings
    image_processor: ImageProcessorSettings
    mask_num: int = 32
    spatial_merge_size: int = 2
    mm_projector_type: str = "mlp2x_gelu"
    mm_max_length: int | None = 8192
    region_token_index: int | None = None
    image_token_index: int | None = None
    eos_token_id: int | None = None
    vision_folder: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # -- framework-specific constants of the authors' code (see the parity README) ------------------
    @property
    def is_lite(self) -> bool:
        return self.mode == "lite"

    @property
    def large_object_threshold(self) -> float:
        """``T`` of the scale rule: Lite's ``mm_utils`` uses 50, full's uses 100 (paper: 100)."""
        return 50.0 if self.is_lite else 100.0

    @property
    def kmeans_iterations(self) -> int:
        """Lite's ``kmeans_fast`` defaults to 3 iterations, full's to 5."""
        return 3 if self.is_lite else 5

    @property
    def hidden_size(self) -> int:
        return int(self.text["hidden_size"])

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_dict(
        cls,
        raw: Mapping[str, Any],
        *,
        vision: Mapping[str, Any] | None,
        preprocessor: Mapping[str, Any] | None,
        where: str = "config.json",
        vision_folder: str | None = None,
    ) -> "PixelReferConfig":
        model_type = raw.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ConfigError(
                f"{where}: model_type {model_type!r} is not a PixelRefer checkpoint "
                f"(expected one of {sorted(MODEL_TYPES)})"
            )
        text: dict[str, Any] = {key: _require_int(raw, key, where) for key in _TEXT_REQUIRED}
        for key, default in _TEXT_OPTIONAL.items():
            text[key] = raw.get(key, default)
        if text["num_key_value_heads"] is None:
            text["num_key_value_heads"] = text["num_attention_heads"]
        if text["hidden_size"] % text["num_attention_heads"]:
            raise ConfigError(f"{where}: hidden_size is not divisible by num_attention_heads")
        if text["num_attention_heads"] % int(text["num_key_value_heads"]):
            raise ConfigError(f"{where}: num_attention_heads is not a multiple of num_key_value_heads")
        rope_scaling = raw.get("rope_scaling")
        if rope_scaling not in (None, {}):
            raise ConfigError(
                f"{where}: rope_scaling {rope_scaling!r} is not supported (released checkpoints use none)"
            )

        if vision is None:
            raise ConfigError(
                f"{where}: no vision tower configuration found (mm_vision_encoder folder or vision_config)"
            )
        vision_settings = VisionSettings.from_dict(vision, where=f"{vision_folder or 'vision_config'}/config.json")

        if MODEL_TYPES[model_type] == "lite" and vision_settings.hidden_size % 8:
            raise ConfigError(
                f"{where}: Lite's fusion attention has 8 heads; vision hidden_size "
                f"{vision_settings.hidden_size} is not divisible by 8"
            )
        mm_hidden = raw.get("mm_hidden_size", vision_settings.hidden_size)
        if mm_hidden != vision_settings.hidden_size:
            raise ConfigError(
                f"{where}: mm_hidden_size {mm_hidden} != vision hidden_size {vision_settings.hidden_size}"
            )
        projector = raw.get("mm_projector_type", "mlp2x_gelu")
        if projector != "mlp2x_gelu":
            raise ConfigError(
                f"{where}: mm_projector_type {projector!r} is not supported (released checkpoints use mlp2x_gelu)"
            )
        mask_num = _require_int(raw, "mask_num", where) if "mask_num" in raw else 32
        merge = _require_int(raw, "spatial_merge_size", where) if "spatial_merge_size" in raw else 1
        mm_max_length = raw.get("mm_max_length")
        if mm_max_length is not None:
            mm_max_length = _require_int(raw, "mm_max_length", where)
        eos = raw.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        return cls(
            mode=MODEL_TYPES[model_type],
            model_type=model_type,
            text=text,
            vision=vision_settings,
            image_processor=ImageProcessorSettings.from_sources(
                preprocessor, merge, mm_max_length, vision_settings.patch_size
            ),
            mask_num=mask_num,
            spatial_merge_size=merge,
            mm_projector_type=projector,
            mm_max_length=mm_max_length,
            region_token_index=raw.get("region_token_index"),
            image_token_index=raw.get("image_token_index"),
            eos_token_id=eos,
            vision_folder=vision_folder,
            raw=dict(raw),
        )

    @classmethod
    def from_folder(cls, folder: str | Path, tower: "VisionTower | None" = None) -> "PixelReferConfig":
        """Read ``config.json`` and the vision tower's config of a checkpoint folder.

        ``tower`` is the tower as resolved by the caller (``models.hub`` adds the Hugging Face cache and
        download); without it only local sources are tried (:func:`find_local_vision_tower`), so reading a
        config never touches the network.
        """
        folder = Path(folder)
        raw = read_config_json(folder)
        path = folder / "config.json"
        tower = tower or find_local_vision_tower(folder, raw)
        if tower is None:
            name = vision_encoder_name(raw)
            raise ConfigError(
                f"{path}: no vision tower configuration found for {name!r}: it is not a folder (relative to "
                f"{folder} or absolute) and config.json has no inline {' / '.join(VISION_CONFIG_KEYS)}"
            )
        return cls.from_dict(
            raw,
            vision=tower.config,
            preprocessor=tower.preprocessor,
            where=str(path),
            vision_folder=tower.label(folder),
        )

    def to_qwen2(self, attn_implementation: str | None = None):
        """transformers ``Qwen2Config`` for the LLM part (rope as ``rope_parameters``, the v5 field)."""
        from transformers import Qwen2Config

        t = self.text
        cfg = Qwen2Config(
            vocab_size=t["vocab_size"],
            hidden_size=t["hidden_size"],
            intermediate_size=t["intermediate_size"],
            num_hidden_layers=t["num_hidden_layers"],
            num_attention_heads=t["num_attention_heads"],
            num_key_value_heads=t["num_key_value_heads"],
            hidden_act=t["hidden_act"],
            max_position_embeddings=t["max_position_embeddings"],
            rms_norm_eps=float(t["rms_norm_eps"]),
            rope_parameters={"rope_type": "default", "rope_theta": float(t["rope_theta"])},
            tie_word_embeddings=bool(t["tie_word_embeddings"]),
            use_sliding_window=bool(t["use_sliding_window"]),
            sliding_window=t["sliding_window"],
            max_window_layers=t["max_window_layers"],
            attention_dropout=float(t["attention_dropout"]),
            eos_token_id=self.eos_token_id,
        )
        if attn_implementation is not None:
            cfg._attn_implementation = attn_implementation
        return cfg

    def to_released_dict(self) -> dict[str, Any]:
        """``config.json`` in the released layout (what upstream's ``save_pretrained`` writes)."""
        t = self.text
        out: dict[str, Any] = {
            "architectures": [LITE_ARCHITECTURE if self.is_lite else FULL_ARCHITECTURE],
            "model_type": self.model_type,
            **{k: t[k] for k in _TEXT_REQUIRED},
            **{k: t[k] for k in _TEXT_OPTIONAL},
            "rope_scaling": None,
            "eos_token_id": self.eos_token_id,
            "mask_num": self.mask_num,
            "spatial_merge_size": self.spatial_merge_size,
            "mm_projector_type": self.mm_projector_type,
            "mm_hidden_size": self.vision.hidden_size,
            "mm_max_length": self.mm_max_length,
            "mm_vision_encoder": self.vision_folder,
            "vision_encoder": self.vision_folder,
            "mm_vision_select_feature": "patch",
            "mm_vision_select_layer": -2,
            "region_token_index": self.region_token_index,
            "image_token_index": self.image_token_index,
            "image_aspect_ratio": "qwen2vl",
            "use_mm_proj": True,
            "use_token_compression": True,
            "torch_dtype": "bfloat16",
        }
        return out


VISION_CONFIG_KEYS = ("vision_config", "vision_encoder_config")


@dataclass(frozen=True)
class VisionTower:
    """The vision tower's ``config.json`` / ``preprocessor_config.json`` and where they were found.

    Upstream builds the tower inside the model constructor from ``mm_vision_encoder`` (a folder or a hub
    id); the released weights of the tower are also in the checkpoint itself, so only these two small
    files are needed from the tower's own location.
    """

    name: str | None
    source: Literal["folder", "inline", "hub"]
    config: dict[str, Any]
    preprocessor: dict[str, Any] | None = None
    folder: Path | None = None

    def label(self, checkpoint: Path) -> str | None:
        """What ``vision_folder`` records: a path relative to the checkpoint when inside it, else the name."""
        if self.source == "folder" and self.folder is not None:
            try:
                return str(self.folder.relative_to(checkpoint))
            except ValueError:
                return str(self.folder)
        return self.name

    def describe(self) -> str:
        where = {
            "folder": f"folder {self.folder}",
            "inline": "inline in config.json",
            "hub": f"hub cache {self.folder}",
        }
        return f"{self.name or '(unnamed)'}: {where[self.source]}"


def read_config_json(folder: Path) -> dict[str, Any]:
    """A checkpoint's ``config.json`` as a dict (ConfigError when absent or not JSON)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{folder}: no config.json")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: not a JSON object")
    return raw


def vision_encoder_name(raw: Mapping[str, Any]) -> str | None:
    """``mm_vision_encoder`` (or ``vision_encoder``), the name upstream builds the tower from."""
    name = raw.get("mm_vision_encoder") or raw.get("vision_encoder")
    return name if isinstance(name, str) and name else None


def read_tower_folder(folder: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The tower's config and (optional) preprocessor config from a folder holding them."""
    config = json.loads((folder / "config.json").read_text())
    pre_path = folder / "preprocessor_config.json"
    return config, (json.loads(pre_path.read_text()) if pre_path.is_file() else None)


def find_local_vision_tower(checkpoint: Path, raw: Mapping[str, Any]) -> VisionTower | None:
    """The tower from local sources only, in upstream's order of meaning.

    The name as a folder relative to the checkpoint (or absolute), then its last path component next
    to the weights (a hub id's folder shipped inside the checkpoint), then an inline vision config.
    Upstream resolves a relative name against the working directory; we use the checkpoint folder so
    that loading does not depend on where a worker happens to run.
    """
    name = vision_encoder_name(raw)
    if name is not None:
        for candidate in dict.fromkeys((checkpoint / Path(name).expanduser(), checkpoint / Path(name).name)):
            if (candidate / "config.json").is_file():
                config, pre = read_tower_folder(candidate)
                return VisionTower(name, "folder", config, pre, candidate)
    for key in VISION_CONFIG_KEYS:
        if isinstance(raw.get(key), Mapping):
            pre = raw.get("preprocessor_config")
            return VisionTower(name, "inline", dict(raw[key]), dict(pre) if isinstance(pre, Mapping) else None)
    return None
