#!/usr/bin/env bash
# Runs the GPU-profile 5-fold benchmark on the device machine from a packed payload (scripts/pack_gpu_payload.py).
# Usage on the device: bash scripts/gpu_cv.sh [OUT_DIR] [extra `dermcir cv` options]
# (the GPU image has torch, timm, transformers, scikit-learn). A local smoke test of this exact path on a tiny packed
# subset: bash scripts/gpu_cv.sh /tmp/smoke --data /tmp/tiny_release --min-cases 4 --folds 2 --set epochs=1 ...
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-runs}/cv_gpu}"
pip install -q --no-deps -e . >/dev/null 2>&1 || true
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" DERMCIR_CACHE="$PWD/.dermcir-cache" HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -m dermcir cv --data gpu_payload/release --profile gpu --out "$OUT" --quiet \
  --set backbone_weights='"gpu_payload/lite0_fp16.safetensors"' \
  --set text_encoder='"bert"' --set text_weights='"gpu_payload/minilm"' "${@:2}"
cat "$OUT/tables.md"
