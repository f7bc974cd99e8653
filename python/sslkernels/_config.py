"""Runtime switches.

Value checks (NaN/Inf, index ranges) need a pass over the data and, on CUDA, a
host sync. The rule for every op: structural checks (shape, dtype, device)
always; value checks always on CPU; on CUDA only in debug mode, switched on by
`set_debug(True)` or the environment variable SSLKERNELS_DEBUG=1. With debug off a
CUDA kernel still never reads or writes out of bounds, whatever its inputs hold.
"""
from __future__ import annotations

import os

_debug = os.environ.get("SSLKERNELS_DEBUG", "0").strip().lower() in {"1", "true", "yes", "on"}


def set_debug(enabled: bool) -> None:
    """Turn value checks on CUDA inputs on or off (they cost a host sync per call)."""
    global _debug
    _debug = bool(enabled)


def debug_enabled() -> bool:
    return _debug
