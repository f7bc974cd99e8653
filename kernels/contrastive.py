"""Triton kernels for the contrastive losses (the CUDA path of `sslkernels::nt_xent_*`).

NT-Xent over the M = 2N rows of Z = cat(z1, z2), never materialising anything of
size M x M, forward or backward. Rows are read from z1 / z2 in place (a program's
row tile and each column tile lie in one view, picked by a scalar select); the
two launchers at the bottom are what `python/sslkernels/ops/contrastive.py` calls.

* ``_row_norm_kernel``    (normalize only) ||x_i|| and r_i = 1 / max(||x_i||, eps)
  for the M rows, O(M D).
* ``_nt_xent_fwd_kernel`` grid (2 cdiv(N, BLOCK_M),): a program owns BLOCK_M rows
  of one view and sweeps all M columns in BLOCK_N tiles (z1's, then z2's). Per
  tile: S = (X_i X_j^T) r_i r_j log2(e) / t with ``tl.dot`` (fp32 accumulation,
  fp64 for fp64 inputs), diagonal and padding masked to -inf, online max /
  sum-exp in base 2. Epilogue: the positive logit as a row-wise dot product;
  writes lse [M] and the per-row losses [M], which the launcher sums with torch
  (deterministic). 2 M^2 D flops.
* ``_nt_xent_bwd_kernel`` grid (2 cdiv(N, BLOCK_M), cdiv(D, BLOCK_DO)),
  row-parallel and atomic-free (deterministic): the program owning rows i (and
  one BLOCK_DO slice of the output features) sweeps all column tiles again,
  recomputes S, forms W_ij = exp(s_ij - lse_i) + exp(s_ij - lse_j) (S is
  symmetric, so lse_j is the column block's own statistic), W - 2 at the
  positive pair, 0 on the diagonal, and accumulates (W r_j) @ x_j on the raw
  inputs, so dZhat_i = g / (t M) * that. 2 M^2 D (S) x cdiv(D, BLOCK_DO) +
  2 M^2 D flops. When a program holds whole rows (D <= BLOCK_DO) or there is no
  normalisation, dx is finished in the epilogue and written in the inputs'
  dtype; otherwise dZhat goes to an fp32 [M, D] scratch and
* ``_norm_bwd_kernel``    applies dx = (dZhat - zhat (zhat . dZhat)) / ||x||, O(M D).

Addressing: explicit row strides (the launchers copy only a tensor whose last
dimension is not unit-stride), int64 block offsets plus int32 in-tile offsets,
every size masked. Scalars that must be exact in float64 (log2(e)/t, 1/(tM)) are
passed as float32 hi/lo pairs, since Triton passes Python floats as float32. The
upstream gradient is read on the device through its pointer (no host sync).
"""
from __future__ import annotations

import contextlib
import math
import os

import numpy as np
import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# SSLKERNELS_AUTOTUNE=0: one default config per kernel (quick compile, no tuning).
AUTOTUNE = (not INTERPRET) and os.environ.get("SSLKERNELS_AUTOTUNE", "1") != "0"

_EPS = 1e-12  # F.normalize's eps
_MAX_ROW_STRIDE = 2**31 // 512  # in-tile offsets (< 256 rows) stay int32

__all__ = ["nt_xent_forward", "nt_xent_backward"]


# ----------------------------------------------------------------------------- configs
#
# Tiles depend on the "family" of the call:
#   "mma128" / "mma256": fp16, bf16, fp32 with TF32 and D <= 128 / D <= 256: tensor
#       cores, BLOCK_K = next_pow2(D) so the row tile is loaded once (hoisted), and
#       the backward keeps whole output rows (BLOCK_DO = next_pow2(D)).
#   "mmawide": same dtypes, D > 256: S accumulated over 64-wide chunks, output in
#       128-wide column blocks (second grid axis, then the normalisation epilogue).
#   "fma": fp32 with IEEE products and fp64: no tensor-core path, operands live in
#       registers, so narrow chunks (BLOCK_K 32) and small tiles.
# Chosen after compiling every config for sm_90 with ptxas -v: these hold no or
# few register spills (benchmarks/gpu_check.py --compile-only). Autotuning picks
# among a family's configs (key: D, a bucket of M, the precision, normalize and the
# dtypes; configs that do not fit shared memory are skipped by the autotuner);
# SSLKERNELS_AUTOTUNE=0 takes the first, which fits every dtype of its family.


def _cfg(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


_FWD_FAMILIES = {
    "mma128": [_cfg(128, 64, 8, 3), _cfg(128, 128, 8, 2), _cfg(64, 64, 4, 3), _cfg(64, 32, 4, 2)],
    # (64, 32) first: the one that fits shared memory for fp32 (TF32) at D = 256
    "mma256": [_cfg(64, 32, 4, 2), _cfg(128, 64, 8, 3), _cfg(128, 128, 8, 2), _cfg(64, 64, 4, 3)],
    "mmawide": [_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3), _cfg(64, 32, 4, 2)],
    "fma": [_cfg(64, 64, 8, 2), _cfg(64, 32, 4, 2), _cfg(32, 64, 4, 2), _cfg(32, 32, 4, 2)],
}
_BWD_FAMILIES = {
    "mma128": [_cfg(128, 64, 8, 2), _cfg(128, 32, 8, 2), _cfg(64, 64, 4, 2), _cfg(64, 32, 4, 2)],
    "mma256": [_cfg(64, 32, 8, 2), _cfg(32, 64, 8, 2), _cfg(32, 32, 4, 2), _cfg(64, 64, 8, 2)],
    "mmawide": [_cfg(128, 64, 8, 2), _cfg(64, 32, 4, 2), _cfg(32, 64, 4, 2)],
    "fma": [_cfg(64, 64, 8, 2), _cfg(32, 32, 4, 2), _cfg(32, 64, 4, 2), _cfg(64, 32, 4, 2)],
}
_INTERPRET_CONFIG = _cfg(32, 32, 4, 1)


def _family(d: int, dtype: torch.dtype, precision: str) -> str:
    if dtype == torch.float64 or (dtype == torch.float32 and precision == "ieee"):
        return "fma"
    return "mma128" if d <= 128 else ("mma256" if d <= 256 else "mmawide")


def _all_configs(families):
    if INTERPRET:
        return [_INTERPRET_CONFIG]
    return [c for fam in families.values() for c in fam]


def _pruner(families):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        dtype = args["z1_ptr"].dtype
        fam = families[_family(args["D"], dtype, args.get("PRECISION") or _precision(dtype))]
        return fam if AUTOTUNE else fam[:1]

    return prune


def _block_k(d: int, family: str) -> int:
    """Reduction chunk of S; the whole row (hoisted row tile) when it is <= 256."""
    if INTERPRET:  # small, so that the tests run both the hoisted and the chunked path
        return max(16, triton.next_power_of_2(d)) if d <= 32 else 32
    if family == "fma":
        return 32 if d > 16 else 16
    return max(16, triton.next_power_of_2(d)) if d <= 256 else 64


def _block_do(d: int, family: str, dtype: torch.dtype) -> int:
    """Output columns per backward program (second grid axis when D > BLOCK_DO)."""
    if INTERPRET:
        return min(max(16, triton.next_power_of_2(d)), 64)
    cap = {"fma": 64 if dtype == torch.float64 else 128, "mmawide": 128}.get(family, 256)
    return min(max(16, triton.next_power_of_2(d)), cap)


def _tune_m(m: int) -> int:
    """Autotune bucket of the row count (part of the autotune key)."""
    return max(1024, min(16384, triton.next_power_of_2(m)))


# ----------------------------------------------------------------------------- helpers
#
# Addressing: a scalar int64 offset to the first row of a tile (row0 * stride) plus
# int32 offsets inside the tile (local row * stride + column). The launchers keep
# BLOCK * stride < 2**31. Per-element int64 offsets cost ~2 registers per element
# of a tile held in an MMA layout.


@triton.jit
def _tile_ptrs(z1_ptr, z2_ptr, stride1, stride2, view, row0, lrows, cols):
    """Pointers to Z[view][row0 + lrows, cols] (unit column stride)."""
    base = tl.where(view == 0, z1_ptr, z2_ptr)
    stride = tl.where(view == 0, stride1, stride2)
    base = base + row0.to(tl.int64) * stride
    return base + lrows[:, None] * stride + cols[None, :]


@triton.jit
def _rnorm(norm_ptr, N, idx, mask):
    """r = 1 / max(||x||, eps) for rows idx, precomputed by the prologue (padding: 1).

    (A division inside the column loop costs ~90 registers per thread on sm_90.)"""
    return tl.load(norm_ptr + 2 * N + idx, mask=mask, other=1.0)


@triton.jit
def _hoisted_row_tile(z1_ptr, z2_ptr, stride1, stride2, view, row0, lrows, row_ok, D,
                      HOIST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The program's whole [BLOCK_M, BLOCK_K] row tile, loaded once when HOIST (D fits one chunk)."""
    q = tl.zeros([BLOCK_M, BLOCK_K], dtype=z1_ptr.dtype.element_ty)
    if HOIST:
        kcols = tl.arange(0, BLOCK_K)
        q = tl.load(_tile_ptrs(z1_ptr, z2_ptr, stride1, stride2, view, row0, lrows, kcols),
                    mask=row_ok[:, None] & (kcols < D)[None, :], other=0.0)
    return q


@triton.jit
def _program_rows(N, BLOCK: tl.constexpr):
    """Program -> (view, first row in the view, local row ids, row ids, valid rows)."""
    pid = tl.program_id(0)
    nb = tl.cdiv(N, BLOCK)
    view = pid // nb  # 0: rows of z1, 1: rows of z2
    row0 = (pid - view * nb) * BLOCK
    lrows = tl.arange(0, BLOCK)
    rows = row0 + lrows
    return view, row0, lrows, rows, rows < N


# ----------------------------------------------------------------------------- prologue


@triton.jit
def _row_norm_kernel(
    z1_ptr, z2_ptr, stride1, stride2, norm_ptr, N, D,
    ACC: tl.constexpr, EPS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """norm_ptr [2, M] <- (||x_i||, 1 / max(||x_i||, eps))."""
    view, row0, lrows, rows, row_ok = _program_rows(N, BLOCK_R)
    ss = tl.zeros([BLOCK_R], dtype=ACC)
    for k0 in range(0, D, BLOCK_D):
        cols = k0 + tl.arange(0, BLOCK_D)
        x = tl.load(_tile_ptrs(z1_ptr, z2_ptr, stride1, stride2, view, row0, lrows, cols),
                    mask=row_ok[:, None] & (cols < D)[None, :], other=0.0).to(ACC)
        ss += tl.sum(x * x, axis=1)
    nrm = tl.sqrt(ss)
    tl.store(norm_ptr + view * N + rows, nrm, mask=row_ok)
    tl.store(norm_ptr + 2 * N + view * N + rows, 1.0 / tl.maximum(nrm, EPS), mask=row_ok)


# ----------------------------------------------------------------------------- logits


@triton.jit
def _logit_tile(
    q, z1_ptr, z2_ptr, stride1, stride2, view, row0, lrows, row_ok, cview, col0, lcols, col_ok, D,
    ACC: tl.constexpr, PRECISION: tl.constexpr, HOIST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Raw dot products X_rows . X_cols^T [BLOCK_M, BLOCK_N] in ACC, and the column
    tile [BLOCK_N, BLOCK_K] when HOIST (whole row in one chunk; q = the row tile)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    if HOIST:
        kcols = tl.arange(0, BLOCK_K)
        kt = tl.load(_tile_ptrs(z1_ptr, z2_ptr, stride1, stride2, cview, col0, lcols, kcols),
                     mask=col_ok[:, None] & (kcols < D)[None, :], other=0.0)
        acc = tl.dot(q, tl.trans(kt), acc, input_precision=PRECISION, out_dtype=ACC)
    else:
        kt = tl.zeros([BLOCK_N, BLOCK_K], dtype=z1_ptr.dtype.element_ty)
        for k0 in range(0, D, BLOCK_K):
            kcols = k0 + tl.arange(0, BLOCK_K)
            kmask = (kcols < D)[None, :]
            a = tl.load(_tile_ptrs(z1_ptr, z2_ptr, stride1, stride2, view, row0, lrows, kcols),
                        mask=row_ok[:, None] & kmask, other=0.0)
            b = tl.load(_tile_ptrs(z1_ptr, z2_ptr, stride1, stride2, cview, col0, lcols, kcols),
                        mask=col_ok[:, None] & kmask, other=0.0)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION, out_dtype=ACC)
    return acc, kt


# ----------------------------------------------------------------------------- forward


@triton.autotune(configs=_all_configs(_FWD_FAMILIES), key=["D", "TUNE_M", "PRECISION", "NORMALIZE"],
                 prune_configs_by={"early_config_prune": _pruner(_FWD_FAMILIES)})
@triton.jit(do_not_specialize=["N", "TUNE_M"])
def _nt_xent_fwd_kernel(
    z1_ptr, z2_ptr, stride1, stride2, norm_ptr, lse_ptr, loss_ptr,
    N, D, TUNE_M, scale_hi, scale_lo,
    NORMALIZE: tl.constexpr, HOIST: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    view, row0, lrows, rows, row_ok = _program_rows(N, BLOCK_M)
    # log2(e) / t, exact in float64 (hi, lo are float32 values: exact in ACC)
    scale = tl.zeros([BLOCK_M], dtype=ACC) + scale_hi + scale_lo
    ln2 = tl.log(tl.full([BLOCK_M], 2.0, ACC))
    if NORMALIZE:
        row_scale = _rnorm(norm_ptr, N, view * N + rows, row_ok).to(ACC) * scale
    else:
        row_scale = scale

    q = _hoisted_row_tile(z1_ptr, z2_ptr, stride1, stride2, view, row0, lrows, row_ok, D,
                          HOIST, BLOCK_M, BLOCK_K)

    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    lcols = tl.arange(0, BLOCK_N)
    nbj = tl.cdiv(N, BLOCK_N)
    for t in range(0, 2 * nbj):  # z1's column tiles, then z2's
        cview = t // nbj
        col0 = (t - cview * nbj) * BLOCK_N
        cols = col0 + lcols
        col_ok = cols < N
        acc, kt = _logit_tile(q, z1_ptr, z2_ptr, stride1, stride2, view, row0, lrows, row_ok, cview, col0,
                              lcols, col_ok, D, ACC, PRECISION, HOIST, BLOCK_M, BLOCK_N, BLOCK_K)
        s = acc * row_scale[:, None]  # base-2 logits
        if NORMALIZE:
            s = s * _rnorm(norm_ptr, N, cview * N + cols, col_ok).to(ACC)[None, :]
        keep = col_ok[None, :] & ((cols[None, :] != rows[:, None]) | (cview != view))
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * tl.exp2(m_i - m_use) + tl.sum(p, axis=1)
        m_i = m_new

    # positive logit: row-wise dot of x_i with its other view, in narrow chunks
    # (a [BLOCK_M, BLOCK_K] fp32 pair here would dominate the registers)
    pdot = tl.zeros([BLOCK_M], dtype=ACC)
    for p0 in range(0, D, 32):
        pcols = p0 + tl.arange(0, 32)
        pmask = row_ok[:, None] & (pcols < D)[None, :]
        a = tl.load(_tile_ptrs(z1_ptr, z2_ptr, stride1, stride2, view, row0, lrows, pcols),
                    mask=pmask, other=0.0)
        b = tl.load(_tile_ptrs(z1_ptr, z2_ptr, stride1, stride2, 1 - view, row0, lrows, pcols),
                    mask=pmask, other=0.0)
        pdot += tl.sum(a.to(ACC) * b.to(ACC), axis=1)
    spos = pdot * row_scale
    if NORMALIZE:
        spos = spos * _rnorm(norm_ptr, N, (1 - view) * N + rows, row_ok).to(ACC)

    lse2 = m_i + tl.log2(l_i)
    idx = view * N + rows
    tl.store(lse_ptr + idx, lse2 * ln2, mask=row_ok)
    tl.store(loss_ptr + idx, (lse2 - spos) * ln2, mask=row_ok)


# ----------------------------------------------------------------------------- backward


@triton.autotune(configs=_all_configs(_BWD_FAMILIES), key=["D", "TUNE_M", "PRECISION", "NORMALIZE"],
                 prune_configs_by={"early_config_prune": _pruner(_BWD_FAMILIES)})
@triton.jit(do_not_specialize=["N", "TUNE_M"])
def _nt_xent_bwd_kernel(
    z1_ptr, z2_ptr, stride1, stride2, norm_ptr, lse_ptr, g_ptr, out1_ptr, out2_ptr, scratch_ptr,
    N, D, TUNE_M, scale_hi, scale_lo, c_hi, c_lo,
    NORMALIZE: tl.constexpr, HOIST: tl.constexpr, SAME_TILE: tl.constexpr, FUSED_OUT: tl.constexpr,
    PRECISION: tl.constexpr, DOT2_F32: tl.constexpr, ACC: tl.constexpr, EPS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr,
):
    view, row0, lrows, rows, row_ok = _program_rows(N, BLOCK_M)
    dcols = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    dcol_ok = dcols < D

    scale = tl.zeros([BLOCK_M], dtype=ACC) + scale_hi + scale_lo  # log2(e) / t
    log2e = tl.max(1.0 / tl.log(tl.full([2], 2.0, ACC)), axis=0)  # a scalar, exact in ACC
    lse2_i = tl.load(lse_ptr + view * N + rows, mask=row_ok, other=0.0).to(ACC) * log2e
    if NORMALIZE:
        r_i = _rnorm(norm_ptr, N, view * N + rows, row_ok).to(ACC)
        row_scale = r_i * scale
    else:
        row_scale = scale

    q = _hoisted_row_tile(z1_ptr, z2_ptr, stride1, stride2, view, row0, lrows, row_ok, D,
                          HOIST, BLOCK_M, BLOCK_K)

    acc = tl.zeros([BLOCK_M, BLOCK_DO], dtype=ACC)
    lcols = tl.arange(0, BLOCK_N)
    nbj = tl.cdiv(N, BLOCK_N)
    for t in range(0, 2 * nbj):
        cview = t // nbj
        col0 = (t - cview * nbj) * BLOCK_N
        cols = col0 + lcols
        col_ok = cols < N
        sacc, kt = _logit_tile(q, z1_ptr, z2_ptr, stride1, stride2, view, row0, lrows, row_ok, cview, col0,
                               lcols, col_ok, D, ACC, PRECISION, HOIST, BLOCK_M, BLOCK_N, BLOCK_K)
        s = sacc * row_scale[:, None]
        if NORMALIZE:
            r_j = _rnorm(norm_ptr, N, cview * N + cols, col_ok).to(ACC)
            s = s * r_j[None, :]
        lse2_j = tl.load(lse_ptr + cview * N + cols, mask=col_ok, other=0.0).to(ACC) * log2e
        w = tl.exp2(s - lse2_i[:, None]) + tl.exp2(s - lse2_j[None, :])
        # diagonal -> 0; positive pair -> W - 2 (the "- 2 zhat_pos(i)" term); padding -> 0
        eq = cols[None, :] == rows[:, None]
        w = tl.where(eq, tl.where(cview == view, 0.0, w - 2.0), w)
        w = tl.where(col_ok[None, :], w, 0.0)
        if NORMALIZE:
            w = w * r_j[None, :]  # multiplied onto the raw x_j: no normalised copy
        if SAME_TILE:
            vt = kt
        else:
            vt = tl.load(_tile_ptrs(z1_ptr, z2_ptr, stride1, stride2, cview, col0, lcols, dcols),
                         mask=col_ok[:, None] & dcol_ok[None, :], other=0.0)
        if DOT2_F32:
            # float16 inputs: W r_j in fp16 underflows (it is ~1/M), so this product
            # runs on fp32 operands (tf32: fp16's mantissa with fp32's range)
            acc = tl.dot(w.to(tl.float32), vt.to(tl.float32), acc, input_precision="tf32")
        else:
            acc = tl.dot(w.to(vt.dtype), vt, acc, input_precision=PRECISION, out_dtype=ACC)

    g = tl.load(g_ptr).to(ACC)
    c = g * (tl.zeros([BLOCK_M], dtype=ACC) + c_hi + c_lo)  # g / (t M); dZhat = c * acc
    omask = row_ok[:, None] & dcol_ok[None, :]
    out_off = lrows[:, None] * D + dcols[None, :]  # int32 inside the block
    if FUSED_OUT:
        if NORMALIZE:
            # this program holds whole rows: the normalisation backward in place,
            # dx = r (dZhat - zhat (zhat . dZhat)) = c r acc - c r^3 (x . acc) x
            n_i = tl.load(norm_ptr + view * N + rows, mask=row_ok, other=1.0)
            if SAME_TILE:
                x_i = q.to(ACC)
            else:
                x_i = tl.load(_tile_ptrs(z1_ptr, z2_ptr, stride1, stride2, view, row0, lrows, dcols),
                              mask=omask, other=0.0).to(ACC)
            a1 = c * r_i
            a2 = tl.where(n_i > EPS, a1 * r_i * r_i * tl.sum(x_i * acc, axis=1), 0.0)
            dx = acc * a1[:, None] - x_i * a2[:, None]
        else:
            dx = acc * c[:, None]
        out_ptr = tl.where(view == 0, out1_ptr, out2_ptr) + row0.to(tl.int64) * D
        tl.store(out_ptr + out_off, dx.to(out1_ptr.dtype.element_ty), mask=omask)
    else:
        sc_ptr = scratch_ptr + (view * N + row0).to(tl.int64) * D
        tl.store(sc_ptr + out_off, acc * c[:, None], mask=omask)


@triton.jit
def _norm_bwd_kernel(
    scratch_ptr, z1_ptr, z2_ptr, stride1, stride2, norm_ptr, out1_ptr, out2_ptr, N, D,
    ACC: tl.constexpr, EPS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dx = (dZhat - zhat (zhat . dZhat)) / ||x||  (dZhat / eps where ||x|| <= eps)."""
    view, row0, lrows, rows, row_ok = _program_rows(N, BLOCK_R)
    nrm = tl.load(norm_ptr + view * N + rows, mask=row_ok, other=1.0)
    r = _rnorm(norm_ptr, N, view * N + rows, row_ok).to(ACC)
    sc_ptr = scratch_ptr + (view * N + row0).to(tl.int64) * D
    out_ptr = tl.where(view == 0, out1_ptr, out2_ptr) + row0.to(tl.int64) * D
    proj = tl.zeros([BLOCK_R], dtype=ACC)
    for k0 in range(0, D, BLOCK_D):
        cols = k0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < D)[None, :]
        x = tl.load(_tile_ptrs(z1_ptr, z2_ptr, stride1, stride2, view, row0, lrows, cols), mask=mask, other=0.0)
        gz = tl.load(sc_ptr + lrows[:, None] * D + cols[None, :], mask=mask, other=0.0)
        proj += tl.sum(x.to(ACC) * r[:, None] * gz, axis=1)
    big = (nrm > EPS)[:, None]
    for k0 in range(0, D, BLOCK_D):
        cols = k0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < D)[None, :]
        x = tl.load(_tile_ptrs(z1_ptr, z2_ptr, stride1, stride2, view, row0, lrows, cols), mask=mask, other=0.0)
        gz = tl.load(sc_ptr + lrows[:, None] * D + cols[None, :], mask=mask, other=0.0)
        zh = x.to(ACC) * r[:, None]
        dx = tl.where(big, (gz - zh * proj[:, None]) * r[:, None], gz * r[:, None])
        tl.store(out_ptr + lrows[:, None] * D + cols[None, :], dx.to(out1_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def _precision(dtype: torch.dtype) -> str:
    """fp32 follows torch's TF32 switch for matmuls (as eager's Z @ Z.T does)."""
    if dtype != torch.float32:
        return "ieee"
    return "tf32" if _tf32_allowed() else FP32_PRECISION


def _split(x: float):
    """A float64 scalar as a float32 (hi, lo) pair: hi + lo carries ~48 bits."""
    hi = float(np.float32(x))
    return hi, float(np.float32(x - hi))


def _unit_stride(z: torch.Tensor) -> torch.Tensor:
    """Read in place unless the feature dimension is strided (or a row stride so large
    that in-tile int32 offsets, at most 256 rows x stride, could overflow)."""
    if z.stride(-1) == 1 and abs(z.stride(0)) < _MAX_ROW_STRIDE:
        return z
    return z.contiguous()


def _device_ctx(z: torch.Tensor):
    """Launch on the inputs' GPU (the interpreter runs CPU tensors: no context)."""
    return torch.cuda.device(z.device) if z.is_cuda else contextlib.nullcontext()


def _small_blocks(d: int):
    """(BLOCK_R, BLOCK_D) of the O(M D) prologue / epilogue kernels."""
    if INTERPRET:
        return 16, min(max(16, triton.next_power_of_2(d)), 64)
    return 32, min(max(16, triton.next_power_of_2(d)), 64)


def _plan(d: int, dtype: torch.dtype, normalize: bool, precision: str):
    """(family, forward constexprs, backward constexprs) of one call; the launchers and
    `benchmarks/gpu_check.py --compile-only` both use it."""
    family = _family(d, dtype, precision)
    block_k = _block_k(d, family)
    block_do = _block_do(d, family, dtype)
    hoist = d <= block_k
    acc = _TL_DTYPES[_acc_dtype(dtype)]
    fwd = dict(NORMALIZE=bool(normalize), HOIST=hoist, PRECISION=precision, ACC=acc, BLOCK_K=block_k)
    bwd = dict(
        NORMALIZE=bool(normalize), HOIST=hoist,
        # the column tile loaded for S is also the value tile of the second product
        SAME_TILE=hoist and block_k == block_do and d <= block_do,
        # whole output rows in one program (or no normalisation): dz written directly;
        # otherwise dZhat -> fp32 scratch -> _norm_bwd_kernel
        FUSED_OUT=(not normalize) or d <= block_do,
        PRECISION=precision, DOT2_F32=dtype == torch.float16, ACC=acc, EPS=_EPS,
        BLOCK_K=block_k, BLOCK_DO=block_do,
    )
    return family, fwd, bwd


def _row_norms(z1, z2, acc_dtype):
    n, d = z1.shape
    norms = torch.empty(4 * n, dtype=acc_dtype, device=z1.device)  # [2, M]: norms, 1 / max(norm, eps)
    block_r, block_d = _small_blocks(d)
    _row_norm_kernel[(2 * triton.cdiv(n, block_r),)](
        z1, z2, z1.stride(0), z2.stride(0), norms, n, d,
        ACC=_TL_DTYPES[acc_dtype], EPS=_EPS, BLOCK_R=block_r, BLOCK_D=block_d,
    )
    return norms


def nt_xent_forward(z1: torch.Tensor, z2: torch.Tensor, temperature: float, normalize: bool):
    """-> (loss: 0-dim z1.dtype, lse: [2N] float32 (float64 for float64 inputs))."""
    z1 = _unit_stride(z1)
    z2 = _unit_stride(z2)
    n, d = z1.shape
    m = 2 * n
    acc_dtype = _acc_dtype(z1.dtype)
    _, meta, _ = _plan(d, z1.dtype, normalize, _precision(z1.dtype))
    scale_hi, scale_lo = _split(math.log2(math.e) / float(temperature))
    with _device_ctx(z1):
        lse = torch.empty(m, dtype=acc_dtype, device=z1.device)
        row_loss = torch.empty(m, dtype=acc_dtype, device=z1.device)
        norms = _row_norms(z1, z2, acc_dtype) if normalize else lse  # lse: an unread placeholder

        def grid(cfg):
            return (2 * triton.cdiv(n, cfg["BLOCK_M"]),)

        _nt_xent_fwd_kernel[grid](
            z1, z2, z1.stride(0), z2.stride(0), norms, lse, row_loss,
            n, d, _tune_m(m), scale_hi, scale_lo, **meta,
        )
        # per-row losses reduced by torch: deterministic
        loss = (row_loss.sum() / m).to(z1.dtype)
    return loss, lse


def nt_xent_backward(grad_loss, z1, z2, lse, temperature: float, normalize: bool):
    """-> (dz1, dz2): contiguous [N, D] of z1.dtype. grad_loss is read on the device."""
    z1 = _unit_stride(z1)
    z2 = _unit_stride(z2)
    n, d = z1.shape
    m = 2 * n
    acc_dtype = _acc_dtype(z1.dtype)
    _, _, meta = _plan(d, z1.dtype, normalize, _precision(z1.dtype))
    block_do = meta["BLOCK_DO"]
    scale_hi, scale_lo = _split(math.log2(math.e) / float(temperature))
    c_hi, c_lo = _split(1.0 / (float(temperature) * m))
    with _device_ctx(z1):
        if grad_loss.device != z1.device:
            grad_loss = grad_loss.to(z1.device)
        lse = lse.contiguous()
        dz1 = torch.empty((n, d), dtype=z1.dtype, device=z1.device)
        dz2 = torch.empty((n, d), dtype=z1.dtype, device=z1.device)
        norms = _row_norms(z1, z2, acc_dtype) if normalize else lse  # lse: an unread placeholder
        fused_out = meta["FUSED_OUT"]
        scratch = lse if fused_out else torch.empty((m, d), dtype=acc_dtype, device=z1.device)

        def grid(cfg):
            return (2 * triton.cdiv(n, cfg["BLOCK_M"]), triton.cdiv(d, block_do))

        _nt_xent_bwd_kernel[grid](
            z1, z2, z1.stride(0), z2.stride(0), norms, lse, grad_loss, dz1, dz2, scratch,
            n, d, _tune_m(m), scale_hi, scale_lo, c_hi, c_lo, **meta,
        )
        if not fused_out:
            block_r, block_d = _small_blocks(d)
            _norm_bwd_kernel[(2 * triton.cdiv(n, block_r),)](
                scratch, z1, z2, z1.stride(0), z2.stride(0), norms, dz1, dz2, n, d,
                ACC=_TL_DTYPES[acc_dtype], EPS=_EPS, BLOCK_R=block_r, BLOCK_D=block_d,
            )
    return dz1, dz2
