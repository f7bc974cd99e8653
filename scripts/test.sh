#!/usr/bin/env bash
# Set everything up on a fresh machine, then run the whole test suite (CPU; the
# Triton kernels run under TRITON_INTERPRET=1 in tests/interpret/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${SSLK_VENV:-.venv}/bin/python" -m pytest tests "$@"
