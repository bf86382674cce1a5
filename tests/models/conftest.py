"""Shared fixtures of the model tests: the copied upstream parity fixtures and small synthetic videos."""

from __future__ import annotations

import numpy as np
import pytest

from pixelrefer_helpers import FULL_FIXTURE, LITE_FIXTURE


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is ~10x faster than two spinning
    OpenMP threads competing with other processes, and results do not depend on the thread count."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def lite_run():
    """The parity pipeline on the Lite fixture, fp32 (one run shared by the parity tests)."""
    from models.parity import run_fixture

    return run_fixture(LITE_FIXTURE)


@pytest.fixture(scope="session")
def full_run():
    from models.parity import run_fixture

    return run_fixture(FULL_FIXTURE)


@pytest.fixture(scope="session")
def lite_reference():
    with np.load(LITE_FIXTURE / "reference_fp32.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def full_reference():
    with np.load(FULL_FIXTURE / "reference_fp32.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def tiny_lite():
    from models.referrer import Referrer

    return Referrer.from_pretrained("tiny", mode="lite")


@pytest.fixture(scope="session")
def tiny_full():
    from models.referrer import Referrer

    return Referrer.from_pretrained("tiny", mode="full")
