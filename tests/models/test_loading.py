"""Strict loading in the released layout: key mapping, round trips, and every way a checkpoint can be wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from models.config import ConfigError, PixelReferConfig
from models.loading import CheckpointError, load_checkpoint, resolve_checkpoint, save_checkpoint
from models.modeling_pixelrefer import PixelReferModel, internal_to_released, released_to_internal
from models.tiny import create_tiny_checkpoint
from pixelrefer_helpers import FULL_FIXTURE, LITE_FIXTURE


def _keys_txt(folder: Path) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in (folder / "keys.txt").read_text().splitlines():
        name, shape, _dtype = line.split("\t")
        out[name] = tuple(json.loads(shape))
    return out


@pytest.mark.parametrize("folder,count", [(LITE_FIXTURE, 87), (FULL_FIXTURE, 73)])
def test_module_tree_has_exactly_the_released_keys(folder, count):
    """Our modules, named back to the released layout, are the fixture's keys.txt with its shapes."""
    released = _keys_txt(folder)
    assert len(released) == count
    model = PixelReferModel(PixelReferConfig.from_folder(folder))
    ours = {k: tuple(v.shape) for k, v in model.released_state_dict().items()}
    assert ours == released
    for key in released:
        assert internal_to_released(released_to_internal(key)) == key


def test_key_mapping_targets():
    assert (
        released_to_internal("model.vision_encoder.vision_encoder.encoder.layers.0.mlp.fc1.weight")
        == "vision.encoder.layers.0.mlp.fc1.weight"
    )
    assert released_to_internal("model.mm_projector.readout.2.bias") == "projector.readout.2.bias"
    assert released_to_internal("model.region_encoder.pos_linear.weight") == "region_encoder.pos_linear.weight"
    assert released_to_internal("model.layers.1.self_attn.q_proj.bias") == "llm.model.layers.1.self_attn.q_proj.bias"
    assert released_to_internal("model.embed_tokens.weight") == "llm.model.embed_tokens.weight"
    assert released_to_internal("model.norm.weight") == "llm.model.norm.weight"
    assert released_to_internal("lm_head.weight") == "llm.lm_head.weight"
    with pytest.raises(KeyError):
        released_to_internal("vision_tower.weight")


@pytest.mark.parametrize("folder,mode", [(LITE_FIXTURE, "lite"), (FULL_FIXTURE, "full")])
def test_fixture_loads_strictly_with_every_tensor(folder, mode):
    ckpt = load_checkpoint(folder)
    assert ckpt.config.mode == mode
    stored = load_file(str(folder / "model.safetensors"))
    state = ckpt.model.released_state_dict()
    assert set(state) == set(stored)
    for key, value in stored.items():
        assert torch.equal(state[key], value.float()), key
    assert ckpt.config.region_token_index == 299 and ckpt.config.image_token_index == 296
    assert ckpt.config.eos_token_id == 295


@pytest.mark.parametrize("mode", ["lite", "full"])
def test_tiny_round_trip_through_the_released_layout(tmp_path, mode):
    """tiny -> files -> strict load -> save again -> strict load: identical tensors and logits."""
    first = create_tiny_checkpoint(tmp_path / "a", mode)
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
        "VL3-SigLIP-NaViT-tiny/config.json",
        "VL3-SigLIP-NaViT-tiny/model.safetensors",
        "VL3-SigLIP-NaViT-tiny/preprocessor_config.json",
    ):
        assert (first / name).is_file(), name
    assert json.loads((first / "config.json").read_text())["model_type"] == (
        "pixelreferlite_qwen2" if mode == "lite" else "pixelrefer_qwen2"
    )
    a = load_checkpoint(first)
    second = save_checkpoint(a.model, tmp_path / "b", tokenizer_dir=first)
    b = load_checkpoint(second)
    sa, sb = a.model.released_state_dict(), b.model.released_state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    # the vision sub-folder carries the tower's own weights, as upstream ships it
    tower = load_file(str(second / "VL3-SigLIP-NaViT-tiny" / "model.safetensors"))
    assert all(torch.equal(v.float(), sa["model.vision_encoder.vision_encoder." + k]) for k, v in tower.items())
    embeds = torch.randn(1, 7, a.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a.model.llm(inputs_embeds=embeds).logits, b.model.llm(inputs_embeds=embeds).logits)


def test_tiny_creation_is_deterministic(tmp_path):
    a = create_tiny_checkpoint(tmp_path / "a", "lite")
    b = create_tiny_checkpoint(tmp_path / "b", "lite")
    for name in ("model.safetensors", "tokenizer.json", "config.json", "vocab.json", "merges.txt"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


# -- failures ----------------------------------------------------------------------------------------
def _copy(folder: Path, tmp_path: Path) -> Path:
    dst = tmp_path / folder.name
    shutil.copytree(folder, dst)
    return dst


def _rewrite(folder: Path, change) -> None:
    state = load_file(str(folder / "model.safetensors"))
    change(state)
    save_file(state, str(folder / "model.safetensors"))


def test_missing_tensor_is_named(tmp_path):
    folder = _copy(LITE_FIXTURE, tmp_path)
    _rewrite(folder, lambda s: s.pop("model.region_encoder.mask_embedding.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): model.region_encoder.mask_embedding.weight"):
        load_checkpoint(folder)


def test_unexpected_tensors_are_listed(tmp_path):
    folder = _copy(FULL_FIXTURE, tmp_path)

    def add(s):
        s["model.region_encoder.ln_local.weight"] = torch.ones(64, dtype=torch.bfloat16)  # Lite-only module
        s["model.something_else"] = torch.zeros(3)

    _rewrite(folder, add)
    with pytest.raises(
        CheckpointError,
        match=r"unexpected tensors \(2\): model.region_encoder.ln_local.weight, "
        r"model.something_else",
    ):
        load_checkpoint(folder)


def test_wrong_shape_is_named(tmp_path):
    folder = _copy(LITE_FIXTURE, tmp_path)
    _rewrite(folder, lambda s: s.__setitem__("model.norm.weight", torch.ones(65, dtype=torch.bfloat16)))
    with pytest.raises(CheckpointError, match=r"model.norm.weight: checkpoint \(65,\) vs model \(64,\)"):
        load_checkpoint(folder)


def test_lite_weights_under_a_full_config_fail(tmp_path):
    folder = _copy(LITE_FIXTURE, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "pixelrefer_qwen2"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unexpected tensors .*fusion_attention_global"):
        load_checkpoint(folder)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda c: c.__setitem__("model_type", "qwen2"), "model_type 'qwen2' is not a PixelRefer checkpoint"),
        (lambda c: c.pop("hidden_size"), "required field 'hidden_size' is missing"),
        (lambda c: c.__setitem__("num_attention_heads", 5), "not divisible"),
        (lambda c: c.__setitem__("mm_projector_type", "linear"), "mm_projector_type 'linear' is not supported"),
        (
            lambda c: c.__setitem__("mm_vision_encoder", "nowhere") or c.__setitem__("vision_encoder", "nowhere"),
            "no vision tower configuration",
        ),
        (lambda c: c.__setitem__("mm_hidden_size", 32), "mm_hidden_size 32 != vision hidden_size 64"),
    ],
)
def test_bad_config(tmp_path, change, match):
    folder = _copy(LITE_FIXTURE, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    change(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=match):
        load_checkpoint(folder)


def test_missing_files(tmp_path):
    folder = _copy(LITE_FIXTURE, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found .*model.safetensors.*pytorch_model.bin"):
        load_checkpoint(folder)
    with pytest.raises(CheckpointError, match="neither an existing folder nor a hub id"):
        resolve_checkpoint(str(tmp_path / "does" / "not" / "exist"))


def test_unknown_hub_id_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match="offline"):
        resolve_checkpoint("nobody-here/no-such-model")


def test_tokenizer_without_region_token(tmp_path):
    folder = _copy(LITE_FIXTURE, tmp_path)
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<REGION>"]
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    for name in ("tokenizer_config.json", "added_tokens.json", "special_tokens_map.json"):
        text = (folder / name).read_text().replace("<REGION>", "<RGN>")
        (folder / name).write_text(text)
    with pytest.raises(CheckpointError, match="<REGION>"):
        load_checkpoint(folder)


def test_bf16_load_keeps_rotary_buffers_in_float32():
    """Built with bf16 as the default dtype (like upstream's from_pretrained), not cast afterwards."""
    ckpt = load_checkpoint(LITE_FIXTURE, dtype=torch.bfloat16)
    assert ckpt.model.dtype == torch.bfloat16
    assert ckpt.model.vision.rotary_pos_emb.inv_freq.dtype == torch.float32
    assert ckpt.model.llm.model.rotary_emb.inv_freq.dtype == torch.float32
    assert np.isfinite(ckpt.model.llm.lm_head.weight.float().numpy()).all()
