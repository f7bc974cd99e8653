#!/usr/bin/env bash
# What a GPU session carries to the device machine, which reaches no package index and has
# no scipy-openblas32: the cp312 wheel of sslkernels built here with pyenv's Python 3.12
# (the device image's python3 is 3.12 with its own torch / triton), the scipy-openblas32
# wheel it links against, and libgomp.so.1 as a fallback should the image lack it.
#
#   bash scripts/build_device_wheels.sh [DEST]     # DEST defaults to .whl (git-ignored)
#   bash scripts/build_device_wheels.sh --check [DEST]   # then the install rehearsal only
#
# The rehearsal (also run after a build) installs DEST's wheels into a fresh Python 3.12
# venv with --no-index --no-deps --target, as scripts/device_run.sh does there, and loads the
# C++ core from that install (this machine's 3.12 has no torch: the Python package is
# checked for its files, the extension by loading it).
set -euo pipefail
cd "$(dirname "$0")/.."
check_only=0
if [[ "${1:-}" == "--check" ]]; then check_only=1; shift; fi
DEST="${1:-.whl}"
PY312="${SSLK_PY312:-}"
if [[ -z "$PY312" ]]; then
  for cand in "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/3.12*/bin/python3.12; do
    [[ -x "$cand" ]] && PY312="$cand"
  done
fi
if [[ -z "$PY312" ]] || ! "$PY312" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
  echo "[device-wheels] no Python 3.12 found (pyenv install 3.12, or set SSLK_PY312)" >&2
  exit 2
fi

if [[ "$check_only" == 0 ]]; then
  rm -rf "$DEST"
  mkdir -p "$DEST/lib"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  echo "[device-wheels] building the cp312 wheel with $PY312"
  "$PY312" -m pip wheel --quiet --disable-pip-version-check --no-deps -Cbuild-dir="$work/build" -w "$DEST" .
  # the scipy-openblas32 that the build linked against: the one its isolated env resolved
  # (pip picks the newest matching release for both)
  "$PY312" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d "$DEST" "scipy-openblas32>=0.3.27"
  gomp="$(gcc -print-file-name=libgomp.so.1 2>/dev/null || true)"
  if [[ -f "$gomp" ]]; then cp -L "$gomp" "$DEST/lib/libgomp.so.1"; fi
  (cd "$DEST" && sha256sum ./*.whl lib/* > MANIFEST.sha256)
  du -sh "$DEST"
  ls -la "$DEST"
fi

# ---- the install rehearsal: a fresh 3.12 venv, no index, as on the device machine
rehearse="$(mktemp -d)"
trap 'rm -rf "$rehearse" ${work:+"$work"}' EXIT
"$PY312" -m venv "$rehearse/venv"
n_wheels=$(ls "$DEST"/*.whl | wc -l)
[[ "$n_wheels" == 2 ]] || { echo "[device-wheels] expected 2 wheels in $DEST, found $n_wheels" >&2; exit 1; }
"$rehearse/venv/bin/python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$rehearse/site" "$DEST"/*.whl
PYTHONPATH="$rehearse/site" "$rehearse/venv/bin/python" - "$rehearse/site" <<'PY'
import glob, importlib.util, os, sys
site = sys.argv[1]
ext = glob.glob(os.path.join(site, "sslkernels", "_C.cpython-312-*.so"))
assert len(ext) == 1, f"no cp312 extension in the install: {ext}"
for mod in ("functional.py", "ops/spectral.py", "kernels/contrastive.py", "kernels/attention.py",
            "kernels/spectral.py"):
    assert os.path.isfile(os.path.join(site, "sslkernels", mod)), f"{mod} missing from the wheel"
assert glob.glob(os.path.join(site, "scipy_openblas32", "lib", "libscipy_openblas*.so")), "no OpenBLAS"
spec = importlib.util.spec_from_file_location("sslkernels._C", ext[0])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)  # resolves libscipy_openblas through the RUNPATH, and libgomp
names = [n for n in dir(module) if not n.startswith("_")]
assert names, "the extension exports nothing"
print(f"[device-wheels] rehearsal: --no-index install into a fresh 3.12 venv OK; _C loads "
      f"({len(names)} functions) from {ext[0]}")
PY
