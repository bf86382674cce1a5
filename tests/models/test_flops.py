"""models.flops: the analytic counts against torch's FlopCounterMode on tiny real modules.

FlopCounterMode counts 2 FLOPs per multiply-add and only matmul-like ops (mm, addmm, bmm,
convolution, and the CUDA SDPA kernels). On CPU it does *not* count
``scaled_dot_product_attention`` (torch 2.14 registers no formula for the CPU kernel), so
every measured model here runs with eager attention, whose matmuls are counted. Under that
like-for-like setup the formula is exact, which the tests check besides the 10% bound.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from models.flops import (
    LITE_GLOBAL_CELLS,
    LITE_LOCAL_CELLS,
    RELEASED_DIMS,
    LLMDims,
    ModelDims,
    VisionDims,
    feat_linear_macs,
    full_macs,
    lite_macs,
    llm_decode_macs,
    llm_layer_macs,
    llm_macs,
    load_dims,
    macs_to_flops,
    oci_macs,
    released_dims,
    tokens_for_llm_macs,
    vision_encoder_macs,
)

PARITY = Path(__file__).resolve().parents[1] / "fixtures" / "parity"


def _measure(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _close(measured: int, predicted: int, tol: float = 0.10) -> bool:
    return abs(measured - predicted) <= tol * measured


def _qwen2_config(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, **extra):
    from transformers import Qwen2Config

    cfg = Qwen2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        vocab_size=300,
        max_position_embeddings=1024,
        **extra,
    )
    cfg._attn_implementation = "eager"
    return cfg


LLM_SHAPES = [
    pytest.param(dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128), 100, id="tiny-n100"),
    pytest.param(dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128), 300, id="tiny-n300"),
    pytest.param(dict(hidden=256, layers=3, heads=8, kv_heads=2, intermediate=704), 257, id="bigger-n257"),
    pytest.param(dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, head_dim=32), 150, id="head_dim"),
]


@pytest.mark.parametrize("shape,n", LLM_SHAPES)
def test_llm_formula_matches_flop_counter(shape: dict, n: int) -> None:
    from transformers import Qwen2Model

    torch.manual_seed(0)
    cfg = _qwen2_config(**shape)
    model = Qwen2Model(cfg).eval()
    dims = LLMDims.from_hf_config(cfg.to_dict())
    assert (dims.hidden, dims.layers, dims.heads, dims.kv_heads) == tuple(
        shape[k] for k in ("hidden", "layers", "heads", "kv_heads")
    )
    ids = torch.randint(0, 300, (1, n))
    measured = _measure(lambda: model(input_ids=ids, use_cache=False))
    predicted = macs_to_flops(llm_macs(dims, n))
    assert _close(measured, predicted), (measured, predicted)
    # Same matmuls on both sides: the count is exact, so a dropped term (e.g. K/V, ~2%) shows.
    assert measured == predicted


def test_llm_formula_is_the_papers_expression() -> None:
    llm = RELEASED_DIMS["2B"].llm
    n, d, d_kv, m = 1480, 1536, 256, 8960
    assert llm.d_kv == d_kv
    assert llm_layer_macs(llm, n) == 2 * n * d**2 + 2 * n * d * d_kv + 2 * n**2 * d + 3 * n * d * m
    assert llm_macs(llm, n) == 28 * llm_layer_macs(llm, n)
    assert tokens_for_llm_macs(llm, llm_macs(llm, n)) == pytest.approx(n)


def test_lm_head_and_decode_match_flop_counter() -> None:
    from transformers import DynamicCache, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = _qwen2_config(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)
    model = Qwen2ForCausalLM(cfg).eval()
    dims = LLMDims.from_hf_config(cfg.to_dict())
    assert dims.vocab_size == 300
    n, steps = 120, 3
    ids = torch.randint(0, 300, (1, n))
    # A plain forward computes logits for every position: lm_head over n tokens.
    measured = _measure(lambda: model(input_ids=ids, use_cache=False))
    assert measured == macs_to_flops(llm_macs(dims, n, lm_head_tokens=n))

    cache = DynamicCache(config=cfg)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)

    def decode() -> None:
        for i in range(steps):
            model(
                input_ids=torch.randint(0, 300, (1, 1)),
                past_key_values=cache,
                use_cache=True,
                position_ids=torch.tensor([[n + i]]),
            )

    measured = _measure(decode)
    predicted = macs_to_flops(llm_decode_macs(dims, n, steps))
    assert _close(measured, predicted) and measured == predicted, (measured, predicted)


class _OCI(nn.Module):
    """Lite's Object-Centric Infusion + feat_linear, as in the parity README (step 7)."""

    def __init__(self, vision_hidden: int, llm_hidden: int) -> None:
        super().__init__()
        self.ln_local = nn.LayerNorm(vision_hidden)
        self.ln_global = nn.LayerNorm(vision_hidden)
        self.fusion_attention_local = nn.MultiheadAttention(vision_hidden, 8, batch_first=True)
        self.fusion_attention_global = nn.MultiheadAttention(vision_hidden, 8, batch_first=True)
        self.feat_linear = nn.Sequential(
            nn.Linear(vision_hidden, llm_hidden), nn.GELU(), nn.Linear(llm_hidden, llm_hidden)
        )

    def forward(self, q: torch.Tensor, local: torch.Tensor, glob: torch.Tensor) -> torch.Tensor:
        q = q + self.fusion_attention_local(self.ln_local(q), local, local)[0]
        q = q + self.fusion_attention_global(self.ln_global(q), glob, glob)[0]
        return self.feat_linear(q.flatten(0, 1))


@pytest.mark.parametrize("vision_hidden,llm_hidden,masks", [(64, 64, 3), (128, 96, 2)])
def test_oci_matches_flop_counter(vision_hidden: int, llm_hidden: int, masks: int) -> None:
    torch.manual_seed(0)
    oci = _OCI(vision_hidden, llm_hidden).eval()
    q = torch.randn(masks, 32, vision_hidden)
    local = torch.randn(masks, LITE_LOCAL_CELLS, vision_hidden)
    glob = torch.randn(masks, LITE_GLOBAL_CELLS, vision_hidden)
    measured = _measure(lambda: oci(q, local, glob))
    predicted = macs_to_flops(oci_macs(vision_hidden, masks) + feat_linear_macs(vision_hidden, llm_hidden, 32 * masks))
    assert _close(measured, predicted) and measured == predicted, (measured, predicted)


def test_vision_encoder_matches_flop_counter() -> None:
    from transformers import VideoLlama3VisionConfig, VideoLlama3VisionModel

    torch.manual_seed(0)
    cfg = VideoLlama3VisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, patch_size=14
    )
    cfg._attn_implementation = "eager"
    model = VideoLlama3VisionModel(cfg).eval()
    grid = torch.tensor([[1, 10, 12], [1, 16, 16], [1, 24, 24]])
    sizes = grid.prod(dim=1).tolist()
    pixels = torch.randn(sum(sizes), 3 * 14 * 14)
    measured = _measure(lambda: model(pixel_values=pixels, grid_thw=grid, merge_sizes=torch.tensor([1, 1, 1])))
    predicted = macs_to_flops(vision_encoder_macs(VisionDims.from_hf_config(cfg.to_dict()), sizes))
    assert _close(measured, predicted) and measured == predicted, (measured, predicted)


def test_lite_vs_full_ratio_video_2b() -> None:
    """The paper's video setting: 20 frames, ~7185 global tokens, one object prompted on one frame."""
    dims = released_dims("2B")
    full = full_macs(dims, vision_tokens=7185, num_masks=1, text_tokens=40)
    lite = lite_macs(dims, num_masks=1, text_tokens=40)
    assert full.llm_tokens == 7185 + 32 + 40 and lite.llm_tokens == 32 + 40
    assert full.total / lite.total >= 50
    assert full.llm / lite.llm >= 50


def test_lite_cost_grows_with_masks_not_frames() -> None:
    """An object tracked on all 20 frames gives Lite 640 object tokens: the ratio falls well below 50x."""
    dims = released_dims("2B")
    one = lite_macs(dims, num_masks=1, text_tokens=40)
    twenty = lite_macs(dims, num_masks=20, text_tokens=40)
    full = full_macs(dims, vision_tokens=7185, num_masks=20, text_tokens=40)
    assert twenty.llm_tokens == 640 + 40
    assert twenty.total > 9 * one.total
    assert 10 < full.total / twenty.total < 25


def test_full_tokens_per_mask_validation() -> None:
    dims = released_dims("2B")
    b = full_macs(dims, vision_tokens=100, num_masks=2, text_tokens=10, tokens_per_mask=[32, 7])
    assert b.llm_tokens == 100 + 39 + 10
    with pytest.raises(ValueError):
        full_macs(dims, vision_tokens=100, num_masks=2, text_tokens=10, tokens_per_mask=[32])
    with pytest.raises(ValueError):
        full_macs(dims, vision_tokens=100, num_masks=1, text_tokens=10, tokens_per_mask=33)


# Fields as published in the public config.json files (see models/flops.py for the sources).
QWEN25_15B_INSTRUCT = {
    "architectures": ["Qwen2ForCausalLM"], "hidden_size": 1536, "intermediate_size": 8960,
    "model_type": "qwen2", "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2,
    "tie_word_embeddings": True, "vocab_size": 151936, "use_sliding_window": False,
}
QWEN25_7B_INSTRUCT = {
    "architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584, "intermediate_size": 18944,
    "model_type": "qwen2", "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "tie_word_embeddings": False, "vocab_size": 152064, "use_sliding_window": False,
}
VIDEOLLAMA3_VISION_ENCODER_CONFIG = {
    "hidden_size": 1152, "intermediate_size": 4304, "model_type": "videollama3_vision_encoder",
    "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14,
}


def test_released_dims_match_public_configs() -> None:
    assert LLMDims.from_hf_config(QWEN25_15B_INSTRUCT) == RELEASED_DIMS["2B"].llm
    assert LLMDims.from_hf_config(QWEN25_7B_INSTRUCT) == RELEASED_DIMS["7B"].llm
    nested = {**QWEN25_15B_INSTRUCT, "vision_encoder_config": VIDEOLLAMA3_VISION_ENCODER_CONFIG}
    for dims in RELEASED_DIMS.values():
        assert VisionDims.from_hf_config(nested) == dims.vision
        assert VisionDims.from_hf_config(VIDEOLLAMA3_VISION_ENCODER_CONFIG) == dims.vision
    assert RELEASED_DIMS["2B"].llm.d_kv == 256 and RELEASED_DIMS["7B"].llm.d_kv == 512
    assert released_dims("Alibaba-DAMO-Academy/PixelRefer-Lite-7B") is RELEASED_DIMS["7B"]
    assert released_dims("pixelrefer-2b") is RELEASED_DIMS["2B"]
    with pytest.raises(KeyError):
        released_dims("13B")


def test_from_hf_config_variants() -> None:
    composite = {"text_config": QWEN25_7B_INSTRUCT, "vision_config": VIDEOLLAMA3_VISION_ENCODER_CONFIG}
    assert LLMDims.from_hf_config(composite) == RELEASED_DIMS["7B"].llm
    assert VisionDims.from_hf_config(composite) == RELEASED_DIMS["7B"].vision
    mha = {**QWEN25_15B_INSTRUCT, "num_key_value_heads": None}
    assert LLMDims.from_hf_config(mha).kv_heads == 12
    with pytest.raises(KeyError, match="load_dims"):
        VisionDims.from_hf_config({**QWEN25_15B_INSTRUCT, "mm_vision_encoder": "VL3-SigLIP-NaViT"})
    with pytest.raises(ValueError):
        LLMDims(hidden=64, layers=1, heads=4, kv_heads=3, intermediate=8)


@pytest.mark.skipif(not PARITY.is_dir(), reason="parity fixtures not present")
@pytest.mark.parametrize("fixture", ["lite-tiny", "full-tiny"])
def test_load_dims_parity_checkpoint(fixture: str) -> None:
    dims = load_dims(PARITY / fixture)
    assert dims == ModelDims(
        llm=LLMDims(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab_size=300),
        vision=VisionDims(hidden=64, layers=2, heads=4, intermediate=128, patch_size=14),
    )


def test_bench_rows_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.flops import main

    out = tmp_path / "flops.json"
    assert main(["--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "11.15" in text and "Why our numbers differ" in text
    rows = json.loads(out.read_text())
    keys = {(r["model"], r["framework"], r["setting"]) for r in rows}
    assert keys == {(m, f, s) for m in ("2B", "7B") for f in ("lite", "full") for s in ("image", "video")}
    assert len(rows) == len(keys)
    for r in rows:
        assert isinstance(r["tflops"], float) and r["tflops"] > 0
    by = {(r["model"], r["framework"], r["setting"]): r for r in rows}
    assert by[("2B", "full", "video")]["tflops"] / by[("2B", "lite", "video")]["tflops"] >= 50


@pytest.mark.skipif(not (PARITY / "lite-tiny").is_dir(), reason="parity fixtures not present")
def test_tiny_lite_model_matches_formula() -> None:
    """The product's own tiny Lite model (random weights, the parity fixture's config and prompt).

    The fixture's Lite prompt holds 186 ids, 128 of them ``<REGION>`` (4 masks x 32): the LLM
    prefill, and OCI + feat_linear run through the model's own region encoder, must cost exactly
    what :func:`lite_macs` says.
    """
    import numpy as np

    modeling = pytest.importorskip("models.modeling_pixelrefer")
    from models.config import PixelReferConfig

    folder = PARITY / "lite-tiny"
    cfg = PixelReferConfig.from_folder(folder)
    torch.manual_seed(0)
    model = modeling.PixelReferModel(cfg, attn_implementation="eager").eval()
    dims = load_dims(folder)
    ids = np.load(folder / "reference_fp32.npz")["input_ids"][0]
    region = int((ids == cfg.region_token_index).sum())
    masks, text = region // 32, len(ids) - region
    assert (masks, text) == (4, 58)
    expected = lite_macs(dims, num_masks=masks, text_tokens=text)

    embeds = torch.randn(1, len(ids), dims.llm.hidden)
    measured = _measure(lambda: model.llm.model(inputs_embeds=embeds, use_cache=False))
    assert _close(measured, macs_to_flops(expected.llm)) and measured == macs_to_flops(expected.llm)

    enc, c = model.region_encoder, dims.vision.hidden
    q = torch.randn(masks, 32, c)
    local, glob = torch.randn(masks, LITE_LOCAL_CELLS, c), torch.randn(masks, LITE_GLOBAL_CELLS, c)
    measured = _measure(lambda: enc.feat_linear(enc.infuse(q, local, glob).flatten(0, 1)))
    assert _close(measured, macs_to_flops(expected.connector)) and measured == macs_to_flops(expected.connector)
