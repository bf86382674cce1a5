"""Decoding as upstream's ``generate(do_sample=False)`` with the checkpoint's generation_config.json:
repetition penalty and every eos id, checked against transformers' own ``generate`` on the same Qwen2
with the same input embeddings; sampling only when asked, and batch-independent."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from models.config import ConfigError
from models.decoding import DecodeInput, greedy_decode
from models.generation import (
    GenerationSettings,
    generate_with_transformers,
    warp_for_sampling,
)

STEPS = 12


@pytest.fixture(scope="module")
def llm(tiny_lite):
    return tiny_lite.model.llm


def prompts(llm, lengths=(7, 11, 5, 11)) -> list[DecodeInput]:
    """Random prompt embeddings at the scale of token embeddings; the two of length 11 share a prefix."""
    g = torch.Generator().manual_seed(3)
    dim = llm.config.hidden_size
    items = [
        DecodeInput(torch.randint(0, 200, (n,), generator=g), 0.1 * torch.randn(n, dim, generator=g)) for n in lengths
    ]
    a, b = items[1], items[3]
    items[3] = DecodeInput(torch.cat([a.ids[:8], b.ids[8:]]), torch.cat([a.embeds[:8], b.embeds[8:]]))
    return items


def hf_ids(llm, item: DecodeInput, **config) -> list[int]:
    """transformers' greedy generate from embeddings alone, as upstream calls it (no input_ids)."""
    cfg = GenerationConfig(max_new_tokens=STEPS, do_sample=False, num_beams=1, pad_token_id=0, **config)
    mask = torch.ones(1, len(item.ids), dtype=torch.long)
    out = llm.generate(inputs_embeds=item.embeds[None], attention_mask=mask, generation_config=cfg)
    return out[0].tolist()


def test_repetition_penalty_equals_transformers_generate(llm):
    items = prompts(llm)
    settings = GenerationSettings(repetition_penalty=1.3)
    ours = greedy_decode(llm, items, max_new_tokens=STEPS, settings=settings, batch_size=1, share_prefix=False)
    with pytest.warns(UserWarning, match="penalty only to newly generated tokens, not to the prompt"):
        theirs = [hf_ids(llm, item, repetition_penalty=1.3) for item in items]  # upstream's semantics too
    assert ours == theirs
    plain = greedy_decode(llm, items, max_new_tokens=STEPS, settings=GenerationSettings())
    assert plain == [hf_ids(llm, item) for item in items]
    assert plain != ours, "the penalty must change something on these prompts, or this test proves nothing"
    assert any(len(set(row)) < len(row) for row in plain)


def test_penalty_batched_equals_one_by_one(llm):
    """The penalty looks at a row's own tokens only: batches, the shared prefix and rows leaving early
    (two eos ids, one of them emitted mid-answer) change nothing."""
    items = prompts(llm)
    free = greedy_decode(llm, items, max_new_tokens=STEPS, settings=GenerationSettings(repetition_penalty=1.3))
    mid = free[0][4]
    settings = GenerationSettings(eos_token_ids=(mid, 10_000), repetition_penalty=1.3)
    alone = [greedy_decode(llm, [x], max_new_tokens=STEPS, settings=settings)[0] for x in items]
    for batch_size in (2, 4):
        batched = greedy_decode(
            llm, items, max_new_tokens=STEPS, settings=settings, batch_size=batch_size, min_shared_prefix=1
        )
        assert batched == alone
    assert alone[0][-1] == mid and len(alone[0]) == 5
    reference = generate_with_transformers(
        llm, [x.embeds for x in items], max_new_tokens=STEPS, settings=settings, batch_size=4
    )
    assert reference == alone


def test_every_eos_id_of_the_list_stops(llm):
    items = prompts(llm)[:2]
    free = greedy_decode(llm, items, max_new_tokens=STEPS)
    first, second = free[0][3], free[1][2]
    assert first not in free[0][:3] and second not in free[1][:2] and first != second
    settings = GenerationSettings(eos_token_ids=(first, second))
    assert greedy_decode(llm, items, max_new_tokens=STEPS, settings=settings) == [free[0][:4], free[1][:3]]
    assert hf_ids(llm, items[0], eos_token_id=[first, second]) == free[0][:4]


# -- generation_config.json ---------------------------------------------------------------------------
def write(tmp_path, content: dict):
    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps(content))
    return path


def test_qwen_instruct_file_is_greedy_with_its_penalty_and_eos_ids(tmp_path):
    path = write(
        tmp_path,
        {
            "do_sample": True,
            "eos_token_id": [151645, 151643],
            "pad_token_id": 151643,
            "repetition_penalty": 1.1,
            "temperature": 0.7,
            "top_k": 20,
            "top_p": 0.8,
        },
    )
    s = GenerationSettings.from_file(path, tokenizer_eos=151645, tokenizer_pad=151643)
    assert s.do_sample is False  # upstream passes do_sample=False over the file's True
    assert s.eos_token_ids == (151645, 151643) and s.pad_token_id == 151643 and s.repetition_penalty == 1.1
    sampled = s.sampling(seed=5)
    got = (sampled.do_sample, sampled.temperature, sampled.top_p, sampled.top_k, sampled.seed)
    assert got == (True, 0.2, 0.9, 20, 5)


def test_fixture_style_file_and_missing_file(tmp_path):
    s = GenerationSettings.from_file(write(tmp_path, {"eos_token_id": 295}), tokenizer_eos=295, tokenizer_pad=293)
    assert s == GenerationSettings(eos_token_ids=(295,), pad_token_id=293)
    absent = GenerationSettings.from_file(tmp_path / "nothing.json", tokenizer_eos=7, tokenizer_pad=None)
    assert absent.eos_token_ids == (7,) and absent.pad_token_id == 7 and absent.repetition_penalty == 1.0


def test_tokenizer_eos_joins_the_list(tmp_path):
    """Upstream also stops on the tokenizer's eos keyword, whatever the file lists."""
    s = GenerationSettings.from_file(write(tmp_path, {"eos_token_id": [5]}), tokenizer_eos=9)
    assert s.eos_token_ids == (5, 9)


@pytest.mark.parametrize("field,value", [("num_beams", 4), ("no_repeat_ngram_size", 3), ("min_new_tokens", 2)])
def test_settings_that_would_change_greedy_ids_are_refused(tmp_path, field, value):
    with pytest.raises(ConfigError, match=field):
        GenerationSettings.from_file(write(tmp_path, {field: value}))


def test_neutral_values_are_accepted(tmp_path):
    neutral = {"num_beams": 1, "no_repeat_ngram_size": 0, "bad_words_ids": None}
    s = GenerationSettings.from_file(write(tmp_path, neutral))
    assert s.repetition_penalty == 1.0


# -- sampling, only when asked ------------------------------------------------------------------------
def test_warpers_match_transformers():
    logits = torch.randn(3, 300, generator=torch.Generator().manual_seed(0))
    s = GenerationSettings().sampling(temperature=0.7, top_k=20, top_p=0.8)
    theirs = TopPLogitsWarper(0.8)(None, TopKLogitsWarper(20)(None, logits / 0.7))
    ours = warp_for_sampling(logits, s)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    assert torch.equal(ours[~torch.isinf(ours)], theirs[~torch.isinf(theirs)])
    assert int((~torch.isinf(ours)).sum(dim=1).max()) <= 20


def test_sampling_is_seeded_per_sequence(llm):
    items = prompts(llm)
    s = GenerationSettings().sampling(seed=11, temperature=1.0, top_p=1.0, top_k=0)
    batched = greedy_decode(llm, items, max_new_tokens=STEPS, settings=s, batch_size=4, min_shared_prefix=1)
    alone = [greedy_decode(llm, [x], max_new_tokens=STEPS, settings=s)[0] for x in items]
    assert batched == alone
    assert greedy_decode(llm, items, max_new_tokens=STEPS, settings=s) == batched
    other = greedy_decode(llm, items, max_new_tokens=STEPS, settings=dataclasses.replace(s, seed=12))
    assert other != batched
    assert batched != greedy_decode(llm, items, max_new_tokens=STEPS, settings=GenerationSettings())


def test_transformers_path_refuses_sampling(llm):
    with pytest.raises(ValueError, match="native decoder"):
        generate_with_transformers(
            llm, [prompts(llm)[0].embeds], max_new_tokens=2, settings=GenerationSettings().sampling(), batch_size=1
        )


def test_referrer_decodes_with_the_checkpoint_settings(tiny_lite):
    """The Referrer takes its settings from the checkpoint (greedy, deterministic) unless given others."""
    from models.referrer import Referrer, Request
    from pixelrefer_helpers import make_video

    assert tiny_lite.generation == tiny_lite.checkpoint.generation and not tiny_lite.generation.do_sample
    frames, times, objects = make_video(num_frames=2, num_objects=1)
    req = [Request("Describe <region>.", [0])]
    first = tiny_lite.generate(frames, times, objects, req, max_new_tokens=8)[0].token_ids
    assert tiny_lite.generate(frames, times, objects, req, max_new_tokens=8)[0].token_ids == first
    strong = dataclasses.replace(tiny_lite.generation, repetition_penalty=5.0)
    penalised = Referrer(tiny_lite.checkpoint, "t", generation=strong)
    again = penalised.generate(frames, times, objects, req, max_new_tokens=8)[0].token_ids
    assert len(set(again)) == len(again)


def test_referrer_samples_only_when_asked(tiny_lite):
    from models.referrer import Referrer, Request
    from pixelrefer_helpers import make_video

    sampler = Referrer.from_pretrained("tiny", mode="lite", sample_seed=3)
    assert sampler.generation == tiny_lite.generation.sampling(seed=3)
    frames, times, objects = make_video(num_frames=2, num_objects=2)
    reqs = [Request("Describe <region>.", [0]), Request("Describe <region>.", [1])]
    together = [g.token_ids for g in sampler.generate(frames, times, objects, reqs, max_new_tokens=8)]
    alone = [sampler.generate(frames, times, objects, [r], max_new_tokens=8)[0].token_ids for r in reqs]
    assert together == alone
    greedy = [g.token_ids for g in tiny_lite.generate(frames, times, objects, reqs, max_new_tokens=8)]
    assert together != greedy
