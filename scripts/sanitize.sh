#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer run of the C++ core, outside the install:
#   1. configure and build `_C` and the pure C++ driver (tests/cpp, CTest) with
#      -DSSLKERNELS_SANITIZE=ON into $SSLK_ASAN_BUILD (default build/asan; never build/ itself,
#      where pip builds the real extension);
#   2. run the driver through ctest;
#   3. run the C++-path pytest files with the sanitizer runtime preloaded and
#      SSLKERNELS_EXT_PATH pointing sslkernels at the sanitized `_C`.
# Any ASan/UBSan report aborts the process, so the script fails on the first one.
# Usage: bash scripts/sanitize.sh [extra pytest args]   (SSLK_ASAN_TESTS overrides the file list)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SSLK_VENV:-.venv}"
PY="$(cd "$VENV/bin" && pwd)/python"
BUILD="${SSLK_ASAN_BUILD:-build/asan}"
JOBS="${SSLK_JOBS:-2}"

pybind11_dir="$("$PY" -c 'import pybind11; print(pybind11.get_cmake_dir())')"
version="$("$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])' 2>/dev/null || echo 0.0.0)"
cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DSKBUILD_PROJECT_NAME=sslkernels -DSKBUILD_PROJECT_VERSION="$version" \
  -DPython_EXECUTABLE="$PY" -Dpybind11_DIR="$pybind11_dir" \
  -DSSLKERNELS_SANITIZE=ON -DSSLKERNELS_BUILD_TESTS=ON > "$BUILD.configure.log" 2>&1 \
  || { cat "$BUILD.configure.log"; exit 1; }
cmake --build "$BUILD" --target _C sslkernels_core_test -j "$JOBS"

export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:symbolize=1${SSLK_ASAN_EXTRA:+:$SSLK_ASAN_EXTRA}"
export UBSAN_OPTIONS="halt_on_error=1:abort_on_error=1:print_stacktrace=1"
echo "[sanitize] C++ driver (ctest)"
ctest --test-dir "$BUILD" --output-on-failure

echo "[sanitize] C++-path pytest files on the sanitized _C"
asan_rt="$(${CXX:-g++} -print-file-name=libasan.so)"
ubsan_rt="$(${CXX:-g++} -print-file-name=libubsan.so)"
tests=(${SSLK_ASAN_TESTS:-tests/test_nt_xent.py tests/test_sup_con.py tests/test_info_nce.py tests/test_svdvals.py
  tests/test_metrics.py tests/test_attention.py tests/test_hostile_input.py tests/test_properties.py
  tests/test_threads_determinism.py tests/test_sigreg.py tests/test_info_nce_terms.py})
export SSLKERNELS_EXT_PATH="$(cd "$BUILD" && pwd)" LD_PRELOAD="$asan_rt:$ubsan_rt${LD_PRELOAD:+:$LD_PRELOAD}"
# the tests must be using the sanitized module, not the installed one
"$PY" -c 'import sys, sslkernels._ext as e; f = e._C.__file__; print("[sanitize] _C:", f); sys.exit(not f.startswith(sys.argv[1]))' "$SSLKERNELS_EXT_PATH"
HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}" "$PY" -m pytest "${tests[@]}" -m "not slow" -p no:cacheprovider "$@"
