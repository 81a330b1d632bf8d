#!/usr/bin/env bash
# The main job on a fresh machine: set up, train a CPU-profile model on a Derm7pt folder, index it, serve the page.
# Usage: bash scripts/demo.sh [DERM7PT_RELEASE_DIR]   (default ../shared/derm7pt/release_v0)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-../shared/derm7pt/release_v0}"
bash scripts/setup.sh
. .venv/bin/activate
exec dermcir demo --data "$DATA" --out runs/demo
