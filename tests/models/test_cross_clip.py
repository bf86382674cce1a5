"""Requests of many clips decoded in shared batches (`Referrer.prepare` + `Referrer.decode`).

The referrer stage batches every clip of a Ray batch together, so a clip's answers must not depend on
which other clips share its LLM batches: each clip's greedy ids equal those of the clip decoded alone,
one request at a time, whatever the batch size or token budget.
"""

from __future__ import annotations

import pytest

from models.decoding import batch_rows
from models.processing_pixelrefer import InputError
from models.referrer import DEFAULT_CAPTION_PROMPT, Request
from pixelrefer_helpers import make_video


def _clips(count: int = 5):
    """Short clips of different sizes with one or two objects each, and their requests."""
    clips = []
    for c in range(count):
        frames, times, objects = make_video(num_frames=2 + c % 3, num_objects=1 + c % 2, seed=10 + c)
        times = [t + 30.0 * c for t in times]
        requests = [Request(DEFAULT_CAPTION_PROMPT, [k]) for k in range(len(objects))]
        if c % 2:
            requests.append(Request("<region> and <region>: which one is larger?", [1, 0]))
        clips.append((frames, times, objects, requests))
    return clips


@pytest.mark.parametrize("mode", ["lite", "full"])
@pytest.mark.parametrize("batch_size,token_budget", [(64, None), (3, None), (64, 400)])
def test_cross_clip_batches_give_each_clip_its_own_answers(mode, batch_size, token_budget, request):
    referrer = request.getfixturevalue(f"tiny_{mode}")
    clips = _clips()
    alone = [[referrer.generate(f, t, o, [r], max_new_tokens=12, batch_size=1)[0] for r in reqs]
             for f, t, o, reqs in clips]
    prepared = [referrer.prepare(*clip) for clip in clips]
    together = referrer.decode(prepared, max_new_tokens=12, batch_size=batch_size, token_budget=token_budget)
    assert [[g.token_ids for g in clip] for clip in together] == [[g.token_ids for g in clip] for clip in alone]
    assert all(g.error is None and g.num_tokens > 0 for clip in together for g in clip)


def test_decode_keeps_per_clip_failures_in_place(tiny_lite):
    frames, times, objects, _ = _clips(1)[0]
    objects = [objects[0], {}]  # the second object is never visible
    reqs = [Request(DEFAULT_CAPTION_PROMPT, [1]), Request(DEFAULT_CAPTION_PROMPT, [0])]
    other = _clips(2)[1]
    out = tiny_lite.decode([tiny_lite.prepare(frames, times, objects, reqs), tiny_lite.prepare(*other)],
                           max_new_tokens=8)
    assert out[0][0].error and "no non-empty mask" in out[0][0].error and out[0][0].num_tokens == 0
    assert out[0][1].error is None and out[0][1].num_tokens > 0
    assert len(out[1]) == len(other[3]) and all(g.error is None for g in out[1])


def test_prepare_names_bad_input_before_any_compute(tiny_lite):
    frames, times, objects, reqs = _clips(1)[0]
    with pytest.raises(InputError, match="timestamps"):
        tiny_lite.prepare(frames, times[:1], objects, reqs)


def test_batch_rows_respects_rows_and_padded_tokens():
    lengths = [100, 90, 50, 40, 40, 10]
    order = list(range(6))
    assert batch_rows(lengths, order, 64, None) == [order]
    assert batch_rows(lengths, order, 2, None) == [[0, 1], [2, 3], [4, 5]]
    # 3 x 100 > 250: a new batch starts at row 2, whose width (50) lets four rows in.
    assert batch_rows(lengths, order, 64, 250) == [[0, 1], [2, 3, 4, 5]]
    # A budget smaller than one prompt still runs that prompt alone.
    assert batch_rows(lengths, order, 64, 20) == [[0], [1], [2], [3], [4], [5]]


def test_a_request_cap_stops_only_its_own_answer(tiny_lite):
    """A category question (a few tokens) shares batches with captions without shortening them."""
    frames, times, objects, reqs = _clips(2)[1]
    capped = [Request(r.prompt, r.object_indices, max_new_tokens=3 if k == 0 else None) for k, r in enumerate(reqs)]
    full = tiny_lite.decode([tiny_lite.prepare(frames, times, objects, reqs)], max_new_tokens=12)[0]
    cut = tiny_lite.decode([tiny_lite.prepare(frames, times, objects, capped)], max_new_tokens=12)[0]
    assert cut[0].token_ids == full[0].token_ids[:3] and len(full[0].token_ids) > 3
    assert [g.token_ids for g in cut[1:]] == [g.token_ids for g in full[1:]]
    with pytest.raises(InputError, match="max_new_tokens"):
        tiny_lite.prepare(frames, times, objects, [Request(reqs[0].prompt, reqs[0].object_indices, max_new_tokens=0)])
