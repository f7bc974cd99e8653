#!/usr/bin/env bash
# Build a wheel with `pip wheel .` (build isolation on), install it into a brand-new
# virtual environment and use it there: the C++ core, the Triton sources
# (sslkernels.kernels) and a forward+backward.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${SSLK_PYTHON:-python3}"
TORCH_SPEC="${SSLK_TORCH:-torch==2.13.0}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m pip wheel --quiet --disable-pip-version-check --no-deps -Cbuild-dir="$work/build" -w "$work/dist" .
wheel="$(ls "$work"/dist/sslkernels-*.whl)"
echo "[wheel] built $(basename "$wheel")"
"$PYTHON" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check "$TORCH_SPEC"
"$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check "$wheel"
cd "$work"
"$work/venv/bin/python" - <<'PY'
import importlib.util, torch, sslkernels, sslkernels.kernels
assert importlib.util.find_spec("sslkernels.kernels.contrastive") is not None, "Triton sources missing from the wheel"
z1 = torch.randn(100, 32, requires_grad=True); z2 = torch.randn(100, 32, requires_grad=True)
loss = sslkernels.nt_xent(z1, z2); loss.backward()
ref = sslkernels.reference.nt_xent_reference(z1.detach(), z2.detach())
torch.testing.assert_close(loss.detach(), ref)
print("[wheel] installed wheel works:", sslkernels.__file__, "loss", float(loss.detach()))
PY
