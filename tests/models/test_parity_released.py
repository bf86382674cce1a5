"""``python -m models.parity`` on the upstream fixtures rewritten in the shape the released repos most likely
have: ``.bin`` shards, the vision tower only in ``HF_HOME``'s cache (offline), and Qwen2.5-Instruct's
``generation_config.json`` (``repetition_penalty`` 1.1, eos ``[<|im_end|>, <|endoftext|>]``).

Why the authors' greedy ids still apply although their reference run had no penalty: the penalty only
lowers the logits of tokens a sequence has already generated (upstream's ``generate`` gets embeddings
without ``input_ids``, so the prompt is not penalised). When the penalty-free greedy ids are all distinct,
every step's winner is a token not generated before, whose logit the penalty leaves alone while it only
lowers the others, so the same ids come out; the test checks that premise. The added eos
(``<|endoftext|>``) is not among the ids either, so it stops nothing. The penalty itself is checked
against transformers' ``generate`` in ``test_generation.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pixelrefer_helpers import FULL_FIXTURE, LITE_FIXTURE, TOWER_REPO, released_shape

ROOT = Path(__file__).resolve().parents[2]
TOL = 5e-4


@pytest.mark.parametrize("source", [LITE_FIXTURE, FULL_FIXTURE], ids=["lite", "full"])
def test_parity_cli_on_the_released_shape(tmp_path, source):
    hf_home = tmp_path / "hf"
    fixture = released_shape(source, tmp_path / "fixture", hf_home)
    for name in ("reference.npz", "reference_fp32.npz", "summary.json"):
        (fixture / name).unlink()
    assert not list(fixture.glob("*.safetensors")) and (fixture / "pytorch_model.bin.index.json").is_file()
    assert not (fixture / "VL3-SigLIP-NaViT-tiny").exists()

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    out = tmp_path / "out.npz"
    done = subprocess.run(
        [sys.executable, "-m", "models.parity", str(fixture), "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr

    with np.load(out) as got, np.load(source / "reference_fp32.npz") as ref:
        ids = ref["generated_ids"][0].tolist()
        assert len(set(ids)) == len(ids) and 293 not in ids  # the premise above
        np.testing.assert_array_equal(got["generated_ids"], ref["generated_ids"])
        np.testing.assert_array_equal(got["input_ids"], ref["input_ids"])
        assert float(np.abs(got["logits"] - ref["logits"]).max()) < TOL
        assert float(np.abs(got["region_tokens"] - ref["region_tokens"]).max()) < TOL


def test_released_shape_settings_are_the_files(tmp_path, monkeypatch):
    """What the CLI run above decoded with: the tower from the cache, the file's penalty and both eos ids."""
    from models.loading import load_checkpoint
    from pixelrefer_helpers import offline_hub

    hf_home = tmp_path / "hf"
    fixture = released_shape(LITE_FIXTURE, tmp_path / "fixture", hf_home)
    offline_hub(monkeypatch, hf_home)
    ckpt = load_checkpoint(fixture)
    assert ckpt.tower.source == "hub" and ckpt.tower.name == TOWER_REPO
    assert ckpt.weights.format == "bin" and len(ckpt.weights.shards) == 3
    g = ckpt.generation
    assert (g.repetition_penalty, g.eos_token_ids, g.pad_token_id, g.do_sample) == (1.1, (295, 293), 293, False)
