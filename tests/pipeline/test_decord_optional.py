"""decord is an optional extra: nothing imports it unless `PIXELREFER_DECODER=decord` asks for it.

Each case runs a fresh interpreter (so a fresh pool of decode children) in which ``decord`` is a
stand-in package that records the attempt to import it and then fails, as an absent package does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.decode.backends import DECODER_ENV
from pipeline.samples import make_video

REPO = Path(__file__).resolve().parents[2]

FAKE_DECORD = """
import os
open(os.environ["DECORD_MARKER"], "a").write(f"{os.getpid()}\\n")
raise ImportError("No module named 'decord' (test stand-in)")
"""

SAMPLE = """
import json, sys
from pipeline.decode.sampling import sample_at, sample_video
whole = sample_video(sys.argv[1], fps=2.0)
some = sample_at(sys.argv[1], [0.0, 1.0])
print(json.dumps({"whole": whole.timestamps.tolist(), "shape": list(whole.frames.shape),
                  "error": whole.error, "at": some.timestamps.tolist()}))
"""


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_video(tmp_path_factory.mktemp("v") / "v.mp4", fps=10, duration_s=2.0, gop=5).path


def run_without_decord(tmp_path: Path, video: str, decoder: str | None) -> tuple[dict, list[str]]:
    """Sample `video` in a fresh interpreter where decord is absent; return the result and who tried to import it."""
    (tmp_path / "fake" / "decord").mkdir(parents=True)
    (tmp_path / "fake" / "decord" / "__init__.py").write_text(FAKE_DECORD)
    marker = tmp_path / "imported"
    env = {k: v for k, v in os.environ.items() if k != DECODER_ENV}
    env.update(PYTHONPATH=os.pathsep.join([str(tmp_path / "fake"), str(REPO)]), DECORD_MARKER=str(marker))
    if decoder is not None:
        env[DECODER_ENV] = decoder
    done = subprocess.run([sys.executable, "-c", SAMPLE, video], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    tried = marker.read_text().split() if marker.exists() else []
    return json.loads(done.stdout.strip().splitlines()[-1]), tried


def test_default_decoding_never_imports_decord(tmp_path: Path, video: str) -> None:
    got, tried = run_without_decord(tmp_path, video, None)
    assert tried == []
    assert got["whole"] == pytest.approx([0.0, 0.5, 1.0, 1.5]) and got["shape"] == [4, 120, 160, 3]
    assert got["error"] is None and got["at"] == pytest.approx([0.0, 1.0])


def test_decord_asked_for_but_absent_falls_back_to_pyav(tmp_path: Path, video: str) -> None:
    got, tried = run_without_decord(tmp_path, video, "decord")
    assert tried  # the decode child tried, failed, and decoded with PyAV
    assert got["whole"] == pytest.approx([0.0, 0.5, 1.0, 1.5]) and got["error"] is None
