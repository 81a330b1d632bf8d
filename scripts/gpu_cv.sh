#!/usr/bin/env bash
# Runs the GPU-profile 5-fold benchmark on the device machine from a packed payload (scripts/pack_gpu_payload.py).
#
# Usage: bash scripts/gpu_cv.sh RUN_DIR [extra `dermcir cv` options, e.g. --time-budget 480]
#   RUN_DIR gets the usual cv outputs. With $BUNDLE set (the device's $OUT), the log is written straight into $BUNDLE,
#   so that a command stopped by the device's time limit still returns it; while the run goes, its results.json and
#   tables.md (rewritten after every finished fold) are copied there every 10 s, so a run stopped part-way still
#   returns its finished folds; after the run, the run folder is packed into $BUNDLE/cv_gpu.tgz and the final
#   results.json and tables.md are copied there (the device returns at most 8 files).
# Order: the benchmark first, then its bundle, then the CUDA-only tests (GPU_TESTS=1, the default; at most
# TESTS_TIMEOUT seconds, default 90, into gpu_tests.log beside the log). So the tests can never cost the benchmark
# its time, and when the device's limit cuts them short the benchmark's results are already in the bundle.
# Time: DEVICE_LIMIT (seconds the device call may run, default 600: its `limit_s`, which is less than timeout_s when
# the session has less device time left) sets the defaults, counted from this script's start (the checks before the
# benchmark take their share): CV_TIMEOUT = what is left of DEVICE_LIMIT - 50 (time left for the bundle),
# --time-budget = what is left of DEVICE_LIMIT - 120 unless given (preparation before the budget's clock, start-up,
# the companions' collection), and the tests get only what is left before DEVICE_LIMIT (skipped under 30 s).
# RUN_DIR must not hold an earlier run: a run cut short would otherwise bundle the earlier run's results as its own.
# The GPU image has torch, timm, transformers, scikit-learn, pandas, matplotlib but not our PyPI weight packages and
# no network, so the package runs from src/ (no pip install) with the weights from gpu_payload/.
# The companion's folds train in CPU worker processes while the GPU trains the fine-tuned models
# (COMPANION_WORKERS, default 5; 0 = fold by fold on the GPU, before each fine-tuned model). With a time budget,
# they stop training (keeping their best epoch) by the time the budget ends, so slow host cores cannot push the
# run past CV_TIMEOUT.
# Local smoke test of this exact path on a tiny packed subset (runs on the CPU):
#   bash scripts/gpu_cv.sh /tmp/smoke --data /tmp/tiny_release --min-cases 4 --folds 2 --set epochs=1 ...
set -uo pipefail
cd "$(dirname "$0")/.."
script_start=$(date +%s)
RUN_DIR="${1:?usage: gpu_cv.sh RUN_DIR [dermcir cv options]}"
if [ -n "$(ls -A "$RUN_DIR" 2>/dev/null)" ]; then
  echo "gpu_cv.sh: $RUN_DIR already holds a run; give a new RUN_DIR (a run cut short would bundle the old results)" >&2
  exit 2
fi
mkdir -p "$RUN_DIR"
DEVICE_LIMIT="${DEVICE_LIMIT:-600}"
GIVEN_TIMEOUT="${CV_TIMEOUT:-}"
OWN_BUDGET=1
case " ${*:2} " in *" --time-budget"*) OWN_BUDGET=0 ;; esac
PY="${PYTHON:-$(command -v python || command -v python3)}"
LOG_DIR="${BUNDLE:-$(dirname "$RUN_DIR")}"
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/$(basename "$RUN_DIR").log"
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" DERMCIR_CACHE="${DERMCIR_CACHE:-$PWD/.dermcir-cache}" HF_HUB_OFFLINE=1
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import torch, timm, transformers; print('torch', torch.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__)"
  start=$(date +%s)
  left=$(( DEVICE_LIMIT - (start - script_start) ))  # the checks above took their share of the device call
  # CV_TIMEOUT (seconds; 0 = none) stops a run that overruns, so that the bundle below is still written; -k: KILL
  # what ignores the TERM (e.g. a process stuck in a driver call) 15 s later
  if [ -z "$GIVEN_TIMEOUT" ] && [ "$left" -lt 180 ]; then  # below that the budget (left - 120) trains nothing
    echo "gpu_cv.sh: only ${left} s of DEVICE_LIMIT=${DEVICE_LIMIT} left; the benchmark needs 180 s at least" >&2
    exit 2
  fi
  CV_TIMEOUT="${GIVEN_TIMEOUT:-$(( left - 50 ))}"
  BUDGET=()
  [ "$OWN_BUDGET" = 1 ] && BUDGET=(--time-budget "$(( left - 120 ))")
  echo "gpu_cv.sh: ${left} s of DEVICE_LIMIT=${DEVICE_LIMIT} left; CV_TIMEOUT=${CV_TIMEOUT} ${BUDGET[*]}"
  if [ -n "${BUNDLE:-}" ]; then  # the finished folds' figures reach the bundle while the run goes
    ( while sleep 10; do
        for f in results.json tables.md; do
          [ -f "$RUN_DIR/$f" ] && cp -f "$RUN_DIR/$f" "$BUNDLE/.$f" && mv -f "$BUNDLE/.$f" "$BUNDLE/$f"
        done
      done ) >/dev/null 2>&1 &  # not into tee's pipe, which would then stay open until its last sleep ends
    mirror=$!
  fi
  timeout -k 15 "$CV_TIMEOUT" "$PY" -m dermcir cv --data gpu_payload/release --profile gpu --out "$RUN_DIR" --quiet \
    --set backbone_weights='"gpu_payload/lite0_fp16.safetensors"' \
    --set text_encoder='"bert"' --set text_weights='"gpu_payload/minilm"' \
    --companion-workers "${COMPANION_WORKERS:-5}" "${BUDGET[@]}" "${@:2}"
  rc=$?
  if [ -n "${mirror:-}" ]; then  # stopped, and any copy it had begun removed (the device returns 8 files at most)
    kill "$mirror" 2>/dev/null
    wait "$mirror" 2>/dev/null
    rm -f "$BUNDLE/.results.json" "$BUNDLE/.tables.md"
  fi
  echo "dermcir cv exit $rc after $(( $(date +%s) - start )) s"
  [ -f "$RUN_DIR/tables.md" ] && cat "$RUN_DIR/tables.md"
  exit $rc
} 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
if [ -n "${BUNDLE:-}" ]; then
  tar czf "$BUNDLE/cv_gpu.tgz" -C "$(dirname "$RUN_DIR")" "$(basename "$RUN_DIR")"
  cp "$RUN_DIR"/results.json "$RUN_DIR"/tables.md "$BUNDLE/" 2>/dev/null
fi
tests_time=$(( DEVICE_LIMIT - ($(date +%s) - script_start) - 15 ))  # what is left of the device call, less a margin
[ "$tests_time" -gt "${TESTS_TIMEOUT:-90}" ] && tests_time="${TESTS_TIMEOUT:-90}"
if [ "${GPU_TESTS:-1}" = 1 ] && [ "$tests_time" -lt 30 ]; then
  echo "CUDA tests skipped: ${tests_time} s left of DEVICE_LIMIT=${DEVICE_LIMIT}" | tee -a "$LOG"
elif [ "${GPU_TESTS:-1}" = 1 ]; then
  # the CUDA-only tests; the payload's MiniLM folder stands in for the PyPI package the device lacks
  start=$(date +%s)
  DERMCIR_TEST_TEXT_FOLDER=gpu_payload/minilm timeout -k 5 "$tests_time" \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py > "$LOG_DIR/gpu_tests.log" 2>&1
  echo "CUDA tests exit $? after $(( $(date +%s) - start )) s: $(tail -n 1 "$LOG_DIR/gpu_tests.log")" | tee -a "$LOG"
fi
exit "$rc"
