"""Parity with the authors' code on the copied fixtures (fp32 references), step by step.

The end-to-end checks are the contract (ids equal, tensors within 5e-4); the step checks exist so that a
mismatch points at the step that broke (crop, grid, box, mask resize, tower, pooling, k-means, OCI,
frames, compression).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from pixelrefer_helpers import FULL_FIXTURE, LITE_FIXTURE

TOL = 5e-4


def _maxabs(a, b) -> float:
    a = a.detach().float().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, dtype=np.float32)
    assert a.shape == np.shape(b), (a.shape, np.shape(b))
    return float(np.abs(a - b).max()) if a.size else 0.0


# -- end to end --------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["lite", "full"])
def test_end_to_end_fp32(which, request):
    run = request.getfixturevalue(f"{which}_run")
    ref = request.getfixturevalue(f"{which}_reference")
    np.testing.assert_array_equal(np.asarray(run.sequence.input_ids)[None], ref["input_ids"])
    assert _maxabs(run.embeds.region_tokens, ref["region_tokens"]) < TOL
    assert _maxabs(run.logits, ref["logits"]) < TOL
    np.testing.assert_array_equal(np.asarray(run.generated_ids)[None], ref["generated_ids"])


@pytest.mark.parametrize("which", ["lite", "full"])
def test_llm_inputs_embeds(which, request):
    run = request.getfixturevalue(f"{which}_run")
    ref = request.getfixturevalue(f"{which}_reference")
    assert _maxabs(run.embeds.inputs_embeds, ref["llm_inputs_embeds"]) < TOL


# -- SAOT preprocessing ------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["lite", "full"])
def test_crop_grid_box(which, request):
    run = request.getfixturevalue(f"{which}_run")
    ref = request.getfixturevalue(f"{which}_reference")
    crops = [r.crop for r in run.sequence.regions]
    np.testing.assert_array_equal([c.crop_hw for c in crops], ref["crop_hw"])
    np.testing.assert_array_equal([c.grid_hw for c in crops], ref["grid_hw"])
    np.testing.assert_array_equal([c.box + c.frame_hw for c in crops], ref["box_params"])
    if which == "full":
        np.testing.assert_array_equal([c.num_tokens for c in crops], ref["mask_nums"])


@pytest.mark.parametrize("which", ["lite", "full"])
def test_mask_resized(which, request):
    run = request.getfixturevalue(f"{which}_run")
    ref = request.getfixturevalue(f"{which}_reference")
    for i, region in enumerate(run.sequence.regions):
        np.testing.assert_array_equal(region.crop.mask_grid.astype(np.float32), ref[f"mask_resized_{i}"])
        if which == "full":
            assert str(ref[f"mask_resized_dtype_{i}"]) == "torch.uint8" and region.crop.mask_grid.dtype == np.uint8


# -- vision tower ------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["lite", "full"])
def test_vision_features_of_crops(which, request):
    run = request.getfixturevalue(f"{which}_run")
    ref = request.getfixturevalue(f"{which}_reference")
    for i, keys in enumerate(run.plan.region_keys[0]):
        assert _maxabs(run.trace.vision[keys[0]], ref[f"vision_feat_crop_{i}"]) < 1e-4


def test_lite_context_features(lite_run, lite_reference):
    """F_global (336) and F_local (224, with quirk L3 as upstream: masks 2/3 use the small object's crop)."""
    keys = lite_run.plan.region_keys[0]
    glob = torch.stack([lite_run.trace.vision[k[2]] for k in keys])
    local = torch.stack([lite_run.trace.vision[k[1]] for k in keys])
    assert _maxabs(glob, lite_reference["vision_feat_raw336"]) < 1e-4
    assert _maxabs(local, lite_reference["vision_feat_local224"]) < 1e-4
    assert keys[2][1] == keys[0][1] and keys[3][1] == keys[1][1]  # L3: per-frame cache


def test_full_frame_tokens(full_run, full_reference):
    """Frames through the tower (merge 2 = 2x2 mean of the processor's merge-ordered features), the
    projector, and the frame-difference compressor."""
    ref_frames = full_reference["vision_feat_frames"]  # (160, C) merge order: groups of 4 are 2x2 blocks
    merged_ref = ref_frames.reshape(-1, 4, ref_frames.shape[-1]).mean(axis=1)
    model = full_run.checkpoint.model
    feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in model.encode_images(full_run.frames.images)])
    assert _maxabs(feats, merged_ref) < 1e-4
    assert _maxabs(full_run.trace.frame_tokens, full_reference["video_tokens_projected"]) < TOL
    np.testing.assert_array_equal(
        full_run.trace.frame_keep.flatten().cpu().numpy(), full_reference["video_tokens_kept"]
    )
    np.testing.assert_array_equal([[1, *im.grid_hw] for im in full_run.frames.images], full_reference["video_grid_thw"])


# -- pooling and k-means -----------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["lite", "full"])
def test_kmeans_inputs_and_init(which, request):
    run = request.getfixturevalue(f"{which}_run")
    ref = request.getfixturevalue(f"{which}_reference")
    tokens = run.trace.kmeans_inputs[0]
    np.testing.assert_array_equal([len(t) for t in tokens], ref["kmeans_n"])
    for i, t in enumerate(tokens):
        assert _maxabs(t, ref[f"kmeans_tokens_{i}"]) < 1e-4
    inits = [init.numpy() for init in run.trace.kmeans_init[0] if init is not None]
    np.testing.assert_array_equal(np.stack(inits), ref["kmeans_init"])


@pytest.mark.parametrize("which", ["lite", "full"])
def test_pooled_tokens(which, request):
    run = request.getfixturevalue(f"{which}_run")
    ref = request.getfixturevalue(f"{which}_reference")
    assert _maxabs(torch.stack(run.trace.pooled[0]), ref["pooled_tokens"]) < 1e-4


# -- the CLI -----------------------------------------------------------------------------------------
def test_cli_on_a_copy_without_references(tmp_path):
    """``python -m models.parity`` works from the checkpoint and inputs alone (no reference files)."""
    from models.parity import main

    folder = tmp_path / "fixture"
    shutil.copytree(LITE_FIXTURE, folder)
    for name in ("reference.npz", "reference_fp32.npz", "summary.json"):
        (folder / name).unlink()
    out = tmp_path / "out.npz"
    assert main([str(folder), "--out", str(out), "--dtype", "float32"]) == 0
    with np.load(out) as got, np.load(LITE_FIXTURE / "reference_fp32.npz") as ref:
        assert set(got.files) == {"input_ids", "region_tokens", "logits", "generated_ids"}
        assert got["logits"].dtype == np.float32 and got["input_ids"].shape == (1, 186)
        np.testing.assert_array_equal(got["generated_ids"], ref["generated_ids"])
        assert float(np.abs(got["logits"] - ref["logits"]).max()) < TOL


def test_full_fixture_compression_shortens_the_llm_input(full_run):
    assert len(full_run.sequence.input_ids) == 152 and full_run.logits.shape == (1, 149, 300)
    assert FULL_FIXTURE.is_dir()
