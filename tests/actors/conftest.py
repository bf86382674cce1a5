"""Fixtures for the tracker tests: real encoded videos of moving shapes, decoded with PyAV (the production decoder)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from pipeline.samples import GroundTruth, make_video


@dataclass
class DecodedVideo:
    """Sampled frames as the pipeline hands them to the tracker, with the encoder's ground truth."""

    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    timestamps: np.ndarray  # float64 seconds, the decoder's presentation times
    truth: GroundTruth

    def gt_mask(self, shape: int, frame_index: int) -> np.ndarray | None:
        return self.truth.mask(shape, float(self.timestamps[frame_index]))

    def index_of(self, frame: np.ndarray) -> int:
        """Which sampled frame an array is (discoverers only see pixels)."""
        for k, f in enumerate(self.frames):
            if np.array_equal(f, frame):
                return k
        raise AssertionError("frame not in this video")


def decode(path: str, truth: GroundTruth, step: int = 1) -> DecodedVideo:
    import av

    with av.open(path) as container:
        decoded = [(f.to_ndarray(format="rgb24"), float(f.time)) for f in container.decode(video=0)]
    picked = decoded[::step]
    frames = np.stack([f for f, _ in picked])
    timestamps = np.array([t for _, t in picked], dtype=np.float64)
    return DecodedVideo(frames=frames, timestamps=np.round(timestamps, 3), truth=truth)


@pytest.fixture(scope="session")
def shapes_video(tmp_path_factory) -> DecodedVideo:
    """2 s at 10 fps, every 2nd frame sampled (10 frames); the third shape enters at 1.0 s (frame 5)."""
    path = tmp_path_factory.mktemp("videos") / "shapes.mp4"
    truth = make_video(path, duration_s=2.0, fps=10.0)
    return decode(str(path), truth, step=2)


@pytest.fixture(scope="session")
def long_video(tmp_path_factory) -> DecodedVideo:
    """16 sampled frames: several times tiny's memory window (4 frames), for chunking and pruning."""
    path = tmp_path_factory.mktemp("videos") / "long.mp4"
    truth = make_video(path, duration_s=1.6, fps=10.0, seed=3)
    return decode(str(path), truth, step=1)


@pytest.fixture(scope="session")
def tiny_tracker():
    """One tiny-model tracker for the tests that do not change its settings (loading costs ~1 s)."""
    from actors.tracker import Tracker

    return Tracker("tiny", keyframe_interval_s=1.0)


@pytest.fixture(scope="module")
def torch_single_thread():
    """One intra-op thread while a module runs: on a small machine shared by other test runs, two
    OpenMP threads spin-waiting on each other made the tiny model 20x slower than one thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
