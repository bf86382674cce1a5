"""Region encoder pieces: quirk L2's position grid, mask pooling, k-means semantics, padding, OCI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.modeling_pixelrefer import RegionEncoder, box_position_grid, kmeans_centroids


def test_position_grid_reads_the_box_as_upstream_does():
    """(top, left, bottom, right) read as (x0, y0, x1, y1): channel 0 spans bottom-top along the width."""
    top, left, bottom, right, H, W = 17, 0, 111, 139, 112, 140
    grid = box_position_grid((14, 20), (top, left, bottom, right), (H, W))
    assert grid.shape == (14, 20, 2) and grid.dtype == torch.float32
    j, i = 7, 5
    assert grid[i, j, 0].item() == pytest.approx((j / 20 * (bottom - top) + top) / (W - 1), rel=1e-6)
    assert grid[i, j, 1].item() == pytest.approx((i / 14 * (right - left) + left) / (H - 1), rel=1e-6)
    assert torch.all(grid[:, :, 0] == grid[0:1, :, 0]) and torch.all(grid[:, :, 1] == grid[:, 0:1, 1])
    # non-square frames push channel 1 above 1 (here up to 139/111)
    assert grid[..., 1].max() > 1.0


def test_kmeans_init_draws_like_the_global_rng():
    tokens = torch.randn(50, 8, generator=torch.Generator().manual_seed(3))
    _, init = kmeans_centroids(tokens, 32, 3, torch.Generator().manual_seed(1234))
    torch.manual_seed(1234)
    assert torch.equal(init, torch.randperm(50)[:32])


def test_kmeans_early_stop_returns_the_previous_centroids():
    # 40 tokens, 32 clusters: the first update only moves clusters that received extra points
    tokens = torch.randn(40, 4, generator=torch.Generator().manual_seed(0)).double()
    g = torch.Generator().manual_seed(7)
    centroids, init = kmeans_centroids(tokens, 32, 50, g)
    # converged: one more assignment step does not move anything beyond atol
    labels = ((tokens[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    new = torch.stack([tokens[labels == i].mean(0) if (labels == i).any() else centroids[i] for i in range(32)])
    assert torch.allclose(centroids, new, atol=1e-6)


def test_kmeans_empty_cluster_keeps_its_centroid():
    """Three of {1, 1, 1, 5} are drawn, so two initial centroids coincide; ties go to the first index,
    the duplicate cluster receives nothing and must keep its centroid (no NaN from an empty mean)."""
    tokens = torch.tensor([[1.0], [1.0], [1.0], [5.0]])
    for seed in range(5):
        centroids, init = kmeans_centroids(tokens, 3, 1, torch.Generator().manual_seed(seed))
        assert torch.isfinite(centroids).all()
        assert (centroids == 1.0).sum() >= 1


@pytest.mark.parametrize("lite", [True, False])
def test_pooling_pads_lite_and_keeps_fewer_tokens_in_full(lite):
    torch.manual_seed(0)
    enc = RegionEncoder(16, 24, lite=lite, num_heads=8).eval()
    feat = torch.randn(6, 7, 16)
    mask = torch.zeros(6, 7)
    mask[1:3, 2:5] = 0.4  # 6 cells > 0
    tokens = enc.masked_tokens(feat, mask)
    assert tokens.shape == (6, 16)
    assert torch.equal(tokens[0], feat[1, 2].float() if not lite else feat[1, 2])  # row-major order
    pooled, init = enc.pool(tokens, 32, 3, torch.Generator().manual_seed(0))
    assert init is None
    if lite:
        assert pooled.shape == (32, 16) and torch.all(pooled[6:] == 0)
    else:
        assert pooled.shape == (6, 16)


def test_pooling_reduces_to_32_with_kmeans():
    torch.manual_seed(0)
    enc = RegionEncoder(16, 24, lite=True).eval()
    feat = torch.randn(10, 10, 16)
    mask = torch.ones(10, 10)
    pooled, init = enc.pool(enc.masked_tokens(feat, mask), 32, 3, torch.Generator().manual_seed(1234))
    assert pooled.shape == (32, 16) and init is not None and len(init) == 32


def test_features_are_resized_to_the_mask_grid():
    """smart_resize may shrink a crop below its mask grid: features are bilinearly resized to the mask."""
    enc = RegionEncoder(8, 8, lite=True).eval()
    feat = torch.arange(2 * 3 * 8, dtype=torch.float32).view(2, 3, 8)
    mask = torch.ones(4, 6)
    tokens = enc.masked_tokens(feat, mask)
    expected = (
        torch.nn.functional.interpolate(feat.permute(2, 0, 1)[None], size=(4, 6), mode="bilinear", align_corners=False)[
            0
        ]
        .flatten(1)
        .T
    )
    assert torch.equal(tokens, expected)


def test_full_pooling_runs_in_float32():
    enc = RegionEncoder(4, 8, lite=False).to(torch.bfloat16).eval()
    feat = torch.randn(3, 3, 4).to(torch.bfloat16)
    tokens = enc.masked_tokens(feat, torch.ones(3, 3, dtype=torch.uint8))
    assert tokens.dtype == torch.float32


def test_oci_is_residual_attention_over_context():
    torch.manual_seed(0)
    enc = RegionEncoder(16, 24, lite=True).eval()
    q = torch.randn(2, 32, 16)
    local, glob = torch.randn(2, 256, 16), torch.randn(2, 576, 16)
    with torch.no_grad():
        out = enc.infuse(q, local, glob)
        step = q + enc.fusion_attention_local(enc.ln_local(q), local, local)[0]
        step = step + enc.fusion_attention_global(enc.ln_global(step), glob, glob)[0]
    assert torch.equal(out, step)
    # each mask attends only to its own context
    with torch.no_grad():
        single = enc.infuse(q[1:], local[1:], glob[1:])
    np.testing.assert_allclose(single[0].numpy(), out[1].numpy(), atol=1e-6)


def test_frame_difference_compression(tiny_full):
    """Frame 0 is kept whole; a static frame keeps only its first token; a changed 28x28 block is kept."""
    from models.processing_pixelrefer import prepare_frames

    rng = np.random.RandomState(0)
    base = (rng.rand(56, 84, 3) * 255).astype(np.uint8)
    changed = base.copy()
    changed[28:56, 28:56] = 255 - changed[28:56, 28:56]  # merged token (row 1, col 1)
    frames = prepare_frames([base, base, changed], [0.0, 1.0, 2.0], tiny_full.config.image_processor, 2, video=True)
    keep = tiny_full.model.frame_keep_mask(frames).numpy()
    assert keep.shape == (3, 6)
    assert keep[0].all()
    assert keep[1].tolist() == [True, False, False, False, False, False]
    assert keep[2].tolist() == [False, False, False, False, True, False]
    image = prepare_frames([base], [0.0], tiny_full.config.image_processor, 2, video=False)
    assert image.images[0].merge == 1 and tiny_full.model.frame_keep_mask(image).all()


@pytest.mark.parametrize("lite, feat_hw", [(True, (6, 8)), (False, (6, 8)), (True, (4, 5))])
def test_masked_mean_is_the_mean_of_the_masked_tokens(lite, feat_hw):
    """Re-identification's appearance (`masked_mean`) averages exactly the cells the region tokens are
    pooled from, also when the features must be resized to the mask grid first."""
    from models.appearance import masked_mean

    gen = torch.Generator().manual_seed(0)
    feat = torch.randn(*feat_hw, 16, generator=gen)
    grid = (torch.rand(6, 8, generator=gen) > 0.4).numpy().astype(np.float32 if lite else np.uint8)
    tokens = RegionEncoder(16, 8, lite=lite).masked_tokens(feat, torch.from_numpy(grid))
    assert torch.allclose(masked_mean(feat, grid), tokens.float().mean(dim=0), atol=1e-5)
