#!/usr/bin/env bash
# Set everything up on a fresh machine, then run the default benchmark suite (fused vs eager
# PyTorch, one headline case per op, ~3 min on 2 cores); extra arguments go to
# `sslkernels bench` (`--full` for the whole grid, `--quick` for small cases).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${SSLK_VENV:-.venv}/bin/sslkernels" bench "$@"
