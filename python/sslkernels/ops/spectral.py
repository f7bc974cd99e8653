"""Singular-value ops.

sslkernels::svdvals_ex(A, max_sweeps) -> (S, info)

A is [B, m, n] (the functional layer flattens leading dims); S is [B, min(m, n)],
descending, float64 for float64 input and float32 otherwise (float16 / bfloat16
are computed in float32); info is int32 [B]: 0 converged, 1 sweep budget
exhausted (Jacobi) or the eigensolver failed (Gram route). Both stay on A's
device: no host sync on CUDA.

Routes of the CPU kernel (the C++ core, csrc/cpu/spectral.cpp):
  * one-sided Jacobi, 16 (float32) / 8 (float64) matrices per SIMD register, when
    min(m, n) <= JACOBI_MAX_COLS[dtype] and the matrix is not much taller than
    wide (float64: any height, it keeps full float64 accuracy);
  * otherwise a float64 Gram A^T A (OpenBLAS dsyrk on float64 row tiles) and its
    eigenvalues, sigma = sqrt(max(lambda, 0)): LAPACK dsyevd one matrix per thread
    for batches, torch.linalg.eigvalsh (multithreaded LAPACK) for a few big
    matrices. Absolute error about 1e-8 * sigma_max (see the comment in
    spectral.cpp), far inside the float32 promise of 1e-5 * sigma_max.

Singular values only: there is no backward. Calling backward through S raises
NotImplementedError saying so.
"""
from __future__ import annotations

import torch
from torch import Tensor

from sslkernels import _ext
from sslkernels._common import no_kernel as _no_kernel
from sslkernels._common import stats_dtype as compute_dtype
from sslkernels._config import debug_enabled
from sslkernels._validation import check_finite
from sslkernels.ops._triton import launchers

DEFAULT_MAX_SWEEPS = 30  # LAPACK's sgesvj budget; random 32x32 converge in about 9

# Largest min(m, n) that the Jacobi route takes, per compute dtype. Above it the
# float64 Gram + dsyevd route is faster on the CPU (measured, 2 cores, AVX-512).
JACOBI_MAX_COLS = {torch.float32: 48, torch.float64: 128}
# Jacobi cost grows with the height; a float32 matrix taller than this many times
# its width goes to the Gram route (one pass over the rows).
JACOBI_MAX_ASPECT = 4
# Below this many matrices per thread, a big Gram's eigenvalues come from
# torch.linalg.eigvalsh (multithreaded) rather than one dsyevd per thread.
EIGVALSH_MIN_COLS = 256
# From this many matrices on, one matrix per thread (C++ dsyrk + dsyevd); below it, each
# Gram is split over threads in fixed blocks and torch's eigvalsh takes the eigenvalues.
# The route depends on the shape only, so results do not change with the thread count.
GRAM_PER_MATRIX_MIN_BATCH = 8


@torch.library.custom_op("sslkernels::svdvals_ex", mutates_args=())
def svdvals_ex(A: Tensor, max_sweeps: int) -> tuple[Tensor, Tensor]:
    raise _no_kernel("svdvals_ex", A.device)


@svdvals_ex.register_fake
def _(A, max_sweeps):
    b, m, n = A.shape
    k = min(m, n)
    return A.new_empty((b, k), dtype=compute_dtype(A.dtype)), A.new_empty((b,), dtype=torch.int32)


def _tall_view(A: Tensor):
    """(rows, cols, batch_stride, row_stride, col_stride) of A or, when wide, of A^T."""
    b, m, n = A.shape
    if m >= n:
        return m, n, A.stride(0), A.stride(1), A.stride(2)
    return n, m, A.stride(0), A.stride(2), A.stride(1)


def _status(status: int) -> None:
    if status == _ext.STATUS_NONFINITE_FIRST:
        raise ValueError("svdvals: `A` contains NaN or Inf")
    if status != _ext.STATUS_OK:
        raise ValueError(f"svdvals: the C++ core rejected its arguments (status {status})")


@svdvals_ex.register_kernel("cpu")
def _(A, max_sweeps):
    b = A.shape[0]
    rows, cols, bs, rs, cs = _tall_view(A)
    out_dtype = compute_dtype(A.dtype)
    view = dict(a=A.data_ptr(), dtype=_ext.DTYPE_CODES[A.dtype], batch=b, rows=rows, cols=cols,
                batch_stride=bs, row_stride=rs, col_stride=cs)
    threads = _ext.num_threads()
    S = torch.empty((b, cols), dtype=out_dtype)
    info = torch.empty((b,), dtype=torch.int32)
    jacobi = cols <= JACOBI_MAX_COLS[out_dtype] and (out_dtype == torch.float64 or rows <= JACOBI_MAX_ASPECT * cols)
    if jacobi:
        _status(_ext._C.svdvals_jacobi(**view, s=S.data_ptr(), info=info.data_ptr(), max_sweeps=int(max_sweeps),
                                       num_threads=threads))
    elif cols < EIGVALSH_MIN_COLS or b >= GRAM_PER_MATRIX_MIN_BATCH:  # shapes alone: thread-count independent
        _status(_ext._C.svdvals_gram(**view, s=S.data_ptr(), info=info.data_ptr(), num_threads=threads))
    else:
        G = torch.empty((b, cols, cols), dtype=torch.float64)
        _status(_ext._C.gram_float64(**view, g=G.data_ptr(), num_threads=threads))
        lam = torch.linalg.eigvalsh(G)  # raises if LAPACK fails to converge
        S.copy_(lam.clamp_min(0).sqrt().flip(-1))
        info.zero_()
    return S, info


@svdvals_ex.register_kernel("cuda")
def _(A, max_sweeps):
    if debug_enabled():
        check_finite(A, "A")
    b, m, n = A.shape
    x = A.to(compute_dtype(A.dtype))
    if m < n:
        x = x.transpose(1, 2)  # the kernel sees tall matrices
    S, info = launchers("spectral").jacobi_svdvals(x.contiguous(), int(max_sweeps))
    return S, info


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_s, grad_info):
    raise NotImplementedError(
        "sslkernels.svdvals computes singular values only and has no backward; for gradients "
        "use torch.linalg.svdvals (or detach the input: metrics such as rankme are monitors)"
    )


svdvals_ex.register_autograd(_backward, setup_context=_setup_context)
