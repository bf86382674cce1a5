"""`bench/gpu.sh` is ready for a GPU machine when one is lent: `bench.gpu --smoke` runs every
section (tiny models, CPU, a 20-second video) and reports a finite number under every figure name
that the GPU run reports, without importing what the GPU machine lacks (Ray, PyAV, decord, DuckDB);
a failing section is recorded while the others run; the budget skips sections; the script is valid
bash and fetches the wheel versions that requirements.lock pins."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FIGURES = [
    *(f"sam2_{size}_fps_{n}obj" for size in ("tiny", "large") for n in (1, 8)),
    *(f"{tag}_{key}" for tag in ("lite2b", "lite7b", "full2b")
      for key in ("caption_latency_s", "objects_per_s_b1", "objects_per_s_b16", "objects_per_s_b64",
                  "caption_peak_gpu_mib", "peak_gpu_mib", "params_b")),
    "full_over_lite_caption_time",
    "video_hours_per_gpu_hour", "busy_share_decode", "busy_share_tracker", "busy_share_referrer",
    "loop_video_s", "loop_clips", "loop_captions",
    *(f"discovery_{size}_{key}" for size in ("tiny", "large")
      for key in ("s_per_keyframe", "s_per_keyframe_coarse", "s_per_video_hour_every")),
    "discovery_check_s_per_keyframe",
    "shots_model_frames_per_s_b1", "shots_model_frames_per_s_batched", "shots_gpu_s_per_video_hour",
    "shots_b1_peak_gpu_mib", "shots_batched_peak_gpu_mib",
]
#: Figures that are 0 on CPU (nothing to measure) but must still be numbers.
MAY_BE_ZERO = re.compile(r".*(peak_gpu_mib|params_b|busy_share_decode)$")


def test_smoke_run_reports_every_figure(tmp_path: Path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--smoke", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads(out.read_text())
    assert record["errors"] == {} and record["skipped"] == [], (record["errors"], record["skipped"])
    assert record["absent_on_device_imported"] == []
    for key in ("device", "torch", "transformers", "dtype", "attention"):
        assert isinstance(record[key], str) and record[key], key
    assert record["dtype"] == "float32" and record["attention"] == "sdpa"  # CPU; bf16 + flash/sdpa on CUDA
    for key in FIGURES:
        value = record.get(key)
        assert isinstance(value, (int, float)) and math.isfinite(value), (key, value)
        assert value > 0 or (value == 0 and MAY_BE_ZERO.match(key)), (key, value)
    for tag in ("lite2b", "lite7b", "full2b"):
        assert record[f"{tag}_caption_tokens"] == 8  # eos off: every caption decodes all its tokens
    shares = [record[f"busy_share_{s}"] for s in ("decode", "tracker", "referrer")]
    assert all(0 <= s <= 1 for s in shares) and sum(shares) <= 1.0 + 1e-6
    assert record["loop_video_s"] == pytest.approx(20.0) and record["loop_clip_errors"] == 0
    assert record["loop_clips"] == 2  # 10-s clips in the smoke run: a shared frame, one referrer call
    assert record["loop_captions"] >= record["loop_clips"]  # the loop captioned objects in every clip


def test_a_failing_section_is_recorded_and_the_budget_skips(tmp_path: Path, monkeypatch):
    from bench import gpu

    def broken(ctx):
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(gpu, "SECTIONS", {"broken": broken, "fine": lambda ctx: {"fine_figure": 1.5}})
    out = tmp_path / "gpu.json"
    assert gpu.main(["--smoke", "--json", str(out)]) == 1
    record = json.loads(out.read_text())
    assert record["errors"] == {"broken": "RuntimeError: out of memory, say"} and record["fine_figure"] == 1.5

    assert gpu.main(["--smoke", "--json", str(out), "--budget-s", "0"]) == 0
    record = json.loads(out.read_text())
    assert record["skipped"] == ["broken", "fine"] and "fine_figure" not in record
    assert any("budget" in note for note in record["notes"])


def test_the_script_is_valid_bash_and_pins_the_locked_wheels():
    script = ROOT / "bench" / "gpu.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    wheels = re.search(r'^WHEELS="([^"]*)"', text, re.M).group(1).split()
    assert wheels, "the script names its wheels"
    lines = (ROOT / "requirements.lock").read_text().splitlines()
    lock = {line.split("==")[0].lower(): line.split()[0] for line in lines if "==" in line and not line.startswith((" ", "#"))}
    for pin in wheels:
        assert lock.get(pin.split("==")[0].lower()) == pin, f"{pin} differs from requirements.lock"
        assert pin.split("==")[0] in text.split("set -euo pipefail")[0], f"the header lists {pin}"
    ignored = subprocess.run(["git", "check-ignore", "-q", ".whl/x.whl"], cwd=ROOT)
    assert ignored.returncode == 0, "the wheel folder must be git-ignored"
