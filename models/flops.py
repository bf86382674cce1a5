"""FLOPs accounting for PixelRefer (Vision-Object) and PixelRefer-Lite (Object-Only).

Why this module exists
----------------------
The product offers two modes whose cost differs by one to two orders of magnitude, and the
choice between them (``--mode lite|full``) is a capacity-planning decision. This module gives
an analytic count, as a pure function of model dimensions and token counts, so that a run can
be sized before it starts and the paper's efficiency claims can be checked against the
released configurations. Everything here is arithmetic on ints: no torch import, no I/O
except :func:`load_dims`, which reads ``config.json`` files.

Unit convention (read this before comparing numbers)
----------------------------------------------------
The paper's per-layer LLM formula is::

    2 n d^2  +  2 n d d_kv  +  2 n^2 d  +  3 n d m

with n tokens, d = hidden size, d_kv = num_key_value_heads * head_dim (the width of the K and
V projections under grouped-query attention; 256 for Qwen2.5-1.5B, 512 for Qwen2.5-7B) and
m = intermediate size. Term by term it is the number of **multiply-adds (MACs)** of:

* ``2 n d^2``: the Q and O projections (n x d times d x d, twice);
* ``2 n d d_kv``: the K and V projections;
* ``2 n^2 d``: Q K^T and softmax(.) V over all heads, over the full n x n square (eager and
  math-SDPA attention compute all of it; causal FlashAttention kernels skip about half, so on
  GPU this term is an upper bound);
* ``3 n d m``: the SwiGLU MLP (gate, up and down projections).

So the paper counts one multiply-add as one "FLOP". Hardware FLOPs, and
``torch.utils.flop_counter.FlopCounterMode``, count a multiply-add as **2 FLOPs**.

Our convention: every ``*_macs`` function returns multiply-adds, i.e. the paper's unit, so
that our numbers are directly comparable with the paper's table; :func:`macs_to_flops`
doubles them for hardware FLOPs (what a profiler or an MFU calculation wants). The bench
(``python -m bench.flops``) prints both and labels them.

What is counted, and what is not
--------------------------------
* Counted: every matmul of the decoder layers (the paper's four terms). Per layer, the
  Q projection width is ``heads * head_dim``; for every Qwen2.5 model that equals ``hidden``
  and the formula is exactly the paper's.
* Not counted, as in the paper: token embedding (a lookup), RMSNorm, RoPE, softmax, SiLU,
  residual adds, the q/k/v biases. FlopCounterMode does not count them either; together
  they are well under 1% at these sizes.
* The **lm_head** is *excluded* by default, like the paper. Pass ``lm_head_tokens`` to add
  ``lm_head_tokens * d * vocab`` MACs (1 for a prefill that only needs the next-token
  logits, n for a training-style forward over every position).
* **Prefill only**: the prompt's single forward pass. Generated tokens cost extra; see
  :func:`llm_decode_macs`. For Lite the decode of a one-sentence caption costs about as much
  as its whole prefill, which the paper's numbers do not show.
* Vision encoder (VL3-SigLIP-NaViT) and the k-means of the object tokenizer are outside the
  paper's formula; the encoder is available separately (:func:`vision_encoder_macs`,
  :func:`lite_vision_macs`, :func:`full_vision_macs`); k-means is elementwise work
  (about ``iters * 32 * cells * vision_hidden`` MACs per mask, ~0.1 GMAC) and ignored.

Released dimensions (checked against public configs)
----------------------------------------------------
* "2B" LLM = Qwen2.5-1.5B-Instruct: hidden_size 1536, num_hidden_layers 28,
  num_attention_heads 12, num_key_value_heads 2 (head_dim 128, d_kv 256), intermediate_size
  8960, vocab_size 151936 (tied embeddings). Source: the ``config.json`` of
  ``Qwen/Qwen2.5-1.5B-Instruct`` as mirrored with ``"_name_or_path": "Qwen/Qwen2.5-1.5B-Instruct"``
  at huggingface.co/onnx-community/Qwen2.5-1.5B-Instruct (commit 94677ac) and other copies.
* "7B" LLM = Qwen2.5-7B-Instruct: hidden_size 3584, num_hidden_layers 28, num_attention_heads
  28, num_key_value_heads 4 (head_dim 128, d_kv 512), intermediate_size 18944, vocab_size
  152064 (untied). Source: the ``config.json`` of ``Qwen/Qwen2.5-7B-Instruct`` as mirrored
  at huggingface.co/osllmai-community/Qwen2.5-7B-Instruct and other copies.
* Vision tower (both sizes) = VL3-SigLIP-NaViT (``DAMO-NLP-SG/VL3-SigLIP-NaViT``, the
  VideoLLaMA3 encoder, fine-tuned from siglip-so400m-patch14-384): hidden_size 1152,
  num_hidden_layers 27, num_attention_heads 16, intermediate_size 4304, patch_size 14.
  Source: ``vision_encoder_config`` in VideoLLaMA3-2B's ``config.json`` (copy at
  huggingface.co/cbipok/VideoLLaMA3-2B-fork) and google/siglip-so400m-patch14-384's
  ``vision_config``.
  The PixelRefer checkpoints add a few special tokens, so their vocab may differ slightly;
  vocab only matters for the optional lm_head term.

Framework accounting
--------------------
* Lite (:func:`lite_macs`): the LLM sees ``32 * num_masks + text`` tokens (Lite zero-pads
  every mask's tokens to 32; one mask per object per frame on which it has a mask). Its
  connector is the Object-Centric Infusion (two ``nn.MultiheadAttention`` cross-attentions per
  mask: 32 queries over 256 local cells of the 224x224 crop and over 576 global cells of the
  336x336 frame) plus ``feat_linear``.
* Full (:func:`full_macs`): the LLM sees the global vision tokens (after 2x2 merge and, for
  video, frame-difference compression) + up to 32 object tokens per mask + text. Its
  connector is ``mm_projector`` over the vision tokens plus ``feat_linear`` over the object
  tokens.

The Lite LLM cost scales with the number of masks, not with the video length: an object
prompted on one frame costs 32 tokens whatever the video's length, but an object tracked
on all 20 frames costs 640 tokens, which brings the 2B Lite/full ratio for a 20-frame video
from ~145x down to ~16x (with a 40-token text prompt; ``python -m bench.flops``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = [
    "LLMDims",
    "VisionDims",
    "ModelDims",
    "FlopsBreakdown",
    "RELEASED_DIMS",
    "LITE_TOKENS_PER_MASK",
    "LITE_LOCAL_CELLS",
    "LITE_GLOBAL_CELLS",
    "released_dims",
    "load_dims",
    "macs_to_flops",
    "llm_layer_macs",
    "llm_macs",
    "llm_decode_macs",
    "cross_attention_macs",
    "oci_macs",
    "feat_linear_macs",
    "projector_macs",
    "vision_encoder_macs",
    "lite_macs",
    "full_macs",
    "lite_vision_macs",
    "full_vision_macs",
    "tokens_for_llm_macs",
]

#: Lite pads (or k-means-merges) every mask's object tokens to exactly this many.
LITE_TOKENS_PER_MASK = 32
#: Feature cells of the Lite OCI's local context: a 224x224 crop at patch 14 = 16 x 16.
LITE_LOCAL_CELLS = (224 // 14) ** 2
#: Feature cells of the Lite OCI's global context: the frame at 336x336, patch 14 = 24 x 24.
LITE_GLOBAL_CELLS = (336 // 14) ** 2


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _non_negative(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def _as_mapping(config: Any) -> Mapping[str, Any]:
    """Accept a dict or a ``transformers.PretrainedConfig`` (via ``to_dict``)."""
    if isinstance(config, Mapping):
        return config
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    raise TypeError(f"expected a config mapping or PretrainedConfig, got {type(config).__name__}")


@dataclass(frozen=True)
class LLMDims:
    """The decoder dimensions that the FLOPs formula needs (a Qwen2-style decoder).

    ``head_dim`` defaults to ``hidden // heads`` as in Qwen2; set it only for configs that
    carry an explicit ``head_dim``. ``vocab_size`` is optional: only the lm_head term uses it.
    """

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    head_dim: int | None = None
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("hidden", "layers", "heads", "kv_heads", "intermediate"):
            _positive(name, getattr(self, name))
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.head_dim is None:
            if self.hidden % self.heads:
                raise ValueError(f"hidden ({self.hidden}) is not divisible by heads ({self.heads}); pass head_dim")
        else:
            _positive("head_dim", self.head_dim)
        if self.vocab_size is not None:
            _positive("vocab_size", self.vocab_size)

    @property
    def head_size(self) -> int:
        """Per-head width."""
        return self.head_dim if self.head_dim is not None else self.hidden // self.heads

    @property
    def d_q(self) -> int:
        """Width of the Q projection (= hidden for every Qwen2.5 model)."""
        return self.heads * self.head_size

    @property
    def d_kv(self) -> int:
        """Width of each of the K and V projections (grouped-query attention)."""
        return self.kv_heads * self.head_size

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any] | Any) -> "LLMDims":
        """Read a Qwen2 / PixelRefer ``config.json`` (dict) or a ``PretrainedConfig``.

        PixelRefer checkpoints keep the Qwen2 fields at the top level; composite configs
        (transformers' VideoLLaMA3) keep them under ``text_config``, which is used when the
        top level has no ``hidden_size``. A missing/null ``num_key_value_heads`` means plain
        multi-head attention, as in transformers.
        """
        cfg = _as_mapping(config)
        if "hidden_size" not in cfg:
            for key in ("text_config", "llm_config"):
                if isinstance(cfg.get(key), Mapping):
                    cfg = cfg[key]
                    break
            else:
                raise KeyError("no 'hidden_size' in config (nor in 'text_config'): not an LLM config")
        heads = int(cfg["num_attention_heads"])
        kv_heads = cfg.get("num_key_value_heads")
        head_dim = cfg.get("head_dim")
        vocab = cfg.get("vocab_size")
        return cls(
            hidden=int(cfg["hidden_size"]),
            layers=int(cfg["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(kv_heads) if kv_heads is not None else heads,
            intermediate=int(cfg["intermediate_size"]),
            head_dim=int(head_dim) if head_dim is not None else None,
            vocab_size=int(vocab) if vocab is not None else None,
        )


@dataclass(frozen=True)
class VisionDims:
    """The vision tower dimensions (a SigLIP/NaViT ViT: Conv2d patch embed, LN, MHA, GELU MLP)."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    patch_size: int
    channels: int = 3

    def __post_init__(self) -> None:
        for name in ("hidden", "layers", "heads", "intermediate", "patch_size", "channels"):
            _positive(name, getattr(self, name))

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any] | Any) -> "VisionDims":
        """Read a vision tower config: top-level fields, or nested under a known key.

        Accepts the tower's own ``config.json`` (upstream ``damovl`` / ``videollama3_vision_encoder``,
        transformers' ``video_llama_3_vision``), a VideoLLaMA3-style ``vision_encoder_config``
        or a transformers-style ``vision_config``. A PixelRefer checkpoint's top-level
        ``config.json`` only names the tower folder (``mm_vision_encoder``); use
        :func:`load_dims` for a checkpoint folder.
        """
        cfg = _as_mapping(config)
        for key in ("vision_encoder_config", "vision_config"):
            if isinstance(cfg.get(key), Mapping):
                cfg = cfg[key]
                break
        else:
            if "patch_size" not in cfg:
                hint = ""
                if "mm_vision_encoder" in cfg or "vision_encoder" in cfg:
                    hint = " (a PixelRefer checkpoint config: read the vision tower folder, see load_dims())"
                raise KeyError("no vision fields (patch_size) in config" + hint)
        return cls(
            hidden=int(cfg["hidden_size"]),
            layers=int(cfg["num_hidden_layers"]),
            heads=int(cfg["num_attention_heads"]),  # informational: the MAC count does not depend on it
            intermediate=int(cfg["intermediate_size"]),
            patch_size=int(cfg["patch_size"]),
            channels=int(cfg.get("num_channels", 3)),
        )


@dataclass(frozen=True)
class ModelDims:
    """An LLM plus its vision tower."""

    llm: LLMDims
    vision: VisionDims


_VL3_SIGLIP_NAVIT = VisionDims(hidden=1152, layers=27, heads=16, intermediate=4304, patch_size=14)

#: Released PixelRefer / PixelRefer-Lite dimensions (see the module docstring for sources).
RELEASED_DIMS: dict[str, ModelDims] = {
    "2B": ModelDims(
        llm=LLMDims(hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960, vocab_size=151936),
        vision=_VL3_SIGLIP_NAVIT,
    ),
    "7B": ModelDims(
        llm=LLMDims(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vocab_size=152064),
        vision=_VL3_SIGLIP_NAVIT,
    ),
}


def released_dims(name: str) -> ModelDims:
    """Dims of a released size: ``"2B"``, ``"7B"`` or a checkpoint id such as
    ``"Alibaba-DAMO-Academy/PixelRefer-Lite-7B"`` (Lite and full share the LLM and tower)."""
    key = name.rsplit("/", 1)[-1].upper().rsplit("-", 1)[-1]
    if key not in RELEASED_DIMS:
        raise KeyError(f"unknown released size {name!r}; known: {sorted(RELEASED_DIMS)}")
    return RELEASED_DIMS[key]


def load_dims(checkpoint_dir: str | Path) -> ModelDims:
    """Dims of a checkpoint folder in the released layout.

    Reads ``config.json``; the vision fields come from a nested ``vision_encoder_config`` /
    ``vision_config`` when present, else from the tower folder that ``mm_vision_encoder``
    (or ``vision_encoder``) names, relative to the checkpoint (as upstream resolves it).
    """
    root = Path(checkpoint_dir)
    cfg = json.loads((root / "config.json").read_text())
    llm = LLMDims.from_hf_config(cfg)
    if any(isinstance(cfg.get(k), Mapping) for k in ("vision_encoder_config", "vision_config")):
        return ModelDims(llm=llm, vision=VisionDims.from_hf_config(cfg))
    for key in ("mm_vision_encoder", "vision_encoder"):
        sub = cfg.get(key)
        if isinstance(sub, str) and (root / sub / "config.json").is_file():
            vcfg = json.loads((root / sub / "config.json").read_text())
            return ModelDims(llm=llm, vision=VisionDims.from_hf_config(vcfg))
    raise FileNotFoundError(f"{root}: no vision config (nested, or a tower folder named by mm_vision_encoder)")


def macs_to_flops(macs: int) -> int:
    """Hardware FLOPs (and FlopCounterMode's count): 2 per multiply-add."""
    return 2 * macs


# --------------------------------------------------------------------------------------
# LLM
# --------------------------------------------------------------------------------------


def llm_layer_macs(llm: LLMDims, n_tokens: int) -> int:
    """One decoder layer's prefill MACs: the paper's ``2nd^2 + 2nd d_kv + 2n^2 d + 3ndm``.

    Written with ``d_q = heads * head_dim`` in place of d where the Q width is meant; for
    Qwen2.5 ``d_q == hidden`` and this is the paper's expression verbatim.
    """
    _non_negative("n_tokens", n_tokens)
    n, d, m = n_tokens, llm.hidden, llm.intermediate
    proj_q_o = 2 * n * d * llm.d_q
    proj_k_v = 2 * n * d * llm.d_kv
    attention = 2 * n * n * llm.d_q
    mlp = 3 * n * d * m
    return proj_q_o + proj_k_v + attention + mlp


def llm_macs(llm: LLMDims, n_tokens: int, *, lm_head_tokens: int = 0) -> int:
    """Prefill MACs of the whole decoder stack over ``n_tokens`` (the paper's count × layers).

    ``lm_head_tokens``: positions whose logits are computed (0 = excluded, as in the paper).
    """
    _non_negative("lm_head_tokens", lm_head_tokens)
    total = llm.layers * llm_layer_macs(llm, n_tokens)
    if lm_head_tokens:
        if llm.vocab_size is None:
            raise ValueError("lm_head_tokens > 0 needs LLMDims.vocab_size")
        total += lm_head_tokens * llm.hidden * llm.vocab_size
    return total


def llm_decode_macs(llm: LLMDims, prompt_tokens: int, new_tokens: int, *, include_lm_head: bool = True) -> int:
    """MACs of generating ``new_tokens`` after a prefill of ``prompt_tokens`` (KV cache).

    Step i feeds one token at position ``prompt_tokens + i``; it attends to
    ``prompt_tokens + i + 1`` cached keys. Why it matters: for Lite the prompt is tiny, so
    decoding a short caption costs as much as the prefill that the paper reports.
    """
    _non_negative("prompt_tokens", prompt_tokens)
    _non_negative("new_tokens", new_tokens)
    d = llm.hidden
    per_token_linear = 2 * d * llm.d_q + 2 * d * llm.d_kv + 3 * d * llm.intermediate
    # sum over steps of (keys attended) = sum_{i=0}^{k-1} (p + i + 1)
    keys = new_tokens * (prompt_tokens + 1) + new_tokens * (new_tokens - 1) // 2
    total = llm.layers * (new_tokens * per_token_linear + 2 * keys * llm.d_q)
    if include_lm_head and new_tokens:
        if llm.vocab_size is None:
            raise ValueError("include_lm_head needs LLMDims.vocab_size")
        total += new_tokens * d * llm.vocab_size
    return total


def tokens_for_llm_macs(llm: LLMDims, macs: float) -> float:
    """Inverse of :func:`llm_macs` (no lm_head): the token count n whose prefill costs ``macs``.

    Used by the bench to say which LLM sequence length a published figure implies.
    """
    if macs < 0:
        raise ValueError("macs must be >= 0")
    per_layer = macs / llm.layers
    a = 2 * llm.hidden * llm.d_q + 2 * llm.hidden * llm.d_kv + 3 * llm.hidden * llm.intermediate
    b = 2 * llm.d_q
    return (-a + math.sqrt(a * a + 4 * b * per_layer)) / (2 * b)


# --------------------------------------------------------------------------------------
# Connectors: OCI (Lite), feat_linear (both), mm_projector (full)
# --------------------------------------------------------------------------------------


def cross_attention_macs(embed_dim: int, n_query: int, n_kv: int) -> int:
    """MACs of one ``nn.MultiheadAttention(embed_dim, heads)`` call with distinct K/V input.

    Q in-projection ``n_q E^2``, K and V in-projections ``2 n_kv E^2``, scores and weighted
    sum ``2 n_q n_kv E`` (independent of the head count), out-projection ``n_q E^2``.
    """
    _positive("embed_dim", embed_dim)
    _non_negative("n_query", n_query)
    _non_negative("n_kv", n_kv)
    e = embed_dim
    return 2 * n_query * e * e + 2 * n_kv * e * e + 2 * n_query * n_kv * e


def feat_linear_macs(vision_hidden: int, llm_hidden: int, tokens: int) -> int:
    """``feat_linear``: Linear(vision_hidden, llm_hidden), GELU, Linear(llm_hidden, llm_hidden)."""
    _non_negative("tokens", tokens)
    return tokens * (vision_hidden * llm_hidden + llm_hidden * llm_hidden)


def projector_macs(vision_hidden: int, llm_hidden: int, tokens: int) -> int:
    """``mm_projector`` (mlp2x_gelu) over global vision tokens: same shape as feat_linear."""
    return feat_linear_macs(vision_hidden, llm_hidden, tokens)


def oci_macs(
    vision_hidden: int,
    num_masks: int,
    *,
    query_tokens: int = LITE_TOKENS_PER_MASK,
    local_cells: int = LITE_LOCAL_CELLS,
    global_cells: int = LITE_GLOBAL_CELLS,
) -> int:
    """Object-Centric Infusion MACs: per mask, 32 queries attend to the local crop then the frame.

    K/V are projected per mask, as upstream batches them (M, cells, C) even when two masks
    share a frame. LayerNorms and residual adds are elementwise and not counted.
    """
    _non_negative("num_masks", num_masks)
    per_mask = cross_attention_macs(vision_hidden, query_tokens, local_cells) + cross_attention_macs(
        vision_hidden, query_tokens, global_cells
    )
    return num_masks * per_mask


# --------------------------------------------------------------------------------------
# Vision encoder (reported separately; outside the paper's formula)
# --------------------------------------------------------------------------------------


def vision_encoder_macs(vision: VisionDims, patches_per_image: Sequence[int]) -> int:
    """VL3-SigLIP-NaViT MACs over a packed batch; attention is block-diagonal per image.

    Patch embedding (Conv2d, ``C p^2 E`` per patch) + per layer ``4 n E^2`` (q, k, v, out),
    ``2 sum(n_i^2) E`` (attention inside each image) and ``2 n E F`` (fc1, fc2).
    The final 2x2 merge (bilinear) and the LayerNorms are elementwise and not counted.
    """
    sizes = [int(x) for x in patches_per_image]
    for s in sizes:
        _non_negative("patches", s)
    n = sum(sizes)
    sq = sum(s * s for s in sizes)
    e, f = vision.hidden, vision.intermediate
    embed = n * vision.channels * vision.patch_size**2 * e
    per_layer = 4 * n * e * e + 2 * sq * e + 2 * n * e * f
    return embed + vision.layers * per_layer


# --------------------------------------------------------------------------------------
# Frameworks
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlopsBreakdown:
    """MACs (paper convention) of one request's prefill, split by where they are spent.

    ``llm`` is the paper's quantity. ``connector`` is OCI + feat_linear (Lite) or
    mm_projector + feat_linear (full). The vision encoder is computed separately
    (:func:`lite_vision_macs`, :func:`full_vision_macs`) because its input size depends on
    image resolution, not on anything the LLM sees.
    """

    framework: str
    llm_tokens: int
    llm: int
    connector: int

    @property
    def total(self) -> int:
        """LLM + connector MACs: what the framework costs on top of the vision encoder."""
        return self.llm + self.connector


def lite_macs(
    dims: ModelDims,
    *,
    num_masks: int,
    text_tokens: int,
    lm_head_tokens: int = 0,
    local_cells: int = LITE_LOCAL_CELLS,
    global_cells: int = LITE_GLOBAL_CELLS,
) -> FlopsBreakdown:
    """PixelRefer-Lite (Object-Only) prefill: object tokens + text in the LLM, plus OCI.

    ``num_masks``: one per (object, frame with a mask); each gives exactly 32 LLM tokens.
    ``text_tokens``: everything else in the prompt (chat template, question, brackets,
    ``Time t:`` markers).
    """
    _non_negative("num_masks", num_masks)
    _non_negative("text_tokens", text_tokens)
    obj = LITE_TOKENS_PER_MASK * num_masks
    n = obj + text_tokens
    connector = oci_macs(
        dims.vision.hidden, num_masks, local_cells=local_cells, global_cells=global_cells
    ) + feat_linear_macs(dims.vision.hidden, dims.llm.hidden, obj)
    return FlopsBreakdown("lite", n, llm_macs(dims.llm, n, lm_head_tokens=lm_head_tokens), connector)


def full_macs(
    dims: ModelDims,
    *,
    vision_tokens: int,
    num_masks: int,
    text_tokens: int,
    tokens_per_mask: int | Sequence[int] = LITE_TOKENS_PER_MASK,
    lm_head_tokens: int = 0,
) -> FlopsBreakdown:
    """Full PixelRefer (Vision-Object) prefill: global vision tokens + object tokens + text.

    ``vision_tokens``: global tokens that reach the LLM (after the 2x2 merge and, for video,
    the frame-difference compression). ``tokens_per_mask``: ``min(32, valid cells)`` per
    mask (full does not pad); an int applies to every mask.
    """
    _non_negative("vision_tokens", vision_tokens)
    _non_negative("num_masks", num_masks)
    _non_negative("text_tokens", text_tokens)
    if isinstance(tokens_per_mask, int):
        per = [tokens_per_mask] * num_masks
    else:
        per = [int(t) for t in tokens_per_mask]
        if len(per) != num_masks:
            raise ValueError(f"tokens_per_mask has {len(per)} entries for {num_masks} masks")
    for t in per:
        if not 0 <= t <= LITE_TOKENS_PER_MASK:
            raise ValueError(f"tokens per mask must be in [0, 32], got {t}")
    obj = sum(per)
    n = vision_tokens + obj + text_tokens
    connector = projector_macs(dims.vision.hidden, dims.llm.hidden, vision_tokens) + feat_linear_macs(
        dims.vision.hidden, dims.llm.hidden, obj
    )
    return FlopsBreakdown("full", n, llm_macs(dims.llm, n, lm_head_tokens=lm_head_tokens), connector)


def lite_vision_macs(vision: VisionDims, crop_patches: Sequence[int]) -> int:
    """Lite's vision encoder work: per mask, its scaled crop + the 224x224 crop + the 336x336 frame.

    Counts upstream's behaviour, which encodes the 224 crop and the 336 frame once per mask
    (duplicated per mask); caching per frame would save that for objects sharing a frame.
    """
    images: list[int] = []
    for c in crop_patches:
        images += [int(c), LITE_LOCAL_CELLS, LITE_GLOBAL_CELLS]
    return vision_encoder_macs(vision, images)


def full_vision_macs(vision: VisionDims, frame_patches: Sequence[int], crop_patches: Sequence[int]) -> int:
    """Full's vision encoder work: every frame at its own resolution + one crop per mask.

    ``frame_patches``: 14x14 patches per frame *before* the 2x2 merge, i.e. 4x the frame's
    LLM tokens (upstream's ``image_downsampling`` defaults to ``spatial_merge_size`` = 2 for
    images and video frames alike; object crops use merge size 1).
    """
    return vision_encoder_macs(vision, list(frame_patches)) + vision_encoder_macs(vision, list(crop_patches))
