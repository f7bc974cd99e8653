#!/usr/bin/env bash
# Create (or reuse) .venv, install torch, Triton, the test/bench tools and sslkernels itself.
# Usage: bash scripts/setup.sh [--editable]
# Environment: SSLK_VENV (default .venv), SSLK_TORCH (default torch==2.13.0, a CPU build here;
# torch>=2.5: what ran, README), SSLK_PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${SSLK_VENV:-.venv}"
PYTHON="${SSLK_PYTHON:-python3}"
TORCH_SPEC="${SSLK_TORCH:-torch==2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing $TORCH_SPEC"
  "${PIP[@]}" "$TORCH_SPEC"
fi
echo "[setup] installing build and test tools"
"${PIP[@]}" "scikit-build-core>=0.10" "pybind11>=2.12" "scipy-openblas32>=0.3.27" numpy \
  pytest pytest-benchmark hypothesis matplotlib tqdm "triton>=3.0"

# lightly's own NTXentLoss is the parity oracle; its torchvision dependency is not
# installable beside the CPU torch build, so only the pure-Python package comes in.
"${PIP[@]}" --no-deps "lightly==1.6.0"
# pytorch-metric-learning (pure Python + scikit-learn): the SupCon parity oracle.
"${PIP[@]}" "pytorch-metric-learning>=2.0"
# open_clip's loss.py (plain torch) is the ClipLoss parity oracle; its package
# __init__ needs torchvision, so it comes in without dependencies.
"${PIP[@]}" --no-deps "open_clip_torch==3.3.0"
# timm's VisionTransformer is the patch_vit parity oracle; it needs torchvision only for
# its data pipeline, which the test stubs (tests/_timm.py), so it comes in without deps.
"${PIP[@]}" --no-deps "timm==1.0.31"
# Lightning: the RankMeCallback wrapper is tested under a real Trainer.
"${PIP[@]}" "lightning>=2.0"

echo "[setup] building and installing sslkernels"
if [ "${1:-}" = "--editable" ]; then
  "${PIP[@]}" --no-build-isolation -e .
else
  "${PIP[@]}" --no-build-isolation .
fi
"$PY" -c "import sslkernels, sslkernels.kernels; print('[setup] sslkernels', sslkernels.__version__, 'from', sslkernels.__file__)"
