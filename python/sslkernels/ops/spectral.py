"""Singular-value ops.

sslkernels::svdvals_ex(A, max_sweeps) -> (S, info)

A is [B, m, n] (the functional layer flattens leading dims); S is [B, min(m, n)],
descending, float64 for float64 input and float32 otherwise (float16 / bfloat16
are computed in float32); info is int32 [B]: 0 converged, 1 sweep budget
exhausted (Jacobi) or the eigensolver failed (Gram route). Both stay on A's
device: no host sync on CUDA.

Every route depends on (shape, device type, dtype) alone, never on the values or the
thread count: ``svdvals_route`` names it, and both kernels dispatch on its answer.

Routes of the CPU kernel (the C++ core, csrc/cpu/spectral.cpp):
  * one-sided Jacobi, 16 (float32) / 8 (float64) matrices per SIMD register, when
    min(m, n) <= JACOBI_MAX_COLS[dtype] and the matrix is not much taller than
    wide (float64: any height, it keeps full float64 accuracy);
  * otherwise a float64 Gram A^T A (OpenBLAS dsyrk on float64 row tiles) and its
    eigenvalues, sigma = sqrt(max(lambda, 0)): LAPACK dsyevd one matrix per thread
    for batches, torch.linalg.eigvalsh (multithreaded LAPACK) for a few big
    matrices. Absolute error about 1e-8 * sigma_max (see the comment in
    spectral.cpp), far inside the float32 promise of 1e-5 * sigma_max.

Routes of the CUDA kernel (any shape):
  * "jacobi": both sides <= CUDA_JACOBI_MAX_DIM (128): the Triton one-sided Jacobi,
    one program per matrix, the matrix in registers (kernels/spectral.py);
  * "qr_jacobi": min(m, n) <= 128 < max(m, n): R of a QR (cuSOLVER geqrf through
    torch.linalg.qr, in the compute dtype) has the singular values of the tall matrix
    and is min(m, n) square, so the Jacobi kernel takes R (error ~eps * sigma_max);
  * "gram_eigvalsh" (float32 / half input, min(m, n) > 128): the float64 Gram A^T A,
    summed over fixed row blocks in a fixed order (bounded extra memory, deterministic),
    and torch.linalg.eigvalsh; sigma = sqrt(max(lambda, 0)). Absolute error ~1e-8 *
    sigma_max, so singular values down to 1e-6 of the largest keep ~3 digits and the
    float32 promise (1e-5 * sigma_max) holds with room;
  * "linalg_svdvals" (float64 input, min(m, n) > 128): the Gram would halve float64's
    digits, so torch.linalg.svdvals (cuSOLVER) on R of a QR.
The first two make no host sync. The last two do, once: torch's eigvalsh / svdvals
check cuSOLVER's info flag on the host (a failure raises there, so info is 0).

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


# The CUDA Jacobi kernel keeps the whole matrix in one program's registers: both sides
# at most this (kernels/spectral.py MAX_DIM; tests/interpret check the two agree).
CUDA_JACOBI_MAX_DIM = 128
# Rows of A per float64 block of the Gram route: bounds the float64 copy to
# GRAM_ROW_BLOCK * cols * 8 bytes (128 MiB at 2048 columns) whatever the height.
GRAM_ROW_BLOCK = 8192

ROUTES = ("jacobi", "gram", "gram_eigvalsh", "qr_jacobi", "linalg_svdvals")


def svdvals_route(shape, device, dtype: torch.dtype) -> str:
    """The route of ``svdvals_ex`` for A of ``shape`` [B, m, n] on ``device`` (a
    torch.device or its type name) in ``dtype``; one of ROUTES. Shapes and dtype only,
    so the CPU tests check the CUDA choice too."""
    b, m, n = (int(x) for x in shape)
    rows, cols = max(m, n), min(m, n)
    out = compute_dtype(dtype)
    kind = torch.device(device).type
    if kind == "cpu":
        if cols <= JACOBI_MAX_COLS[out] and (out == torch.float64 or rows <= JACOBI_MAX_ASPECT * cols):
            return "jacobi"
        if cols < EIGVALSH_MIN_COLS or b >= GRAM_PER_MATRIX_MIN_BATCH:
            return "gram"
        return "gram_eigvalsh"
    if kind == "cuda":
        if rows <= CUDA_JACOBI_MAX_DIM:
            return "jacobi"
        if cols <= CUDA_JACOBI_MAX_DIM:
            return "qr_jacobi"
        return "linalg_svdvals" if out == torch.float64 else "gram_eigvalsh"
    raise _no_kernel("svdvals_ex", torch.device(device))


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
    route = svdvals_route(A.shape, "cpu", A.dtype)
    if route == "jacobi":
        _status(_ext._C.svdvals_jacobi(**view, s=S.data_ptr(), info=info.data_ptr(), max_sweeps=int(max_sweeps),
                                       num_threads=threads))
    elif route == "gram":
        _status(_ext._C.svdvals_gram(**view, s=S.data_ptr(), info=info.data_ptr(), num_threads=threads))
    else:
        G = torch.empty((b, cols, cols), dtype=torch.float64)
        _status(_ext._C.gram_float64(**view, g=G.data_ptr(), num_threads=threads))
        lam = torch.linalg.eigvalsh(G)  # raises if LAPACK fails to converge
        S.copy_(lam.clamp_min(0).sqrt().flip(-1))
        info.zero_()
    return S, info


def _tall(A: Tensor) -> Tensor:
    """A in its compute dtype, transposed when wide (same singular values)."""
    x = A.to(compute_dtype(A.dtype))
    return x.transpose(1, 2) if x.shape[1] < x.shape[2] else x


def qr_r(x: Tensor) -> Tensor:
    """R [B, n, n] of the QR of tall x [B, m, n]: the singular values of x."""
    return torch.linalg.qr(x, mode="r")[1]


def gram_float64(x: Tensor) -> Tensor:
    """x^T x in float64 for tall x [B, m, n], summed over GRAM_ROW_BLOCK row blocks in
    order (a float64 copy of one block at a time; the same sum on every run)."""
    b, m, n = x.shape
    G = torch.zeros((b, n, n), dtype=torch.float64, device=x.device)
    for start in range(0, m, GRAM_ROW_BLOCK):
        block = x[:, start:start + GRAM_ROW_BLOCK].double()
        G.baddbmm_(block.transpose(1, 2), block)
    return G


def gram_eigvalsh_svdvals(x: Tensor) -> Tensor:
    """Singular values of tall x from the float64 Gram's eigenvalues, descending, in x's
    dtype (float32 for half)."""
    lam = torch.linalg.eigvalsh(gram_float64(x))  # raises if cuSOLVER / LAPACK fails
    return lam.clamp_min(0).sqrt().flip(-1).to(compute_dtype(x.dtype))


def svdvals_device(A: Tensor, max_sweeps: int, route: str) -> tuple[Tensor, Tensor]:
    """The CUDA kernel's body for a given route; plain torch but for the Jacobi launcher,
    so the CPU tests run it on CPU tensors (the launcher under TRITON_INTERPRET=1)."""
    x = _tall(A)
    if route == "gram_eigvalsh":
        return gram_eigvalsh_svdvals(x), torch.zeros((x.shape[0],), dtype=torch.int32, device=x.device)
    if route == "linalg_svdvals":
        S = torch.linalg.svdvals(qr_r(x))  # raises if cuSOLVER fails
        return S, torch.zeros((x.shape[0],), dtype=torch.int32, device=x.device)
    if route == "qr_jacobi":
        x = qr_r(x)
    elif route != "jacobi":
        raise ValueError(f"svdvals: no device route {route!r}")
    return launchers("spectral").jacobi_svdvals(x.contiguous(), int(max_sweeps))


@svdvals_ex.register_kernel("cuda")
def _(A, max_sweeps):
    if debug_enabled():
        check_finite(A, "A")
    return svdvals_device(A, max_sweeps, svdvals_route(A.shape, A.device, A.dtype))


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_s, grad_info):
    raise NotImplementedError(
        "sslkernels.svdvals computes singular values only and has no backward; for gradients "
        "use torch.linalg.svdvals (or detach the input: metrics such as rankme are monitors)"
    )


svdvals_ex.register_autograd(_backward, setup_context=_setup_context)
