"""Access to the Triton launchers for the "cuda" kernels of the ops."""
from __future__ import annotations

import importlib


def launchers(family: str):
    """The Triton launcher module `sslkernels.kernels.<family>`.

    Raises NotImplementedError with the reason when Triton is not installed, rather
    than falling back to eager PyTorch.
    """
    try:
        return importlib.import_module(f"sslkernels.kernels.{family}")
    except ImportError as exc:
        raise NotImplementedError(
            f"sslkernels: the CUDA path of `{family}` needs Triton (pip install 'triton>=3.0'); "
            f"importing it failed: {exc}"
        ) from exc
