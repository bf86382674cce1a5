"""Checkpoints in every shape a released repo may come in load through the one loader, with outputs
identical to the safetensors original: ``.bin`` (single and sharded), tied embeddings stored once, the
vision tower as a hub id in the Hugging Face cache (offline), an absolute folder, or inline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.config import ConfigError
from models.loading import CheckpointError, inspect_checkpoint, load_checkpoint
from models.referrer import Referrer, Request
from models.tiny import create_tiny_checkpoint
from pixelrefer_helpers import (
    TOWER_REPO,
    copy_checkpoint,
    hub_repo,
    make_video,
    offline_hub,
    save_bin,
    tower_to_hub_cache,
    weights_to_bin,
)


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Path:
    """A tiny Lite checkpoint as ``save_checkpoint`` writes it (safetensors, tower sub-folder)."""
    return create_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "lite", "lite")


def outputs(folder: Path) -> tuple[dict[str, torch.Tensor], list[list[int]], torch.Tensor]:
    """Everything a load decides: the tensors, greedy ids of two requests, and LLM logits."""
    r = Referrer.from_pretrained(str(folder), device="cpu", dtype=torch.float32)
    frames, times, objects = make_video(num_frames=2, num_objects=2)
    reqs = [Request("Describe <region>.", [0]), Request("Is <region> left of <region>?", [0, 1])]
    gens = r.generate(frames, times, objects, reqs, max_new_tokens=6)
    assert all(g.error is None for g in gens)
    embeds = torch.randn(1, 9, r.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = r.model.llm(inputs_embeds=embeds).logits
    return r.model.released_state_dict(), [g.token_ids for g in gens], logits


@pytest.fixture(scope="module")
def reference(original):
    return outputs(original)


def assert_same(got, want) -> None:
    state, ids, logits = got
    assert set(state) == set(want[0]) and all(torch.equal(state[k], want[0][k]) for k in state)
    assert ids == want[1]
    assert torch.equal(logits, want[2])


@pytest.mark.parametrize("shards", [1, 3])
def test_bin_weights_load_like_safetensors(original, reference, tmp_path, shards):
    folder = copy_checkpoint(original, tmp_path / "ckpt")
    weights_to_bin(folder, shards=shards)
    expected = ["pytorch_model.bin"] if shards == 1 else [f"pytorch_model-0000{i}-of-00003.bin" for i in (1, 2, 3)]
    assert sorted(p.name for p in folder.glob("*.bin")) == expected
    assert_same(outputs(folder), reference)
    ckpt = load_checkpoint(folder)
    assert ckpt.weights.format == "bin" and len(ckpt.weights.shards) == shards


def test_safetensors_win_over_bin(original, reference, tmp_path):
    """Both formats present: the safetensors are read (the .bin here would not even load)."""
    folder = copy_checkpoint(original, tmp_path / "ckpt")
    torch.save({"not": "a state dict"}, folder / "pytorch_model.bin")
    assert_same(outputs(folder), reference)


def test_sharded_safetensors(original, reference, tmp_path):
    folder = copy_checkpoint(original, tmp_path / "ckpt")
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    keys = sorted(state)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_same(outputs(folder), reference)


def test_bin_needing_full_unpickling_is_refused(original, tmp_path):
    """A pickle that builds an arbitrary object is never executed: torch.load(weights_only=True) refuses it."""
    folder = copy_checkpoint(original, tmp_path / "ckpt")
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    state["extra"] = Path("/")  # any non-tensor class needs the full unpickler
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint(folder)


def test_legacy_bin_format_loads_without_mmap(original, reference, tmp_path):
    folder = copy_checkpoint(original, tmp_path / "ckpt")
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert_same(outputs(folder), reference)


@pytest.mark.parametrize(
    "change,match",
    [
        ("drop_shard", r"shard\(s\) pytorch_model-00002-of-00003.bin listed in pytorch_model.bin.index.json are"),
        ("unlisted_key", "maps elsewhere or not at all: model.norm.weight"),
        ("listed_absent", "lists tensors that no shard holds: ghost.weight"),
    ],
)
def test_inconsistent_shard_index(original, tmp_path, change, match):
    folder = copy_checkpoint(original, tmp_path / "ckpt")
    weights_to_bin(folder, shards=3)
    index_path = folder / "pytorch_model.bin.index.json"
    index = json.loads(index_path.read_text())
    if change == "drop_shard":
        (folder / "pytorch_model-00002-of-00003.bin").unlink()
    elif change == "unlisted_key":
        del index["weight_map"]["model.norm.weight"]
    else:
        index["weight_map"]["ghost.weight"] = "pytorch_model-00001-of-00003.bin"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(folder)


# -- tied embeddings ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tied(original, tmp_path_factory) -> Path:
    """``original`` made a tied-embedding checkpoint: ``lm_head`` := ``embed_tokens``, both stored."""
    folder = copy_checkpoint(original, tmp_path_factory.mktemp("tied") / "ckpt")
    raw = json.loads((folder / "config.json").read_text())
    raw["tie_word_embeddings"] = True
    (folder / "config.json").write_text(json.dumps(raw))
    state = load_file(str(folder / "model.safetensors"))
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize("stored", ["model.embed_tokens.weight", "lm_head.weight"])
def test_tied_embeddings_stored_once(tied, tmp_path, stored):
    """With tie_word_embeddings true, whichever of the pair is stored fills the other (as .bin shards too)."""
    want = outputs(tied)
    folder = copy_checkpoint(tied, tmp_path / "ckpt")
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    state.pop("lm_head.weight" if stored == "model.embed_tokens.weight" else "model.embed_tokens.weight")
    save_bin(state, folder, shards=2)
    got = outputs(folder)
    assert_same(got, want)
    ckpt = load_checkpoint(folder)
    assert ckpt.model.llm.lm_head.weight is ckpt.model.llm.model.embed_tokens.weight


def test_tied_pair_stored_twice_must_agree(tied, tmp_path):
    folder = copy_checkpoint(tied, tmp_path / "ckpt")
    state = load_file(str(folder / "model.safetensors"))
    state["lm_head.weight"] = state["lm_head.weight"] + 1
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lm_head.weight differs from model.embed_tokens.weight"):
        load_checkpoint(folder)


def test_untied_checkpoint_needs_both(original, tmp_path):
    folder = copy_checkpoint(original, tmp_path / "ckpt")
    state = load_file(str(folder / "model.safetensors"))
    del state["lm_head.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): lm_head.weight \(tie_word_embeddings is false"):
        load_checkpoint(folder)


# -- where the vision tower comes from ----------------------------------------------------------------
def test_tower_as_hub_id_from_the_offline_cache(original, reference, tmp_path, monkeypatch):
    folder = copy_checkpoint(original, tmp_path / "ckpt")
    hf_home = tmp_path / "hf"
    tower_to_hub_cache(folder, hf_home)
    offline_hub(monkeypatch, hf_home)
    assert_same(outputs(folder), reference)
    ckpt = load_checkpoint(folder)
    assert ckpt.tower.source == "hub" and ckpt.tower.name == TOWER_REPO
    snapshots = hf_home / "hub" / "models--DAMO-NLP-SG--VL3-SigLIP-NaViT" / "snapshots"
    assert ckpt.tower.folder == snapshots / ckpt.tower.folder.name


def test_missing_hub_tower_names_the_repo_to_fetch(original, tmp_path, monkeypatch):
    folder = copy_checkpoint(original, tmp_path / "ckpt")
    tower_to_hub_cache(folder, tmp_path / "elsewhere")
    offline_hub(monkeypatch, tmp_path / "empty-hf-home")
    with pytest.raises(ConfigError) as info:
        load_checkpoint(folder)
    message = str(info.value)
    assert f"the vision tower '{TOWER_REPO}' (mm_vision_encoder)" in message
    assert "offline (HF_HUB_OFFLINE)" in message and str(tmp_path / "empty-hf-home" / "hub") in message
    assert f"Fetch the repo {TOWER_REPO} (config.json, preprocessor_config.json)" in message
    assert "pixelrefer models download" in message


def test_tower_as_absolute_folder(original, reference, tmp_path):
    folder = copy_checkpoint(original, tmp_path / "ckpt")
    raw = json.loads((folder / "config.json").read_text())
    elsewhere = tmp_path / "towers" / "my-tower"
    shutil.move(str(folder / raw["mm_vision_encoder"]), elsewhere)
    raw["mm_vision_encoder"] = raw["vision_encoder"] = str(elsewhere)
    (folder / "config.json").write_text(json.dumps(raw))
    assert_same(outputs(folder), reference)
    assert load_checkpoint(folder).tower.folder == elsewhere


def test_inline_vision_config_needs_no_tower_repo(original, reference, tmp_path, monkeypatch):
    """An inline vision config wins over a hub id that is nowhere to be found."""
    folder = copy_checkpoint(original, tmp_path / "ckpt")
    raw = json.loads((folder / "config.json").read_text())
    tower = folder / raw["mm_vision_encoder"]
    raw["vision_encoder_config"] = json.loads((tower / "config.json").read_text())
    raw["mm_vision_encoder"] = raw["vision_encoder"] = "nobody/not-cached"
    shutil.rmtree(tower)
    (folder / "config.json").write_text(json.dumps(raw))
    offline_hub(monkeypatch, tmp_path / "hf")
    assert_same(outputs(folder), reference)
    assert load_checkpoint(folder).tower.source == "inline"


def test_checkpoint_itself_from_the_offline_cache(original, reference, tmp_path, monkeypatch):
    """A hub id for the model resolves to its cached snapshot, and the tower from the same cache."""
    hf_home = tmp_path / "hf"
    staged = copy_checkpoint(original, tmp_path / "staged")
    tower_to_hub_cache(staged, hf_home)
    weights_to_bin(staged, shards=2)
    hub_repo(hf_home, "Alibaba-DAMO-Academy/PixelRefer-Lite-tiny", staged)
    offline_hub(monkeypatch, hf_home)
    assert_same(outputs("Alibaba-DAMO-Academy/PixelRefer-Lite-tiny"), reference)


# -- the meta-device check ----------------------------------------------------------------------------
def test_inspect_matches_the_real_load(original, tmp_path):
    folder = copy_checkpoint(original, tmp_path / "ckpt")
    weights_to_bin(folder, shards=3)
    report = inspect_checkpoint(folder)
    model = load_checkpoint(folder).model
    assert report.parameters == sum(p.numel() for p in model.parameters())
    assert report.stored_dtypes == f"bfloat16 ({len(model.released_state_dict())})"
    assert report.weights.index is not None and report.weights.index.name == "pytorch_model.bin.index.json"


def test_inspect_finds_what_the_load_would(original, tmp_path):
    folder = copy_checkpoint(original, tmp_path / "ckpt")
    state = load_file(str(folder / "model.safetensors"))
    state["model.norm.weight"] = torch.ones(3, dtype=torch.bfloat16)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.norm.weight: checkpoint \(3,\) vs model \(64,\)"):
        inspect_checkpoint(folder)
