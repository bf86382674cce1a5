"""Hugging Face hub ids: checkpoints, vision towers and downloads, from the local cache when offline.

Everything goes through ``huggingface_hub`` (``snapshot_download`` with ``local_files_only`` when
offline), so the cache layout, ``HF_HOME`` / ``HF_HUB_CACHE`` and revision refs are the library's own.
Offline is ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` read now (``huggingface_hub`` reads them once at
import, which misses a variable set later by a job) or the library's own flag.

A released PixelRefer repo names its vision tower by hub id (``DAMO-NLP-SG/VL3-SigLIP-NaViT``), as
upstream's constructor does with ``from_pretrained(mm_vision_encoder)``. The tower's weights are also in
the checkpoint (``model.vision_encoder.vision_encoder.*``), so only the tower's ``config.json`` and
``preprocessor_config.json`` are needed from its repo; that is all this module fetches of it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from .config import (
    MODEL_TYPES,
    ConfigError,
    VisionTower,
    find_local_vision_tower,
    read_tower_folder,
    vision_encoder_name,
)
from .weights import CheckpointError

TOWER_FILES = ("config.json", "preprocessor_config.json")
CONFIG_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")


def hub_offline() -> bool:
    """True when the hub must not be contacted (env read at call time, or huggingface_hub's own flag)."""
    from huggingface_hub import is_offline_mode

    env = any(
        os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    return env or is_offline_mode()


def hub_cache() -> str:
    """The cache folder huggingface_hub uses (for messages: where a missing repo was looked for)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def is_hub_id(name: str) -> bool:
    """``owner/name`` that is not a local path spelling."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def snapshot(repo_id: str, *, allow_patterns: list[str] | None = None) -> Path:
    """A repo's snapshot folder: from the cache when offline; downloaded (or from the cache when the hub is
    unreachable) when online."""
    from huggingface_hub import snapshot_download

    offline = hub_offline()
    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns, local_files_only=offline))
    except Exception as first:  # noqa: BLE001 - network and cache errors come in many types
        if not offline:
            try:
                return Path(snapshot_download(repo_id, allow_patterns=allow_patterns, local_files_only=True))
            except Exception:  # noqa: BLE001
                pass
        mode = "offline (HF_HUB_OFFLINE)" if offline else "online, but the hub could not be reached"
        raise CheckpointError(
            f"cannot get {repo_id!r} from the Hugging Face hub or its local cache {hub_cache()} ({mode}): "
            f"{type(first).__name__}: {first}"
        ) from first


def resolve_checkpoint(name_or_path: str | os.PathLike[str]) -> Path:
    """A local folder as is; otherwise a hub id downloaded (or found in the cache) as a snapshot."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file, not a checkpoint folder")
    name = str(name_or_path)
    if not is_hub_id(name):
        raise CheckpointError(f"checkpoint {name!r} is neither an existing folder nor a hub id (owner/name)")
    return snapshot(name)


def resolve_vision_tower(checkpoint: Path, raw: dict) -> VisionTower | None:
    """The tower of a checkpoint: local sources first (see ``config.find_local_vision_tower``), then the
    hub id through the cache or a download. ``None`` when the name is neither (the config reports it)."""
    local = find_local_vision_tower(checkpoint, raw)
    if local is not None:
        return local
    name = vision_encoder_name(raw)
    if name is None or not is_hub_id(name):
        return None
    try:
        folder = snapshot(name, allow_patterns=list(TOWER_FILES))
    except CheckpointError as exc:
        raise ConfigError(
            f"{checkpoint / 'config.json'}: the vision tower {name!r} (mm_vision_encoder) is not a folder of the "
            f"checkpoint and config.json has no inline vision config, so its hub repo is needed: {exc}. "
            f"Fetch the repo {name} ({', '.join(TOWER_FILES)}) once on a machine with internet, e.g. "
            f"`pixelrefer models download MODEL` (fetches the model and its tower) or "
            f"`hf download {name} {' '.join(TOWER_FILES)}`, and point HF_HOME at that cache"
        ) from exc
    if not (folder / "config.json").is_file():
        raise ConfigError(f"vision tower repo {name!r} ({folder}) has no config.json")
    config, pre = read_tower_folder(folder)
    return VisionTower(name, "hub", config, pre, folder)


# -- downloads -----------------------------------------------------------------------------------------
def select_repo_files(files: Iterable[str]) -> list[str]:
    """The files of a repo that a run needs: configs and tokenizer files anywhere, and one weight format
    at the top level (safetensors when present, else ``pytorch_model*.bin``).

    Left out on purpose: original-format checkpoints (``*.pt`` of SAM 2, 0.9 GB for large), training
    state (``training_args.bin``, optimizer files) and a second copy of the weights in another format.
    """
    files = sorted(set(files))
    top = [f for f in files if "/" not in f]
    weights = [f for f in top if f.endswith(".safetensors")]
    if not weights:
        weights = [f for f in top if f.startswith("pytorch_model") and f.endswith(".bin")]
    configs = [f for f in files if f.endswith(CONFIG_SUFFIXES)]
    return sorted(set(weights) | set(configs))


def _list_files(repo_id: str) -> list[str]:
    from huggingface_hub import HfApi

    return list(HfApi().list_repo_files(repo_id))


def _fetch(repo_id: str, allow_patterns: list[str], local_dir: Path | None) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, allow_patterns=allow_patterns, local_dir=local_dir))


def download(
    name: str,
    *,
    to: Path | None = None,
    log: Callable[[str], None] = print,
) -> list[tuple[str, Path]]:
    """Fetch repo ``name`` (and, for a PixelRefer checkpoint, its vision tower) for offline runs.

    Without ``to`` everything lands in the Hugging Face cache (run offline with the same ``HF_HOME``).
    With ``to`` the repo becomes the plain folder ``to/<repo name>`` and its tower a sub-folder named
    after the tower repo, where the loader finds it (``--model to/<repo name>`` needs no cache at all).
    Returns (repo id, local folder) for everything fetched.
    """
    if not is_hub_id(name):
        raise CheckpointError(f"{name!r} is not a hub id (owner/name)")
    if hub_offline():
        raise CheckpointError(
            f"cannot download {name}: HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set. Run `pixelrefer models "
            f"download` on a machine with internet access, then copy or mount its cache (HF_HOME) or --to folder"
        )
    try:
        patterns = select_repo_files(_list_files(name))
        target = to / name.split("/")[1] if to is not None else None
        log(f"{name}: fetching {len(patterns)} file(s)" + (f" into {target}" if target else " into the cache"))
        folder = _fetch(name, patterns, target)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - network errors come in many types
        raise CheckpointError(f"cannot download {name}: {type(exc).__name__}: {exc}") from exc
    fetched = [(name, folder)]
    config_path = folder / "config.json"
    raw = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if raw.get("model_type") in MODEL_TYPES and find_local_vision_tower(folder, raw) is None:
        tower = vision_encoder_name(raw)
        if tower is not None and is_hub_id(tower):
            tower_dir = folder / Path(tower).name if to is not None else None
            log(f"{name}: its vision tower {tower}: fetching {', '.join(TOWER_FILES)}")
            try:
                fetched.append((tower, _fetch(tower, list(TOWER_FILES), tower_dir)))
            except Exception as exc:  # noqa: BLE001
                raise CheckpointError(f"cannot download the vision tower {tower} of {name}: {exc}") from exc
    return fetched
