#!/usr/bin/env bash
# Creates .venv and installs dermcir (editable) with pinned dependencies; --test adds the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
. .venv/bin/activate
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
# torch/torchvision first: pip takes the pinned CPU-usable wheels from the local disk where available.
python -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
python -m pip install -q --disable-pip-version-check -e ".${extra}"
