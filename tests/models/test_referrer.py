"""The public entry point on tiny checkpoints: batching, quirk flags, images, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.config import ConfigError
from models.processing_pixelrefer import InputError
from models.referrer import Generation, Referrer, Request, pick_device
from pixelrefer_helpers import LITE_FIXTURE, make_video


def _requests():
    return [
        Request("Describe <region>.", [0]),
        Request("What is <region> doing?", [1]),
        Request("<region> and <region>: which one moves faster?", [1, 0]),
        Request("Is <region> near <region>? Answer with <region>.", [0, 2, 1]),
    ]


@pytest.mark.parametrize("mode", ["lite", "full"])
def test_batched_equals_one_by_one(mode, request):
    referrer = request.getfixturevalue(f"tiny_{mode}")
    frames, times, objects = make_video(num_frames=4, num_objects=3, skip={2: {1, 3}})
    reqs = _requests()
    batched = referrer.generate(frames, times, objects, reqs, max_new_tokens=8, batch_size=3)
    single = [referrer.generate(frames, times, objects, [r], max_new_tokens=8)[0] for r in reqs]
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert all(g.error is None and len(g.token_ids) >= 1 for g in batched)
    # and independent of the order of the requests in the call
    reordered = referrer.generate(frames, times, objects, reqs[::-1], max_new_tokens=8, batch_size=16)
    assert [g.token_ids for g in reordered[::-1]] == [g.token_ids for g in batched]


@pytest.mark.parametrize("mode", ["lite", "full"])
def test_caption_one_per_object(mode, request):
    referrer = request.getfixturevalue(f"tiny_{mode}")
    frames, times, objects = make_video(num_frames=4, num_objects=2)
    captions = referrer.caption(frames, times, objects, max_new_tokens=6)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    assert referrer.name == f"tiny-{mode}" and referrer.mode == mode


@pytest.mark.parametrize("mode", ["lite", "full"])
def test_single_frame_is_an_image(mode, request):
    referrer = request.getfixturevalue(f"tiny_{mode}")
    frames, times, objects = make_video(num_frames=1, num_objects=2)
    out = referrer.generate(frames, times, objects, [Request("Describe <region>.", [1])], max_new_tokens=5)
    assert out[0].error is None and out[0].num_tokens >= 1


def test_full_expands_one_region_per_mask(tiny_full):
    frames, times, objects = make_video(num_frames=3, num_objects=1)
    ids = tiny_full.tokenizer
    from models.processing_pixelrefer import RegionInput, make_crop, prepare_frames

    fi = prepare_frames(frames, times, tiny_full.config.image_processor, 2, video=True)
    regions = [RegionInput(make_crop("full", frames[f], objects[0][f].astype(np.uint8)), f, (0, f)) for f in range(3)]
    seq = tiny_full._prompts.full("Describe <region>.", regions, fi, groups=[3])
    text = ids.decode(seq.input_ids)
    assert text.startswith("<|im_start|>user\nTime 0.0s:<image>") and "Time 1.0s:" in text
    assert text.count("][") == 0 and text.count("],[") == 2


def test_lite_prompt_has_times_per_mask(tiny_lite):
    frames, times, objects = make_video(num_frames=4, num_objects=1, skip={0: {2}})
    from models.processing_pixelrefer import RegionInput, make_crop

    regions = [RegionInput(make_crop("lite", frames[f], m.astype(np.uint8)), f, (0, f)) for f, m in objects[0].items()]
    seq = tiny_lite._prompts.lite("Describe <region>.", [regions], times)
    text = tiny_lite.tokenizer.decode(seq.input_ids)
    assert "[Time 0.0:" in text and ",Time 0.5:" in text and "Time 1.0:" not in text and ",Time 1.5:" in text
    assert sum(1 for i in seq.input_ids if i == tiny_lite.config.region_token_index) == 3 * 32


def test_empty_object_fails_alone(tiny_lite):
    frames, times, objects = make_video(num_frames=3, num_objects=2)
    objects_with_empty = objects + [{f: np.zeros_like(m) for f, m in objects[0].items()}]
    reqs = [
        Request("Describe <region>.", [0]),
        Request("Describe <region>.", [2]),
        Request("<region> vs <region>", [1, 2]),
        Request("Describe <region>.", [1]),
    ]
    out = tiny_lite.generate(frames, times, objects_with_empty, reqs, max_new_tokens=6)
    assert out[1] == Generation("", 0, "object 2 has no non-empty mask")
    assert out[2].text == "" and "object 2" in out[2].error
    clean = tiny_lite.generate(frames, times, objects, [reqs[0], reqs[3]], max_new_tokens=6)
    assert [out[0].token_ids, out[3].token_ids] == [g.token_ids for g in clean]


def test_empty_mask_on_one_frame_is_skipped(tiny_lite):
    frames, times, objects = make_video(num_frames=3, num_objects=1)
    with_gap = [dict(objects[0])]
    with_gap[0][1] = np.zeros_like(objects[0][1])
    without = [{f: m for f, m in objects[0].items() if f != 1}]
    a = tiny_lite.generate(frames, times, with_gap, [Request("<region>", [0])], max_new_tokens=6)
    b = tiny_lite.generate(frames, times, without, [Request("<region>", [0])], max_new_tokens=6)
    assert a[0].token_ids == b[0].token_ids


def test_upstream_local_crop_only_matters_for_shared_frames(tiny_lite):
    upstream = Referrer(tiny_lite.checkpoint, "tiny-lite", upstream_local_crop=True)
    frames, times, objects = make_video(num_frames=2, num_objects=2)
    one = [Request("Describe <region>.", [1])]
    assert (
        upstream.generate(frames, times, objects, one, max_new_tokens=6)[0].token_ids
        == tiny_lite.generate(frames, times, objects, one, max_new_tokens=6)[0].token_ids
    )


def test_kmeans_seed_changes_only_what_it_should(tiny_lite):
    """Same seed: the same object tokens, also when another sequence shares the call (up to float
    rounding of the larger packed matmuls); another seed: different k-means draws, different tokens."""
    from models.processing_pixelrefer import RegionInput, make_crop, plan_encoder_inputs

    frames, times, objects = make_video(num_frames=2, num_objects=2)

    def seq(k):
        regions = [
            RegionInput(make_crop("lite", frames[f], m.astype(np.uint8)), f, (k, f)) for f, m in objects[k].items()
        ]
        return tiny_lite._prompts.lite("Describe <region>.", [regions], times)

    model, settings = tiny_lite.model, tiny_lite.config.image_processor

    def tokens(seqs, seed):
        plan = plan_encoder_inputs("lite", seqs, frames, settings)
        return [e.region_tokens for e in model.build_embeds(seqs, plan, frames=None, kmeans_seed=seed)]

    a = tokens([seq(0)], 1234)[0]
    assert torch.equal(a, tokens([seq(0)], 1234)[0])
    assert (a - tokens([seq(1), seq(0)], 1234)[1]).abs().max() < 1e-5
    assert (a - tokens([seq(0)], 99)[0]).abs().max() > 1e-3


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change,match",
    [
        (lambda f, t, o, r: ([], [], o, r), "no frames"),
        (
            lambda f, t, o, r: ([x[..., 0] for x in f], t, o, r),
            r"frame 0 has shape \(96, 128\); frames must be HxWx3 RGB",
        ),
        (lambda f, t, o, r: ([np.dstack([x, x[..., :1]]) for x in f], t, o, r), "HxWx3 RGB"),
        (lambda f, t, o, r: ([x.astype(np.float32) for x in f], t, o, r), "dtype float32; frames must be uint8"),
        (lambda f, t, o, r: (f[:1] + [f[1][:50]] + f[2:], t, o, r), "frame 1 is .* all frames must have the same size"),
        (lambda f, t, o, r: (f, t[:2], o, r), "2 timestamps for 3 frames"),
        (
            lambda f, t, o, r: (f, t, [{0: o[0][0][:10]}] + o[1:], r),
            r"object 0, frame 0: mask shape \(10, 128\) != frame size",
        ),
        (lambda f, t, o, r: (f, t, [{7: o[0][0]}] + o[1:], r), "object 0: mask on frame 7 but there are only 3 frames"),
        (
            lambda f, t, o, r: (f, t, o, [Request("Describe <region> and <region>.", [0])]),
            r"request 0: prompt has 2 <region> but refers to 1 object",
        ),
        (lambda f, t, o, r: (f, t, o, [Request("Describe it.", [0])]), "prompt has 0 <region>"),
        (
            lambda f, t, o, r: (f, t, o, [Request("Describe <region>.", [5])]),
            "object index 5 is not one of the 2 objects",
        ),
        (lambda f, t, o, r: (f, t, o, [Request("Describe <region>.", [])]), "refers to no object"),
        (lambda f, t, o, r: (f, t, o, [Request("Describe <region> <REGION>.", [0])]), "contain <REGION> literally"),
    ],
)
def test_bad_input_is_named(tiny_lite, change, match):
    frames, times, objects = make_video(num_frames=3, num_objects=2)
    args = change(frames, times, objects, [Request("Describe <region>.", [0])])
    with pytest.raises(InputError, match=match):
        tiny_lite.generate(*args, max_new_tokens=3)


def test_caption_prompt_needs_one_region(tiny_lite):
    frames, times, objects = make_video(num_frames=2, num_objects=1)
    with pytest.raises(InputError, match="exactly one <region>"):
        tiny_lite.caption(frames, times, objects, prompt="Describe <region> and <region>")


def test_full_rejects_two_video_tags(tiny_full):
    frames, times, objects = make_video(num_frames=2, num_objects=1)
    with pytest.raises(InputError, match="at most one is allowed"):
        tiny_full.generate(frames, times, objects, [Request("<video><video> <region>", [0])], max_new_tokens=2)


# -- loading through the entry point ---------------------------------------------------------------------
def test_pick_device_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("CPU-only expectation")
    assert pick_device(None, None) == (torch.device("cpu"), torch.float32, "sdpa")


def test_from_pretrained_names_and_modes():
    r = Referrer.from_pretrained(str(LITE_FIXTURE), upstream_local_crop=True)
    assert r.mode == "lite" and r.name == "lite-tiny" and r.upstream_local_crop
    with pytest.raises(ConfigError, match="is a lite checkpoint .* but mode='full'"):
        Referrer.from_pretrained(str(LITE_FIXTURE), mode="full")
    with pytest.raises(ValueError, match="'tiny-lite' is a lite model but mode='full'"):
        Referrer.from_pretrained("tiny-lite", mode="full")
    with pytest.raises(ValueError, match="mode must be"):
        Referrer.from_pretrained("tiny", mode="medium")
