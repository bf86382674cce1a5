#!/usr/bin/env bash
# The GPU benchmark (bench/gpu.py) on a machine with one GPU: SAM 2.1 tiny/large frames/s, PixelRefer
# Lite-2B/-7B and full-2B latency, batching and memory, and video-hours per GPU-hour of the stages'
# own loop; random weights at the released sizes, bf16, flash-attention 2 when importable. Under
# 8 minutes (--budget-s 420 stops starting sections after 7). JSON to --json FILE, else $OUT/gpu-bench.json.
#
# What it needs beyond torch, transformers, numpy, Pillow and tokenizers (which the GPU machine has):
#   pycocotools (masks as RLE)
# Fetch the wheel once, on a machine with PyPI, for the GPU machine's Python 3.12:
#   bash bench/gpu.sh --fetch-wheels      # into .whl/ (git-ignored via .git/info/exclude)
# then run there with .whl carried along, e.g. with this workplace's device tool:
#   run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=560)
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="pycocotools==2.0.11"  # the version requirements.lock pins

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d .whl $WHEELS
  exit 0
fi

if ! python3 -c "import pycocotools" 2>/dev/null; then
  if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "pycocotools is missing: run 'bash bench/gpu.sh --fetch-wheels' where PyPI is reachable and carry .whl" >&2
    exit 2
  fi
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec python3 -m bench.gpu --budget-s 420 "$@"
