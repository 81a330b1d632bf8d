#!/usr/bin/env bash
# Sets up a virtual environment (.venv) with dermcir and its test tools, then runs the whole test suite.
# Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
# A real headless browser for the web-page test (Debian's chromium; Playwright drives it).
bash scripts/setup_browser.sh
. .venv/bin/activate
export DERMCIR_CACHE="${DERMCIR_CACHE:-$PWD/.dermcir-cache}"
set +e
python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi
exit "$rc"
