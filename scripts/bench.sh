#!/usr/bin/env bash
# Set everything up on a fresh machine, then run the default benchmark suite
# (fused vs eager PyTorch); extra arguments go to `sslkernels bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${SSLK_VENV:-.venv}/bin/sslkernels" bench "$@"
