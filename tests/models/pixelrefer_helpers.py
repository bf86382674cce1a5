"""Helpers shared by the model tests (a plain module: tests/ has no packages)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

PARITY = Path(__file__).resolve().parents[1] / "fixtures" / "parity"
LITE_FIXTURE = PARITY / "lite-tiny"
FULL_FIXTURE = PARITY / "full-tiny"


def make_video(
    num_frames: int = 4,
    height: int = 96,
    width: int = 128,
    num_objects: int = 2,
    seed: int = 0,
    skip: dict[int, set[int]] | None = None,
):
    """Textured noise frames with textured moving rectangles; returns frames, timestamps, objects.

    ``skip[k]`` lists frames where object k has no mask (absent from its mapping).
    """
    rng = np.random.RandomState(seed)
    base = (rng.rand(height, width, 3) * 255).astype(np.uint8)
    frames = [base.copy() for _ in range(num_frames)]
    objects: list[dict[int, np.ndarray]] = []
    for k in range(num_objects):
        masks: dict[int, np.ndarray] = {}
        h, w = 18 + 6 * k, 24 + 4 * k
        for f in range(num_frames):
            if skip and f in skip.get(k, set()):
                continue
            r = min(height - h, 8 + 20 * k + 3 * f)
            c = min(width - w, 10 + 25 * k + 5 * f)
            m = np.zeros((height, width), dtype=bool)
            m[r : r + h, c : c + w] = True
            colour = rng.randint(0, 255, 3)
            tex = np.clip(colour + rng.randint(-60, 60, size=(height, width, 3)), 0, 255).astype(np.uint8)
            frames[f][m] = tex[m]
            masks[f] = m
        objects.append(masks)
    timestamps = [0.5 * f for f in range(num_frames)]
    return frames, timestamps, objects


# -- checkpoints in the shapes the released repos come in ------------------------------------------------
TOWER_REPO = "DAMO-NLP-SG/VL3-SigLIP-NaViT"
SNAPSHOT = "3f1c0a7e5b9d2c4e6a8b0d1f3e5c7a9b1d3f5e7a"


def save_bin(state: dict, folder: Path, *, shards: int = 1) -> None:
    """``state`` as ``pytorch_model.bin`` or as shards plus ``pytorch_model.bin.index.json``, the layout of
    ``save_pretrained(safe_serialization=False)``."""
    import json

    import torch

    keys = sorted(state)
    if shards == 1:
        torch.save({k: state[k].clone() for k in keys}, folder / "pytorch_model.bin")
        return
    bounds = [round(i * len(keys) / shards) for i in range(shards + 1)]
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k].clone() for k in keys[bounds[i] : bounds[i + 1]]}
        torch.save(part, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


def hub_repo(hf_home: Path, repo_id: str, source: Path, revision: str = SNAPSHOT) -> Path:
    """Put ``source``'s files into a Hugging Face cache as ``repo_id``'s main snapshot
    (``hub/models--org--name/snapshots/<hash>/`` plus ``refs/main``, as a download leaves them)."""
    import shutil

    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    shutil.copytree(source, snapshot, copy_function=shutil.copyfile)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def offline_hub(monkeypatch, hf_home: Path) -> None:
    """``HF_HOME=hf_home`` and ``HF_HUB_OFFLINE=1`` for one test; huggingface_hub reads both once at
    import, so its constants are patched too (a subprocess sees the environment alone)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def qwen_generation_config(folder: Path) -> dict:
    """Qwen2.5-Instruct's ``generation_config.json`` with the ids of ``folder``'s tokenizer: what a
    checkpoint fine-tuned from it inherits (repetition penalty 1.1, eos ``<|im_end|>`` and ``<|endoftext|>``)."""
    import json

    ids = json.loads((folder / "added_tokens.json").read_text())
    return {
        "bos_token_id": ids["<|endoftext|>"],
        "do_sample": True,
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
        "repetition_penalty": 1.1,
        "temperature": 0.7,
        "top_k": 20,
        "top_p": 0.8,
        "transformers_version": "4.46.3",
    }


def copy_checkpoint(source: Path, dest: Path) -> Path:
    """A writable copy of a checkpoint folder (the fixtures may be read-only)."""
    import shutil

    shutil.copytree(source, dest, copy_function=shutil.copyfile)
    return dest


def tamper_safetensors(folder: Path, *, drop: Iterable[str] = (), add: dict | None = None) -> None:
    """Rewrite ``model.safetensors`` without the tensors ``drop`` names and with those of ``add``:
    the checkpoint a strict load must refuse."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    for name in drop:
        del state[name]
    state.update(add or {})
    save_file(state, str(folder / "model.safetensors"))


def weights_to_bin(folder: Path, *, shards: int) -> None:
    """Replace ``model.safetensors`` with the same tensors as ``.bin`` (one file, or shards plus index)."""
    from safetensors.torch import load_file

    save_bin(load_file(str(folder / "model.safetensors")), folder, shards=shards)
    (folder / "model.safetensors").unlink()


def tower_to_hub_cache(folder: Path, hf_home: Path) -> None:
    """Move the checkpoint's vision-tower sub-folder into ``hf_home``'s cache as ``TOWER_REPO`` and name it
    by that hub id in ``config.json``, as the authors' config does."""
    import json
    import shutil

    raw = json.loads((folder / "config.json").read_text())
    tower = folder / raw["mm_vision_encoder"]
    hub_repo(hf_home, TOWER_REPO, tower)
    shutil.rmtree(tower)
    raw["mm_vision_encoder"] = raw["vision_encoder"] = TOWER_REPO
    (folder / "config.json").write_text(json.dumps(raw, indent=2))


def released_shape(source: Path, dest: Path, hf_home: Path, *, shards: int = 3) -> Path:
    """Copy checkpoint ``source`` into ``dest`` the way the released repos most likely are: ``.bin`` shards
    (no safetensors), the vision tower named by hub id and present only in ``hf_home``'s cache, and
    Qwen2.5-Instruct's generation config. Other files (tokenizer, inputs.npz, ...) are copied as they are."""
    import json

    copy_checkpoint(source, dest)
    weights_to_bin(dest, shards=shards)
    tower_to_hub_cache(dest, hf_home)
    (dest / "generation_config.json").write_text(json.dumps(qwen_generation_config(source), indent=2))
    return dest
