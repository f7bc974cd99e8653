#!/usr/bin/env bash
# The device image's Triton against this tree, on this CPU-only machine, so that a GPU lease
# is not lost to an API Triton 3.6 lacks. The GPU machine runs Python 3.12, torch 2.11 and
# triton 3.6.0; the tests here run a newer Triton. This builds (once) a second venv with
# triton==3.6.0 beside the CPU torch (Python 3.11 here: no CPU torch wheel for 3.12 on disk),
# then runs under it:
#   1. the source checks that pin what 3.6 rejects (tests/test_triton_compat.py) and the
#      interpreter's and frontend's (tests/interpret/test_triton_versions_triton.py);
#   2. python -m benchmarks.gpu --compile-only: every kernel variant compiled for sm_90 by
#      3.6's frontend and its bundled ptxas (registers, spills, SASS HGMMA), 0 failures;
#   3. python -m benchmarks.gpu --rehearse: the device run on tiny CPU tensors under
#      TRITON_INTERPRET=1, every check PASS.
#
#   bash scripts/check_triton36.sh                    # all three (compile-only ~8 min on 2 cores)
#   bash scripts/check_triton36.sh --no-compile       # 1 and 3 only (about a minute once built)
#   bash scripts/check_triton36.sh --only sigreg      # extra arguments go to both benchmarks.gpu runs
#   .venv36/bin/python -m pytest tests/interpret -q   # then the whole interpreter suite (~7 min)
#
# Environment: SSLK_VENV36 (default .venv36), SSLK_PYTHON (default python3), SSLK_JOBS
# (compile-only processes, default 2). The venv pins numpy<2.4: Triton 3.6's interpreter
# calls int() on one-element arrays, which NumPy 2.4 refuses (newer Triton squeezes first);
# the device never interprets, so this pin is the rehearsal's only. Compiled kernels are
# cached in build/triton36-cache (TRITON_CACHE_DIR), apart from the main venv's.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${SSLK_VENV36:-.venv36}"
PYTHON="${SSLK_PYTHON:-python3}"
JOBS="${SSLK_JOBS:-2}"
TRITON_SPEC="triton==3.6.0"
compile=1
if [[ "${1:-}" == "--no-compile" ]]; then compile=0; shift; fi
t0=$(date +%s)
say() { echo "[triton36 $(( $(date +%s) - t0 ))s] $*"; }

ready() {
  [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" - <<'PY' 2>/dev/null
import numpy, sslkernels, sslkernels.kernels, torch, triton
assert triton.__version__ == "3.6.0" and tuple(map(int, numpy.__version__.split(".")[:2])) < (2, 4)
PY
}

if ! ready; then
  say "building $VENV ($TRITON_SPEC, numpy<2.4, then scripts/setup.sh --editable)"
  [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
  # triton and numpy first: setup.sh's unpinned "triton>=3.0" and "numpy" keep what is there
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$TRITON_SPEC" "numpy<2.4"
  SSLK_VENV="$VENV" SSLK_PYTHON="$PYTHON" bash scripts/setup.sh --editable > "$VENV/setup.log" 2>&1 \
    || { tail -20 "$VENV/setup.log"; exit 1; }
  ready || { echo "[triton36] $VENV is not triton 3.6.0 + numpy<2.4 + sslkernels after setup" >&2; exit 1; }
fi
PY="$VENV/bin/python"
export TRITON_CACHE_DIR="$PWD/build/triton36-cache"
unset TRITON_INTERPRET
say "$("$PY" -c 'import sys, torch, triton, numpy as np
print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "numpy", np.__version__)')"

status=0
say "source and interpreter checks"
nice -n 10 "$PY" -m pytest -q -p no:cacheprovider --disable-warnings tests/test_triton_compat.py \
  tests/interpret/test_triton_versions_triton.py || status=1

if [[ "$compile" == 1 ]]; then
  say "compile-only (sm_90, $JOBS processes)"
  nice -n 10 "$PY" -m benchmarks.gpu --compile-only --jobs "$JOBS" "$@" > build/triton36-compile.log 2>&1 || status=1
  grep -E "COMPILE FAILED|^compile-only" build/triton36-compile.log | cut -c1-300 || true
fi

say "rehearsal (TRITON_INTERPRET=1, tiny shapes)"
nice -n 10 "$PY" -m benchmarks.gpu --rehearse --csv "build/triton36-rehearsal.csv" "$@" \
  > build/triton36-rehearsal.log 2>&1 || status=1
sed -n '/^FAILURES:/,/^$/p' build/triton36-rehearsal.log | head -30
grep -E "^(ALL CHECKS PASSED|FAILED) \(" build/triton36-rehearsal.log \
  || echo "[triton36] the rehearsal ended early: see build/triton36-rehearsal.log"

say "$( ((status)) && echo "FAILED (logs: build/triton36-*.log)" || echo "triton 3.6 check passed")"
exit "$status"
