"""Native PixelRefer (Vision-Object) and PixelRefer-Lite (Object-Only) on transformers' building blocks.

Modules (state-dict prefixes of the released checkpoints in brackets; ``released_to_internal`` maps them):

* ``vision``: ``transformers.VideoLlama3VisionModel`` [``model.vision_encoder.vision_encoder.``], the
  same network as upstream's VL3-SigLIP-NaViT tower. Every image of a call (object crops, Lite's 336
  frames and 224 local crops, full's video frames) goes through it in one packed call; merge size 1
  everywhere except full's video frames (``spatial_merge_size``), whose 2x2 mean is the tower's own
  ``pixel_unshuffle`` (upstream's ``spatial_downsampling``).
* ``projector``: ``VideoLlama3Projector`` [``model.mm_projector.``] (``mlp2x_gelu``), full only at run time;
  Lite keeps the weights (they are in its checkpoint) and never calls it.
* ``region_encoder``: :class:`RegionEncoder` [``model.region_encoder.``], upstream's ``MaskExtractor``.
* ``llm``: ``transformers.Qwen2ForCausalLM`` [``model.layers.``, ``model.embed_tokens``, ``model.norm``, ``lm_head``].

Object tokens (SAOT), per mask: tower features of the crop (gh, gw, C) + ``pos_linear`` of a position
grid built from the crop box; then, when smart_resize changed the crop's size, bilinear resize of the
features to the mask grid; the cells where the grid mask is > 0 in row-major order; k-means to
``mask_num`` tokens when more remain. Lite zero-pads to ``mask_num`` and applies Object-Centric
Infusion (OCI) over all masks of a sequence; full keeps ``min(mask_num, cells)`` tokens and runs the
pooling in float32 (upstream casts to the mask's dtype). Both end in ``feat_linear``.

Quirks reproduced because the released weights were trained with them:

* **L2** the position grid gets the (top, left, bottom, right) box read as (x0, y0, x1, y1): channel 0
  runs along the width as ``(j/gw*(bottom-top)+top)/(W-1)`` and channel 1 along the height as
  ``(i/gh*(right-left)+left)/(H-1)`` (values may exceed 1 on non-square frames).
* **L3** (a bug, off by default): upstream caches Lite's 224x224 local crop per frame, so a second
  object on a frame attends to the *first* object's crop. ``upstream_local_crop=True`` reproduces it
  (needed for the parity fixtures); by default each mask uses its own crop.
* k-means: upstream draws ``torch.randperm`` from the global RNG. We draw from a fresh
  ``torch.Generator().manual_seed(kmeans_seed)`` per *sequence*, one ``randperm(N)`` per mask with
  ``N > mask_num`` in mask order, which reproduces upstream's draws after ``torch.manual_seed`` and makes
  every sequence independent of what else is in the batch. Distances are ``sum((t - c)**2)`` (quirk L7:
  the expanded form loses precision; on CPU evaluated in row blocks, bit-identically, see
  :func:`squared_distances`); the loop stops when ``allclose(old, new, atol=1e-6)`` and then
  returns the *old* centroids; an empty cluster keeps its centroid; Lite runs 3 iterations, full 5.
* Lite on CUDA in bf16 runs the region encoder under bf16 autocast, as upstream's
  ``torch.autocast("cuda")`` does (on CPU that autocast is inactive, quirk L6).

The other quirks of the parity README and how they are handled:

* L1 (``<video>``/``<image>`` crash Lite): Lite drops the tags (``processing_pixelrefer.lite_user_content``).
* L4 (mask resized straight to the patch grid, fringe cells count): reproduced in ``processing_pixelrefer``.
* L5 (Lite forces bf16 casts; an fp32 Lite model crashes upstream): we run in the model's dtype; fp32 equals
  upstream with those casts made no-ops (``reference_fp32``), bf16 equals the faithful run.
* L6 (autocast only on CUDA): see the bf16-autocast point above.
* L9 (upstream's eager/sdpa tower attention is broken): transformers' tower works with sdpa, eager and
  flash_attention_2 alike.
* L10 (upstream's own chat template), L11 (greedy decoding, stop at eos, with the checkpoint's
  ``generation_config.json``): ``chat_prompt``, :meth:`generate`, ``models.generation``.

Full's frame-difference compression (upstream arch 270-290): for each merged token, the mean absolute
difference of its normalised pixels (model dtype) to the previous frame, times 255, must exceed 0.1;
frame 0 is kept whole and a frame with nothing kept keeps its first token. Dropped ``<image>`` tokens
leave the sequence, so the LLM positions are those of the compressed sequence.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Hashable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .appearance import region_appearance
from .config import PixelReferConfig
from .generation import GenerationSettings, generate_with_transformers
from .perf import PerfOptions
from .timing import PhaseTimes, maybe
from .processing_pixelrefer import EncoderImage, EncoderPlan, FrameInput, SequenceInput

# ---------------------------------------------------------------------------------------------------
# State-dict layout
# ---------------------------------------------------------------------------------------------------
_PREFIX_MAP: tuple[tuple[str, str], ...] = (
    ("model.vision_encoder.vision_encoder.", "vision."),
    ("model.mm_projector.", "projector."),
    ("model.region_encoder.", "region_encoder."),
    ("lm_head.", "llm.lm_head."),
    ("model.", "llm.model."),
)


def released_to_internal(key: str) -> str:
    """Map a released state-dict key onto this module tree (first matching prefix wins)."""
    for released, internal in _PREFIX_MAP:
        if key.startswith(released):
            return internal + key[len(released) :]
    raise KeyError(f"unexpected key outside the released layout: {key!r}")


def internal_to_released(key: str) -> str:
    """Inverse of :func:`released_to_internal` (used when saving in the released layout)."""
    for released, internal in _PREFIX_MAP:
        if key.startswith(internal):
            return released + key[len(internal) :]
    raise KeyError(f"internal key has no released name: {key!r}")


# ---------------------------------------------------------------------------------------------------
# Region encoder (upstream MaskExtractor)
# ---------------------------------------------------------------------------------------------------
def box_position_grid(grid_hw: tuple[int, int], box: Sequence[int], frame_hw: tuple[int, int]) -> torch.Tensor:
    """Upstream's ``generate_position_tensor`` with its box-order quirk L2, as a (gh, gw, 2) float32 grid.

    The arithmetic order (``arange/w``, ``*extent + offset``, ``/(size-1)``) follows upstream so the
    float32 values are bit-identical.
    """
    gh, gw = grid_hw
    frame_h, frame_w = frame_hw
    x0, y0, x1, y1 = (int(v) for v in box)  # really (top, left, bottom, right): read as upstream does
    xs = (torch.arange(gw, dtype=torch.float32) / gw).repeat(gh, 1)
    xs = (xs * (x1 - x0) + x0) / (frame_w - 1)
    ys = (torch.arange(gh, dtype=torch.float32) / gh).unsqueeze(1).repeat(1, gw)
    ys = (ys * (y1 - y0) + y0) / (frame_h - 1)
    return torch.stack([xs, ys], dim=2)


#: Elements per row block of :func:`squared_distances` on CPU (~256 KB of float32: stays in L2).
DISTANCE_BLOCK_ELEMENTS = 65536


def squared_distances(tokens: torch.Tensor, centroids: torch.Tensor, *, blocked: bool | None = None) -> torch.Tensor:
    """``((tokens[:, None] - centroids[None]) ** 2).sum(2)``, the exact form upstream's k-means uses (quirk L7).

    Why blocked: the direct expression materialises an (N, K, C) tensor three times (N = mask cells,
    K = 32, C = 1152 for the released tower: ~44 MB per mask and iteration), which on CPU is
    memory-bound. Evaluating the *same expression* on blocks of at least two rows keeps each block
    cache-resident and is several times faster on a 2-core CPU. It is bit-identical: ATen lays out each
    block's difference tensor like the whole one (it follows the strides of ``tokens``; masked cells
    arrive as a transposed view, which makes C the outer dimension, and a one-row block would lose that,
    hence the two-row minimum), and reduces each output element over the same C values in the same order
    whatever the number of outputs (``tests/models/test_referrer_perf.py`` checks both layouts).
    ``blocked=None`` blocks on CPU only: on CUDA the direct form is one kernel each and cheap, and
    CUDA's reduction order may depend on the launch shape.
    """
    if blocked is None:
        blocked = tokens.device.type == "cpu"
    n = tokens.shape[0]
    step = max(2, DISTANCE_BLOCK_ELEMENTS // max(1, centroids.shape[0] * tokens.shape[1]))
    if not blocked or n < 2 * step:
        return ((tokens.unsqueeze(1) - centroids.unsqueeze(0)) ** 2).sum(dim=2)
    bounds = list(range(0, n, step))
    if n - bounds[-1] < 2:
        bounds.pop()  # the last block must keep two rows (see above)
    bounds.append(n)
    parts = [
        ((tokens[a:b].unsqueeze(1) - centroids.unsqueeze(0)) ** 2).sum(dim=2) for a, b in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(parts, dim=0)


def cluster_means(
    tokens: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, counts: list[int]
) -> torch.Tensor:
    """``stack([tokens[labels == i].mean(0) if counts[i] else centroids[i] for i ...])`` with fewer ops, on CPU.

    Why: upstream's per-cluster boolean indexing is ~100 small ops per k-means iteration, which on CPU is
    mostly dispatch overhead. Here the rows are sorted by label once (stable, so each cluster keeps its
    rows in index order, exactly as boolean indexing gathers them), each cluster's contiguous (k, C)
    block is summed over dim 0 with the same kernel, and the sums are divided by k, which is what ATen's
    CPU ``mean`` computes (``sum(...).div_(k)``): bit-identical on CPU (tested on random inputs).
    """
    order = torch.sort(labels, stable=True).indices
    grouped = tokens.index_select(0, order)
    parts = grouped.split(counts)
    sums = torch.stack([part.sum(dim=0) if n else centroids[i] for i, (part, n) in enumerate(zip(parts, counts))])
    filled = [i for i, n in enumerate(counts) if n]
    if filled:
        index = torch.tensor(filled, dtype=torch.long, device=tokens.device)
        divisor = torch.tensor([float(counts[i]) for i in filled], dtype=sums.dtype, device=tokens.device)
        sums[index] = sums[index] / divisor.unsqueeze(1)
    return sums


def kmeans_centroids(
    tokens: torch.Tensor,
    num_clusters: int,
    iterations: int,
    generator: torch.Generator,
    *,
    fast: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream's ``kmeans_fast`` with an explicit generator; returns (centroids, initial indices).

    Written out rather than taken from a library because its exact semantics are part of the trained
    model: random-permutation init, squared distances summed per token (not the expanded form), first
    index on ties, empty clusters keep their centroid, and an early stop that returns the centroids
    *before* the converged update. Cluster means use ``tokens[labels == i].mean(0)`` like upstream so
    the float rounding is identical. ``fast`` (default: on CPU) computes the same numbers with blocked
    distances (:func:`squared_distances`) and sorted-segment means (:func:`cluster_means`), both
    bit-identical on CPU; on CUDA the direct expressions are used.
    """
    if fast is None:
        fast = tokens.device.type == "cpu"
    n = tokens.shape[0]
    init = torch.randperm(n, generator=generator)[:num_clusters]
    if fast:
        with single_thread():
            return _kmeans_loop(tokens, tokens[init], num_clusters, iterations, fast=True), init
    return _kmeans_loop(tokens, tokens[init.to(tokens.device)], num_clusters, iterations, fast=False), init


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run the enclosed CPU ops on one intra-op thread, restoring the previous count afterwards.

    Why: k-means is hundreds of small ops per mask (a (32, 1152) ``allclose``, blocks of 32K elements);
    an OpenMP parallel region costs more than such an op, and on a shared or oversubscribed CPU much more
    (measured on this project's 2-vCPU CI machine: an elementwise op on 400K floats takes 0.3 ms on one
    thread and 1-4 ms on two). The ops used here reduce each output element on one thread either way,
    so the result does not depend on the thread count. ``torch.set_num_threads`` is process-wide: the
    model is driven by one thread per process (Ray actor, CLI), which is the only supported use.
    """
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _kmeans_loop(
    tokens: torch.Tensor, centroids: torch.Tensor, num_clusters: int, iterations: int, *, fast: bool
) -> torch.Tensor:
    """The Lloyd iterations of :func:`kmeans_centroids` (see there for the exact semantics)."""
    for _ in range(iterations):
        distances = squared_distances(tokens, centroids, blocked=fast)
        labels = distances.argmin(dim=1)
        counts = torch.bincount(labels, minlength=num_clusters).tolist()
        if fast:
            new_centroids = cluster_means(tokens, labels, centroids, counts)
        else:
            new_centroids = torch.stack(
                [tokens[labels == i].mean(dim=0) if counts[i] > 0 else centroids[i] for i in range(num_clusters)]
            )
        if torch.allclose(centroids, new_centroids, atol=1e-6):
            break
        centroids = new_centroids
    return centroids


class RegionEncoder(nn.Module):
    """Upstream's ``MaskExtractor``: SAOT pooling (+ Lite's OCI) and ``feat_linear``.

    ``mask_embedding`` exists only because Lite's checkpoints contain it (upstream never calls it);
    keeping it lets loading stay strict.
    """

    def __init__(self, vision_hidden: int, llm_hidden: int, *, lite: bool, num_heads: int = 8) -> None:
        super().__init__()
        self.lite = lite
        self.feat_linear = nn.Sequential(
            nn.Linear(vision_hidden, llm_hidden), nn.GELU(), nn.Linear(llm_hidden, llm_hidden)
        )
        self.pos_linear = nn.Linear(2, vision_hidden)
        if lite:
            self.mask_embedding = nn.Conv2d(1, vision_hidden, kernel_size=1)
            self.fusion_attention_local = nn.MultiheadAttention(vision_hidden, num_heads, batch_first=True)
            self.fusion_attention_global = nn.MultiheadAttention(vision_hidden, num_heads, batch_first=True)
            self.ln_local = nn.LayerNorm(vision_hidden)
            self.ln_global = nn.LayerNorm(vision_hidden)

    def add_position(self, feat: torch.Tensor, box: Sequence[int], frame_hw: tuple[int, int]) -> torch.Tensor:
        """``feat + pos_linear(grid)`` for features (gh, gw, C) of a crop with ``box`` (quirk L2)."""
        grid = box_position_grid((feat.shape[0], feat.shape[1]), box, frame_hw).to(device=feat.device, dtype=feat.dtype)
        return feat + self.pos_linear(grid)

    def masked_tokens(self, feat: torch.Tensor, mask_grid: torch.Tensor) -> torch.Tensor:
        """Tokens (N, C) of the grid cells inside the mask, row-major (upstream ``MaskPooling``).

        Features are resized bilinearly to the mask grid when their grid differs (smart_resize shrank
        the crop). Full computes in float32 and keeps cells where ``feat * mask`` is nonzero anywhere.
        """
        x = feat.permute(2, 0, 1).unsqueeze(0)  # 1, C, gh, gw
        if not self.lite:
            x = x.float()
        if tuple(x.shape[-2:]) != tuple(mask_grid.shape):
            x = F.interpolate(x, size=tuple(mask_grid.shape), mode="bilinear", align_corners=False)
        mask_grid = mask_grid.to(x.device)
        if self.lite:
            valid = mask_grid > 0
            return x[0][:, valid].transpose(0, 1)
        masked = x * (mask_grid > 0).to(x.dtype)
        valid = (masked != 0).any(dim=1)[0]
        return masked[0][:, valid].transpose(0, 1)

    def pool(
        self,
        tokens: torch.Tensor,
        num_tokens: int,
        iterations: int,
        generator: torch.Generator,
        *,
        fast: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """k-means to ``num_tokens`` when more cells remain; Lite zero-pads to ``num_tokens``."""
        init = None
        if tokens.shape[0] > num_tokens:
            tokens, init = kmeans_centroids(tokens, num_tokens, iterations, generator, fast=fast)
        if self.lite and tokens.shape[0] < num_tokens:
            tokens = F.pad(tokens, (0, 0, 0, num_tokens - tokens.shape[0]))
        return tokens, init

    def infuse(self, queries: torch.Tensor, local: torch.Tensor, global_: torch.Tensor) -> torch.Tensor:
        """Lite's OCI: ``q + MHA(LN_local q, F_local)`` then ``+ MHA(LN_global q, F_global)`` (K/V raw)."""
        queries = queries + self.fusion_attention_local(self.ln_local(queries), local, local)[0]
        return queries + self.fusion_attention_global(self.ln_global(queries), global_, global_)[0]


# ---------------------------------------------------------------------------------------------------
# Outputs of one call
# ---------------------------------------------------------------------------------------------------
@dataclass
class SequenceEmbeds:
    """What the LLM receives for one sequence, plus the object tokens that were written into it."""

    input_ids: torch.Tensor  # (L',) after compression; <image> positions keep the image token id
    inputs_embeds: torch.Tensor  # (L', D)
    region_tokens: torch.Tensor  # (R, D)
    #: Per mask of the sequence (prompt order), the mean tower feature inside it (float32, CPU):
    #: `models.appearance.region_appearance`, what re-identification compares.
    appearance: torch.Tensor | None = None


@dataclass
class Trace:
    """Intermediate tensors of one call, for tests and the parity tool (filled only when given)."""

    vision: dict[Hashable, torch.Tensor] = field(default_factory=dict)
    position_features: list[list[torch.Tensor]] = field(default_factory=list)
    kmeans_inputs: list[list[torch.Tensor]] = field(default_factory=list)
    kmeans_init: list[list[torch.Tensor | None]] = field(default_factory=list)
    pooled: list[list[torch.Tensor]] = field(default_factory=list)
    frame_tokens: torch.Tensor | None = None
    frame_keep: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------
class PixelReferModel(nn.Module):
    """PixelRefer / PixelRefer-Lite inference model (see the module docstring for the data flow)."""

    def __init__(self, config: PixelReferConfig, *, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        from transformers import Qwen2ForCausalLM
        from transformers.models.video_llama_3.configuration_video_llama_3 import VideoLlama3Config
        from transformers.models.video_llama_3.modeling_video_llama_3 import (
            VideoLlama3Projector,
            VideoLlama3VisionModel,
        )

        self.config = config
        vision_cfg = config.vision.to_hf(attn_implementation)
        text_cfg = config.to_qwen2(attn_implementation)
        self.vision = VideoLlama3VisionModel(vision_cfg)
        self.projector = VideoLlama3Projector(
            VideoLlama3Config(vision_config=vision_cfg.to_dict(), text_config=text_cfg.to_dict())
        )
        self.region_encoder = RegionEncoder(config.vision.hidden_size, config.hidden_size, lite=config.is_lite)
        self.llm = Qwen2ForCausalLM(text_cfg)
        self.region_token_id = config.region_token_index
        self.image_token_id = config.image_token_index
        self.max_patches_per_call = 1 << 17

    # -- helpers -----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.llm.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.lm_head.weight.dtype

    def released_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict under the released key names (every parameter; no buffers are persistent)."""
        return {internal_to_released(k): v for k, v in self.state_dict().items()}

    # -- vision ------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: Sequence[EncoderImage]) -> list[torch.Tensor]:
        """Run the tower on many images in packed calls; returns (gh/m, gw/m, C) per image.

        Packing (block-diagonal attention over ``cu_seqlens``) is what the tower is built for; calls are
        split only beyond ``max_patches_per_call`` patches to bound memory.
        """
        out: list[torch.Tensor] = []
        start = 0
        while start < len(images):
            end, patches = start, 0
            while end < len(images) and (
                end == start or patches + len(images[end].patches) <= self.max_patches_per_call
            ):
                patches += len(images[end].patches)
                end += 1
            chunk = images[start:end]
            pixels = torch.from_numpy(np.concatenate([im.patches for im in chunk])).to(self.device)
            grid = torch.tensor(
                [[1, im.grid_hw[0], im.grid_hw[1]] for im in chunk], dtype=torch.long, device=self.device
            )
            merges = torch.tensor([im.merge for im in chunk], dtype=torch.long, device=self.device)
            feats = self.vision(pixel_values=pixels, grid_thw=grid, merge_sizes=merges).last_hidden_state
            sizes = [(im.grid_hw[0] // im.merge) * (im.grid_hw[1] // im.merge) for im in chunk]
            for im, feat in zip(chunk, feats.split(sizes)):
                out.append(feat.view(im.grid_hw[0] // im.merge, im.grid_hw[1] // im.merge, -1))
            start = end
        return out

    def frame_keep_mask(self, frames: FrameInput) -> torch.Tensor:
        """Full's frame-difference compressor over merged tokens; (T, tokens_per_frame) bool."""
        t = len(frames.images)
        n = frames.tokens_per_frame
        if not frames.video or t == 1:
            return torch.ones(t, n, dtype=torch.bool, device=self.device)
        pixels = torch.stack([torch.from_numpy(im.patches) for im in frames.images]).to(self.device, self.dtype)
        pixels = pixels.view(t, n, -1)
        diff = (pixels[1:] - pixels[:-1]).abs().mean(dim=-1) * 255
        threshold = 0.1
        keep = torch.cat([torch.ones(1, n, dtype=torch.bool, device=self.device), diff > threshold], dim=0)
        empty = keep.sum(dim=1) < 1
        keep[empty, :1] = True
        return keep

    # -- object tokens -----------------------------------------------------------------------------
    def _region_dtype_context(self):
        on_cuda_bf16 = self.device.type == "cuda" and self.dtype == torch.bfloat16 and self.config.is_lite
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=on_cuda_bf16)

    @torch.no_grad()
    def object_tokens(
        self,
        sequences: Sequence[SequenceInput],
        crop_feats: Sequence[Sequence[torch.Tensor]],
        local_feats: Sequence[Sequence[torch.Tensor]] | None,
        global_feats: Sequence[Sequence[torch.Tensor]] | None,
        *,
        kmeans_seed: int,
        trace: Trace | None = None,
        region_keys: Sequence[Sequence[tuple[Hashable, Hashable | None, Hashable | None]]] | None = None,
        perf: PerfOptions | None = None,
    ) -> list[torch.Tensor]:
        """Region tokens (R_i, D) per sequence, each sequence with its own k-means generator.

        With ``region_keys`` (the encoder plan's image keys of every mask) and ``perf.share_object_tokens``,
        work that two sequences share is done once (see :mod:`models.perf`): a mask's pooled tokens are a
        function of the masks before it in its sequence (they decide the generator's draws), so the key
        of a pooled result is the tuple of crop keys up to and including it, and it is stored with the
        generator state after it. OCI rows are keyed by (that tuple, local key, global key).
        """
        perf = perf or PerfOptions()
        enc = self.region_encoder
        n_tok = self.config.mask_num
        lite = self.config.is_lite
        share = perf.share_object_tokens and region_keys is not None
        fast_kmeans = None if perf.fast_kmeans else False
        # A unit is one mask's pooled tokens that reach OCI / feat_linear; sequences point at units.
        unit_pooled: list[torch.Tensor] = []
        unit_context: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        unit_of_key: dict[Hashable, int] = {}
        seq_units: list[list[int]] = []
        # (crop keys up to a mask) -> (pooled, k-means init, position features, cells, generator state after it)
        pooled_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]]
        pooled_cache = {}
        with self._region_dtype_context():
            for s, seq in enumerate(sequences):
                generator = torch.Generator().manual_seed(kmeans_seed)
                chain: tuple = ()
                units: list[int] = []
                pooled_seq: list[torch.Tensor] = []
                if trace is not None:
                    trace.position_features.append([])
                    trace.kmeans_inputs.append([])
                    trace.kmeans_init.append([])
                for j, (region, feat) in enumerate(zip(seq.regions, crop_feats[s])):
                    keys = region_keys[s][j] if share else None
                    hit = None
                    if keys is not None:
                        chain = chain + (keys[0],)
                        hit = pooled_cache.get(chain)
                    if hit is not None:
                        out, init, x, tokens, state = hit
                        generator.set_state(state)
                    else:
                        x = enc.add_position(feat, region.crop.box, region.crop.frame_hw)
                        grid = torch.from_numpy(np.ascontiguousarray(region.crop.mask_grid))
                        if lite:
                            grid = grid.to(x.dtype)
                        tokens = enc.masked_tokens(x, grid)
                        out, init = enc.pool(tokens, n_tok, self.config.kmeans_iterations, generator, fast=fast_kmeans)
                        if keys is not None:
                            pooled_cache[chain] = (out, init, x, tokens, generator.get_state())
                    if not lite and out.shape[0] != region.crop.num_tokens:
                        raise RuntimeError(
                            f"mask pooled to {out.shape[0]} tokens but the prompt holds "
                            f"{region.crop.num_tokens} <REGION> tokens"
                        )
                    unit_key: Hashable = (chain, keys[1], keys[2]) if keys is not None else ("seq", s, j)
                    if unit_key not in unit_of_key:
                        unit_of_key[unit_key] = len(unit_pooled)
                        unit_pooled.append(out)
                        context = (local_feats[s][j], global_feats[s][j]) if lite else None  # type: ignore[index]
                        unit_context.append(context)
                    units.append(unit_of_key[unit_key])
                    pooled_seq.append(out)
                    if trace is not None:
                        trace.position_features[-1].append(x)
                        trace.kmeans_inputs[-1].append(tokens)
                        trace.kmeans_init[-1].append(init)
                seq_units.append(units)
                if trace is not None:
                    trace.pooled.append(pooled_seq)

            if lite:
                fused = self._infuse_units(unit_pooled, unit_context)  # type: ignore[arg-type]
            else:
                fused = [p.to(self.dtype) for p in unit_pooled]
            lengths = [f.shape[0] for f in fused]
            projected = (
                enc.feat_linear(torch.cat(fused, dim=0)).to(self.dtype)
                if sum(lengths)
                else torch.zeros(0, self.config.hidden_size, device=self.device, dtype=self.dtype)
            )
        per_unit = projected.split(lengths) if lengths else []
        empty = torch.zeros(0, self.config.hidden_size, device=self.device, dtype=self.dtype)
        return [torch.cat([per_unit[u] for u in units], dim=0) if units else empty for units in seq_units]

    def _infuse_units(
        self, pooled: Sequence[torch.Tensor], context: Sequence[tuple[torch.Tensor, torch.Tensor]]
    ) -> list[torch.Tensor]:
        """OCI for every unit, batched over units whose context grids have equal sizes (one MHA call each)."""
        rows = [
            (q, loc.reshape(-1, loc.shape[-1]), glob.reshape(-1, glob.shape[-1]))
            for q, (loc, glob) in zip(pooled, context)
        ]
        results: list[torch.Tensor | None] = [None] * len(rows)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (_, loc_i, glob_i) in enumerate(rows):
            groups.setdefault((loc_i.shape[0], glob_i.shape[0]), []).append(i)
        enc = self.region_encoder
        for idx in groups.values():
            q = torch.stack([rows[i][0] for i in idx])
            local = torch.stack([rows[i][1] for i in idx])
            g = torch.stack([rows[i][2] for i in idx])
            fused = enc.infuse(q, local, g)
            for j, i in enumerate(idx):
                results[i] = fused[j]
        return results  # type: ignore[return-value]

    # -- LLM inputs --------------------------------------------------------------------------------
    @torch.no_grad()
    def build_embeds(
        self,
        sequences: Sequence[SequenceInput],
        plan: EncoderPlan,
        *,
        frames: FrameInput | None,
        kmeans_seed: int,
        trace: Trace | None = None,
        perf: PerfOptions | None = None,
        times: PhaseTimes | None = None,
    ) -> list[SequenceEmbeds]:
        """Encode every distinct image of the call once (one packed tower call), make the object tokens of
        every sequence, project full's frames once, and write everything into each sequence's embeddings."""
        keys = list(plan.images)
        all_images = [plan.images[k] for k in keys]
        if frames is not None:
            all_images += frames.images
        with maybe(times, "vision_tower"):
            feats = self.encode_images(all_images)
        by_key = dict(zip(keys, feats[: len(keys)]))
        if trace is not None:
            trace.vision.update(by_key)
        crop_feats = [[by_key[k[0]] for k in seq_keys] for seq_keys in plan.region_keys]
        local_feats = global_feats = None
        if self.config.is_lite:
            local_feats = [[by_key[k[1]] for k in seq_keys] for seq_keys in plan.region_keys]
            global_feats = [[by_key[k[2]] for k in seq_keys] for seq_keys in plan.region_keys]
        with maybe(times, "region_tokens"):
            region_tokens = self.object_tokens(
                sequences,
                crop_feats,
                local_feats,
                global_feats,
                kmeans_seed=kmeans_seed,
                trace=trace,
                region_keys=plan.region_keys,
                perf=perf,
            )

        with maybe(times, "appearance"):
            appearance = region_appearance(sequences, crop_feats, plan.region_keys, self.config.vision.hidden_size)

        frame_tokens = keep = None
        if frames is not None:
            merged = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats[len(keys) :]], dim=0)
            frame_tokens = self.projector(merged.to(self.dtype))
            keep = self.frame_keep_mask(frames)
            if trace is not None:
                trace.frame_tokens = frame_tokens
                trace.frame_keep = keep
            frame_tokens = frame_tokens[keep.flatten()]

        embed = self.llm.get_input_embeddings()
        out: list[SequenceEmbeds] = []
        for seq, tokens, looks in zip(sequences, region_tokens, appearance):
            ids = torch.tensor(seq.input_ids, dtype=torch.long, device=self.device)
            if frames is not None:
                assert keep is not None and frame_tokens is not None
                image_pos = ids == self.image_token_id
                if int(image_pos.sum()) != keep.numel():
                    raise RuntimeError(
                        f"sequence holds {int(image_pos.sum())} <image> tokens, frames give {keep.numel()}"
                    )
                keep_ids = torch.ones_like(ids, dtype=torch.bool)
                keep_ids[image_pos] = keep.flatten()
                ids = ids[keep_ids]
            region_pos = ids == self.region_token_id
            if int(region_pos.sum()) != tokens.shape[0]:
                raise RuntimeError(
                    f"sequence holds {int(region_pos.sum())} <REGION> tokens, the region encoder gave {tokens.shape[0]}"
                )
            lookup = ids.clone()
            image_pos = ids == self.image_token_id if frames is not None else None
            if image_pos is not None:
                lookup[image_pos] = 0  # upstream zeroes <image> ids before the lookup (arch 377)
            emb = embed(lookup).clone()
            emb[region_pos] = tokens.to(emb.dtype)
            if image_pos is not None:
                emb[image_pos] = frame_tokens.to(emb.dtype)
            out.append(SequenceEmbeds(ids, emb, tokens, looks))
        return out

    # -- LLM ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, embeds: SequenceEmbeds) -> torch.Tensor:
        """One forward pass over one sequence: (1, L', V) logits."""
        return self.llm(inputs_embeds=embeds.inputs_embeds.unsqueeze(0)).logits

    @torch.no_grad()
    def generate(
        self,
        embeds: Sequence[SequenceEmbeds],
        *,
        max_new_tokens: int,
        settings: GenerationSettings,
        batch_size: int = 16,
        perf: PerfOptions | None = None,
        token_budget: int | None = None,
        times: PhaseTimes | None = None,
        limits: Sequence[int | None] | None = None,
    ) -> list[list[int]]:
        """Decode many sequences in left-padded batches; ids stop at (and include) the first eos.

        ``limits``: a cap on new tokens per sequence (None entries: ``max_new_tokens``).

        ``settings`` are the checkpoint's (``models.generation``: greedy with its repetition penalty and eos
        ids unless sampling was asked for). By default through :func:`models.decoding.greedy_decode`
        (shared-prefix KV cache, no per-step framework overhead; see :mod:`models.perf`);
        ``perf.native_decode=False`` uses ``Qwen2ForCausalLM.generate`` instead, the reference the native
        loop is tested against. A sequence decodes the same alone or in a batch.
        """
        perf = perf or PerfOptions()
        if not embeds:
            return []
        limits = list(limits) if limits is not None else [None] * len(embeds)
        if perf.native_decode:
            from .decoding import DecodeInput, greedy_decode

            return greedy_decode(
                self.llm,
                [DecodeInput(e.input_ids, e.inputs_embeds, n) for e, n in zip(embeds, limits)],
                max_new_tokens=max_new_tokens,
                settings=settings,
                batch_size=batch_size,
                share_prefix=perf.share_prefix,
                min_shared_prefix=perf.min_shared_prefix,
                token_budget=token_budget,
                times=times,
            )
        with maybe(times, "llm_decode"):
            outs = generate_with_transformers(
                self.llm,
                [e.inputs_embeds for e in embeds],
                max_new_tokens=max_new_tokens,
                settings=settings,
                batch_size=batch_size,
            )
        # Greedy rows are independent, so cutting a row at its cap equals stopping it there.
        return [ids[:n] if n else ids for ids, n in zip(outs, limits)]
