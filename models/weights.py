"""Reading checkpoint tensors in every layout the hub serves: safetensors or PyTorch ``.bin``, single or sharded.

Why a module of its own: the PixelRefer loader and the SAM 2 loader read the same four layouts, and a
``.bin`` file is a pickle, so exactly one place may open it, and only with
``torch.load(weights_only=True)`` (the restricted unpickler: tensors and plain containers, never
arbitrary objects). ``mmap=True`` keeps a multi-GB shard out of RAM until a tensor is copied into the
model; files in the legacy (pre-zip) format cannot be memory-mapped and are read whole.

Preference when a folder holds several layouts: ``model.safetensors``, its sharded index, then
``pytorch_model.bin``, then its index (the authors train with ``--save_safetensors False``, so the
released PixelRefer repos most likely hold ``.bin`` shards; the SAM 2 repos hold safetensors).
A sharded index is checked against its shards: every listed shard exists, every key sits in the shard
the index names, and no shard holds a key the index does not list.

`read_strict` is the one strict load of a transformers model from such a folder (SAM 2 and SAM 3
video models): the same meta-device shape check, loading info and problem report for both.
"""

from __future__ import annotations

import contextlib
import json
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
LAYOUTS: tuple[tuple[str, Literal["safetensors", "bin"], bool], ...] = (
    (SAFE_WEIGHTS, "safetensors", False),
    (SAFE_INDEX, "safetensors", True),
    (BIN_WEIGHTS, "bin", False),
    (BIN_INDEX, "bin", True),
)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be found, or its tensors do not match the architecture its config describes."""


@dataclass(frozen=True)
class WeightFiles:
    """The weight files of one checkpoint folder, as chosen by the preference order above."""

    folder: Path
    format: Literal["safetensors", "bin"]
    shards: tuple[Path, ...]
    index: Path | None = None

    def describe(self) -> str:
        names = ", ".join(p.name for p in self.shards)
        if self.index is not None:
            return f"{self.index.name} -> {len(self.shards)} {self.format} shard(s): {names}"
        return names


def find_weight_files(folder: Path) -> WeightFiles:
    """The preferred weight layout present in ``folder``; fails naming every accepted file name."""
    folder = Path(folder)
    for name, fmt, sharded in LAYOUTS:
        path = folder / name
        if not path.is_file():
            continue
        if not sharded:
            return WeightFiles(folder, fmt, (path,))
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: not a sharded-checkpoint index with a weight_map ({exc})") from exc
        shards = tuple(folder / s for s in sorted(set(weight_map.values())))
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise CheckpointError(f"{folder}: shard(s) {', '.join(missing)} listed in {name} are missing")
        return WeightFiles(folder, fmt, shards, path)
    accepted = ", ".join(name for name, _, _ in LAYOUTS)
    raise CheckpointError(f"{folder}: no weights found (looked for {accepted})")


def _load_bin(path: Path, device: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location=device, weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # noqa: BLE001 - the restricted unpickler raises UnpicklingError, RuntimeError, ...
        raise CheckpointError(
            f"{path}: cannot be read with torch.load(weights_only=True): {exc}. Only plain tensor state dicts "
            "are accepted; a file that needs full unpickling is refused on purpose"
        ) from exc
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{path}: not a flat state dict of name -> tensor")
    return state


def _load_safetensors(path: Path, device: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            if device == "meta":
                piece = f.get_slice(key)
                out[key] = torch.empty(piece.get_shape(), dtype=_SAFE_DTYPES[piece.get_dtype()], device="meta")
            else:
                out[key] = f.get_tensor(key)
    return out


_SAFE_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_weights(files: WeightFiles, *, meta: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of ``files`` under its stored name (CPU; ``meta=True``: shapes and dtypes only).

    The meta form reads only safetensors headers or the pickle's tensor records, so a 7B checkpoint can
    be checked against an architecture without reading its data.
    """
    device = "meta" if meta else "cpu"
    load = _load_safetensors if files.format == "safetensors" else _load_bin
    listed: dict[str, str] | None = None
    if files.index is not None:
        listed = json.loads(files.index.read_text())["weight_map"]
    state: dict[str, torch.Tensor] = {}
    for shard in files.shards:
        part = load(shard, device)
        duplicated = sorted(set(part) & set(state))
        if duplicated:
            raise CheckpointError(f"{shard}: tensors also stored in another shard: {', '.join(duplicated[:10])}")
        if listed is not None:
            stray = sorted(k for k in part if listed.get(k) != shard.name)
            if stray:
                index_name = files.index.name  # type: ignore[union-attr]
                raise CheckpointError(
                    f"{shard}: holds tensors that {index_name} maps elsewhere or not at all: {', '.join(stray[:10])}"
                )
        state.update(part)
    if listed is not None:
        absent = sorted(set(listed) - set(state))
        if absent:
            index_name = files.index.name  # type: ignore[union-attr]
            raise CheckpointError(f"{index_name} lists tensors that no shard holds: {', '.join(absent[:10])}")
    return state


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, whichever layout it uses."""
    return read_weights(find_weight_files(folder))


def dtype_summary(state: dict[str, torch.Tensor]) -> str:
    """``bfloat16 (87)``-style summary of the stored dtypes (a checkpoint may mix them)."""
    counts = Counter(str(t.dtype).replace("torch.", "") for t in state.values())
    return ", ".join(f"{name} ({n})" for name, n in counts.most_common())


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' loading chatter (progress bars) for the duration of a load."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def loading_problems(info: dict[str, Any]) -> list[str]:
    """transformers' loading info (or ours, of the same shape) as one line per kind of problem."""
    problems = []
    labels = {"missing_keys": "missing", "unexpected_keys": "unexpected", "mismatched_keys": "shape mismatch"}
    for key, label in labels.items():
        items = sorted(str(k) for k in info.get(key) or ())
        if items:
            problems.append(f"{label} ({len(items)}): {', '.join(items[:20])}{' ...' if len(items) > 20 else ''}")
    problems += [str(e) for e in info.get("error_msgs") or ()]
    return problems


def read_strict(folder: Path, model_class: Any, config_class: Any, *, dtype: torch.dtype, meta: bool = False,
                model_name: Callable[[str], str] | None = None,
                count_unexpected: bool = False) -> tuple[Any, list[str], str]:
    """A transformers model of a folder's config with the folder's weights: (model, problems, the
    weight files read). Every stored tensor must fill a parameter of the same shape and every
    parameter must be filled; `problems` lists what does not (empty: loaded strictly).

    `meta=True` compares names and shapes with the files' headers on a meta-device model, reading
    no tensor data (`pixelrefer models check`). `model_name` maps a stored name to the model's
    where a checkpoint's names differ (SAM 3's doubled tracker prefix). `count_unexpected` counts
    stray tensors here instead of trusting transformers', whose per-class ignore lists can hide
    them (SAM 3's nested models); meta checks always count them here.
    """
    files = find_weight_files(folder)
    state = read_weights(files, meta=meta)
    config = config_class.from_pretrained(folder)
    rename = model_name or (lambda name: name)
    if meta:
        with torch.device("meta"):
            model = model_class(config)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        stored = {rename(k): tuple(v.shape) for k, v in state.items()}
        info: dict[str, Any] = {
            "missing_keys": set(expected) - set(stored),
            "mismatched_keys": {k for k in set(expected) & set(stored) if stored[k] != expected[k]},
        }
        count_unexpected = True
    else:
        model, info = model_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype,
                                                  output_loading_info=True)
        expected = dict.fromkeys(model.state_dict())
    if count_unexpected:
        info["unexpected_keys"] = {rename(k) for k in state} - set(expected)
    return model, loading_problems(info), files.describe()
