"""Loading SAM 2 for the tracker: `tiny` is saved and loaded like a real checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models import sam2

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def test_tiny_is_written_once_into_the_cache_and_loaded_back(tmp_path, monkeypatch):
    monkeypatch.setenv("PIXELREFER_CACHE", str(tmp_path))
    bundle = sam2.load_sam2("tiny")
    folder = bundle.path
    assert folder.parent == tmp_path and folder.name == f"tiny-sam2-{sam2.tiny_fingerprint()}"
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", sam2.TRACKER_DEFAULTS_FILE} <= files
    assert json.loads((folder / "config.json").read_text())["model_type"] == "sam2_video"
    assert bundle.name == "tiny-sam2" and bundle.device.type == "cpu" and bundle.dtype == torch.float32
    assert bundle.model.config.image_size == sam2.TINY_IMAGE_SIZE
    assert bundle.tracker_defaults == sam2.TINY_TRACKER_DEFAULTS
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    again = sam2.load_sam2("tiny")  # reuses the folder; same seeded weights
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    reloaded = again.model.state_dict()
    for name, tensor in bundle.model.state_dict().items():
        assert torch.equal(tensor, reloaded[name]), name
    # The same weights as building the model from its seed (nothing lost in the save/load round trip).
    built = sam2.build_tiny_model().state_dict()
    assert all(torch.equal(built[k], v) for k, v in bundle.model.state_dict().items())


def test_image_model_shares_the_video_models_weights(tmp_path):
    from transformers import Sam2Model

    bundle = sam2.load_sam2("tiny")
    image = bundle.image_model
    assert image.vision_encoder is bundle.model.vision_encoder and image.mask_decoder is bundle.model.mask_decoder
    reference = Sam2Model.from_pretrained(bundle.path).eval()  # what loading it separately would give
    pixels = torch.rand(1, 3, sam2.TINY_IMAGE_SIZE, sam2.TINY_IMAGE_SIZE)
    points = torch.tensor([[[[30.0, 40.0]], [[90.0, 20.0]]]])
    labels = torch.ones(1, 2, 1, dtype=torch.long)
    with torch.inference_mode():
        ours = image(pixel_values=pixels, input_points=points, input_labels=labels)
        theirs = reference(pixel_values=pixels, input_points=points, input_labels=labels)
    assert torch.allclose(ours.pred_masks, theirs.pred_masks, atol=1e-5)
    assert torch.allclose(ours.iou_scores, theirs.iou_scores, atol=1e-5)


def test_device_and_dtype_defaults():
    dev, dt = sam2.resolve_device()
    assert (dev.type, dt) == (("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32))
    assert sam2.resolve_device("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(sam2.Sam2LoadError, match="SAM 2 checkpoint"):
        sam2.load_sam2(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(sam2.Sam2LoadError, match="cannot load SAM 2"):
        sam2.load_sam2(str(tmp_path / "empty"))


def test_tiny_tracks_a_frame_quickly_enough_for_tests():
    """Not a timing assertion: reports tiny's per-frame cost with four objects (run with -s to see it)."""
    import time

    from actors.prompts import ObjectPrompt
    from actors.seeds import Seed
    from actors.session import TrackingSession

    bundle = sam2.load_sam2("tiny")
    frames = np.random.default_rng(0).integers(0, 255, (6, 120, 160, 3), dtype=np.uint8)
    pixels = bundle.processor.video_processor(videos=[frames], return_tensors="pt").pixel_values_videos[0]
    session = TrackingSession(bundle, 120, 160)
    for oid in range(1, 5):
        box = (10.0 * oid, 10.0, 10.0 * oid + 30, 50.0)
        session.add(Seed(object_id=oid, source="prompt", frame=0, prompt=ObjectPrompt(box=box), box=box))
    session.step(0, pixels[0])
    started = time.process_time()
    for i in range(1, 6):
        assert len(session.step(i, pixels[i]).object_ids) == 4
        session.prune(i)
    print(f"tiny SAM 2: {(time.process_time() - started) / 5 * 1000:.0f} ms CPU per frame with 4 objects")
