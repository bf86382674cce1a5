"""Greedy (or, when asked, sampled) decoding of many prompts with a shared-prefix KV cache, written for
this model's workload.

Why not ``GenerationMixin.generate``: for PixelRefer a call is many short greedy decodes whose prompts
often start the same way, and the framework's generality costs on both counts. It runs logits
processors, stopping criteria and cache bookkeeping on every step (on a small model on CPU that is most
of a decode step), keeps decoding padding for rows that already reached eos, and cannot start a batch
from a KV cache computed once for a prefix that all rows share. This loop does only what greedy
decoding needs:

* **Shared prefix.** The longest common prefix of all sequences of the call (same ids and bit-identical
  embedding rows, so the cached keys/values are exactly those each sequence would compute) is prefilled
  once with batch 1; each batch extends it with the longer prefix its own rows share, when that is worth
  a call (``min_shared_prefix``). For full PixelRefer the chat header plus every frame token is shared by
  all requests of a video, so the video is prefilled once per call instead of once per request.
* **Layout.** A batch is ``[shared prefix][left padding][suffix]``: the attention mask hides the padding,
  and positions are explicit (prefix ``0..P-1``, then each suffix continues at ``P``), so a row sees
  the same positions and keys as when it runs alone; padding in the middle is just masked keys for
  transformers' mask builders (sdpa, eager and flash-attention alike).
* **Finished rows leave the batch** (the cache rows are dropped), so a long answer does not make the
  others pay for padding steps.
* **Logits only for the last position**, as greedy decoding needs.
* **Per-row state only.** The repetition penalty looks at a row's own generated tokens and sampling
  draws from a row's own generator (``models.generation``), so dropping or adding rows changes nothing.

Rows are independent, so results do not depend on the batch composition beyond float rounding of
different matmul shapes; ``tests/models/test_referrer_perf.py`` checks greedy ids against
``GenerationMixin.generate``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .generation import GenerationSettings, next_tokens, row_generators
from .timing import PhaseTimes, maybe

__all__ = ["DecodeInput", "common_prefix_length", "greedy_decode"]


@dataclass
class DecodeInput:
    """One prompt as the LLM sees it: token ids (for prefix matching) and input embeddings (L, D)."""

    ids: torch.Tensor
    embeds: torch.Tensor
    #: This prompt's own cap on new tokens (None: the call's): a category answer needs a few
    #: tokens while the captions beside it in the batch need dozens.
    max_new_tokens: int | None = None


def common_prefix_length(items: Sequence[DecodeInput], start: int = 0) -> int:
    """Length of the prefix shared by every item (equal ids *and* equal embedding rows).

    Capped one token short of the shortest item: the last prompt token of every row must go through the
    batched prefill to give that row's first logits. ``start`` is a prefix length already known to be
    shared (rows before it are not compared again).
    """
    if not items:
        return 0
    limit = min(int(x.ids.shape[0]) for x in items) - 1
    if limit <= start:
        return max(0, min(start, limit))
    ref = items[0]
    n = limit
    for other in items[1:]:
        if n <= start:
            break
        differ = ref.ids[start:n] != other.ids[start:n]
        differ |= (ref.embeds[start:n] != other.embeds[start:n]).any(dim=1)
        hits = differ.nonzero()
        if hits.numel():
            n = start + int(hits[0, 0])
    return n


def _cache(llm, base, batch: int):
    """A fresh ``DynamicCache`` holding ``base``'s keys/values repeated over ``batch`` rows (or empty)."""
    from transformers import DynamicCache

    if base is None:
        return DynamicCache(config=llm.config)
    data = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v, *_ in base]
    return DynamicCache(ddp_cache_data=data, config=llm.config)


def _forward(llm, embeds: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor, cache) -> torch.Tensor:
    """One decoder pass; returns the final hidden state of the last position of every row (B, D)."""
    out = llm.model(
        inputs_embeds=embeds, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
    )
    return out.last_hidden_state[:, -1]


def _prefill_prefix(llm, base, embeds: torch.Tensor, offset: int):
    """Extend ``base`` (batch 1, ``offset`` tokens, or None) with ``embeds`` (L, D) in one batch-1 pass."""
    cache = _cache(llm, base, 1)
    length = embeds.shape[0]
    positions = torch.arange(offset, offset + length, device=embeds.device).unsqueeze(0)
    mask = torch.ones(1, offset + length, dtype=torch.long, device=embeds.device)
    _forward(llm, embeds.unsqueeze(0), mask, positions, cache)
    return cache


@torch.no_grad()
def greedy_decode(
    llm,
    items: Sequence[DecodeInput],
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
    settings: GenerationSettings | None = None,
    batch_size: int = 16,
    share_prefix: bool = True,
    min_shared_prefix: int = 16,
    token_budget: int | None = None,
    times: PhaseTimes | None = None,
) -> list[list[int]]:
    """Ids per item (stopping at and including the first eos), in the order of ``items``.

    ``settings`` (eos ids, repetition penalty, sampling) default to plain greedy stopping at
    ``eos_token_id``; pass one or the other. ``llm`` is a ``Qwen2ForCausalLM`` (any transformers causal
    LM with ``.model`` and ``.lm_head``). Items are batched longest first to limit padding, at most
    ``batch_size`` rows and, with ``token_budget``, at most that many padded prompt tokens a batch
    (always at least one row): many short prompts fill a batch, a few long ones do not overflow it.
    ``times`` gets the seconds of ``llm_prefill`` and ``llm_decode``.
    """
    if settings is None:
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        settings = GenerationSettings(eos_token_ids=tuple(int(e) for e in eos))
    elif eos_token_id is not None:
        raise ValueError("pass eos ids either as eos_token_id or in settings, not both")
    if not items:
        return []
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    stops = set(settings.eos_token_ids)
    batch_size = max(1, int(batch_size))
    dtype = llm.lm_head.weight.dtype
    device = llm.lm_head.weight.device
    embed = llm.get_input_embeddings()
    order = sorted(range(len(items)), key=lambda i: -int(items[i].ids.shape[0]))
    results: list[list[int]] = [[] for _ in items]

    call_prefix, call_cache = 0, None
    if share_prefix and len(items) > 1:
        call_prefix = common_prefix_length(items)
        if call_prefix >= min_shared_prefix:
            with maybe(times, "llm_prefill"):
                call_cache = _prefill_prefix(llm, None, items[order[0]].embeds[:call_prefix].to(dtype), 0)
        else:
            call_prefix = 0

    for rows in batch_rows([int(items[i].ids.shape[0]) for i in order], order, batch_size, token_budget):
        batch = [items[i] for i in rows]
        with maybe(times, "llm_prefill"):
            cache, hidden, mask, positions, prefix = _prefill_batch(
                llm, batch, call_prefix, call_cache, share_prefix, min_shared_prefix, dtype, device)
        with maybe(times, "llm_decode"):
            limits = [min(max_new_tokens, items[i].max_new_tokens or max_new_tokens) for i in rows]
            _decode_batch(llm, embed, cache, hidden, mask, positions, rows, results, limits, settings, stops,
                          device)
    return results


def batch_rows(lengths: Sequence[int], order: Sequence[int], batch_size: int, token_budget: int | None
               ) -> list[list[int]]:
    """``order`` (longest first, with ``lengths`` in that order) cut into batches of at most
    ``batch_size`` rows whose padded size (rows x the first, longest, row) stays within ``token_budget``."""
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i, n in zip(order, lengths):
        if current and (len(current) >= batch_size or (token_budget and (len(current) + 1) * width > token_budget)):
            batches.append(current)
            current = []
        if not current:
            width = n
        current.append(i)
    if current:
        batches.append(current)
    return batches


def _prefill_batch(llm, batch: list[DecodeInput], call_prefix: int, call_cache, share_prefix: bool,
                   min_shared_prefix: int, dtype: torch.dtype, device: torch.device):
    """One batch's prompts through the LLM after the call's shared prefix: its cache and last hidden states."""
    prefix, cache_base = call_prefix, call_cache
    if share_prefix and len(batch) > 1:
        longer = common_prefix_length(batch, start=call_prefix)
        if longer - call_prefix >= min_shared_prefix:
            extra = batch[0].embeds[call_prefix:longer].to(dtype)
            cache_base, prefix = _prefill_prefix(llm, call_cache, extra, call_prefix), longer
    b = len(batch)
    lengths = [int(x.ids.shape[0]) - prefix for x in batch]
    width = max(lengths)
    dim = batch[0].embeds.shape[1]
    x = torch.zeros(b, width, dim, dtype=dtype, device=device)
    mask = torch.zeros(b, prefix + width, dtype=torch.long, device=device)
    mask[:, :prefix] = 1
    positions = torch.zeros(b, width, dtype=torch.long, device=device)
    for r, (item, n) in enumerate(zip(batch, lengths)):
        x[r, width - n :] = item.embeds[prefix:].to(dtype)
        mask[r, prefix + width - n :] = 1
        positions[r, width - n :] = torch.arange(prefix, prefix + n, device=device)
    cache = _cache(llm, cache_base, b)
    hidden = _forward(llm, x, mask, positions, cache)
    return cache, hidden, mask, positions, prefix


def _decode_batch(llm, embed, cache, hidden: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                  rows: list[int], results: list[list[int]], limits: list[int], settings: GenerationSettings,
                  stops: set[int], device: torch.device) -> None:
    """Greedy steps for one prefilled batch; each row's ids (at most its `limits` entry) are appended
    to ``results``."""
    b = len(rows)
    limit_of = dict(zip(rows, limits))
    max_new_tokens = max(limits)
    last = positions[:, -1:]
    live = list(rows)
    history = torch.zeros(b, 0, dtype=torch.long, device=device)
    generators = row_generators(b, settings)
    for step in range(max_new_tokens):
        tokens = next_tokens(llm.lm_head(hidden), history, settings, generators)
        history = torch.cat([history, tokens.unsqueeze(1)], dim=1)
        token_list = tokens.tolist()
        keep: list[int] = []
        for r, (i, t) in enumerate(zip(live, token_list)):
            results[i].append(int(t))
            if t not in stops and len(results[i]) < limit_of[i]:
                keep.append(r)
        if step == max_new_tokens - 1 or not keep:
            break
        if len(keep) < len(live):
            index = torch.tensor(keep, dtype=torch.long, device=device)
            cache.batch_select_indices(index)
            mask, last, tokens, history = mask[index], last[index], tokens[index], history[index]
            live = [live[r] for r in keep]
            if generators is not None:
                generators = [generators[r] for r in keep]
        mask = torch.cat([mask, torch.ones(len(live), 1, dtype=mask.dtype, device=device)], dim=1)
        last = last + 1
        hidden = _forward(llm, embed(tokens).unsqueeze(1), mask, last, cache)
