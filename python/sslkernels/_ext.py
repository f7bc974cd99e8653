"""The one module that touches the compiled CPU core `sslkernels._C`.

The fused CPU path has no eager fallback: if the extension is missing, importing
sslkernels fails here and says how to rebuild it.
"""
from __future__ import annotations

import os

import torch


def _load_override(path: str):
    """Load `_C` from SSLKERNELS_EXT_PATH (the module file, or a folder holding it): how
    scripts/sanitize.sh runs the tests on an ASan/UBSan build made outside the install."""
    import importlib.machinery
    import importlib.util
    import sys

    files = [path] if os.path.isfile(path) else [
        os.path.join(path, "_C" + suffix) for suffix in importlib.machinery.EXTENSION_SUFFIXES]
    found = [f for f in files if os.path.isfile(f)]
    if not found:
        raise ImportError(f"SSLKERNELS_EXT_PATH={path!r} holds no _C extension module for this Python")
    spec = importlib.util.spec_from_file_location("sslkernels._C", found[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["sslkernels._C"] = module
    return module


try:
    if os.environ.get("SSLKERNELS_EXT_PATH"):
        _C = _load_override(os.environ["SSLKERNELS_EXT_PATH"])
    else:
        from sslkernels import _C  # noqa: F401  (built by scikit-build-core from csrc/)
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "sslkernels._C (the C++ CPU core) is not importable: the package was not built or "
        "its build is out of date. Reinstall with `pip install .` (or `pip install -e .`) "
        f"from the source tree, with a C++ compiler available. Original error: {exc}"
    ) from exc

# dtype codes shared with csrc/include/sslkernels/common.hpp (enum class DType).
DTYPE_CODES = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float64: 3,
}

# Status codes of csrc/include/sslkernels/common.hpp (enum class Status).
STATUS_OK = 0
STATUS_NONFINITE_FIRST = 1
STATUS_NONFINITE_SECOND = 2
STATUS_NONFINITE_RESULT = 3
STATUS_BAD_ARGUMENT = 4
STATUS_NONFINITE_THIRD = 5


def raise_for_status(status: int, op: str, first: str, second: str, third: str = "") -> None:
    """Turn a C++ status code into an exception that names the offending argument."""
    if status == STATUS_OK:
        return
    if status == STATUS_NONFINITE_FIRST:
        raise ValueError(f"{op}: `{first}` contains NaN or Inf")
    if status == STATUS_NONFINITE_SECOND:
        raise ValueError(f"{op}: `{second}` contains NaN or Inf")
    if status == STATUS_NONFINITE_THIRD:
        raise ValueError(f"{op}: `{third}` contains NaN or Inf")
    if status == STATUS_NONFINITE_RESULT:
        raise ValueError(
            f"{op}: the logits overflow float32 (finite `{first}`/`{second}` too large for the "
            "temperature); normalize the inputs or raise the temperature"
        )
    raise ValueError(f"{op}: the C++ core rejected its arguments (status {status})")


def num_threads() -> int:
    """Threads for a CPU kernel: the same count torch uses for its own CPU ops."""
    return max(1, torch.get_num_threads())
