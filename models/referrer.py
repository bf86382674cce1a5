"""Public entry point: :class:`Referrer` answers prompts about tracked objects of one video.

``Referrer.generate`` takes the sampled frames of one video, their timestamps, the objects (per-frame
binary masks, possibly on a subset of the frames) and many :class:`Request` s, and decodes all of them
in one batched pass:

* every distinct encoder image is computed once (each frame's 336 image for Lite, the frames for full,
  each (object, frame) crop) in one packed vision-tower call, and shared by every request using it;
* each request gets its own k-means generator (``kmeans_seed``), so its output does not depend on the
  other requests of the batch; the LLM decodes left-padded batches of ``batch_size`` greedily with the
  checkpoint's ``generation_config.json`` (repetition penalty, eos ids; ``models.generation``), and a
  request gives the same tokens alone or batched. Sampling only when asked
  (``generation=checkpoint.generation.sampling(seed=...)``).

Prompts hold one ``<region>`` per referenced object, in the order of ``Request.object_indices``.
Lite expands an object to ``[Time t:<REGION>*32,...]`` (one entry per frame with a mask; ``[<REGION>*32]``
for a single image). Full, as upstream, takes one ``<region>`` per *mask*: an object with masks on n
frames becomes n groups ``[<REGION>*k]`` joined by ``,`` at its placeholder, and the frames go first
as ``Time t s:<image>...`` (or wherever the prompt has its ``<video>`` tag).

A single frame is treated as an image (Lite: no times; full: image path with merge 1, no compression).

Empty masks: a frame where an object's mask is empty is a frame where the object is not visible, so it
is skipped. A request referring to an object with no non-empty mask at all does not fail the call: its
:class:`Generation` has ``text == ""``, ``num_tokens == 0`` and ``error`` saying which object is empty;
the other requests run normally. Everything else that is wrong with the input (no frames, non-RGB
frames, frames of different sizes, mask shape != frame, masks on frames that do not exist, a
``<region>`` count that differs from ``object_indices``, unknown object indices) raises
:class:`InputError` naming the problem before any compute.

Inference optimisations (shared-prefix KV cache, object tokens computed once per object, a native greedy
loop, fast k-means on CPU) are on by default and can be switched off with ``perf=PerfOptions(...)``;
each keeps greedy outputs identical (``models.perf``).

Quirk L3 (upstream caches Lite's 224 local crop per frame, so the 2nd object on a frame attends to the
1st object's crop) is fixed by default; ``upstream_local_crop=True`` reproduces it. Quirk L2 (box order
swap in the position embedding) is always reproduced; see ``modeling_pixelrefer``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from .config import REGION_PLACEHOLDER, ConfigError
from .generation import GenerationSettings
from .loading import LoadedCheckpoint, load_checkpoint
from .perf import PerfOptions
from .processing_pixelrefer import (
    EncoderPlan,
    InputError,
    PromptBuilder,
    RegionInput,
    SequenceInput,
    count_regions,
    make_crop,
    plan_encoder_inputs,
    prepare_frames,
)
from .referrer_inputs import check_frames, check_objects, check_requests, check_timestamps
from .timing import PhaseTimes
from .tiny import tiny_checkpoint

__all__ = [
    "DEFAULT_CAPTION_PROMPT", "Generation", "InputError", "PerfOptions", "Prepared", "Referrer", "Request", "pick_device",
]

logger = logging.getLogger(__name__)

DEFAULT_CAPTION_PROMPT = (
    "There is one object in the video: <region>.\nPlease describe in detail the marked object in the video."
)
TINY_NAMES = {"tiny": None, "tiny-lite": "lite", "tiny-full": "full"}


@dataclass
class Request:
    """A prompt with one ``<region>`` per referenced object, in ``object_indices`` order."""

    prompt: str
    object_indices: list[int]
    #: A cap on this answer's tokens below the call's `max_new_tokens` (e.g. a category's few words).
    max_new_tokens: int | None = None


@dataclass
class Generation:
    """Decoded answer; ``error`` is set (and ``text`` empty) when the request could not run.

    ``num_tokens`` counts generated tokens without the final eos; ``token_ids`` are the raw ids (with it).
    """

    text: str
    num_tokens: int
    error: str | None = None
    token_ids: list[int] = field(default_factory=list)


@dataclass
class Prepared:
    """One clip's requests after :meth:`Referrer.prepare`: answers already known (empty objects, crops
    that cannot be encoded) in ``results``, and the LLM inputs of the others with their slots."""

    results: list[Generation | None]
    embeds: list = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    #: Each slot's request cap on new tokens (`Request.max_new_tokens`).
    limits: list[int | None] = field(default_factory=list)
    #: Per object index with a non-empty mask in some request: its appearance vector (`appearance_of`).
    appearance: dict[int, np.ndarray] = field(default_factory=dict)


@dataclass
class _Staged:
    """A clip between its checks and the vision tower."""

    prepared: Prepared
    sequences: list[SequenceInput] = field(default_factory=list)
    plan: EncoderPlan | None = None
    frame_input: object = None


def _merged_plans(plans: Sequence[EncoderPlan]) -> EncoderPlan:
    """One encoder plan for several clips: each clip's image keys are put under its own number, so
    images that look alike by key (frame 0 of two clips) stay apart."""
    merged = EncoderPlan()
    for c, plan in enumerate(plans):
        merged.images.update({(c, key): image for key, image in plan.images.items()})
        merged.region_keys += [[tuple(None if k is None else (c, k) for k in keys) for keys in seq]
                               for seq in plan.region_keys]
    return merged


def pick_device(device: str | None, dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype, str]:
    """CUDA + bf16 + flash_attention_2 when available (flash-attn is optional), else CPU + fp32 + sdpa."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    attn = "sdpa"
    if dev.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        try:
            import flash_attn  # noqa: F401

            attn = "flash_attention_2"
        except ImportError:
            pass
    return dev, dtype, attn


class Referrer:
    """PixelRefer-Lite (``mode="lite"``) or PixelRefer (``mode="full"``) ready to answer requests."""

    def __init__(
        self,
        checkpoint: LoadedCheckpoint,
        name: str,
        *,
        upstream_local_crop: bool = False,
        kmeans_seed: int = 1234,
        perf: PerfOptions | None = None,
        generation: GenerationSettings | None = None,
    ) -> None:
        self.perf = perf or PerfOptions()
        self.generation = generation or checkpoint.generation
        self.checkpoint = checkpoint
        self.model = checkpoint.model
        self.tokenizer = checkpoint.tokenizer
        self.config = checkpoint.config
        self.mode: str = checkpoint.config.mode
        self.name: str = name
        self.upstream_local_crop = upstream_local_crop
        self.kmeans_seed = kmeans_seed
        #: Seconds per phase (crops, vision_tower, region_tokens, llm_prefill, llm_decode) since the
        #: caller last took them: `actors.referrer` turns them into per-row columns.
        self.times = PhaseTimes(self.model.device)
        self._prompts = PromptBuilder(
            self.config.mode, self.tokenizer, self.config.region_token_index, self.config.image_token_index
        )

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        mode: str | None = None,
        device: str | None = None,
        dtype: "torch.dtype | None" = None,
        upstream_local_crop: bool = False,
        kmeans_seed: int = 1234,
        perf: PerfOptions | None = None,
        attn_implementation: str | None = None,
        sample_seed: int | None = None,
    ) -> "Referrer":
        """Load a checkpoint folder, a hub id, or the built-in ``tiny`` (``tiny-lite``/``tiny-full``).

        ``tiny`` is created deterministically in ``$PIXELREFER_CACHE`` (default
        ``~/.cache/pixelrefer-pipeline``) and loaded through the same loader as a real folder. For a
        real checkpoint ``mode`` is optional and must match its config. ``perf`` selects the inference
        optimisations (all on by default, see :mod:`models.perf`); ``attn_implementation`` overrides the
        device's default (``eager`` lets ``FlopCounterMode`` see the attention matmuls on CPU).
        Decoding is greedy with the checkpoint's ``generation_config.json``; ``sample_seed`` switches to
        upstream's sampling settings, each request drawing from its own generator seeded with it.
        """
        if mode is not None and mode not in ("lite", "full"):
            raise ValueError(f"mode must be 'lite' or 'full', got {mode!r}")
        dev, dt, attn = pick_device(device, dtype)
        key = str(name_or_path)
        if key in TINY_NAMES:
            tiny_mode = TINY_NAMES[key] or mode or "lite"
            if mode is not None and mode != tiny_mode:
                raise ValueError(f"{key!r} is a {tiny_mode} model but mode={mode!r} was requested")
            path, name = tiny_checkpoint(tiny_mode), f"tiny-{tiny_mode}"
        else:
            path, name = key, (key if _is_hub_id(key) else Path(key).expanduser().resolve().name)
        ckpt = load_checkpoint(path, device=dev, dtype=dt, attn_implementation=attn_implementation or attn)
        if mode is not None and ckpt.config.mode != mode:
            raise ConfigError(
                f"{name_or_path} is a {ckpt.config.mode} checkpoint ({ckpt.config.model_type}) "
                f"but mode={mode!r} was requested"
            )
        generation = ckpt.generation.sampling(seed=sample_seed) if sample_seed is not None else None
        return cls(
            ckpt,
            name,
            upstream_local_crop=upstream_local_crop,
            kmeans_seed=kmeans_seed,
            perf=perf,
            generation=generation,
        )

    # -- public API --------------------------------------------------------------------------------
    def generate(
        self,
        frames: Sequence[np.ndarray],
        timestamps: Sequence[float],
        objects: Sequence[Mapping[int, np.ndarray]],
        requests: Sequence[Request],
        *,
        max_new_tokens: int = 64,
        batch_size: int = 16,
        token_budget: int | None = None,
    ) -> list[Generation]:
        """Answer every request about the objects of one video (see the module docstring)."""
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        prepared = self.prepare(frames, timestamps, objects, requests)
        return self.decode([prepared], max_new_tokens=max_new_tokens, batch_size=batch_size,
                           token_budget=token_budget)[0]

    def prepare(
        self,
        frames: Sequence[np.ndarray],
        timestamps: Sequence[float],
        objects: Sequence[Mapping[int, np.ndarray]],
        requests: Sequence[Request],
    ) -> Prepared:
        """Validate one video's (or clip's) requests and encode them into LLM inputs.

        Everything that depends on the frames happens here (crops, the vision tower, object tokens),
        so a caller can prepare many clips, let their frames go, and `decode` all their requests in
        shared batches. Raises :class:`InputError` for input that is wrong as a whole.
        """
        (result,) = self.prepare_many([(frames, timestamps, objects, requests)])
        if isinstance(result, Exception):
            raise result
        return result

    def prepare_many(
        self, items: Sequence[tuple[Sequence[np.ndarray], Sequence[float], Sequence[Mapping[int, np.ndarray]],
                                    Sequence[Request]]]
    ) -> list[Prepared | InputError]:
        """`prepare` for many clips (frames, timestamps, objects, requests), with one vision-tower call
        for all of them in Lite: a clip's few crops alone leave the tower's batch mostly empty. A clip
        whose input is wrong gets its :class:`InputError` in its place; the others are prepared.

        Full PixelRefer clips are encoded one by one: each carries its own frames into its prompts.
        """
        staged: list[_Staged | InputError] = []
        for item in items:
            try:
                staged.append(self._stage(*item))
            except InputError as exc:
                staged.append(exc)
        ready = [s for s in staged if isinstance(s, _Staged) and s.sequences]
        groups = [ready] if self.mode == "lite" and ready else [[s] for s in ready]
        for group in groups:
            plan = _merged_plans([s.plan for s in group]) if len(group) > 1 else group[0].plan
            embeds = self.model.build_embeds(
                [seq for s in group for seq in s.sequences], plan, frames=group[0].frame_input,
                kmeans_seed=self.kmeans_seed, perf=self.perf, times=self.times,
            )
            at = 0
            for s in group:
                s.prepared.embeds = embeds[at : at + len(s.sequences)]
                s.prepared.appearance = appearance_of(s.sequences, s.prepared.embeds)
                at += len(s.sequences)
        return [s.prepared if isinstance(s, _Staged) else s for s in staged]

    def _stage(
        self,
        frames: Sequence[np.ndarray],
        timestamps: Sequence[float],
        objects: Sequence[Mapping[int, np.ndarray]],
        requests: Sequence[Request],
    ) -> _Staged:
        """Checks, crops, prompts and the encoder plan of one clip: everything before the tower."""
        frames = check_frames(frames)
        times = check_timestamps(timestamps, len(frames))
        masks = check_objects(objects, frames)
        check_requests(requests, len(masks))
        staged = _Staged(Prepared([None] * len(requests), [], []))
        if not requests:
            return staged
        video = len(frames) > 1
        region_of: dict[tuple[int, int], RegionInput] = {}  # one crop per (object, frame) for the whole call

        def regions_of_object(k: int) -> list[RegionInput]:
            out = []
            for f in sorted(masks[k]):
                if (k, f) not in region_of:
                    crop = make_crop(self.mode, frames[f], masks[k][f], self.config.mask_num)  # type: ignore[arg-type]
                    region_of[(k, f)] = RegionInput(crop, f, (k, f))
                out.append(region_of[(k, f)])
            return out

        sequences: list[SequenceInput] = []
        index: list[int] = []
        results = staged.prepared.results
        with self.times("crops"):
            if self.mode == "full":
                staged.frame_input = prepare_frames(
                    frames, times, self.config.image_processor, self.config.spatial_merge_size, video=video
                )
            for i, req in enumerate(requests):
                empty = [k for k in req.object_indices if not masks[k]]
                if empty:
                    results[i] = Generation("", 0, "; ".join(f"object {k} has no non-empty mask" for k in empty))
                    continue
                per_object = [regions_of_object(k) for k in req.object_indices]
                if self.mode == "lite":
                    seq = self._prompts.lite(req.prompt, per_object, times if video else None)
                else:
                    assert staged.frame_input is not None
                    flat = [r for regions in per_object for r in regions]
                    seq = self._prompts.full(req.prompt, flat, staged.frame_input, groups=[len(r) for r in per_object])
                sequences.append(seq)
                index.append(i)
            if not sequences:
                return staged
            plan, failed = self._plan(sequences, frames)
            for j, msg in failed.items():
                results[index[j]] = Generation("", 0, msg)
            ok = [j for j in range(len(sequences)) if j not in failed]
            if ok and failed:
                plan, _ = self._plan([sequences[j] for j in ok], frames)
        staged.sequences = [sequences[j] for j in ok]
        staged.plan = plan
        staged.prepared.slots = [index[j] for j in ok]
        staged.prepared.limits = [requests[index[j]].max_new_tokens for j in ok]
        return staged

    def decode(
        self,
        prepared: Sequence[Prepared],
        *,
        max_new_tokens: int = 64,
        batch_size: int = 16,
        token_budget: int | None = None,
    ) -> list[list[Generation]]:
        """Decode the requests of many prepared clips in shared batches, one list of answers per clip.

        Batches hold at most ``batch_size`` prompts and, with ``token_budget``, at most that many
        padded prompt tokens, whichever clip they come from: many clips with one or two objects each
        fill a batch that one of them alone could not. A request decodes the same alone or batched
        with any others (greedy, per-row penalty and k-means seeds; tested).
        """
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        embeds = [e for p in prepared for e in p.embeds]
        limits = [n for p in prepared for n in (p.limits or [None] * len(p.embeds))]
        gens = self._run(embeds, max_new_tokens, batch_size, token_budget, limits) if embeds else []
        out, at = [], 0
        for p in prepared:
            results = list(p.results)
            for slot in p.slots:
                results[slot] = gens[at]
                at += 1
            out.append([r if r is not None else Generation("", 0, "not run") for r in results])
        return out

    def caption(
        self,
        frames: Sequence[np.ndarray],
        timestamps: Sequence[float],
        objects: Sequence[Mapping[int, np.ndarray]],
        prompt: str = DEFAULT_CAPTION_PROMPT,
        **kw,
    ) -> list[str]:
        """One caption per object, each asked with its own single-``<region>`` prompt, batched.

        An object without any non-empty mask gets ``""`` (``generate`` reports why).
        """
        if count_regions(prompt) != 1:
            raise InputError(f"a caption prompt needs exactly one {REGION_PLACEHOLDER}, got {count_regions(prompt)}")
        gens = self.generate(frames, timestamps, objects, [Request(prompt, [k]) for k in range(len(objects))], **kw)
        return [g.text for g in gens]

    # -- internals ---------------------------------------------------------------------------------
    def _plan(self, sequences: list[SequenceInput], frames: list[np.ndarray]) -> tuple[EncoderPlan, dict[int, str]]:
        """Encoder plan of all sequences; a sequence whose crops cannot be encoded (e.g. a crop with an
        aspect ratio above 200 on an extreme frame) is reported instead of failing the others."""

        def plan_of(seqs: list[SequenceInput]) -> EncoderPlan:
            return plan_encoder_inputs(
                self.mode,
                seqs,
                frames,
                self.config.image_processor,  # type: ignore[arg-type]
                upstream_local_crop=self.upstream_local_crop,
            )

        try:
            return plan_of(sequences), {}
        except InputError:
            failed = {}
            for j, seq in enumerate(sequences):
                try:
                    plan_of([seq])
                except InputError as exc:
                    failed[j] = f"cannot encode this request's object crops: {exc}"
            if not failed:
                raise
            return EncoderPlan(), failed

    def _run(self, embeds: list, max_new_tokens: int, batch_size: int, token_budget: int | None,
             limits: list[int | None] | None = None) -> list[Generation]:
        outs = self.model.generate(
            embeds, max_new_tokens=max_new_tokens, settings=self.generation, batch_size=batch_size, perf=self.perf,
            token_budget=token_budget, times=self.times, limits=limits,
        )
        stops = set(self.generation.eos_token_ids)
        gens = []
        for ids in outs:
            n = len(ids) - (1 if ids and ids[-1] in stops else 0)
            gens.append(Generation(self.tokenizer.decode(ids, skip_special_tokens=True).strip(), n, None, ids))
        return gens


def appearance_of(sequences: Sequence[SequenceInput], embeds: Sequence) -> dict[int, np.ndarray]:
    """Object index -> the L2-normalised mean of its masks' appearance (float32), over the frames shown.

    Regions are keyed (object index, frame) by `_stage`, so a mask seen by several requests counts
    once. Each frame weighs the same, whatever the object's size there, so that a frame where it is
    large does not outvote the others.
    """
    per_frame: dict[tuple[int, int], torch.Tensor] = {}
    for seq, emb in zip(sequences, embeds):
        looks = getattr(emb, "appearance", None)
        if looks is None:
            continue
        for region, vec in zip(seq.regions, looks):
            per_frame.setdefault(region.crop_key, vec)  # type: ignore[arg-type]
    by_object: dict[int, list[torch.Tensor]] = {}
    for (k, _), vec in sorted(per_frame.items(), key=lambda kv: kv[0]):
        by_object.setdefault(int(k), []).append(vec)
    out = {}
    for k, vecs in by_object.items():
        mean = torch.stack(vecs).float().mean(dim=0)
        norm = float(mean.norm())
        if norm > 0:
            out[k] = (mean / norm).numpy().astype(np.float32)
    return out


def _is_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not Path(name).expanduser().exists() and not name.startswith((".", "/", "~"))
