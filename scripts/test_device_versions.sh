#!/usr/bin/env bash
# Runs the test suite under the GPU machine's library versions (torch 2.11, torchvision 0.26, timm 1.0.29,
# transformers 5.17, tokenizers 0.23.2), in a separate environment, .venv-device, so that code that only works on
# our pinned newer versions is caught here and not in a device run (which has no time for a second try).
# Every other dependency keeps the version pyproject.toml pins. The web-page test is left out: it needs a browser
# and Playwright, and the search it drives is tested through the HTTP API (tests/test_service.py). The device's CUDA
# build of torch brings its CUDA libraries, so the environment takes about 5.5 GB; it is not part of CI
# (scripts/test.sh is).
# Usage: bash scripts/test_device_versions.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
DEVICE_PINS=("torch==2.11.0" "torchvision==0.26.0" "timm==1.0.29" "transformers==5.17.0" "tokenizers==0.23.2")
if [ ! -x .venv-device/bin/python ]; then "$PY" -m venv .venv-device; fi
. .venv-device/bin/activate
# pyproject.toml's pins, and its test tools, with the device's versions in place of ours for the libraries above
# (a command substitution, not mapfile's process substitution, so that set -e stops the script when this fails)
PIN_LINES=$(python - "${DEVICE_PINS[@]}" <<'EOF'
import re, sys, tomllib
device = {re.split(r"[=<>!~ ]", p, maxsplit=1)[0].lower(): p for p in sys.argv[1:]}
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
pins = project["dependencies"] + [p for p in project["optional-dependencies"]["test"] if not p.startswith("playwright")]
names = set()
for pin in pins:
    name = re.split(r"[=<>!~ \[]", pin, maxsplit=1)[0].lower()
    names.add(name)
    print(device.get(name, pin))
missing = set(device) - names
if missing:
    sys.exit(f"test_device_versions.sh: {sorted(missing)} not among pyproject.toml's dependencies")
EOF
)
mapfile -t PINS <<< "$PIN_LINES"
python -m pip install -q --disable-pip-version-check "${PINS[@]}"
python -m pip install -q --disable-pip-version-check --no-deps -e .
python -c "import torch, torchvision, timm, transformers; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__)"
export DERMCIR_CACHE="${DERMCIR_CACHE:-$PWD/.dermcir-cache}"
set +e
python -m pytest -q -p no:cacheprovider --ignore=tests/test_web_browser.py "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi
exit "$rc"
