#!/usr/bin/env bash
# Set everything up on a fresh machine, then run the whole test suite (CPU; the
# Triton kernels run under TRITON_INTERPRET=1 in tests/interpret/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
"${SSLK_VENV:-.venv}/bin/python" -m pytest tests "$@"
# SSLK_SANITIZE=1: also build _C and the C++ driver with ASan/UBSan (build/asan) and rerun the
# C++-path tests on it (scripts/sanitize.sh, ~5 min on 2 cores; .ci/run runs the core files only).
if [ "${SSLK_SANITIZE:-0}" = "1" ]; then
  bash scripts/sanitize.sh -q
fi
