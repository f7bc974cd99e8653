"""Triton batched singular values (the CUDA path of `sslkernels::svdvals_ex` for small
matrices): one-sided Jacobi (Hestenes), one program per matrix.

``jacobi_svdvals(A, max_sweeps=30) -> (S, info)`` for A [B, m, n], m, n <= 128,
float32 or float64 (any strides). A wide matrix (m < n) is read as its transpose
by swapping the strides (same singular values, no copy), so the kernel always sees
a tall [M, N] matrix with N = min(m, n) columns.

Kernel ``_jacobi_svdvals_kernel``, grid (B,):

* The matrix lives in registers as a [BLOCK_M, BLOCK_N] tile (powers of two,
  masked, padding = 0), in float32 (float64 for float64 input).
* Sweeps use the round-robin (circle-method) parallel ordering over NP = N rounded
  up to even columns: NP - 1 rounds, each pairing every column with a distinct
  partner, so the NP / 2 rotations of a round are disjoint and are applied to the
  whole tile at once. Round r pairs j, k < NP - 1 with j + k = r (mod NP - 1); the
  column j* with 2 j* = r (mod NP - 1) pairs with column NP - 1. Columns >= NP
  (padding) pair with themselves (no rotation).
* Triton cannot index register columns dynamically, so the partner tile
  P[:, j] = A[:, partner(j)] and the partner's squared norm are a gather through a
  per-program global scratch buffer ([BLOCK_M + 1, BLOCK_N], L1/L2-resident):
  store the tile and the norms, barrier, load them with permuted column offsets,
  barrier (or tl.gather in registers, SSLKERNELS_JACOBI_GATHER=1). Cost per
  round: 2 (BLOCK_M + 1) BLOCK_N scratch accesses (L1/L2) + ~10 M N flops; per
  sweep NP - 1 rounds, so O(M N^2) work and memory traffic per sweep, exact (no
  tensor-core rounding).
* Per column j with partner q (both sides compute the same numbers: the squared
  norms are computed once per column and gathered, gamma is one reduction of the
  product tile): alpha = ||a_p||^2, beta = ||a_q||^2, gamma = a_p . a_q (p < q of
  the pair), recomputed from the columns every round (no drift of updated norms);
  rotate only if |gamma| > tol sqrt(alpha) sqrt(beta) (so gamma == 0, zero or
  padded columns never rotate: no NaN); zeta = (beta - alpha) / (2 gamma),
  t = sign(zeta) / (|zeta| + sqrt(1 + zeta^2)) (through 1 / |zeta| for |zeta| > 1),
  c = 1 / sqrt(1 + t^2), s = c t, tau = s / (1 + c), applied in Rutishauser's form
  a_p' = a_p - s (a_q + tau a_p), a_q' = a_q + s (a_p - tau a_q) (as LAPACK's
  sgesvj and csrc/cpu/spectral.cpp). tol = max(M, 1) * eps(dtype).
* float32 accuracy: the plain form c a_p - s a_q scales the columns by the rounded
  c, and fl(1 / sqrt(1 + t^2)) is biased upwards (sqrt(1 + k eps) with k odd lies
  just below a rounding tie and rounds down), so c^2 + s^2 - 1 averaged +2.7e-8
  per rotation: with ~750 rotations per column at 128 x 128 the column norms grew
  by ~5e-6 on average and up to 1.2e-5 of sigma_max (1.8e-5 measured on an H200,
  where `/` and tl.sqrt were also the approximate div.full.f32 / sqrt.approx.f32).
  In Rutishauser's form the implied cosine 1 - s tau carries no such rounding
  (2-4e-7 of sigma_max at 128 x 128 in a float32 emulation and the interpreter),
  and the rotation parameters and the epilogue's square root use the correctly
  rounded tl.div_rn / tl.sqrt_rn (float32; `/` and tl.sqrt are already IEEE in
  float64).
* A sweep with no rotation means converged: the while loop stops per matrix (so
  info = 0); otherwise it stops after max_sweeps (info = 1).
* Epilogue: sigma_j = ||a_j||, ranked descending by counting comparisons in a
  [BLOCK_N, BLOCK_N] compare matrix (ties broken by index), scattered to S[b, rank].

No host sync in the launcher; outputs come from torch.empty on the input's device.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from sslkernels.kernels._common import device_ctx, interpret_mode

INTERPRET = interpret_mode()
MAX_DIM = 128
# Partner columns through tl.gather (registers) instead of the scratch tile; off until
# a GPU run shows it correct and faster (benchmarks/gpu_check.py times both).
USE_GATHER = os.environ.get("SSLKERNELS_JACOBI_GATHER", "0") == "1"

__all__ = ["jacobi_svdvals", "MAX_DIM"]

_TL = {torch.float32: tl.float32, torch.float64: tl.float64}
_EPS = {torch.float32: float(torch.finfo(torch.float32).eps), torch.float64: float(torch.finfo(torch.float64).eps)}


@triton.jit
def _div(x, y, ACC: tl.constexpr):
    """x / y correctly rounded (Triton's float32 `/` is div.full.f32 on NVIDIA, ~2 ulp)."""
    if ACC == tl.float32:
        return tl.div_rn(x, y)
    else:
        return x / y


@triton.jit
def _sqrt(x, ACC: tl.constexpr):
    """sqrt(x) correctly rounded (Triton's float32 tl.sqrt is sqrt.approx.ftz.f32 on NVIDIA)."""
    if ACC == tl.float32:
        return tl.sqrt_rn(x)
    else:
        return tl.sqrt(x)


@triton.jit
def _jacobi_svdvals_kernel(
    a_ptr, s_ptr, info_ptr, scratch_ptr,
    M, N, stride_b, stride_m, stride_n, stride_sb,
    max_sweeps, tol,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_GATHER: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    a_base = a_ptr + pid * stride_b
    offs = rows[:, None].to(tl.int64) * stride_m + cols[None, :].to(tl.int64) * stride_n
    A = tl.load(a_base + offs, mask=mask, other=0.0).to(ACC)

    scr = scratch_ptr + pid * ((BLOCK_M + 1) * BLOCK_N)  # the tile, then the column norms
    scr_rows = rows[:, None] * BLOCK_N

    NP = N + (N % 2)  # even number of columns in the tournament
    R = NP - 1  # rounds per sweep (odd)
    half = NP // 2  # inverse of 2 modulo R
    sweep = 0
    done = 0
    while (sweep < max_sweeps) & (done == 0):
        rotated = 0
        for r in range(0, R):
            # partner of each column in round r
            k = (r - cols + R) % R
            k = tl.where(cols == R, (r * half) % R, k)
            k = tl.where(k == cols, R, k)
            jstar = (r * half) % R
            k = tl.where(cols == jstar, R, k)
            k = tl.where(cols >= NP, cols, k)
            # P[:, j] = A[:, k[j]] and oth[j] = own[k[j]]: a register gather, or through the
            # scratch tile. The partner's squared norm is gathered, not recomputed from P, so
            # both columns of a pair hold bitwise the same alpha and beta (a 1-ulp disagreement
            # makes the two sides' rotations differ; emulated: 3.8e-6 instead of 2.7e-7 at 128).
            own = tl.sum(A * A, axis=0)
            if USE_GATHER:
                P = tl.gather(A, tl.broadcast_to(k[None, :], (BLOCK_M, BLOCK_N)), axis=1)
                oth = tl.gather(own, k, axis=0)
            else:
                tl.store(scr + scr_rows + cols[None, :], A)
                tl.store(scr + BLOCK_M * BLOCK_N + cols, own)
                tl.debug_barrier()
                P = tl.load(scr + scr_rows + k[None, :])
                oth = tl.load(scr + BLOCK_M * BLOCK_N + k)
                tl.debug_barrier()
            gamma = tl.sum(A * P, axis=0)
            is_p = cols < k
            alpha = tl.where(is_p, own, oth)
            beta = tl.where(is_p, oth, own)
            rot = tl.abs(gamma) > tol * (_sqrt(alpha, ACC) * _sqrt(beta, ACC))
            rot = rot & (gamma != 0.0)
            g_safe = tl.where(rot, gamma, 1.0)
            zeta = _div(beta - alpha, 2.0 * g_safe, ACC)
            az = tl.abs(zeta)
            # t = sign(zeta) / (|zeta| + sqrt(1 + zeta^2)), as (1/w) / (x + sqrt(x^2 + (1/w)^2)) with
            # w = max(|zeta|, 1), x = min(|zeta|, 1): no overflow of zeta^2
            inv = _div(tl.full([BLOCK_N], 1.0, ACC), tl.maximum(az, 1.0), ACC)
            x = tl.minimum(az, 1.0)
            t = _div(inv, x + _sqrt(x * x + inv * inv, ACC), ACC)
            t = tl.where(rot, tl.where(zeta >= 0.0, t, -t), 0.0)
            c = _div(tl.full([BLOCK_N], 1.0, ACC), _sqrt(1.0 + t * t, ACC), ACC)
            s = c * t
            tau = _div(s, 1.0 + c, ACC)  # s / (1 + c) = (1 - c) / s
            # Rutishauser's form of (c a_p - s a_q, s a_p + c a_q):
            #   p side: a_p - s (a_q + tau a_p); q side: a_q + s (a_p - tau a_q)
            s_eff = tl.where(is_p, -s, s)
            tau_eff = tl.where(is_p, tau, -tau)
            A = A + s_eff[None, :] * (P + tau_eff[None, :] * A)
            rotated = tl.maximum(rotated, tl.max(rot.to(tl.int32), axis=0))
        sweep += 1
        done = 1 - rotated

    sig = _sqrt(tl.sum(A * A, axis=0), ACC)
    sig = tl.where(cmask, sig, -1.0)
    # rank_j = #{k : sig_k > sig_j or (sig_k == sig_j and k < j)}
    sk = sig[None, :]
    sj = sig[:, None]
    before = (sk > sj) | ((sk == sj) & (cols[None, :] < cols[:, None]))
    rank = tl.sum(before.to(tl.int32), axis=1)
    tl.store(s_ptr + pid * stride_sb + rank, sig, mask=cmask)
    tl.store(info_ptr + pid, 1 - done)


def _num_warps(block_m, block_n, dtype):
    elems = block_m * block_n * (2 if dtype == torch.float64 else 1)
    return int(min(16, max(1, elems // 512)))


def _blocks(m, n):
    """(BLOCK_M, BLOCK_N) for the tall [m, n] view (m >= n)."""
    return max(2, triton.next_power_of_2(m)), max(2, triton.next_power_of_2(n))


def jacobi_svdvals(A: torch.Tensor, max_sweeps: int = 30, num_warps: int | None = None,
                   gather: bool | None = None):
    """-> (S [B, min(m, n)] descending, float32 (float64 for float64 input); info [B] int32:
    0 converged, 1 not converged within max_sweeps). A: [B, m, n], m, n <= 128.
    ``num_warps`` overrides the launch's warp count and ``gather`` the partner-column
    gather (True: ``tl.gather`` in registers, False: the scratch tile; default
    ``USE_GATHER``), for tuning and the GPU checks."""
    if A.dim() != 3:
        raise ValueError(f"jacobi_svdvals expects a [B, m, n] tensor, got shape {tuple(A.shape)}")
    if A.dtype not in _TL:
        raise ValueError(f"jacobi_svdvals supports float32 and float64, got {A.dtype}")
    b, m, n = A.shape
    if m > MAX_DIM or n > MAX_DIM:
        raise ValueError(f"jacobi_svdvals handles m, n <= {MAX_DIM}, got {m} x {n}")
    sb, sm, sn = A.stride()
    if m < n:  # wide: the transpose, through the strides
        m, n, sm, sn = n, m, sn, sm
    dtype = A.dtype
    S = torch.empty((b, n), dtype=dtype, device=A.device)
    info = torch.empty((b,), dtype=torch.int32, device=A.device)
    if b == 0:
        return S, info
    if n == 0:
        info.zero_()
        return S, info
    block_m, block_n = _blocks(m, n)
    ctx = device_ctx(A)
    with ctx:
        use_gather = USE_GATHER if gather is None else bool(gather)
        scratch = torch.empty((0 if use_gather else b * (block_m + 1) * block_n,), dtype=dtype, device=A.device)
        _jacobi_svdvals_kernel[(b,)](
            A, S, info, scratch,
            m, n, sb, sm, sn, S.stride(0),
            int(max_sweeps), max(m, 1) * _EPS[dtype],
            ACC=_TL[dtype], BLOCK_M=block_m, BLOCK_N=block_n, USE_GATHER=use_gather,
            num_warps=num_warps or _num_warps(block_m, block_n, dtype), num_stages=1,
        )
    return S, info
