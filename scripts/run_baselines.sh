#!/usr/bin/env bash
# Runs the four re-implemented baselines on a Derm7pt release, one after the other (the machine is small and shared),
# into OUT/<method>/, then writes the comparison table OUT/comparison.md and its chart OUT/comparison.png.
#
# Usage: bash scripts/run_baselines.sh [DATA] [PROFILE] [OUT]
#   DATA     Derm7pt release folder (default ../shared/derm7pt/release_v0)
#   PROFILE  cpu (default) or gpu (needs CUDA)
#   OUT      output root (default runs/baselines)
# Environment: METHODS="snf-dca dahnet" runs a subset; COMPOSED_RUN=runs/cv adds the composed model's run folder to
# the comparison; OMP_NUM_THREADS=1 was the faster setting on the busy 2-core machine the CPU numbers come from.
#   Relative paths are taken from the folder the script is called from (defaults: from the repository root).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
# the caller's relative paths made absolute here, before the script moves to the repository root
DATA="$(realpath -m -- "${1:-$root/../shared/derm7pt/release_v0}")"
PROFILE="${2:-cpu}"
OUT="$(realpath -m "${3:-$root/runs/baselines}")"
if [ -n "${COMPOSED_RUN:-}" ]; then COMPOSED_RUN="$(realpath -m "$COMPOSED_RUN")"; fi
cd "$root"
METHODS="${METHODS:-maskrcnn-fusion snf-dca resnet50-cossim dahnet}"
if ! command -v dermcir >/dev/null 2>&1 && [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi

mkdir -p "$OUT"
: > "$OUT/timings.txt"  # this run's timings only (a rerun used to append to the last one's)
runs=()
for method in $METHODS; do
  start=$(date +%s)
  dermcir cv --method "$method" --data "$DATA" --out "$OUT/$method" --profile "$PROFILE" --quiet
  echo "$method ($PROFILE): $(( $(date +%s) - start )) s wall-clock" | tee -a "$OUT/timings.txt"
  runs+=("$OUT/$method")
done
if [ -n "${COMPOSED_RUN:-}" ]; then runs=("$COMPOSED_RUN" "${runs[@]}"); fi
dermcir compare "${runs[@]}" --out "$OUT/comparison.md"
