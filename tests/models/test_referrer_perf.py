"""Inference optimisations (models.perf): each one gives the same greedy ids as the plain path.

Bit-exact pieces (blocked k-means distances, sorted cluster means, single-thread k-means) are compared
with ``torch.equal``; the others (native decode loop, shared-prefix KV cache, shared object tokens) are
compared on greedy token ids, with every switch off and on, in both frameworks. The counting tests check
that the work is really shared (not only that the output did not change).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import models.decoding as decoding
import models.modeling_pixelrefer as modeling
from models.decoding import DecodeInput, common_prefix_length, greedy_decode
from models.modeling_pixelrefer import cluster_means, kmeans_centroids, single_thread, squared_distances
from models.perf import PerfOptions
from models.processing_pixelrefer import RegionInput, make_crop, plan_encoder_inputs
from models.referrer import DEFAULT_CAPTION_PROMPT, Referrer, Request
from pixelrefer_helpers import make_video

SWITCHES = ("native_decode", "share_prefix", "share_object_tokens", "fast_kmeans")


def _requests():
    """Captions (shared lead-in), questions about the same objects, a two-object question."""
    return [
        Request(DEFAULT_CAPTION_PROMPT, [0]),
        Request(DEFAULT_CAPTION_PROMPT, [1]),
        Request("There is one object in the video: <region>.\nWhat is it doing?", [0]),
        Request("What colour is <region>?", [1]),
        Request("<region> and <region>: which one is larger?", [1, 0]),
    ]


# -- bit-exact k-means pieces -------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [7, 64, 1152])
def test_blocked_distances_are_bit_identical(channels):
    """Both layouts: contiguous tokens, and the transposed view masked_tokens returns (which makes ATen
    reduce over an outer dimension, a different summation order that blocking must keep)."""
    g = torch.Generator().manual_seed(channels)
    for n in (33, 257, 301):
        feat = torch.randn(channels, 19, 23, generator=g) * 3
        view = feat[:, torch.rand(19, 23, generator=g) > 0.2].transpose(0, 1)[:n]
        for tokens in (view, view.contiguous()):
            centroids = tokens[torch.randperm(tokens.shape[0], generator=g)[:32]]
            direct = ((tokens.unsqueeze(1) - centroids.unsqueeze(0)) ** 2).sum(dim=2)
            assert torch.equal(squared_distances(tokens, centroids, blocked=False), direct)
            assert torch.equal(squared_distances(tokens, centroids, blocked=True), direct)


def test_cluster_means_are_bit_identical():
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        n, c = int(torch.randint(33, 700, (1,), generator=g)), (5, 64, 300)[trial % 3]
        tokens = torch.randn(c, n, generator=g).t() * float(1 + 9 * torch.rand(1, generator=g))
        if trial % 4 < 2:
            tokens = tokens.contiguous()
        skewed = (torch.rand(n, generator=g) ** 4 * 20).long()  # empty and crowded clusters
        labels = skewed if trial % 2 else torch.randint(0, 32, (n,), generator=g)
        centroids = torch.randn(32, c, generator=g)
        counts = torch.bincount(labels, minlength=32).tolist()
        ref = torch.stack([tokens[labels == i].mean(0) if counts[i] else centroids[i] for i in range(32)])
        assert torch.equal(cluster_means(tokens, labels, centroids, counts), ref)


def test_fast_kmeans_equals_upstream_form_and_restores_threads():
    g = torch.Generator().manual_seed(3)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for c in (16, 256):
            feat = torch.randn(c, 17, 23, generator=g)
            valid = torch.rand(17, 23, generator=g) > 0.3
            tokens = feat[:, valid].transpose(0, 1)  # the layout masked_tokens returns
            slow, init_slow = kmeans_centroids(tokens, 32, 5, torch.Generator().manual_seed(1), fast=False)
            fast, init_fast = kmeans_centroids(tokens, 32, 5, torch.Generator().manual_seed(1), fast=True)
            assert torch.equal(init_slow, init_fast) and torch.equal(slow, fast)
            assert torch.get_num_threads() == 2
        with single_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


# -- end to end: greedy ids with every switch off and on ------------------------------------------------
@pytest.mark.parametrize("mode", ["lite", "full"])
def test_each_optimisation_keeps_greedy_ids(mode, request):
    referrer = request.getfixturevalue(f"tiny_{mode}")
    frames, times, objects = make_video(num_frames=3, num_objects=2, skip={1: {0}})
    reqs = _requests()
    ids = {}
    variants = {"baseline": PerfOptions.baseline(), "all": PerfOptions()}
    for name in SWITCHES:
        variants[f"only_{name}"] = dataclasses.replace(PerfOptions.baseline(), **{name: True})
    variants["only_share_prefix"] = dataclasses.replace(variants["only_share_prefix"], native_decode=True)
    variants["all_small_prefix"] = PerfOptions(min_shared_prefix=1)
    for name, perf in variants.items():
        r = Referrer(referrer.checkpoint, referrer.name, perf=perf)
        for batch_size in (2, 16):
            out = r.generate(frames, times, objects, reqs, max_new_tokens=6, batch_size=batch_size)
            assert all(g.error is None for g in out)
            ids[(name, batch_size)] = [g.token_ids for g in out]
    reference = ids[("baseline", 16)]
    for key, got in ids.items():
        assert got == reference, key


@pytest.mark.parametrize("mode", ["lite", "full"])
def test_native_decode_matches_generate_with_early_eos(mode, request):
    """Rows stop at different steps (finished rows leave the native batch), with a shared prefix; eos is
    picked among tokens the model really emits so that it fires mid-answer in some rows only."""
    referrer = request.getfixturevalue(f"tiny_{mode}")
    frames, times, objects = make_video(num_frames=2, num_objects=2)
    reqs = _requests()

    def run(perf: PerfOptions, eos: int | None) -> list[list[int]]:
        stops = () if eos is None else (eos,)
        generation = dataclasses.replace(referrer.generation, eos_token_ids=stops)
        r = Referrer(referrer.checkpoint, referrer.name, perf=perf, generation=generation)
        return [g.token_ids for g in r.generate(frames, times, objects, reqs, max_new_tokens=8, batch_size=4)]

    free = run(PerfOptions(), None)
    rows_with = {t: sum(t in row[1:6] for row in free) for row in free for t in row[1:6]}
    eos = max(rows_with, key=lambda t: (0 < rows_with[t] < len(free), rows_with[t]))
    native = run(PerfOptions(min_shared_prefix=1), eos)
    assert native == run(PerfOptions.baseline(), eos)
    assert any(len(x) < 8 and x[-1] == eos for x in native) and any(len(x) == 8 for x in native)


def _region(r, frames, objects, k, f):
    return RegionInput(make_crop(r.mode, frames[f], objects[k][f].astype(np.uint8)), f, (k, f))


# -- the work is really shared -----------------------------------------------------------------------
def _count_prefill_tokens(monkeypatch) -> list[int]:
    seen: list[int] = []
    original = decoding._forward

    def counting(llm, embeds, mask, positions, cache):
        seen.append(int(embeds.shape[0] * embeds.shape[1]))
        return original(llm, embeds, mask, positions, cache)

    monkeypatch.setattr(decoding, "_forward", counting)
    return seen


def test_full_prefills_the_video_once(tiny_full, monkeypatch):
    """Three captions of one video: the header and every frame token are prefilled once, not three times."""
    frames, times, objects = make_video(num_frames=4, num_objects=3)
    reqs = [Request(DEFAULT_CAPTION_PROMPT, [k]) for k in range(3)]
    sizes, prefixes = {}, []
    for share in (False, True):
        seen = _count_prefill_tokens(monkeypatch)
        original = decoding.common_prefix_length

        def recording(items, start=0):
            n = original(items, start)
            prefixes.append((items[0].ids, n))
            return n

        monkeypatch.setattr(decoding, "common_prefix_length", recording)
        r = Referrer(tiny_full.checkpoint, tiny_full.name, perf=PerfOptions(share_prefix=share))
        r.generate(frames, times, objects, reqs, max_new_tokens=1, batch_size=16)
        sizes[share] = sum(seen)
        monkeypatch.undo()
    ids, shared = prefixes[0]
    image_positions = (ids == tiny_full.config.image_token_index).nonzero()
    assert len(image_positions) > 0 and int(image_positions[-1]) < shared
    assert sizes[False] - sizes[True] == 2 * shared  # the two other rows skip it


def test_common_prefix_needs_equal_embeddings():
    ids = torch.tensor([5, 6, 7, 8, 9])
    emb = torch.arange(20, dtype=torch.float32).view(5, 4)
    other = emb.clone()
    other[2, 3] += 1  # same id, different embedding row (e.g. another object's token)
    assert common_prefix_length([DecodeInput(ids, emb), DecodeInput(ids.clone(), emb.clone())]) == 4
    assert common_prefix_length([DecodeInput(ids, emb), DecodeInput(ids, other)]) == 2
    assert common_prefix_length([DecodeInput(ids, emb), DecodeInput(ids[:3], emb[:3])]) == 2
    assert common_prefix_length([DecodeInput(ids, emb)]) == 4


def test_greedy_decode_rejects_zero_tokens(tiny_lite):
    item = DecodeInput(torch.tensor([1, 2]), torch.zeros(2, tiny_lite.config.hidden_size))
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_decode(tiny_lite.model.llm, [item], max_new_tokens=0, eos_token_id=None)


def test_object_tokens_are_computed_once_per_object(tiny_lite, monkeypatch):
    frames, times, objects = make_video(num_frames=3, num_objects=2, height=160, width=200)
    # a big object so that every mask goes through k-means
    objects[0] = {f: np.pad(np.ones((80, 90), bool), ((10, 70), (20, 90))) for f in range(3)}
    reqs = [Request(DEFAULT_CAPTION_PROMPT, [0]), Request("What is <region> doing?", [0]), Request("<region>?", [0])]
    calls = {}
    for share in (False, True):
        count = [0]
        original = modeling.kmeans_centroids

        def counting(*args, **kwargs):
            count[0] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(modeling, "kmeans_centroids", counting)
        r = Referrer(tiny_lite.checkpoint, tiny_lite.name, perf=PerfOptions(share_object_tokens=share))
        out = r.generate(frames, times, objects, reqs, max_new_tokens=2)
        monkeypatch.undo()
        calls[share] = (count[0], [g.token_ids for g in out])
    assert calls[False][0] == 9 and calls[True][0] == 3  # 3 masks, asked 3 times
    assert calls[False][1] == calls[True][1]


def test_frame_images_are_encoded_once_per_call(tiny_lite):
    """Shared per-frame features: Lite's 336 frame image is one encoder image per frame for every
    object and request of the call; each (object, frame) crop and local crop is one image."""
    frames, times, objects = make_video(num_frames=4, num_objects=3)
    r = tiny_lite
    seqs = []
    for k in range(3):
        regions = [_region(r, frames, objects, k, f) for f in sorted(objects[k])]
        for prompt in (DEFAULT_CAPTION_PROMPT, "What is <region> doing?"):
            seqs.append(r._prompts.lite(prompt, [regions], times))
    plan = plan_encoder_inputs("lite", seqs, frames, r.config.image_processor)
    kinds: dict[str, int] = {}
    for key in plan.images:
        kinds[key[0][0]] = kinds.get(key[0][0], 0) + 1
    assert kinds == {"crop": 12, "local": 12, "global": 4}


# -- checkpoints with given dimensions -----------------------------------------------------------------
def test_checkpoint_with_given_dims_loads_through_the_normal_loader(tmp_path):
    from models.tiny import CheckpointDims, real_2b_dims, tiny_checkpoint

    dims = CheckpointDims(hidden=48, intermediate=96, layers=1, heads=4, kv_heads=1, vision_hidden=32,
                          vision_intermediate=64, vision_layers=1, vision_heads=2, mm_max_length=512)
    path = tiny_checkpoint("lite", cache_dir=tmp_path, dims=dims)
    assert path.name.endswith(dims.slug()) and tiny_checkpoint("lite", cache_dir=tmp_path, dims=dims) == path
    r = Referrer.from_pretrained(str(path), mode="lite")
    text = r.config.text
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_key_value_heads"]) == (48, 1, 1)
    assert (r.config.vision.hidden_size, r.config.vision.num_hidden_layers, r.config.mm_max_length) == (32, 1, 512)
    frames, times, objects = make_video(num_frames=2, num_objects=1)
    assert r.generate(frames, times, objects, [Request("<region>", [0])], max_new_tokens=2)[0].error is None
    big = real_2b_dims()
    assert (big.hidden, big.heads, big.kv_heads, big.intermediate) == (1536, 12, 2, 8960)
    assert (big.vision_hidden, big.vision_heads, big.vision_intermediate, big.layers) == (1152, 16, 4304, 2)
