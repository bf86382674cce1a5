"""The referrer stage on the tiny model: which frames of a track reach PixelRefer, and what comes back."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from actors.columns import rows_to_batch
from actors.referrer import ReferrerStage
from actors.requests import spread_frames
from pipeline.config import IndexConfig

NUM_FRAMES, H, W = 6, 64, 80


@pytest.mark.parametrize(
    "indices, limit, expected",
    [
        ([3, 0, 1, 2], None, [0, 1, 2, 3]),
        ([0, 1, 2], 5, [0, 1, 2]),
        (list(range(10)), 2, [0, 9]),
        (list(range(10)), 4, [0, 3, 6, 9]),
        ([2, 5, 7, 11, 13], 3, [2, 7, 13]),
        (list(range(7)), 1, [3]),
    ],
)
def test_spread_frames_keeps_the_ends(indices, limit, expected):
    assert spread_frames(indices, limit) == expected


def _rle(mask: np.ndarray) -> dict:
    enc = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in enc["size"]], "counts": enc["counts"].decode("ascii")}


def _cell(value) -> np.ndarray:
    """A one-row object column holding an array, as Ray Data hands a ragged column over."""
    col = np.empty(1, dtype=object)
    col[0] = value
    return col


def _batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (NUM_FRAMES, H, W, 3), dtype=np.uint8)
    track_frames = []
    for f in range(NUM_FRAMES):
        mask = np.zeros((H, W), dtype=bool)
        mask[10 + f : 40 + f, 20 + 2 * f : 50 + 2 * f] = True
        track_frames.append({"frame_index": f, "ts": 0.5 * f, "rle": _rle(mask)})
    tracks = [{"object_id": 7, "source": "auto", "frames": track_frames}]
    return {
        "video_id": np.array(["v1"], dtype=object),
        "frames": _cell(frames),
        "timestamps": _cell(np.arange(NUM_FRAMES) * 0.5),
        "tracks_json": np.array([json.dumps(tracks)], dtype=object),
        "questions_json": np.array([json.dumps([{"question": "What is <region>?"}])], dtype=object),
        "error": np.array([""], dtype=object),
    }


@pytest.fixture(scope="module")
def stage() -> ReferrerStage:
    return ReferrerStage("tiny", max_new_tokens=3)


@pytest.mark.parametrize("limit, shown", [(None, list(range(NUM_FRAMES))), (2, [0, 5]), (3, [0, 2, 5])])
def test_object_frames_limits_what_the_model_sees(stage, monkeypatch, limit, shown):
    seen = []
    prepare_many = stage.referrer.prepare_many

    def spy(items):
        seen.extend([sorted(o) for o in objects] for _, _, objects, _ in items)
        return prepare_many(items)

    monkeypatch.setattr(stage.referrer, "prepare_many", spy)
    monkeypatch.setattr(stage, "object_frames", limit)
    out = stage(_batch())
    assert seen == [[shown]]
    assert out["error"][0] == ""
    (caption,) = json.loads(out["captions_json"][0])
    # The caption's span is the track's, whatever frames the model was shown.
    assert (caption["object_id"], caption["ts_start"], caption["ts_end"]) == (7, 0.0, 2.5)
    assert caption["caption"] is not None and caption["num_tokens"] > 0
    (answer,) = json.loads(out["qa_json"][0])
    assert answer["object_ids"] == [7] and answer["answer"] is not None
    assert "frames" not in out and out["busy_s_referrer"][0] >= 0


def test_object_frames_must_be_positive():
    with pytest.raises(ValueError, match="object_frames"):
        ReferrerStage("tiny", object_frames=0)
    with pytest.raises(ValueError, match="--object-frames"):
        IndexConfig(source="s", output="o", object_frames=0)


def _rows(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One Ray batch of several one-row batches (object columns, as for ragged frames)."""
    return rows_to_batch([{key: column[0] for key, column in b.items()} for b in batches])


def _other_clip() -> dict[str, np.ndarray]:
    batch = _batch()
    frames = np.ascontiguousarray(batch["frames"][0][::-1])
    batch["frames"] = _cell(frames)
    batch["video_id"] = np.array(["v2"], dtype=object)
    return batch


def test_clips_of_a_batch_share_llm_batches_and_keep_their_own_answers(monkeypatch):
    stage = ReferrerStage("tiny", max_new_tokens=6, object_frames=3)
    alone = [stage(_batch()), stage(_other_clip())]
    calls = []
    decode, tower = stage.referrer.decode, stage.referrer.model.encode_images

    def spy(prepared, **kw):
        calls.append(("decode", len(prepared)))
        return decode(prepared, **kw)

    def tower_spy(images):
        calls.append(("tower", len(images)))
        return tower(images)

    monkeypatch.setattr(stage.referrer, "decode", spy)
    monkeypatch.setattr(stage.referrer.model, "encode_images", tower_spy)
    together = stage(_rows([_batch(), _other_clip()]))
    assert [c[0] for c in calls] == ["tower", "decode"] and calls[1] == ("decode", 2)  # one call each
    for i, single in enumerate(alone):
        assert together["captions_json"][i] == single["captions_json"][0]
        assert together["qa_json"][i] == single["qa_json"][0]
    phases = [k for k in together if k.startswith("phase_s_referrer_")]
    assert sorted(phases) == sorted(f"phase_s_referrer_{p}" for p in
                                    ("masks", "crops", "vision_tower", "region_tokens", "appearance", "llm_prefill",
                                     "llm_decode"))
    assert together["phase_s_referrer_llm_decode"].sum() > 0


def test_shipped_frames_give_the_same_answers_as_all_frames():
    stage = ReferrerStage("tiny", max_new_tokens=6, object_frames=3)
    full = stage(_batch())
    shipped = _batch()
    keep = [0, 2, 5]  # spread_frames(range(6), 3)
    shipped["frames"] = _cell(np.ascontiguousarray(shipped["frames"][0][keep]))
    shipped["frame_indices"] = np.array([json.dumps(keep)], dtype=object)
    out = stage(shipped)
    assert out["captions_json"][0] == full["captions_json"][0] and out["qa_json"][0] == full["qa_json"][0]


def test_a_bad_clip_fails_alone():
    stage = ReferrerStage("tiny", max_new_tokens=4)
    bad = _other_clip()
    bad["timestamps"] = _cell(np.arange(2) * 0.5)  # 2 timestamps for 6 frames
    out = stage(_rows([_batch(), bad]))
    assert out["error"][0] == "" and json.loads(out["captions_json"][0])
    assert "timestamps" in out["error"][1] and out["captions_json"][1] == "[]"


def _appearance(out: dict[str, np.ndarray], row: int = 0) -> dict[int, np.ndarray]:
    from actors.referrer import decode_vector

    return {e["object_id"]: decode_vector(e["vector"]) for e in json.loads(out["appearance_json"][row])}


@pytest.mark.parametrize("model", ["tiny", "tiny-full"])
def test_each_object_gets_an_appearance_vector_that_identical_pixels_repeat(stage, monkeypatch, model):
    """What random tiny weights can show about re-identification's input: one unit vector per object
    of the tower's width, computed beside the captions, equal for equal pixels whatever else shares
    the batch, different for different pixels (how *much* different says nothing: random weights)."""
    if model == "tiny-full":
        stage = ReferrerStage(model, mode="full", max_new_tokens=2)
    monkeypatch.setattr(stage, "object_frames", 3)
    alone = _appearance(stage(_batch()))
    assert list(alone) == [7]
    width = stage.referrer.config.vision.hidden_size
    assert alone[7].dtype == np.float32 and alone[7].shape == (width,)
    assert abs(float(np.linalg.norm(alone[7])) - 1.0) < 1e-5
    together = stage(_rows([_other_clip(), _batch()]))
    assert np.allclose(_appearance(together, 1)[7], alone[7], atol=1e-5)
    assert not np.allclose(_appearance(together, 0)[7], alone[7], atol=1e-3)
