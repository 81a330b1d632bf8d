#!/usr/bin/env bash
# Creates .venv and installs dermcir (editable) with pinned dependencies; --test adds the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
. .venv/bin/activate
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
# torch/torchvision first: pip takes the pinned wheels from the local disk where available. These are PyPI's
# builds, which run on the CPU but bring CUDA libraries (about 3 GB of the 6 GB environment); PyPI is the only
# index reached here. Elsewhere a smaller CPU-only torch can be installed first, from PyTorch's own index.
python -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
python -m pip install -q --disable-pip-version-check -e ".${extra}"
