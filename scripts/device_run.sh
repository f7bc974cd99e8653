#!/usr/bin/env bash
# The one device call of a GPU session (issue 14): install the carried wheels, run the
# device package, write benchmarks/results-style CSVs under $OUT, all within 8 minutes.
#
# Here, first:   bash scripts/build_device_wheels.sh      (-> .whl/, git-ignored; ~8 MB)
#                .venv/bin/python -m benchmarks.gpu --rehearse   (the same script on the CPU)
# Then one call of the device tool:
#     run(command="bash scripts/device_run.sh", carry=[".whl"], timeout_s=540)
# What comes back under $OUT (at most 8 files): gpu-<date>-<card>.csv (the run's CSV),
# device.log (everything printed), sanitizer.log (compute-sanitizer memcheck over every
# kernel on tiny shapes, with hostile indices, where the runtime allows it), env.txt.
# Commit the CSV as benchmarks/results/gpu-<date>-<card>.csv and the table, predicted
# (benchmarks/GPU_MODEL.md) against measured, in benchmarks/RESULTS.md.
#
# Budget (seconds, of the 480 the issue allows, set-up included): install ~15, main run
# DEADLINE (default 330: its sections skip what no longer fits and the table is printed),
# memcheck SANITIZE_S (default 90, skipped when less is left).
set -uo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
OUT="${OUT:-/tmp/device-out}"
mkdir -p "$OUT"
DEADLINE="${DEADLINE:-330}"
SANITIZE_S="${SANITIZE_S:-90}"
BUDGET_S="${BUDGET_S:-470}"
WHEELS="${WHEELS:-.whl}"
PY="${PY:-python3}"            # the image's python3 (3.12, its own torch / triton)
SKIP_INSTALL="${SKIP_INSTALL:-0}"  # 1: use PY's own sslkernels (the CPU test of this script)
EXTRA_ARGS="${EXTRA_ARGS:-}"   # appended to the main run (the CPU test: --rehearse --only ...)
export PYTHONUNBUFFERED=1
elapsed() { echo $(( $(date +%s) - t0 )); }

{
  echo "== env"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total,temperature.gpu --format=csv || true
  $PY -c 'import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")' || true
  uname -r
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [[ "$SKIP_INSTALL" != 1 ]]; then
  if ! ls "$WHEELS"/sslkernels-*cp312*.whl >/dev/null 2>&1; then
    echo "device_run: no carried sslkernels cp312 wheel in $WHEELS (run scripts/build_device_wheels.sh here and carry .whl)"
    exit 3
  fi
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 3
  export PYTHONPATH=/tmp/site
  if ! ldconfig -p | grep -q 'libgomp.so.1 ' && [[ -f "$WHEELS/lib/libgomp.so.1" ]]; then
    export LD_LIBRARY_PATH="$PWD/$WHEELS/lib:${LD_LIBRARY_PATH:-}"
    echo "device_run: using the carried libgomp.so.1"
  fi
fi
$PY -c 'import sslkernels, os; print("sslkernels from", os.path.dirname(sslkernels.__file__))' || exit 3
echo "device_run: installed in $(elapsed)s"

card=$($PY -c 'import sys; sys.path.insert(0, "."); from benchmarks.gpu._runner import card_slug; print(card_slug())')
csv="$OUT/gpu-$(date +%F)-$card.csv"
$PY -m benchmarks.gpu --time-first --quick --deadline "$DEADLINE" --csv "$csv" $EXTRA_ARGS 2>&1 | tee "$OUT/device.log"
status=${PIPESTATUS[0]}
echo "device_run: main run exit $status after $(elapsed)s"

left=$(( BUDGET_S - $(elapsed) ))
if command -v compute-sanitizer >/dev/null && (( left > SANITIZE_S + 10 )); then
  # every kernel on tiny shapes (the rehearsal's), hostile indices included; --tiny does no timing
  # that matters, and the checks' verdicts are the memcheck's own lines
  timeout "$SANITIZE_S" compute-sanitizer --tool memcheck --leak-check no --error-exitcode 9 \
    $PY -m benchmarks.gpu --tiny --no-autotune --csv "$OUT/sanitize-tiny.csv" > "$OUT/sanitizer.log" 2>&1
  s=$?
  echo "device_run: compute-sanitizer memcheck exit $s ($( (( s == 124 )) && echo 'timed out' || echo done)); $(grep -c 'Invalid' "$OUT/sanitizer.log") invalid-access reports"
  tail -5 "$OUT/sanitizer.log"
else
  echo "device_run: memcheck skipped (compute-sanitizer missing or ${left}s left)"
fi
echo "device_run: total $(elapsed)s; CSV $csv"
exit "$status"
