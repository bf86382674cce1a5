"""SAM 2 folders load through the same weight reader as PixelRefer (safetensors or ``.bin``, single or
sharded), strictly: a missing or extra tensor fails the load instead of leaving random weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from models import sam2
from pixelrefer_helpers import copy_checkpoint, tamper_safetensors, weights_to_bin


@pytest.fixture(scope="module")
def tiny_sam2():
    folder = sam2.tiny_checkpoint()
    return folder, sam2.load_sam2(str(folder), device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("shards", [1, 3])
def test_bin_layouts_load_the_same_tensors(tiny_sam2, tmp_path, shards):
    original, bundle = tiny_sam2
    folder = copy_checkpoint(original, tmp_path / "sam2")
    weights_to_bin(folder, shards=shards)
    loaded = sam2.load_sam2(str(folder), device="cpu", dtype=torch.float32)
    want, got = bundle.model.state_dict(), loaded.model.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert loaded.tracker_defaults == bundle.tracker_defaults


@pytest.mark.parametrize("meta", [False, True])
def test_missing_and_unexpected_tensors_fail(tiny_sam2, tmp_path, meta):
    original, _ = tiny_sam2
    folder = copy_checkpoint(original, tmp_path / "sam2")
    victim = sorted(k for k in load_file(str(folder / "model.safetensors")) if k.startswith("mask_decoder."))[0]
    tamper_safetensors(folder, drop=[victim], add={"leftover.weight": torch.zeros(2)})
    with pytest.raises(sam2.Sam2LoadError, match=rf"missing \(1\): {victim} \| unexpected \(1\): leftover.weight"):
        sam2.read_sam2(folder, dtype=torch.float32, meta=meta)


def test_meta_check_reads_no_data_and_agrees(tiny_sam2, tmp_path):
    original, bundle = tiny_sam2
    folder = copy_checkpoint(original, tmp_path / "sam2")
    weights_to_bin(folder, shards=2)
    model, files = sam2.read_sam2(folder, dtype=torch.float32, meta=True)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in bundle.model.parameters())
    assert files.startswith("pytorch_model.bin.index.json -> 2 bin shard(s)")
