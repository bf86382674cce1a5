"""How answers are decoded: the checkpoint's ``generation_config.json`` as upstream's call uses it.

Upstream's ``mm_infer`` calls ``generate(do_sample=False, temperature=0.0, top_p=0.9, max_new_tokens=...,
stopping_criteria=[eos keyword], pad_token_id=tokenizer.eos_token_id)`` and passes no penalty, so what it
inherits from the checkpoint's ``generation_config.json`` is what changes greedy ids: ``repetition_penalty``
and every ``eos_token_id`` of the list (Qwen2.5-Instruct: 1.1 and ``<|im_end|>``, ``<|endoftext|>``). The
file's ``do_sample``/``temperature``/``top_p``/``top_k`` only matter when sampling; upstream never samples
by default and neither do we, so the index is deterministic.

The penalty sees a sequence's *generated* tokens only: upstream's ``generate`` receives ``inputs_embeds``
without ``input_ids`` (the multimodal prompt exists only as embeddings), so transformers starts the
penalty's token history empty. A sequence's penalty therefore depends on nothing but its own tokens, and
batched and one-by-one outputs stay identical. HF's processors run on float32 logits; so do ours.

Sampling, when asked (:meth:`GenerationSettings.sampling`), uses upstream's ``mm_infer`` sampling values
(temperature 0.2, top-p 0.9) with the file's ``top_k`` (transformers' default 50 when absent), in
transformers' order (penalty, temperature, top-k, top-p), and draws each sequence from its own generator
seeded with ``seed``, so a sequence samples the same tokens alone or in any batch.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from .config import ConfigError

GENERATION_CONFIG = "generation_config.json"
UPSTREAM_TEMPERATURE = 0.2  # mm_infer's value when do_sample=True
UPSTREAM_TOP_P = 0.9
HF_DEFAULT_TOP_K = 50
# Fields that would change greedy ids if we ignored them; a file setting them is refused, not half-honoured.
_UNSUPPORTED: dict[str, Any] = {
    "num_beams": 1,
    "no_repeat_ngram_size": 0,
    "min_length": 0,
    "min_new_tokens": None,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "sequence_bias": None,
}


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings of one checkpoint (greedy unless :meth:`sampling` was asked for)."""

    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    repetition_penalty: float = 1.0
    do_sample: bool = False
    temperature: float = UPSTREAM_TEMPERATURE
    top_k: int = HF_DEFAULT_TOP_K
    top_p: float = UPSTREAM_TOP_P
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.do_sample:
            if not self.temperature > 0:
                raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
            if not 0 < self.top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
            if self.top_k < 0:
                raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @classmethod
    def from_file(
        cls, path: Path, *, tokenizer_eos: int | None = None, tokenizer_pad: int | None = None
    ) -> "GenerationSettings":
        """Read ``generation_config.json`` (absent: no penalty, the tokenizer's eos).

        The tokenizer's eos joins the file's list because upstream also stops on the eos *keyword*.
        """
        raw: dict[str, Any] = {}
        if path.is_file():
            try:
                raw = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
        bad = {k: raw[k] for k, neutral in _UNSUPPORTED.items() if k in raw and raw[k] not in (neutral, None, [])}
        if bad:
            raise ConfigError(f"{path}: settings that would change greedy decoding are not supported: {bad}")
        eos = raw.get("eos_token_id")
        listed = eos if isinstance(eos, list) else [eos]
        ids = [int(i) for i in (*listed, tokenizer_eos) if i is not None]
        pad = raw.get("pad_token_id", tokenizer_pad)
        penalty = raw.get("repetition_penalty")
        top_k = raw.get("top_k")
        try:
            return cls(
                eos_token_ids=tuple(dict.fromkeys(ids)),
                pad_token_id=int(pad) if pad is not None else (ids[0] if ids else None),
                repetition_penalty=float(penalty) if penalty is not None else 1.0,
                top_k=int(top_k) if top_k is not None else HF_DEFAULT_TOP_K,
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc

    def sampling(
        self,
        *,
        seed: int = 0,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
    ) -> "GenerationSettings":
        """The same settings with sampling on (upstream's sampling values unless overridden)."""
        return replace(
            self,
            do_sample=True,
            seed=seed,
            temperature=self.temperature if temperature is None else temperature,
            top_p=self.top_p if top_p is None else top_p,
            top_k=self.top_k if top_k is None else top_k,
        )

    def describe(self) -> str:
        mode = (
            f"sampling (temperature {self.temperature}, top_p {self.top_p}, top_k {self.top_k}, seed {self.seed})"
            if self.do_sample
            else "greedy"
        )
        return (
            f"{mode}, repetition_penalty {self.repetition_penalty}, eos {list(self.eos_token_ids)}, "
            f"pad {self.pad_token_id}"
        )


# -- logits processing, shared by the native decoder ----------------------------------------------------
def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' ``RepetitionPenaltyLogitsProcessor``: seen tokens' logits divided (if > 0) or multiplied
    (if < 0) by ``penalty``; ``history`` is (B, T) token ids, ``logits`` (B, V) float32."""
    if penalty == 1.0 or history.shape[1] == 0:
        return logits
    seen = logits.gather(1, history)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(1, history, seen)


def warp_for_sampling(logits: torch.Tensor, settings: GenerationSettings) -> torch.Tensor:
    """Temperature, top-k, top-p (keeping at least one token), as transformers' warpers apply them."""
    logits = logits / settings.temperature
    if 0 < settings.top_k < logits.shape[-1]:
        kth = torch.topk(logits, settings.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=False, dim=-1)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - settings.top_p)
        drop[..., -1:] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def next_tokens(
    logits: torch.Tensor,
    history: torch.Tensor,
    settings: GenerationSettings,
    generators: Sequence[torch.Generator] | None,
) -> torch.Tensor:
    """The next token of every row: penalised argmax, or a draw from each row's own generator."""
    logits = apply_repetition_penalty(logits.float(), history, settings.repetition_penalty)
    if not settings.do_sample:
        return logits.argmax(dim=-1)
    assert generators is not None and len(generators) == logits.shape[0]
    probs = warp_for_sampling(logits, settings).softmax(dim=-1).cpu()
    drawn = [torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(generators)]
    return torch.cat(drawn).to(logits.device)


def row_generators(count: int, settings: GenerationSettings) -> list[torch.Generator] | None:
    """One CPU generator per row, all seeded alike, so a row's draws do not depend on its batch."""
    if not settings.do_sample:
        return None
    return [torch.Generator().manual_seed(settings.seed) for _ in range(count)]


def cut_at_eos(ids: list[int], eos_token_ids: Sequence[int]) -> list[int]:
    """``ids`` up to and including the first eos of the set."""
    stops = set(eos_token_ids)
    for i, t in enumerate(ids):
        if t in stops:
            return ids[: i + 1]
    return ids


def generate_with_transformers(
    llm,
    embeds: Sequence[torch.Tensor],
    *,
    max_new_tokens: int,
    settings: GenerationSettings,
    batch_size: int,
) -> list[list[int]]:
    """Left-padded batches through ``Qwen2ForCausalLM.generate``: the reference the native loop is tested
    against. Greedy only: transformers samples from one global generator, which would tie a sequence's
    draws to its batch.

    With a repetition penalty each sequence runs alone: transformers (5.23) skips the first *padding
    length* tokens of a row's penalty history, meant for prompt ids, but with ``inputs_embeds`` the history
    holds only generated tokens, so a left-padded row would ignore its own first answers.
    """
    from transformers import GenerationConfig

    if settings.do_sample:
        raise ValueError("sampling needs the native decoder (PerfOptions(native_decode=True))")
    eos = list(settings.eos_token_ids)
    pad = settings.pad_token_id if settings.pad_token_id is not None else (eos[0] if eos else 0)
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=eos or None,
        pad_token_id=pad,
        repetition_penalty=settings.repetition_penalty,
    )
    dtype, device = llm.lm_head.weight.dtype, llm.lm_head.weight.device
    order = sorted(range(len(embeds)), key=lambda i: -embeds[i].shape[0])
    results: list[list[int]] = [[] for _ in embeds]
    step = max(1, batch_size) if settings.repetition_penalty == 1.0 else 1
    for start in range(0, len(order), step):
        idx = order[start : start + step]
        length = max(embeds[i].shape[0] for i in idx)
        batch = torch.zeros(len(idx), length, embeds[idx[0]].shape[1], dtype=dtype, device=device)
        mask = torch.zeros(len(idx), length, dtype=torch.long, device=device)
        for row, i in enumerate(idx):
            e = embeds[i]
            batch[row, length - e.shape[0] :] = e.to(dtype)
            mask[row, length - e.shape[0] :] = 1
        with warnings.catch_warnings():  # "penalty only to newly generated tokens": what upstream gets too
            warnings.filterwarnings("ignore", message="Passing `repetition_penalty` with `inputs_embeds`")
            out = llm.generate(inputs_embeds=batch, attention_mask=mask, generation_config=gen_cfg)
        for row, i in enumerate(idx):
            results[i] = cut_at_eos(out[row].tolist(), eos)
    return results
