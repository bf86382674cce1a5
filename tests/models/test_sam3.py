"""SAM 3 checkpoints: `tiny-sam3` is written in the released layout and loads back through the same strict
path as a real folder or hub id; concepts are checked against the text encoder's budget before use."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from models import sam3
from pixelrefer_helpers import copy_checkpoint, hub_repo, offline_hub, tamper_safetensors, weights_to_bin


@pytest.fixture(scope="module")
def tiny_sam3():
    folder = sam3.tiny_checkpoint()
    return folder, sam3.load_sam3(str(folder), device="cpu", dtype=torch.float32)


def test_tiny_is_saved_in_the_released_layout(tiny_sam3):
    folder, bundle = tiny_sam3
    assert folder.name == f"tiny-sam3-{sam3.tiny_fingerprint()}"
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
            "vocab.json", "merges.txt"} <= names
    assert json.loads((folder / "config.json").read_text())["model_type"] == "sam3_video"
    stored = load_file(str(folder / "model.safetensors"))
    # One `tracker_model.` prefix, as the released facebook/sam3 (which SAM 3's tracker mapping expects).
    assert {k.split(".")[0] for k in stored} == {"detector_model", "tracker_model", "tracker_neck"}
    assert not any(k.startswith("tracker_model.tracker_model.") for k in stored)
    assert set(stored) == set(bundle.model.state_dict())


def test_tiny_loads_back_strictly_with_its_departures(tiny_sam3):
    _, bundle = tiny_sam3
    built = sam3.build_tiny_model().state_dict()
    loaded = bundle.model.state_dict()
    assert set(loaded) == set(built) and all(torch.equal(loaded[k], built[k]) for k in built)
    presence = bundle.model.detector_model.detr_decoder.presence_head.layer3.bias
    assert torch.all(presence == sam3.TINY_PRESENCE_BIAS)
    assert bundle.model.config.trk_assoc_iou_thresh == sam3.TINY_TRACK_MATCH_IOU
    assert bundle.name == str(tiny_sam3[0]) and sam3.load_sam3("tiny-sam3", device="cpu").name == "tiny-sam3"
    assert (bundle.device.type, bundle.dtype) == ("cpu", torch.float32)


def test_tiny_is_deterministic():
    a, b = sam3.build_tiny_model().state_dict(), sam3.build_tiny_model().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("meta", [False, True])
def test_missing_and_unexpected_tensors_fail(tiny_sam3, tmp_path, meta):
    original, _ = tiny_sam3
    folder = copy_checkpoint(original, tmp_path / "sam3")
    names = load_file(str(folder / "model.safetensors"))
    victim = sorted(k for k in names if k.startswith("detector_model.detr_decoder."))[0]
    # The stray tensor sits under a prefix that transformers' own load report ignores for the composite model.
    tamper_safetensors(folder, drop=[victim], add={"tracker_neck.leftover.weight": torch.zeros(2)})
    with pytest.raises(sam3.Sam3LoadError,
                       match=rf"missing \(1\): {victim} \| unexpected \(1\): tracker_neck.leftover.weight"):
        sam3.read_sam3(folder, dtype=torch.float32, meta=meta)


def test_missing_tensor_fails_load_with_a_clear_message(tiny_sam3, tmp_path):
    original, _ = tiny_sam3
    folder = copy_checkpoint(original, tmp_path / "sam3")
    tamper_safetensors(folder, drop=["tracker_model.no_memory_embedding"])
    with pytest.raises(sam3.Sam3LoadError, match=r"does not match its config: missing \(1\): "
                                                 r"tracker_model.no_memory_embedding"):
        sam3.load_sam3(str(folder), device="cpu")


def test_bin_shards_and_the_meta_check(tiny_sam3, tmp_path):
    original, bundle = tiny_sam3
    folder = copy_checkpoint(original, tmp_path / "sam3")
    weights_to_bin(folder, shards=2)
    model, files = sam3.read_sam3(folder, dtype=torch.float32, meta=True)
    assert all(p.is_meta for p in model.parameters())
    assert files.startswith("pytorch_model.bin.index.json -> 2 bin shard(s)")
    loaded = sam3.load_sam3(str(folder), device="cpu").model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in bundle.model.state_dict().items())


def test_a_sam2_folder_is_refused(tmp_path):
    from models import sam2

    with pytest.raises(sam3.Sam3LoadError, match="model_type 'sam2_video'.*SAM 3 video checkpoint"):
        sam3.load_sam3(str(sam2.tiny_checkpoint()), device="cpu")


def test_is_sam3(tiny_sam3, tmp_path, monkeypatch):
    from models import sam2

    folder, _ = tiny_sam3
    assert sam3.is_sam3("tiny-sam3") and sam3.is_sam3(str(folder))
    assert not sam3.is_sam3("tiny") and not sam3.is_sam3(str(sam2.tiny_checkpoint()))
    hf_home = tmp_path / "hf"
    hub_repo(hf_home, "someone/concept-tracker", folder)
    offline_hub(monkeypatch, hf_home)
    assert sam3.is_sam3("someone/concept-tracker")  # by its cached config, whatever its name
    assert sam3.is_sam3("facebook/sam3")  # not cached: by name
    assert not sam3.is_sam3("facebook/sam2.1-hiera-large")
    bundle = sam3.load_sam3("someone/concept-tracker", device="cpu")
    assert bundle.name == "someone/concept-tracker" and bundle.path.parent.name == "snapshots"


def test_concept_checks_name_the_concept(tiny_sam3):
    _, bundle = tiny_sam3
    assert sam3.concept_token_budget(bundle) == 32
    sam3.check_concepts(bundle, ["person", " red car ", "a person walking a dog"])
    too_long = "pneumonoultramicroscopicsilicovolcanoconiosis"  # spelled out byte by byte by tiny's BPE
    cases = [([], "no concepts given"), (["car", "  "], r"concept #2 \('  '\) is empty"),
             (["car", too_long], rf"concept .{too_long}. is \d+ tokens long; .* at most 32"),
             ("car", "must be a list of strings")]
    for concepts, message in cases:
        with pytest.raises(sam3.ConceptError, match=message):
            sam3.check_concepts(bundle, concepts)
    assert issubclass(sam3.ConceptError, ValueError)
