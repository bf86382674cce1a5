"""`bench/gpu.py --smoke`: every section of the GPU benchmark runs (tiny sizes, CPU) and reports a
finite number under each figure name, so the script is ready for a GPU machine when one is lent."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

FIGURES = [
    "sam2_tiny_fps_1obj", "sam2_tiny_fps_8obj", "sam2_large_fps_1obj", "sam2_large_fps_8obj",
    "lite2b_caption_latency_s", "lite2b_objects_per_s_b1", "lite2b_objects_per_s_b16", "lite2b_objects_per_s_b64",
    "lite7b_caption_latency_s", "lite7b_objects_per_s_b16", "full2b_caption_latency_s",
    "full_over_lite_caption_time", "video_hours_per_gpu_hour", "busy_share_tracker", "busy_share_referrer",
]


def test_every_section_runs_and_reports(tmp_path: Path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--smoke", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["errors"] == {} and record["skipped"] == []
    for key in FIGURES:
        assert isinstance(record.get(key), (int, float)) and math.isfinite(record[key]) and record[key] > 0, key
    assert record["lite2b_caption_tokens"] == 8  # eos is off: every caption decodes all its tokens
    assert 0 < record["busy_share_tracker"] + record["busy_share_referrer"] <= 1.0


def test_the_script_is_valid_bash_and_names_its_wheels():
    script = (ROOT / "bench" / "gpu.sh").read_text()
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu.sh")], check=True)
    lock = (ROOT / "requirements.lock").read_text()
    pinned = next(line.split()[0] for line in lock.splitlines() if line.startswith("pycocotools=="))
    assert f'WHEELS="{pinned}"' in script
