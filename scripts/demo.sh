#!/usr/bin/env bash
# The main job on a fresh machine: set up, train a CPU-profile model on a Derm7pt folder, index it, serve the page.
# Usage: bash scripts/demo.sh [DERM7PT_RELEASE_DIR]   (default ../shared/derm7pt/release_v0)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
# a relative DATA is the caller's, not the repository's (the default is beside the checkout, as in the README)
DATA="$(realpath -m -- "${1:-$root/../shared/derm7pt/release_v0}")"
cd "$root"
bash scripts/setup.sh
. .venv/bin/activate
exec dermcir demo --data "$DATA" --out runs/demo
