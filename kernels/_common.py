"""What every Triton family module shares: the environment switches, the fp32 dot
precision, the statistics dtype and small launch helpers.

The switches are read by a function that each family module calls at its own import
(``INTERPRET = interpret_mode()``): `@triton.jit` reads TRITON_INTERPRET when the
module's kernels are decorated, so the flag has to be the module's own, not a value
cached here (the interpreter tests re-import a module without the interpreter).
"""
from __future__ import annotations

import contextlib
import os

import numpy as np
import torch

from sslkernels._common import stats_dtype

__all__ = ["interpret_mode", "autotune_enabled", "FP32_PRECISION", "dot_precision", "stats_dtype",
           "split_float", "device_ctx"]


def interpret_mode() -> bool:
    """TRITON_INTERPRET=1: the kernels run on CPU tensors through numpy."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def autotune_enabled(interpret: bool) -> bool:
    """SSLKERNELS_AUTOTUNE=0: the first config of each family (quick compile, no tuning);
    never under the interpreter."""
    return (not interpret) and os.environ.get("SSLKERNELS_AUTOTUNE", "1") != "0"


# fp32 products when torch's TF32 switch is off: "tf32x3" (three TF32 tensor-core
# products with split operands, ~fp32 accuracy) or "ieee" (FMA units). On an H200
# IEEE ran NT-Xent fwd+bwd (N = 8192, D = 128) 2.7x slower than eager cuBLAS.
FP32_PRECISION = os.environ.get("SSLKERNELS_FP32_DOT", "tf32x3")
if FP32_PRECISION not in ("tf32x3", "ieee"):
    raise ValueError(f"SSLKERNELS_FP32_DOT must be 'tf32x3' or 'ieee', got {FP32_PRECISION!r}")


def _tf32_allowed() -> bool:
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", "none")  # torch >= 2.9; reading allow_tf32
    if precision in ("tf32", "ieee"):                        # after setting it raises
        return precision == "tf32"
    return bool(matmul.allow_tf32)


def dot_precision(dtype: torch.dtype, fp32_precision: str) -> str:
    """`input_precision` of tl.dot: fp32 follows torch's TF32 switch for matmuls (as
    eager's Z @ Z.T does), else `fp32_precision`; other dtypes are exact products."""
    if dtype != torch.float32:
        return "ieee"
    return "tf32" if _tf32_allowed() else fp32_precision


def split_float(x: float):
    """A float64 scalar as a float32 (hi, lo) pair: hi + lo carries ~48 bits (Triton
    passes Python floats as float32)."""
    hi = float(np.float32(x))
    return hi, float(np.float32(x - hi))


def device_ctx(x: torch.Tensor):
    """Launch on the inputs' GPU (the interpreter runs CPU tensors: no context)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
