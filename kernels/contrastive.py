"""Triton kernels for the contrastive losses (the CUDA path of `sslkernels::nt_xent_*`,
`sup_con_*` and `info_nce_*`).

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
  writes lse [M] and the mean loss itself (``_fold_mean``: per-program float64
  partials summed in program order by the program that draws the last ticket:
  deterministic, no torch reduction launched). 2 M^2 D flops. SPLIT (as the
  backward's, below): S programs per row block, each writing its rows' base-2 (max,
  rest, positive's logit) to [3, S, M]; ``_nt_xent_lse_merge_kernel`` merges them in
  split order and writes lse and the folded loss.
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
* ``_grad_finish_kernel`` applies dx = (dZhat - zhat (zhat . dZhat)) / ||x||, O(M D).
  SPLIT (the row blocks alone fill fewer than 2 programs per SM: N <~ 8192 at D = 128):
  a third grid axis shares each row block's column tiles among S programs (split s
  takes tiles s, s + S, ...), each writing its fp32 share of dZhat to a [S, M, D]
  scratch; ``_grad_finish_kernel`` sums the S slices in split order (deterministic) before
  the normalisation backward (or, without normalisation, writes the sum in the
  outputs' dtype).

SupCon and InfoNCE / CLIP share NT-Xent's jitted helpers (tile pointers, hoisted row
tile, logit tile, online LSE, row-wise positive dot, second product, normalisation
epilogue) in two generic kernels (see "generic row-block passes" below):

* ``_lse_fwd_kernel``  a program owns BLOCK_M rows of A and sweeps the candidates (the
  in-batch rows of B, a shared queue C, or per-query negatives) with an online LSE;
  SupCon also sums the logits of its positives (labels compared in-tile) and counts
  them. Writes lse and a per-row loss term, reduced by torch on the device (no sync).
* ``_lse_bwd_kernel``  row-parallel, atomic-free: recomputes S from the saved lse and
  accumulates W B^ (+ W_C C^). The column passes (InfoNCE's dkey and dqueue) are the
  same kernel with A and B swapped, so nothing is accumulated across programs.
  InfoNCE also writes per-row sum_j p_ij (s_ij - s_ii) for the exact d loss / d t.
* ``_per_query_neg_bwd_kernel``  per-query negatives' gradient, element-wise.
* ``_col_lse_merge_kernel``  CLIP's key direction in one sweep: the query rows' forward
  (COL_PART) also writes each S tile's per-column (max, sum) per row block, merged here in
  row-block order (deterministic): S is computed once for both directions, against
  N^2 / BLOCK_M x 8 B of partials (the two-pass forward, roles swapped, past 256 MB). The
  backward recomputes S in the dquery and dkey passes (sharing it would need atomics or
  O(N^2 D / BLOCK_M) bytes of dkey partials: benchmarks/GPU_MODEL.md, lead 6).
InfoNCE's retrieval terms (a logit bias per candidate, duplicate-id masks compared
in-tile) are constexpr variants of the two kernels (COL_BIAS / ROW_BIAS, HAS_IDS,
DIAG_EXEMPT); without them the kernels compile to the code they had before.

Addressing: explicit row strides (the launchers copy only a tensor whose last
dimension is not unit-stride), int64 block offsets plus int32 in-tile offsets,
every size masked. Scalars that must be exact in float64 (log2(e)/t, 1/(tM)) are
passed as float32 hi/lo pairs, since Triton passes Python floats as float32. The
upstream gradient is read on the device through its pointer (no host sync).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sslkernels.kernels import _common, _launch
from sslkernels.kernels._common import autotune_enabled, device_ctx as _device_ctx, dot_precision
from sslkernels.kernels._common import interpret_mode, split_float as _split, stats_dtype as _acc_dtype

INTERPRET = interpret_mode()
AUTOTUNE = autotune_enabled(INTERPRET)  # off: one default config per kernel
# The fp32 products when TF32 is off, for every family (attention reads `_precision`
# here); the GPU checks set this module attribute to compare "tf32x3" with "ieee".
FP32_PRECISION = _common.FP32_PRECISION


def _precision(dtype: torch.dtype) -> str:
    return dot_precision(dtype, FP32_PRECISION)


_EPS = 1e-12  # F.normalize's eps
_MAX_ROW_STRIDE = 2**31 // 512  # in-tile offsets (< 256 rows) stay int32

__all__ = [
    "nt_xent_forward", "nt_xent_backward", "sup_con_forward", "sup_con_backward", "info_nce_forward",
    "info_nce_backward",
]


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
    # fp32 (tf32 / tf32x3: split operands) -- only the tiles that fit sm_90's 227 KiB of
    # shared memory (ptxas: 128-row tiles need 256-640 KiB)
    "mma128_f32": [_cfg(64, 64, 4, 3), _cfg(64, 32, 4, 2)],
    "mma256_f32": [_cfg(64, 32, 4, 2)],
}
_BWD_FAMILIES = {
    "mma128": [_cfg(128, 64, 8, 2), _cfg(128, 32, 8, 2), _cfg(64, 64, 4, 2), _cfg(64, 32, 4, 2)],
    "mma256": [_cfg(64, 32, 8, 2), _cfg(32, 64, 8, 2), _cfg(32, 32, 4, 2), _cfg(64, 64, 8, 2)],
    "mmawide": [_cfg(128, 64, 8, 2), _cfg(64, 32, 4, 2), _cfg(32, 64, 4, 2)],
    "fma": [_cfg(64, 64, 8, 2), _cfg(32, 32, 4, 2), _cfg(32, 64, 4, 2), _cfg(64, 32, 4, 2)],
    "mma256_f32": [_cfg(32, 64, 8, 2), _cfg(64, 32, 8, 2), _cfg(32, 32, 4, 2)],  # (64, 64): 328 KiB
}
# The generic row-block kernels (SupCon, InfoNCE) carry more live state than NT-Xent's
# (labels, two softmax terms, the expectation), and fp32 products default to tf32x3,
# whose split operands need ~2x the shared memory: their first config per family is one
# that fits sm_90's 227 KiB for every dtype of the family (fp32 included: ptxas-checked
# with benchmarks/gpu_contrastive.py --compile-only); the second, tried when autotuning,
# is the larger tile that bf16 / fp16 can afford.
_LSE_FWD_FAMILIES = {
    "mma128": [_cfg(64, 64, 4, 3), _cfg(128, 64, 8, 3)],
    "mma256": [_cfg(64, 32, 4, 2), _cfg(128, 64, 8, 3)],
    # fp32: the 128-row tiles need 256 / 512 KiB of shared memory (do not fit)
    "mma128_f32": [_cfg(64, 64, 4, 3), _cfg(64, 32, 4, 2)],
    "mma256_f32": [_cfg(64, 32, 4, 2)],
    "mmawide": _FWD_FAMILIES["mmawide"],
    "fma": _FWD_FAMILIES["fma"],
}
_LSE_BWD_FAMILIES = {
    "mma128": [_cfg(64, 32, 4, 2), _cfg(128, 64, 8, 2)],
    "mma256": [_cfg(32, 64, 8, 2), _cfg(64, 32, 8, 2)],
    # fp32 (tf32 / tf32x3) at 128 < D <= 256: ptxas spills 10-24 KB per thread at 32-row
    # tiles (it falls back to 32 registers); 16 rows hold 255 registers and ~1.3 KB
    "mma256_f32": [_cfg(16, 64, 4, 2), _cfg(64, 32, 8, 2)],
    "mmawide": _BWD_FAMILIES["mmawide"],
    "fma": _BWD_FAMILIES["fma"],
}
_INTERPRET_CONFIG = _cfg(32, 32, 4, 1)
# the forward's loss partials: one per program, at most 2 cdiv(N, smallest BLOCK_M)
_MIN_FWD_BLOCK_M = min(c.kwargs["BLOCK_M"] for fam in _FWD_FAMILIES.values() for c in fam + [_INTERPRET_CONFIG])
# partials summed per step of the last program's loop (4 in the interpreter: several steps)
_RED_BLOCK = 4 if INTERPRET else 256


def _family(d: int, dtype: torch.dtype, precision: str) -> str:
    if dtype == torch.float64 or (dtype == torch.float32 and precision == "ieee"):
        return "fma"
    return "mma128" if d <= 128 else ("mma256" if d <= 256 else "mmawide")


def _family_configs(families, d: int, dtype: torch.dtype, precision: str):
    """The configs of a call: its family's, or the family's fp32 variant ("<family>_f32")
    where a table has one (fp32 tensor-core products split their operands)."""
    family = _family(d, dtype, precision)
    if dtype == torch.float32 and f"{family}_f32" in families:
        return families[f"{family}_f32"]
    return families[family]


def _all_configs(families):
    if INTERPRET:
        return [_INTERPRET_CONFIG]
    return [c for fam in families.values() for c in fam]


def _pruner(families, width=None):
    """The configs of the call's family (the first `width` of them; only the first
    without autotuning). NT-Xent tunes over its whole family; the generic row-block
    kernels (SupCon, InfoNCE: several variants per call) over the first two."""
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        dtype = (args["z1_ptr"] if "z1_ptr" in args else args["a_ptr"]).dtype
        fam = _family_configs(families, args["D"], dtype, args.get("PRECISION") or _precision(dtype))
        return fam[:width] if AUTOTUNE else fam[:1]

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
    # eps as an ACC constant: Triton 3.6's tl.maximum rounds a Python float to float32 first
    tl.store(norm_ptr + 2 * N + view * N + rows, 1.0 / tl.maximum(nrm, tl.full([], EPS, ACC)), mask=row_ok)


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


@triton.jit
def _store_lse(lse_ptr, offs, m_i, l_i, mask):
    """Save lse (natural log) in float64 from the base-2 stats m_i + log2(1 + l_i) (l_i: the
    sum beside the max's own 1, _online_lse): a float32 lse of logits ~1e4 is off by up
    to 5e-4, and so would be every probability the backward recomputes from it. Returns
    the base-2 lse, float64."""
    lse2 = m_i.to(tl.float64) + tl.log2(1.0 + l_i.to(tl.float64))
    tl.store(lse_ptr + offs, lse2 * 0.6931471805599453, mask=mask)
    return lse2


@triton.jit
def _load_lse2(lse_ptr, offs, mask, ACC):
    """A saved float64 lse as base-2 parts hi + lo in ACC: p = exp2((s - hi) - lo) keeps
    its accuracy whatever the logits' magnitude (s - hi is exact near the row's lse)."""
    l2 = tl.load(lse_ptr + offs, mask=mask, other=0.0).to(tl.float64) * 1.4426950408889634
    hi = l2.to(ACC)
    lo = tl.where(l2 > -float("inf"), (l2 - hi.to(tl.float64)).to(ACC), 0.0)
    return hi, lo


@triton.jit
def _symmetric_logits(acc, scale, r_i, norm_ptr, N, col_idx, col_ok, NORMALIZE: tl.constexpr, ACC: tl.constexpr):
    """Base-2 logits (x_i . x_j) (log2(e) / t) (r_i r_j) of a tile, rounded the same for
    (i, j) and (j, i): the backward weighs S_ij against both lse_i and lse_j, and lse_j
    came from row j's own program. ((x . y) r_i) r_j, as before, rounds the two apart by
    ~1e-6 at logits ~10, which the positive's small 1 - p against lse_j kept (2-5x
    eager's error at t = 0.1 with normalize)."""
    s = acc * scale[:, None]
    if NORMALIZE:
        s = s * (r_i[:, None] * _rnorm(norm_ptr, N, col_idx, col_ok).to(ACC)[None, :])
    return s


@triton.jit
def _split_of(SPLIT: tl.constexpr, AXIS: tl.constexpr):
    """(this program's split of the queue, whether it is split 0): the grid's AXIS under
    SPLIT, else the only one."""
    if SPLIT:
        split = tl.program_id(AXIS)
    else:
        split = 0
    return split, split == 0


@triton.jit
def _diagonal_of(s, rows, cols, col_ok):
    """Row i's entry at column i of the tile s (0 where the tile does not hold it): the
    positive's logit as the lse saw it, so that lse - s_pos cancels exactly where the
    positive dominates (a second dot product rounds apart: 13x eager's error on a
    converged loss of 0.01)."""
    return tl.sum(tl.where((cols[None, :] == rows[:, None]) & col_ok[None, :], s, 0.0), axis=1)


@triton.jit
def _expm1_base2(x):
    """2^x - 1 without cancelling near 0: (u - 1) y / ln u with u = 2^x rounded and y = x ln 2
    (Kahan), the rounding of u cancelling between the two; u - 1 where u is 0 or 1."""
    y = x * 0.6931471805599453
    u = tl.exp2(x)
    um1 = u - 1.0
    safe = (u != 1.0) & (u > 0.0)
    return tl.where(u == 1.0, y, tl.where(safe, um1 * y / tl.log(tl.where(safe, u, 2.0)), um1))


@triton.jit
def _online_lse(m_i, l_i, s):
    """Fold a tile of base-2 logits s [BLOCK_M, BLOCK_N] (masked entries -inf) into the
    running row max m_i and l_i = sum_j exp2(s_j - m_i) - 1, the sum beside the max's own
    1 (start: -inf, -1); a row masked so far keeps -inf and -1. A peaked row's sum is
    1 + a small rest: summed whole in float32 it is rounded at 1's ulp, 6e-8, and that
    moves every p of the row, the positive's 1 - p (the gradient) by 2-8x eager's error
    at t = 0.07. Kept apart, the rest keeps its own relative accuracy; the max's 1 is
    counted exactly (ties: each element equal to the max adds 1, the max itself none)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    at_max = s == m_use[:, None]
    p = tl.where(at_max, 0.0, tl.exp2(s - m_use[:, None]))
    ties = tl.sum(at_max.to(l_i.dtype), axis=1)
    moved = m_new > m_i  # the max is in this tile: its 1 leaves the sum, the old one scales
    old = tl.where(moved, (l_i + 1.0) * tl.exp2(m_i - m_use) - 1.0, l_i)
    return m_new, old + tl.sum(p, axis=1) + ties


@triton.jit
def _column_lse(m, l):
    """Per column of [R, BLOCK_N] base-2 statistics (max m, sum l beside the max's own 1, as
    _online_lse keeps them; empty: -inf, -1) their merge over the R rows, in the same form:
    the entries at the column's max add their rest l and one each (ties), the others
    (1 + l) 2^(m - max), so a peaked column's small rest is never rounded against the 1.
    A tile of logits s is this with m = s, l = 0 (each logit its own max; masked: -inf);
    an all-empty column gives -inf, -1. Fixed shape, fixed reduction tree: deterministic."""
    top = tl.max(m, axis=0)
    top_use = tl.where(top == float("-inf"), 0.0, top)
    at_max = m == top_use[None, :]
    rest = tl.where(at_max, l, (l + 1.0) * tl.exp2(m - top_use[None, :]))
    return top, tl.sum(rest, axis=0) + (tl.sum(at_max.to(m.dtype), axis=0) - 1.0)


@triton.jit
def _merge_lse_parts(m, l, m2, l2):
    """Merge two base-2 (max, sum beside the max's 1) statistics: the side holding the larger
    max keeps its rest as it is, the other adds (1 + l) 2^(its max - the max) (equal maxes:
    l + l2 + 1; both empty: -inf, -1)."""
    second = m2 > m
    hi = tl.maximum(m, m2)
    lo = tl.minimum(m, m2)
    rest = tl.where(second, l2, l)
    other = tl.where(second, l, l2)
    return hi, rest + (other + 1.0) * tl.exp2(lo - tl.where(hi == float("-inf"), 0.0, hi))


@triton.jit
def _row_dot(z1_ptr, z2_ptr, stride1, stride2, view_a, view_b, row0, lrows, row_ok, D, ACC: tl.constexpr):
    """Row-wise x_a[i] . x_b[i] for the rows of one tile (the positive pair), in narrow
    chunks (a [BLOCK_M, BLOCK_K] fp32 pair here would dominate the registers)."""
    pdot = (lrows * 0).to(ACC)
    for p0 in range(0, D, 32):
        pcols = p0 + tl.arange(0, 32)
        pmask = row_ok[:, None] & (pcols < D)[None, :]
        a = tl.load(_tile_ptrs(z1_ptr, z2_ptr, stride1, stride2, view_a, row0, lrows, pcols),
                    mask=pmask, other=0.0)
        b = tl.load(_tile_ptrs(z1_ptr, z2_ptr, stride1, stride2, view_b, row0, lrows, pcols),
                    mask=pmask, other=0.0)
        pdot += tl.sum(a.to(ACC) * b.to(ACC), axis=1)
    return pdot


@triton.jit
def _weighted_rows(w, vt, acc, PRECISION: tl.constexpr, DOT2_F32: tl.constexpr, ACC: tl.constexpr):
    """acc += W @ V, the second product of a backward pass."""
    if DOT2_F32:
        # float16 inputs: W r_j in fp16 underflows (it is ~1/M), so this product
        # runs on fp32 operands (tf32: fp16's mantissa with fp32's range)
        acc = tl.dot(w.to(tl.float32), vt.to(tl.float32), acc, input_precision="tf32", out_dtype=tl.float32)
    else:
        acc = tl.dot(w.to(vt.dtype), vt, acc, input_precision=PRECISION, out_dtype=ACC)
    return acc


@triton.jit
def _grad_epilogue(acc, c, q, x_ptrs, n_i, r_i, out_base, sc_base, lrows, dcols, omask, D,
                   NORMALIZE: tl.constexpr, SAME_TILE: tl.constexpr, FUSED_OUT: tl.constexpr,
                   ACC: tl.constexpr, EPS: tl.constexpr):
    """dZhat = c * acc for the program's rows; when the program holds whole rows (or there is
    no normalisation) dx is finished here and written in the inputs' dtype (out_base: the
    tile's first output row, contiguous [., D]); otherwise dZhat goes to the fp32 scratch
    for _grad_finish_kernel. x_ptrs: the rows' inputs at dcols (read unless SAME_TILE, q)."""
    out_off = lrows[:, None] * D + dcols[None, :]  # int32 inside the block
    if FUSED_OUT:
        if NORMALIZE:
            # dx = r (dZhat - zhat (zhat . dZhat)) = c r acc - c r^3 (x . acc) x
            if SAME_TILE:
                x_i = q.to(ACC)
            else:
                x_i = tl.load(x_ptrs, mask=omask, other=0.0).to(ACC)
            a1 = c * r_i
            a2 = tl.where(n_i > EPS, a1 * r_i * r_i * tl.sum(x_i * acc, axis=1), 0.0)
            dx = acc * a1[:, None] - x_i * a2[:, None]
        else:
            dx = acc * c[:, None]
        tl.store(out_base + out_off, dx.to(out_base.dtype.element_ty), mask=omask)
    else:
        tl.store(sc_base + out_off, acc * c[:, None], mask=omask)


# ----------------------------------------------------------------------------- forward


@triton.jit
def _fold_mean(partial_ptr, ticket_ptr, out_ptr, part, count, RED_BLOCK: tl.constexpr):
    """out = sum of every program's `part` / count, in the launch itself (1-D grid).

    Each program stores its float64 partial and draws a ticket (atomic add, acq_rel); the
    one that draws the last sums all partials in program order, so the result does not
    depend on which program finishes last (bit-for-bit deterministic), writes it in out's
    dtype (half precision rounded through float32) and sets the ticket back to 0 for the
    next launch (kernels/_launch.py)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    tl.store(partial_ptr + pid, part)
    tl.debug_barrier()  # the partial is stored before the ticket is drawn
    drawn = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
    if drawn == nprog - 1:
        total = tl.zeros([RED_BLOCK], dtype=tl.float64)
        for p0 in range(0, nprog, RED_BLOCK):
            offs = p0 + tl.arange(0, RED_BLOCK)
            total += tl.load(partial_ptr + offs, mask=offs < nprog, other=0.0, volatile=True)
        mean = tl.sum(total, axis=0) / count.to(tl.float64)
        if out_ptr.dtype.element_ty != tl.float64:
            mean = mean.to(tl.float32)  # half dtypes through float32, as torch's .to of a float32 mean
        tl.store(out_ptr, mean.to(out_ptr.dtype.element_ty))
        tl.store(ticket_ptr, 0)


@triton.autotune(configs=_all_configs(_FWD_FAMILIES), key=["D", "TUNE_M", "PRECISION", "NORMALIZE", "SPLIT"],
                 prune_configs_by={"early_config_prune": _pruner(_FWD_FAMILIES)})
@triton.jit(do_not_specialize=["N", "TUNE_M", "SPLITS"])
def _nt_xent_fwd_kernel(
    z1_ptr, z2_ptr, stride1, stride2, norm_ptr, lse_ptr, partial_ptr, ticket_ptr, loss_ptr, part_ptr,
    N, D, TUNE_M, SPLITS, scale_hi, scale_lo,
    NORMALIZE: tl.constexpr, HOIST: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    RED_BLOCK: tl.constexpr,
):
    """SPLIT (as the backward's): program (row block, split) sweeps the column tiles split,
    split + SPLITS, ... and writes its rows' base-2 (max, rest, positive's logit: 0 unless
    the split holds the positive's tile) to part_ptr [3, SPLITS, M]; _nt_xent_lse_merge_kernel
    merges them in split order and folds the loss (this kernel then writes neither)."""
    view, row0, lrows, rows, row_ok = _program_rows(N, BLOCK_M)
    split, _ = _split_of(SPLIT, 1)
    # log2(e) / t, exact in float64 (hi, lo are float32 values: exact in ACC)
    scale = tl.zeros([BLOCK_M], dtype=ACC) + scale_hi + scale_lo
    if NORMALIZE:
        r_i = _rnorm(norm_ptr, N, view * N + rows, row_ok).to(ACC)
    else:
        r_i = scale  # unread

    q = _hoisted_row_tile(z1_ptr, z2_ptr, stride1, stride2, view, row0, lrows, row_ok, D,
                          HOIST, BLOCK_M, BLOCK_K)

    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.full([BLOCK_M], -1.0, ACC)  # the sum beside the max's 1 (_online_lse)
    spos = tl.zeros([BLOCK_M], dtype=ACC)  # the positive's logit, from its tile (_diagonal_of)
    lcols = tl.arange(0, BLOCK_N)
    nbj = tl.cdiv(N, BLOCK_N)
    t_step = SPLITS if SPLIT else 1
    for t in range(split, 2 * nbj, t_step):  # z1's column tiles, then z2's
        cview = t // nbj
        col0 = (t - cview * nbj) * BLOCK_N
        cols = col0 + lcols
        col_ok = cols < N
        acc, kt = _logit_tile(q, z1_ptr, z2_ptr, stride1, stride2, view, row0, lrows, row_ok, cview, col0,
                              lcols, col_ok, D, ACC, PRECISION, HOIST, BLOCK_M, BLOCK_N, BLOCK_K)
        s = _symmetric_logits(acc, scale, r_i, norm_ptr, N, cview * N + cols, col_ok, NORMALIZE, ACC)
        if (cview != view) & (col0 < row0 + BLOCK_M) & (col0 + BLOCK_N > row0):
            spos += _diagonal_of(s, rows, cols, col_ok)
        keep = col_ok[None, :] & ((cols[None, :] != rows[:, None]) | (cview != view))
        s = tl.where(keep, s, float("-inf"))
        m_i, l_i = _online_lse(m_i, l_i, s)

    idx = view * N + rows
    if SPLIT:
        at = split * 2 * N + idx
        tl.store(part_ptr + at, m_i, mask=row_ok)
        tl.store(part_ptr + SPLITS * 2 * N + at, l_i, mask=row_ok)
        tl.store(part_ptr + 2 * SPLITS * 2 * N + at, spos, mask=row_ok)
    else:
        _finish_rows(lse_ptr, partial_ptr, ticket_ptr, loss_ptr, idx, m_i, l_i, spos, row_ok, 2 * N, RED_BLOCK)


@triton.jit
def _finish_rows(lse_ptr, partial_ptr, ticket_ptr, loss_ptr, idx, m_i, l_i, spos, row_ok, M, RED_BLOCK: tl.constexpr):
    """Rows idx done: their lse stored, their losses lse - s_pos folded into the mean."""
    lse2 = _store_lse(lse_ptr, idx, m_i, l_i, row_ok)
    row_loss = tl.where(row_ok, (lse2 - spos.to(tl.float64)) * 0.6931471805599453, 0.0)
    _fold_mean(partial_ptr, ticket_ptr, loss_ptr, tl.sum(row_loss, axis=0), M, RED_BLOCK)


@triton.jit(do_not_specialize=["N", "SPLITS"])
def _nt_xent_lse_merge_kernel(part_ptr, lse_ptr, partial_ptr, ticket_ptr, loss_ptr, N, SPLITS,
                              BLOCK_R: tl.constexpr, RED_BLOCK: tl.constexpr):
    """The split forward's rows finished: the SPLITS partials [3, SPLITS, M] of BLOCK_R rows
    merged in split order 0, 1, ... (_merge_lse_parts; the positive's logit summed: one split
    holds it, the others add 0), then lse and the folded loss as the unsplit kernel writes
    them (_finish_rows; this launch's programs draw the tickets)."""
    m_rows = 2 * N
    idx = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = idx < m_rows
    m = tl.load(part_ptr + idx, mask=ok, other=float("-inf"))
    l = tl.load(part_ptr + SPLITS * m_rows + idx, mask=ok, other=-1.0)
    spos = tl.load(part_ptr + 2 * SPLITS * m_rows + idx, mask=ok, other=0.0)
    for s in range(1, SPLITS):
        at = s * m_rows + idx
        m2 = tl.load(part_ptr + at, mask=ok, other=float("-inf"))
        l2 = tl.load(part_ptr + SPLITS * m_rows + at, mask=ok, other=-1.0)
        m, l = _merge_lse_parts(m, l, m2, l2)
        spos += tl.load(part_ptr + 2 * SPLITS * m_rows + at, mask=ok, other=0.0)
    m = tl.where(ok, m, 0.0)  # (padding: a finite lse, never stored)
    l = tl.where(ok, l, 0.0)
    _finish_rows(lse_ptr, partial_ptr, ticket_ptr, loss_ptr, idx, m, l, spos, ok, m_rows, RED_BLOCK)


# ----------------------------------------------------------------------------- backward


@triton.autotune(configs=_all_configs(_BWD_FAMILIES), key=["D", "TUNE_M", "PRECISION", "NORMALIZE", "SPLIT"],
                 prune_configs_by={"early_config_prune": _pruner(_BWD_FAMILIES)})
@triton.jit(do_not_specialize=["N", "TUNE_M", "SPLITS"])
def _nt_xent_bwd_kernel(
    z1_ptr, z2_ptr, stride1, stride2, norm_ptr, lse_ptr, g_ptr, out1_ptr, out2_ptr, scratch_ptr,
    N, D, TUNE_M, SPLITS, scale_hi, scale_lo, c_hi, c_lo,
    NORMALIZE: tl.constexpr, HOIST: tl.constexpr, SAME_TILE: tl.constexpr, FUSED_OUT: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr, DOT2_F32: tl.constexpr, ACC: tl.constexpr, EPS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr,
):
    """SPLIT (too few row blocks to fill the GPU, _nt_xent_splits): program (row block,
    output columns, split) sweeps the column tiles split, split + SPLITS, ... of the 2 nbj
    (z1's then z2's) and writes its share of dZhat = c acc, fp32, to its slice of
    scratch_ptr [SPLITS, M, D]; _grad_finish_kernel sums the slices in split order and
    applies the normalisation's backward and the output dtype."""
    view, row0, lrows, rows, row_ok = _program_rows(N, BLOCK_M)
    split, _ = _split_of(SPLIT, 2)
    dcols = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    dcol_ok = dcols < D

    scale = tl.zeros([BLOCK_M], dtype=ACC) + scale_hi + scale_lo  # log2(e) / t
    hi_i, lo_i = _load_lse2(lse_ptr, view * N + rows, row_ok, ACC)
    if NORMALIZE:
        r_i = _rnorm(norm_ptr, N, view * N + rows, row_ok).to(ACC)
    else:
        r_i = scale  # unread

    q = _hoisted_row_tile(z1_ptr, z2_ptr, stride1, stride2, view, row0, lrows, row_ok, D,
                          HOIST, BLOCK_M, BLOCK_K)

    acc = tl.zeros([BLOCK_M, BLOCK_DO], dtype=ACC)
    lcols = tl.arange(0, BLOCK_N)
    nbj = tl.cdiv(N, BLOCK_N)
    t_step = SPLITS if SPLIT else 1
    for t in range(split, 2 * nbj, t_step):
        cview = t // nbj
        col0 = (t - cview * nbj) * BLOCK_N
        cols = col0 + lcols
        col_ok = cols < N
        sacc, kt = _logit_tile(q, z1_ptr, z2_ptr, stride1, stride2, view, row0, lrows, row_ok, cview, col0,
                               lcols, col_ok, D, ACC, PRECISION, HOIST, BLOCK_M, BLOCK_N, BLOCK_K)
        s = _symmetric_logits(sacc, scale, r_i, norm_ptr, N, cview * N + cols, col_ok, NORMALIZE, ACC)
        if NORMALIZE:
            r_j = _rnorm(norm_ptr, N, cview * N + cols, col_ok).to(ACC)
        hi_j, lo_j = _load_lse2(lse_ptr, cview * N + cols, col_ok, ACC)
        w = tl.exp2((s - hi_i[:, None]) - lo_i[:, None]) + tl.exp2((s - hi_j[None, :]) - lo_j[None, :])
        # diagonal -> 0; positive pair -> (p_ij - 1) + (p_ji - 1) (the "- 2 zhat_pos(i)"
        # term), each by expm1: a peaked row's p is within ulps of 1, and p_ij + p_ji - 2
        # (rounded at 2) keeps only that rounding of the small 1 - p; padding -> 0
        eq = cols[None, :] == rows[:, None]
        if cview != view:
            s_pos = tl.sum(tl.where(eq, s, 0.0), axis=1)
            hp_j, lp_j = _load_lse2(lse_ptr, cview * N + rows, row_ok, ACC)
            w_pos = _expm1_base2((s_pos - hi_i) - lo_i) + _expm1_base2((s_pos - hp_j) - lp_j)
            w = tl.where(eq, w_pos[:, None], w)
        else:
            w = tl.where(eq, 0.0, w)
        w = tl.where(col_ok[None, :], w, 0.0)
        if NORMALIZE:
            w = w * r_j[None, :]  # multiplied onto the raw x_j: no normalised copy
        if SAME_TILE:
            vt = kt
        else:
            vt = tl.load(_tile_ptrs(z1_ptr, z2_ptr, stride1, stride2, cview, col0, lcols, dcols),
                         mask=col_ok[:, None] & dcol_ok[None, :], other=0.0)
        acc = _weighted_rows(w, vt, acc, PRECISION, DOT2_F32, ACC)

    g = tl.load(g_ptr).to(ACC)
    c = g * (tl.zeros([BLOCK_M], dtype=ACC) + c_hi + c_lo)  # g / (t M); dZhat = c * acc
    omask = row_ok[:, None] & dcol_ok[None, :]
    if NORMALIZE:
        n_i = tl.load(norm_ptr + view * N + rows, mask=row_ok, other=1.0)
    else:
        n_i, r_i = c, c  # unread
    _grad_epilogue(acc, c, q, _tile_ptrs(z1_ptr, z2_ptr, stride1, stride2, view, row0, lrows, dcols),
                   n_i, r_i, tl.where(view == 0, out1_ptr, out2_ptr) + row0.to(tl.int64) * D,
                   scratch_ptr + ((split * 2 + view) * N + row0).to(tl.int64) * D, lrows, dcols, omask, D,
                   NORMALIZE, SAME_TILE, FUSED_OUT and not SPLIT, ACC, EPS)


@triton.jit(do_not_specialize=["SPLITS", "SLICE"])
def _grad_finish_kernel(
    scratch_ptr, z1_ptr, z2_ptr, stride1, stride2, norm_ptr, out1_ptr, out2_ptr, N, D, SPLITS, SLICE,
    NORMALIZE: tl.constexpr, ACC: tl.constexpr, EPS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dZhat = the sum of the SPLITS slices of the scratch (SLICE elements apart), added in
    split order 0, 1, ... (deterministic), then dx = (dZhat - zhat (zhat . dZhat)) / ||x||
    (dZhat / eps where ||x|| <= eps) under NORMALIZE, else dx = dZhat; written in the
    outputs' dtype. One slice: the normalisation backward of an unsplit sweep."""
    view, row0, lrows, rows, row_ok = _program_rows(N, BLOCK_R)
    sc_ptr = scratch_ptr + (view * N + row0).to(tl.int64) * D
    out_ptr = tl.where(view == 0, out1_ptr, out2_ptr) + row0.to(tl.int64) * D
    if NORMALIZE:
        nrm = tl.load(norm_ptr + view * N + rows, mask=row_ok, other=1.0)
        r = _rnorm(norm_ptr, N, view * N + rows, row_ok).to(ACC)
        proj = tl.zeros([BLOCK_R], dtype=ACC)
        for k0 in range(0, D, BLOCK_D):
            cols = k0 + tl.arange(0, BLOCK_D)
            mask = row_ok[:, None] & (cols < D)[None, :]
            x = tl.load(_tile_ptrs(z1_ptr, z2_ptr, stride1, stride2, view, row0, lrows, cols), mask=mask, other=0.0)
            gz = _summed_slices(sc_ptr, lrows[:, None] * D + cols[None, :], mask, SPLITS, SLICE)
            proj += tl.sum(x.to(ACC) * r[:, None] * gz, axis=1)
        big = (nrm > EPS)[:, None]
    for k0 in range(0, D, BLOCK_D):
        cols = k0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < D)[None, :]
        gz = _summed_slices(sc_ptr, lrows[:, None] * D + cols[None, :], mask, SPLITS, SLICE)
        if NORMALIZE:
            x = tl.load(_tile_ptrs(z1_ptr, z2_ptr, stride1, stride2, view, row0, lrows, cols), mask=mask, other=0.0)
            zh = x.to(ACC) * r[:, None]
            dx = tl.where(big, (gz - zh * proj[:, None]) * r[:, None], gz * r[:, None])
        else:
            dx = gz
        tl.store(out_ptr + lrows[:, None] * D + cols[None, :], dx.to(out1_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _summed_slices(sc_ptr, offs, mask, SPLITS, SLICE):
    """sum_s sc_ptr[s SLICE + offs] for s = 0 .. SPLITS - 1, added in that order."""
    total = tl.load(sc_ptr + offs, mask=mask, other=0.0)
    for s in range(1, SPLITS):
        total += tl.load(sc_ptr + s * SLICE.to(tl.int64) + offs, mask=mask, other=0.0)
    return total


# ----------------------------------------------------------------------------- generic row-block passes
#
# SupCon and InfoNCE / CLIP run on two generic kernels built from the helpers above.
# A program owns BLOCK_M rows of a matrix A [NA, D]; its candidates are
#   B [NB, D]  B_MODE 1: every row of B, in BLOCK_N tiles ("in-batch"); row i of B is
#              row i's partner (InfoNCE's positive; SupCon: B = A and the partner is
#              itself, masked out); B_MODE 2: only the partner (MoCo without in-batch
#              negatives); B_MODE 0: none
#   C [NC, D]  (HAS_C) a shared queue, every row, row term only; or (PER_Q) per-query
#              negatives, rows [i M, (i + 1) M) of C [N M, D] for row i only (row-wise dots).
# LABELS (SupCon): positives are the other rows of B with A's label.
# Norm buffers (normalize) hold [3 R]: ||x|| at [0, R), 1 / max(||x||, eps) at [2R, 3R)
# (the one-view layout of _row_norm_kernel). par_ptr holds [log2(e) / t, 1 / (t denom)]
# in ACC on the device, so a learnable temperature and the SupCon anchor count never
# leave the GPU.


@triton.jit
def _candidate_tile(q, a_ptr, x_ptr, stride_a, stride_x, nx_ptr, NX, row0, lrows, row_ok, t, scale, r_a, D,
                    NORMALIZE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, HOIST: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Column tile t of the candidates X [NX, D] against the program's rows of A: base-2
    logits s = (a_i . x_j) (log2(e) / t) (r_i r_j) (_symmetric_logits; r_a = r_i), the column
    tile kt (HOIST), the columns' 1 / ||x_j|| (1 without normalisation) and indices."""
    col0 = t * BLOCK_N
    lcols = tl.arange(0, BLOCK_N)
    cols = col0 + lcols
    col_ok = cols < NX
    sacc, kt = _logit_tile(q, a_ptr, x_ptr, stride_a, stride_x, 0, row0, lrows, row_ok, 1, col0,
                           lcols, col_ok, D, ACC, PRECISION, HOIST, BLOCK_M, BLOCK_N, BLOCK_K)
    s = sacc * scale[:, None]
    if NORMALIZE:
        r_j = _rnorm(nx_ptr, NX, cols, col_ok).to(ACC)
        s = s * (r_a[:, None] * r_j[None, :])
    else:
        r_j = tl.full([BLOCK_N], 1.0, ACC)
    return s, kt, r_j, col0, lcols, cols, col_ok


@triton.jit
def _value_tile(kt, a_ptr, x_ptr, stride_a, stride_x, col0, lcols, col_ok, dcols, dcol_ok, SAME_TILE: tl.constexpr):
    """X[cols, dcols], the value tile of a backward product (the logits' tile when it is the same)."""
    if SAME_TILE:
        vt = kt
    else:
        vt = tl.load(_tile_ptrs(a_ptr, x_ptr, stride_a, stride_x, 1, col0, lcols, dcols),
                     mask=col_ok[:, None] & dcol_ok[None, :], other=0.0)
    return vt


@triton.jit
def _per_query_logit(a_ptr, c_ptr, stride_a, stride_c, nc_ptr, NC, M, mm, row0, lrows, rows, row_ok, scale, r_a, D,
                     NORMALIZE: tl.constexpr, ACC: tl.constexpr):
    """Base-2 logit of row i of A with its mm-th own negative, row i M + mm of C [N M, D]
    (a view of rows stride_c * M apart, starting mm rows in)."""
    s_m = _row_dot(a_ptr, c_ptr + mm * stride_c, stride_a, stride_c * M, 0, 1, row0, lrows, row_ok, D, ACC)
    s_m = s_m * scale
    if NORMALIZE:
        s_m = s_m * (r_a * _rnorm(nc_ptr, NC, rows * M + mm, row_ok).to(ACC))
    return s_m


@triton.jit
def _per_query_neg_bwd_kernel(
    q_ptr, c_ptr, stride_q, stride_c, nq_ptr, nc_ptr, par_ptr, g_ptr, lse_ptr, out_ptr, N, M, D,
    NORMALIZE: tl.constexpr, ACC: tl.constexpr, EPS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """d loss / d n_im = c p_im (q^_i back through n_im's normalisation), grid (row blocks, M):
    with cos = n^ . q^, dn = c p r_n (q^ - n^ cos) (c p r_n q^ where ||n|| <= eps), O(N M D)."""
    _, row0, lrows, rows, row_ok = _program_rows(N, BLOCK_R)
    mm = tl.program_id(1)
    scale = tl.load(par_ptr).to(ACC)
    dot = _row_dot(q_ptr, c_ptr + mm * stride_c, stride_q, stride_c * M, 0, 1, row0, lrows, row_ok, D, ACC)
    if NORMALIZE:
        r_q = _rnorm(nq_ptr, N, rows, row_ok).to(ACC)
        r_n = _rnorm(nc_ptr, N * M, rows * M + mm, row_ok).to(ACC)
        big = tl.load(nc_ptr + rows * M + mm, mask=row_ok, other=1.0) > EPS
        cos = dot * r_q * r_n
        s2 = cos * scale
    else:
        s2 = dot * scale
    hi, lo = _load_lse2(lse_ptr, rows, row_ok, ACC)
    p = tl.exp2((s2 - hi) - lo)
    coef = p * tl.load(g_ptr).to(ACC) * tl.load(par_ptr + 1).to(ACC)
    out_base = out_ptr + (row0 * M + mm).to(tl.int64) * D
    for k0 in range(0, D, BLOCK_D):
        cols = k0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < D)[None, :]
        qv = tl.load(_tile_ptrs(q_ptr, q_ptr, stride_q, stride_q, 0, row0, lrows, cols), mask=mask, other=0.0)
        qv = qv.to(ACC)
        if NORMALIZE:
            nv = tl.load(_tile_ptrs(c_ptr + mm * stride_c, c_ptr, stride_c * M, stride_c, 0, row0, lrows, cols),
                         mask=mask, other=0.0).to(ACC)
            dn = (coef * r_n * r_q)[:, None] * qv - tl.where(big, coef * r_n * r_n * cos, 0.0)[:, None] * nv
        else:
            dn = coef[:, None] * qv
        tl.store(out_base + lrows[:, None] * (M * D) + cols[None, :], dn.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias2(bias_ptr, idx, mask, ACC: tl.constexpr):
    """Retrieval logit bias (natural log, e.g. -log q_j) in the kernels' base-2 units, in ACC.
    The forward and every backward pass add it through here, so a logit is rounded the same
    wherever it is recomputed against a saved lse."""
    return tl.load(bias_ptr + idx, mask=mask, other=0.0).to(ACC) * 1.4426950408889634


@triton.jit
def _same_id(rid, id_ptr, rows, cols, col_ok, DIAG_EXEMPT: tl.constexpr):
    """[BLOCK_M, BLOCK_N] pairs whose ids match (rid: the tile rows' ids, id_ptr: the column
    rows'): they leave the softmax, except the diagonal (i, i) when DIAG_EXEMPT (the positive)."""
    cid = tl.load(id_ptr + cols, mask=col_ok, other=0)
    drop = rid[:, None] == cid[None, :]
    if DIAG_EXEMPT:
        drop = drop & (cols[None, :] != rows[:, None])
    return drop


@triton.jit
def _own_id(rid, id_ptr, rows, row_ok, HAS_IDS: tl.constexpr, DIAG_EXEMPT: tl.constexpr):
    """[BLOCK_M] rows whose partner (B row i, the positive) is masked: only when the diagonal
    is not exempt (a ring's remote block, where key i is not query i's positive)."""
    if HAS_IDS and not DIAG_EXEMPT:
        own = rid == tl.load(id_ptr + rows, mask=row_ok, other=0)
    else:
        own = rows < 0
    return own


@triton.autotune(configs=_all_configs(_LSE_FWD_FAMILIES),
                 key=["D", "TUNE_M", "PRECISION", "NORMALIZE", "B_MODE", "HAS_C", "PER_Q", "LABELS",
                      "COL_BIAS", "HAS_IDS", "DIAG_EXEMPT", "SPLIT", "COL_PART"],
                 prune_configs_by={"early_config_prune": _pruner(_LSE_FWD_FAMILIES, 2)})
@triton.jit(do_not_specialize=["NA", "NB", "NC", "M", "TUNE_M", "SPLITS", "RMAX"])
def _lse_fwd_kernel(
    a_ptr, b_ptr, c_ptr, stride_a, stride_b, stride_c, na_ptr, nb_ptr, nc_ptr, lab_ptr,
    bias_ptr, cbias_ptr, rid_ptr, bid_ptr, cid_ptr, par_ptr,
    lse_ptr, term_ptr, cnt_ptr, part_ptr, cpart_ptr, kpos_ptr, nblk_ptr, NA, NB, NC, M, D, TUNE_M, SPLITS, RMAX,
    NORMALIZE: tl.constexpr, B_MODE: tl.constexpr, HAS_C: tl.constexpr, PER_Q: tl.constexpr, LABELS: tl.constexpr,
    COL_BIAS: tl.constexpr, HAS_IDS: tl.constexpr, DIAG_EXEMPT: tl.constexpr, SPLIT: tl.constexpr,
    COL_PART: tl.constexpr,
    HOIST: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """lse_i over the candidates of row i, and term_i: InfoNCE lse_i - s_ii; SupCon
    lse_i - mean_{p in P(i)} s_ip for anchors (0 for rows without positives) and
    cnt_i = |P(i)| (compared in-tile, float).

    Retrieval terms (InfoNCE): COL_BIAS adds bias_ptr[j] (B columns; cbias_ptr: the queue's)
    to every logit of column j, the partner's included (term_i = lse_i - (s_ii + b_i));
    HAS_IDS drops column j of row i where rid_ptr[i] equals bid_ptr[j] (cid_ptr[j] on the
    queue), the diagonal of B excepted when DIAG_EXEMPT.

    SPLIT (a small batch against a long queue: too few row blocks to fill the GPU): program
    (row block, split) takes the queue's column tiles split, split + SPLITS, ...; split 0
    also takes B (and the partner). Each writes its base-2 (m_i, l_i, s_ii) to part_ptr
    [3, SPLITS, NA] instead of lse / term; the launcher merges the splits in a fixed order
    (_merge_splits).

    COL_PART (CLIP, B_MODE 1: the key direction in the same sweep): each B tile, computed
    once, also gives its columns' base-2 (max, sum beside the max's 1) over this program's
    rows (unbiased logits, the same pair mask), written to cpart_ptr [2, RMAX, NB] at the
    program's row block; kpos_ptr [NA] gets the unbiased s_ii (key i's positive), nblk_ptr
    the number of row blocks. _col_lse_merge_kernel merges them in a fixed order."""
    _, row0, lrows, rows, row_ok = _program_rows(NA, BLOCK_M)
    split, first = _split_of(SPLIT, 1)
    scale = tl.zeros([BLOCK_M], dtype=ACC) + tl.load(par_ptr).to(ACC)  # log2(e) / t
    ln2 = tl.log(tl.full([BLOCK_M], 2.0, ACC))
    if NORMALIZE:
        r_a = _rnorm(na_ptr, NA, rows, row_ok).to(ACC)
    else:
        r_a = scale  # unread
    q = _hoisted_row_tile(a_ptr, a_ptr, stride_a, stride_a, 0, row0, lrows, row_ok, D, HOIST, BLOCK_M, BLOCK_K)
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.full([BLOCK_M], -1.0, ACC)  # the sum beside the max's 1 (_online_lse)
    spos = tl.zeros([BLOCK_M], dtype=ACC)
    if HAS_IDS:
        rid = tl.load(rid_ptr + rows, mask=row_ok, other=0)
    else:
        rid = rows  # unread
    if B_MODE == 2:  # the own key only: the partner's logit (base 2) starts the statistics
        spos = _row_dot(a_ptr, b_ptr, stride_a, stride_b, 0, 1, row0, lrows, row_ok, D, ACC) * scale
        if SPLIT:  # (split 0's alone)
            spos = tl.where(first, spos, float("-inf"))
        if NORMALIZE:
            spos = spos * (r_a * _rnorm(nb_ptr, NB, rows, row_ok).to(ACC))
        if COL_BIAS:
            spos = spos + _bias2(bias_ptr, rows, row_ok, ACC)
        m_i = spos
        l_i = tl.zeros([BLOCK_M], dtype=ACC)  # the positive is the max: its 1 apart
        if SPLIT:
            l_i = tl.where(first, l_i, -1.0)
            spos = tl.where(first, spos, 0.0)
        if HAS_IDS and not DIAG_EXEMPT:
            own = _own_id(rid, bid_ptr, rows, row_ok, HAS_IDS, DIAG_EXEMPT)
            m_i = tl.where(own, float("-inf"), m_i)
            l_i = tl.where(own, -1.0, l_i)
    if LABELS:
        lab_i = tl.load(lab_ptr + rows, mask=row_ok, other=0)
        psum = tl.zeros([BLOCK_M], dtype=ACC)
        pcnt = tl.zeros([BLOCK_M], dtype=ACC)
    kpos = tl.zeros([BLOCK_M], dtype=ACC)  # COL_PART with COL_BIAS: the unbiased s_ii
    if B_MODE == 1:
        b_tiles = tl.cdiv(NB, BLOCK_N)
        if SPLIT:
            b_tiles = tl.where(first, b_tiles, 0)
        for t in range(0, b_tiles):
            s, kt, r_j, col0, lcols, cols, col_ok = _candidate_tile(
                q, a_ptr, b_ptr, stride_a, stride_b, nb_ptr, NB, row0, lrows, row_ok, t, scale, r_a, D,
                NORMALIZE, ACC, PRECISION, HOIST, BLOCK_M, BLOCK_N, BLOCK_K)
            keep = col_ok[None, :] & (rows[:, None] >= 0)
            if LABELS:  # SupCon: B = A, self-pairs out; positives: same label
                keep = keep & (cols[None, :] != rows[:, None])
                lab_j = tl.load(lab_ptr + cols, mask=col_ok, other=0)
                pos = keep & (lab_j[None, :] == lab_i[:, None])
                psum += tl.sum(tl.where(pos, s, 0.0), axis=1)
                pcnt += tl.sum(pos.to(ACC), axis=1)
            s_key = s  # COL_PART: the key direction's logits carry no bias
            if COL_BIAS:
                s = s + _bias2(bias_ptr, cols, col_ok, ACC)[None, :]
            on_diagonal = (col0 < row0 + BLOCK_M) & (col0 + BLOCK_N > row0)
            if not LABELS:  # the partner's logit (bias included) from its tile, masked or not
                if on_diagonal:
                    spos += _diagonal_of(s, rows, cols, col_ok)
            if HAS_IDS:
                keep = keep & ~_same_id(rid, bid_ptr, rows, cols, col_ok, DIAG_EXEMPT)
            if COL_PART:
                if COL_BIAS:
                    if on_diagonal:
                        kpos += _diagonal_of(s_key, rows, cols, col_ok)
                # padding rows (loaded as 0) must not enter the columns' sums
                cm, cl = _column_lse(tl.where(keep & row_ok[:, None], s_key, float("-inf")), 0.0)
                at = tl.program_id(0).to(tl.int64) * NB + cols
                tl.store(cpart_ptr + at, cm, mask=col_ok)
                tl.store(cpart_ptr + RMAX.to(tl.int64) * NB + at, cl, mask=col_ok)
            s = tl.where(keep, s, float("-inf"))
            m_i, l_i = _online_lse(m_i, l_i, s)
    if HAS_C:
        c_step = SPLITS if SPLIT else 1
        for t in range(split, tl.cdiv(NC, BLOCK_N), c_step):
            s, kt, r_j, col0, lcols, cols, col_ok = _candidate_tile(
                q, a_ptr, c_ptr, stride_a, stride_c, nc_ptr, NC, row0, lrows, row_ok, t, scale, r_a, D,
                NORMALIZE, ACC, PRECISION, HOIST, BLOCK_M, BLOCK_N, BLOCK_K)
            keep = col_ok[None, :] & (rows[:, None] >= 0)
            if COL_BIAS:
                s = s + _bias2(cbias_ptr, cols, col_ok, ACC)[None, :]
            if HAS_IDS:  # (the queue holds no positive: no exemption)
                keep = keep & ~_same_id(rid, cid_ptr, rows, cols, col_ok, False)
            s = tl.where(keep, s, float("-inf"))
            m_i, l_i = _online_lse(m_i, l_i, s)
    if PER_Q:
        for mm in range(0, M):
            s_m = _per_query_logit(a_ptr, c_ptr, stride_a, stride_c, nc_ptr, NC, M, mm, row0, lrows, rows,
                                   row_ok, scale, r_a, D, NORMALIZE, ACC)
            m_i, l_i = _online_lse(m_i, l_i, s_m[:, None])

    if COL_PART:  # (split 0 took B: its s_ii; without a bias the partner's is the same logit)
        if not COL_BIAS:
            kpos = spos
        if first:
            tl.store(kpos_ptr + rows, kpos, mask=row_ok)
        if tl.program_id(0) + split == 0:
            tl.store(nblk_ptr, tl.num_programs(0))
    if SPLIT:  # partial statistics, merged by the launcher (_merge_splits)
        at = split * NA + rows
        tl.store(part_ptr + at, m_i, mask=row_ok)
        tl.store(part_ptr + SPLITS * NA + at, l_i, mask=row_ok)
        tl.store(part_ptr + 2 * SPLITS * NA + at, spos, mask=row_ok)
    else:
        lse2 = _store_lse(lse_ptr, rows, m_i, l_i, row_ok)
        ln2_64 = ln2.to(tl.float64)
        if LABELS:
            term = tl.where(pcnt > 0, ((lse2 - (psum / tl.maximum(pcnt, 1.0)).to(tl.float64)) * ln2_64).to(ACC), 0.0)
            tl.store(cnt_ptr + rows, pcnt, mask=row_ok)
        else:
            term = ((lse2 - spos.to(tl.float64)) * ln2_64).to(ACC)
        tl.store(term_ptr + rows, term, mask=row_ok)


@triton.jit(do_not_specialize=["NB", "RMAX"])
def _col_lse_merge_kernel(cpart_ptr, nblk_ptr, kpos_ptr, lse_ptr, term_ptr, NB, RMAX,
                          ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
    """The key direction's lse_j and term_j = lse_j - s_jj from the one-sweep forward's
    column partials cpart_ptr [2, RMAX, NB] (the first nblk_ptr[0] row blocks written), in
    ACC: BLOCK_R row blocks at a time (_column_lse: loads in flight, not one row block's
    latency per step), chunks merged in row-block order (deterministic); kpos_ptr [NB]: s_jj
    (base 2)."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < NB
    m = tl.full([BLOCK], float("-inf"), ACC)
    l = tl.full([BLOCK], -1.0, ACC)
    nblk = tl.load(nblk_ptr)
    for r0 in range(0, nblk, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        at = r.to(tl.int64)[:, None] * NB + cols[None, :]
        mask = (r < nblk)[:, None] & ok[None, :]
        m2, l2 = _column_lse(tl.load(cpart_ptr + at, mask=mask, other=float("-inf")),
                             tl.load(cpart_ptr + RMAX.to(tl.int64) * NB + at, mask=mask, other=-1.0))
        m, l = _merge_lse_parts(m, l, m2, l2)
    m = tl.where(ok, m, 0.0)  # (padding: a finite lse, never stored)
    l = tl.where(ok, l, 0.0)
    lse2 = _store_lse(lse_ptr, cols, m, l, ok)
    kpos = tl.load(kpos_ptr + cols, mask=ok, other=0.0)
    tl.store(term_ptr + cols, ((lse2 - kpos.to(tl.float64)) * 0.6931471805599453).to(ACC), mask=ok)


@triton.autotune(configs=_all_configs(_LSE_BWD_FAMILIES),
                 key=["D", "TUNE_M", "PRECISION", "NORMALIZE", "B_MODE", "HAS_C", "PER_Q", "LABELS",
                      "ROW_TERM", "COL_TERM", "COL_BIAS", "ROW_BIAS", "HAS_IDS", "DIAG_EXEMPT", "SPLIT"],
                 prune_configs_by={"early_config_prune": _pruner(_LSE_BWD_FAMILIES, 2)})
@triton.jit(do_not_specialize=["NA", "NB", "NC", "M", "TUNE_M", "SPLITS"])
def _lse_bwd_kernel(
    a_ptr, b_ptr, c_ptr, stride_a, stride_b, stride_c, na_ptr, nb_ptr, nc_ptr, lab_ptr, cnt_ptr,
    bias_ptr, cbias_ptr, rid_ptr, bid_ptr, cid_ptr, par_ptr,
    g_ptr, lse_r_ptr, lse_c_ptr, out_ptr, scratch_ptr, tterm_ptr, NA, NB, NC, M, D, TUNE_M, SPLITS,
    NORMALIZE: tl.constexpr, B_MODE: tl.constexpr, HAS_C: tl.constexpr, PER_Q: tl.constexpr, LABELS: tl.constexpr,
    ROW_TERM: tl.constexpr, COL_TERM: tl.constexpr, DIAG_W: tl.constexpr, EXPECT: tl.constexpr,
    COL_BIAS: tl.constexpr, ROW_BIAS: tl.constexpr, HAS_IDS: tl.constexpr, DIAG_EXEMPT: tl.constexpr,
    SPLIT: tl.constexpr,
    HOIST: tl.constexpr, SAME_TILE: tl.constexpr, FUSED_OUT: tl.constexpr,
    PRECISION: tl.constexpr, DOT2_F32: tl.constexpr, ACC: tl.constexpr, EPS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr,
):
    """dA = c (W B^ + W_C C^) back through the normalisation, row-parallel and atomic-free,
    with c = g / (t denom) and, on B (s_ij = a^_i . b^_j / t recomputed per tile),
      W_ij = ROW_TERM w_i exp(s_ij - lse_r_i) + COL_TERM w_j exp(s_ij - lse_c_j)
             - DIAG_W [j == i]                         (InfoNCE: the partner)
             - 2 / |P(i)| [j in P(i)], W_ii = 0         (LABELS: SupCon, w = has positives)
    and on the queue W_C = exp(s - lse_r_i). A column pass (dkey, dqueue) is this kernel with
    A and B swapped and the row / column terms exchanged. EXPECT writes
    tterm_i = sum_j p_ij (s_ij - s_ii) (= E_i[s] - s_ii, the row term's softmax expectation
    minus the partner's logit: d loss / d t = -c sum_i tterm_i).

    Retrieval terms (InfoNCE), where the bias belongs to the query direction only: COL_BIAS
    (A = queries) adds bias_ptr[j] (B columns; cbias_ptr: the queue's) to the row term's
    logits; ROW_BIAS (A = keys or the queue, whose column term is the query direction) adds
    bias_ptr[i] of the tile's row to the column term's. tterm keeps the unbiased s (d l / d t
    does not see the bias); only p is biased. HAS_IDS zeroes both terms of a pair whose ids
    match (rid_ptr: A rows, bid_ptr: B rows, cid_ptr: the queue's), the diagonal of B excepted
    when DIAG_EXEMPT; DIAG_W stays subtracted at (i, i) either way (the target is B row i).

    SPLIT (as the forward's): program (row block, output columns, split) takes the queue's
    tiles split, split + SPLITS, ...; split 0 also B and the partner. Each writes its share
    of c * acc to scratch_ptr [SPLITS, NA, D] (fp32) and of tterm to tterm_ptr [SPLITS, NA];
    the launcher sums them in a fixed order, then the normalisation's backward."""
    _, row0, lrows, rows, row_ok = _program_rows(NA, BLOCK_M)
    split, first = _split_of(SPLIT, 2)
    dcols = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    dcol_ok = dcols < D
    scale = tl.zeros([BLOCK_M], dtype=ACC) + tl.load(par_ptr).to(ACC)  # log2(e) / t
    ln2 = tl.log(tl.full([BLOCK_M], 2.0, ACC))
    if ROW_TERM:
        hi_i, lo_i = _load_lse2(lse_r_ptr, rows, row_ok, ACC)
    if NORMALIZE:
        r_i = _rnorm(na_ptr, NA, rows, row_ok).to(ACC)
    else:
        r_i = scale  # unread
    r_a = r_i
    if LABELS:
        lab_i = tl.load(lab_ptr + rows, mask=row_ok, other=0)
        cnt_i = tl.load(cnt_ptr + rows, mask=row_ok, other=0).to(ACC)
        anchor_i = cnt_i > 0
        pos_w = 2.0 / tl.maximum(cnt_i, 1.0)
    if HAS_IDS:
        rid = tl.load(rid_ptr + rows, mask=row_ok, other=0)
    else:
        rid = rows  # unread
    if ROW_BIAS:
        rbias = _bias2(bias_ptr, rows, row_ok, ACC)
    q = _hoisted_row_tile(a_ptr, a_ptr, stride_a, stride_a, 0, row0, lrows, row_ok, D, HOIST, BLOCK_M, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_DO], dtype=ACC)
    # sum_j p_ij (s_ij - s_ii), base 2: = E_i[s] - s_ii, without the cancellation of
    # the difference (sum_j p_ij = 1 only up to the rounding of the saved lse)
    expect = tl.zeros([BLOCK_M], dtype=ACC)
    spos = tl.zeros([BLOCK_M], dtype=ACC)
    if (EXPECT or B_MODE == 2) and not LABELS:  # the partner's logit (rows of A and B pair up)
        spos = _row_dot(a_ptr, b_ptr, stride_a, stride_b, 0, 1, row0, lrows, row_ok, D, ACC) * scale
        if NORMALIZE:
            rb_i = _rnorm(nb_ptr, NB, rows, row_ok).to(ACC)
            spos = spos * (r_a * rb_i)
    if B_MODE == 1:
        b_tiles = tl.cdiv(NB, BLOCK_N)
        if SPLIT:
            b_tiles = tl.where(first, b_tiles, 0)
        for t in range(0, b_tiles):
            s, kt, r_j, col0, lcols, cols, col_ok = _candidate_tile(
                q, a_ptr, b_ptr, stride_a, stride_b, nb_ptr, NB, row0, lrows, row_ok, t, scale, r_a, D,
                NORMALIZE, ACC, PRECISION, HOIST, BLOCK_M, BLOCK_N, BLOCK_K)
            w = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
            if LABELS:
                cnt_j = tl.load(cnt_ptr + cols, mask=col_ok, other=0)
            if HAS_IDS:
                drop = _same_id(rid, bid_ptr, rows, cols, col_ok, DIAG_EXEMPT)
            if ROW_TERM:
                if COL_BIAS:
                    e = tl.exp2(((s + _bias2(bias_ptr, cols, col_ok, ACC)[None, :]) - hi_i[:, None]) - lo_i[:, None])
                else:
                    e = tl.exp2((s - hi_i[:, None]) - lo_i[:, None])
                if LABELS:
                    e = tl.where(anchor_i[:, None], e, 0.0)
                e = tl.where(col_ok[None, :], e, 0.0)
                if HAS_IDS:
                    e = tl.where(drop, 0.0, e)
                if EXPECT:
                    expect += tl.sum(e * (s - spos[:, None]), axis=1)
                w += e
            if COL_TERM:
                hi_j, lo_j = _load_lse2(lse_c_ptr, cols, col_ok, ACC)
                if ROW_BIAS:
                    e = tl.exp2(((s + rbias[:, None]) - hi_j[None, :]) - lo_j[None, :])
                else:
                    e = tl.exp2((s - hi_j[None, :]) - lo_j[None, :])
                if LABELS:
                    e = tl.where((cnt_j > 0)[None, :], e, 0.0)
                w += e
            if HAS_IDS:  # (a masked lse_j of -inf made e inf there: replaced, never multiplied)
                w = tl.where(drop, 0.0, w)
            eq = cols[None, :] == rows[:, None]
            if LABELS:
                lab_j = tl.load(lab_ptr + cols, mask=col_ok, other=0)
                pos = (lab_j[None, :] == lab_i[:, None]) & (~eq)
                w = tl.where(eq, 0.0, w - tl.where(pos, pos_w[:, None], 0.0))
            elif DIAG_W != 0:
                w = tl.where(eq, w - DIAG_W, w)
            w = tl.where(col_ok[None, :], w, 0.0)
            if NORMALIZE:
                w = w * r_j[None, :]  # multiplied onto the raw b_j: no normalised copy
            vt = _value_tile(kt, a_ptr, b_ptr, stride_a, stride_b, col0, lcols, col_ok, dcols, dcol_ok, SAME_TILE)
            acc = _weighted_rows(w, vt, acc, PRECISION, DOT2_F32, ACC)
    if B_MODE == 2:  # the partner only (MoCo): W_ii b^_i
        wd = tl.zeros([BLOCK_M], dtype=ACC) - DIAG_W
        own = _own_id(rid, bid_ptr, rows, row_ok, HAS_IDS, DIAG_EXEMPT)
        if ROW_TERM:
            if COL_BIAS:
                e = tl.exp2(((spos + _bias2(bias_ptr, rows, row_ok, ACC)) - hi_i) - lo_i)
            else:
                e = tl.exp2((spos - hi_i) - lo_i)
            if HAS_IDS and not DIAG_EXEMPT:
                e = tl.where(own, 0.0, e)
            # (its expectation term p_ii (s_ii - s_ii) is 0)
            wd += e
        if COL_TERM:
            hi_c, lo_c = _load_lse2(lse_c_ptr, rows, row_ok, ACC)
            if ROW_BIAS:
                e = tl.exp2(((spos + rbias) - hi_c) - lo_c)
            else:
                e = tl.exp2((spos - hi_c) - lo_c)
            if HAS_IDS and not DIAG_EXEMPT:
                e = tl.where(own, 0.0, e)
            wd += e
        if NORMALIZE:
            wd = wd * rb_i
        if SPLIT:  # (split 0's alone)
            wd = tl.where(first, wd, 0.0)
        xb = tl.load(_tile_ptrs(a_ptr, b_ptr, stride_a, stride_b, 1, row0, lrows, dcols),
                     mask=row_ok[:, None] & dcol_ok[None, :], other=0.0).to(ACC)
        acc += wd[:, None] * xb
    if HAS_C:
        c_step = SPLITS if SPLIT else 1
        for t in range(split, tl.cdiv(NC, BLOCK_N), c_step):
            s, kt, r_j, col0, lcols, cols, col_ok = _candidate_tile(
                q, a_ptr, c_ptr, stride_a, stride_c, nc_ptr, NC, row0, lrows, row_ok, t, scale, r_a, D,
                NORMALIZE, ACC, PRECISION, HOIST, BLOCK_M, BLOCK_N, BLOCK_K)
            if COL_BIAS:
                w = tl.exp2(((s + _bias2(cbias_ptr, cols, col_ok, ACC)[None, :]) - hi_i[:, None]) - lo_i[:, None])
                w = tl.where(col_ok[None, :], w, 0.0)
            else:
                w = tl.where(col_ok[None, :], tl.exp2((s - hi_i[:, None]) - lo_i[:, None]), 0.0)
            if HAS_IDS:
                w = tl.where(_same_id(rid, cid_ptr, rows, cols, col_ok, False), 0.0, w)
            if EXPECT:
                expect += tl.sum(w * (s - spos[:, None]), axis=1)
            if NORMALIZE:
                w = w * r_j[None, :]
            vt = _value_tile(kt, a_ptr, c_ptr, stride_a, stride_c, col0, lcols, col_ok, dcols, dcol_ok, SAME_TILE)
            acc = _weighted_rows(w, vt, acc, PRECISION, DOT2_F32, ACC)
    if PER_Q:  # row i's own negatives: p_im n^_im, row by row
        for mm in range(0, M):
            s_m = _per_query_logit(a_ptr, c_ptr, stride_a, stride_c, nc_ptr, NC, M, mm, row0, lrows, rows,
                                   row_ok, scale, r_a, D, NORMALIZE, ACC)
            p = tl.exp2((s_m - hi_i) - lo_i)
            if EXPECT:
                expect += p * (s_m - spos)
            if NORMALIZE:
                p = p * _rnorm(nc_ptr, NC, rows * M + mm, row_ok).to(ACC)
            xn = tl.load(_tile_ptrs(a_ptr, c_ptr + mm * stride_c, stride_a, stride_c * M, 1, row0, lrows, dcols),
                         mask=row_ok[:, None] & dcol_ok[None, :], other=0.0).to(ACC)
            acc += p[:, None] * xn
    if EXPECT:
        if tl.program_id(1) == 0:
            tl.store(tterm_ptr + split * NA + rows, expect * ln2, mask=row_ok)

    c = tl.load(g_ptr).to(ACC) * (tl.zeros([BLOCK_M], dtype=ACC) + tl.load(par_ptr + 1).to(ACC))
    omask = row_ok[:, None] & dcol_ok[None, :]
    if NORMALIZE:
        n_i = tl.load(na_ptr + rows, mask=row_ok, other=1.0)
    else:
        n_i, r_i = c, c  # unread
    # SPLIT: this split's c * acc to its slice of the scratch (FUSED_OUT is False there)
    _grad_epilogue(acc, c, q, _tile_ptrs(a_ptr, a_ptr, stride_a, stride_a, 0, row0, lrows, dcols),
                   n_i, r_i, out_ptr + row0.to(tl.int64) * D,
                   scratch_ptr + (split * NA + row0).to(tl.int64) * D,
                   lrows, dcols, omask, D, NORMALIZE, SAME_TILE, FUSED_OUT and not SPLIT, ACC, EPS)



# ----------------------------------------------------------------------------- launchers

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


def _unit_stride(z: torch.Tensor) -> torch.Tensor:
    """Read in place unless the feature dimension is strided (or a row stride so large
    that in-tile int32 offsets, at most 256 rows x stride, could overflow)."""
    if z.stride(-1) == 1 and abs(z.stride(0)) < _MAX_ROW_STRIDE:
        return z
    return z.contiguous()


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
    # (shared by NT-Xent's forward and the lse forward: NT-Xent's own RED_BLOCK is added at its launch)
    fwd = dict(NORMALIZE=bool(normalize), HOIST=hoist, PRECISION=precision, ACC=acc, BLOCK_K=block_k)
    bwd = dict(
        NORMALIZE=bool(normalize), HOIST=hoist,
        # the column tile loaded for S is also the value tile of the second product
        SAME_TILE=hoist and block_k == block_do and d <= block_do,
        # whole output rows in one program (or no normalisation): dz written directly;
        # otherwise dZhat -> fp32 scratch -> _grad_finish_kernel
        FUSED_OUT=(not normalize) or d <= block_do,
        PRECISION=precision, DOT2_F32=dtype == torch.float16, ACC=acc, EPS=_EPS,
        BLOCK_K=block_k, BLOCK_DO=block_do,
    )
    return family, fwd, bwd


# The two loss kernels, launched on their JIT function once a key's config is chosen; the
# key: the Autotuner's (D, TUNE_M, PRECISION, NORMALIZE) and the dtypes that vary (the
# placeholder norms / scratch follow normalize and the dtype; the backward's grad_loss)
_nt_xent_fwd = _launch.TunedLauncher(_nt_xent_fwd_kernel)
_nt_xent_bwd = _launch.TunedLauncher(_nt_xent_bwd_kernel)


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
    """-> (loss: 0-dim z1.dtype, lse: [2N] float64, norms: [4N] stats dtype with normalize
    (||x|| then 1 / max(||x||, eps), for the backward), else empty)."""
    z1 = _unit_stride(z1)
    z2 = _unit_stride(z2)
    n, d = z1.shape
    m = 2 * n
    acc_dtype = _acc_dtype(z1.dtype)
    precision = _precision(z1.dtype)
    _, meta, _ = _plan(d, z1.dtype, normalize, precision)
    # the column sweep split where the row blocks leave SMs idle, [3, S, M] partials
    splits = _nt_xent_splits(NT_XENT_FWD_SPLITS, _FWD_FAMILIES, n, d, z1.dtype, precision, 1, 3 * m * 4,
                             z1.device)
    split = splits > 1
    scale_hi, scale_lo = _split(math.log2(math.e) / float(temperature))
    with _device_ctx(z1):
        lse = torch.empty(m, dtype=torch.float64, device=z1.device)
        # one float64 loss partial per program of the launch that folds the loss
        folders = triton.cdiv(m, _LSE_MERGE_ROWS) if split else 2 * triton.cdiv(n, _MIN_FWD_BLOCK_M)
        partials = torch.empty(folders, dtype=torch.float64, device=z1.device)
        loss = torch.empty((), dtype=z1.dtype, device=z1.device)
        norms = _row_norms(z1, z2, acc_dtype) if normalize else lse.new_empty((0,), dtype=acc_dtype)
        part = torch.empty((3, splits, m), dtype=acc_dtype, device=z1.device) if split else lse
        ticket = _launch.ticket(z1.device)

        def grid(cfg):
            return (2 * triton.cdiv(n, cfg["BLOCK_M"]), splits)

        tune_m = _tune_m(m)
        _nt_xent_fwd(
            (d, tune_m, meta["PRECISION"], normalize, split, z1.dtype), grid,
            z1, z2, z1.stride(0), z2.stride(0), norms if normalize else lse, lse,  # lse: unread norms
            partials, ticket, loss, part, n, d, tune_m, splits, scale_hi, scale_lo, SPLIT=split,
            RED_BLOCK=_RED_BLOCK, **meta,
        )
        if split:
            _nt_xent_lse_merge_kernel[(folders,)](part, lse, partials, ticket, loss, n, splits,
                                                  BLOCK_R=_LSE_MERGE_ROWS, RED_BLOCK=_RED_BLOCK)
    return loss, lse, norms


def nt_xent_backward(grad_loss, z1, z2, lse, temperature: float, normalize: bool, norms=None):
    """-> (dz1, dz2): contiguous [N, D] of z1.dtype. grad_loss is read on the device.
    norms: the forward's (saves a row-norm launch); None or empty: computed here.
    The column sweep is split S ways where the row blocks alone leave the GPU idle
    (_nt_xent_splits), the splits' shares summed by _grad_finish_kernel."""
    z1 = _unit_stride(z1)
    z2 = _unit_stride(z2)
    n, d = z1.shape
    m = 2 * n
    acc_dtype = _acc_dtype(z1.dtype)
    precision = _precision(z1.dtype)
    _, _, meta = _plan(d, z1.dtype, normalize, precision)
    block_do = meta["BLOCK_DO"]
    slices = triton.cdiv(d, block_do)
    splits = _nt_xent_splits(NT_XENT_BWD_SPLITS, _BWD_FAMILIES, n, d, z1.dtype, precision, slices, m * d * 4,
                             z1.device)
    split = splits > 1
    scale_hi, scale_lo = _split(math.log2(math.e) / float(temperature))
    c_hi, c_lo = _split(1.0 / (float(temperature) * m))
    with _device_ctx(z1):
        if grad_loss.device != z1.device:
            grad_loss = grad_loss.to(z1.device)
        lse = lse.contiguous()
        dz1 = torch.empty((n, d), dtype=z1.dtype, device=z1.device)
        dz2 = torch.empty((n, d), dtype=z1.dtype, device=z1.device)
        if not normalize:
            norms = lse  # an unread placeholder
        elif norms is None or norms.numel() == 0:
            norms = _row_norms(z1, z2, acc_dtype)
        fused_out = meta["FUSED_OUT"] and not split
        scratch = lse if fused_out else torch.empty((splits * m, d), dtype=acc_dtype, device=z1.device)

        def grid(cfg):
            return (2 * triton.cdiv(n, cfg["BLOCK_M"]), triton.cdiv(d, block_do), splits)

        tune_m = _tune_m(m)
        _nt_xent_bwd(
            (d, tune_m, meta["PRECISION"], normalize, split, z1.dtype, grad_loss.dtype), grid,
            z1, z2, z1.stride(0), z2.stride(0), norms, lse, grad_loss, dz1, dz2, scratch,
            n, d, tune_m, splits, scale_hi, scale_lo, c_hi, c_lo, SPLIT=split, **meta,
        )
        if not fused_out:
            _finish_grads(scratch, z1, z2, norms, dz1, dz2, splits, normalize)
    return dz1, dz2


def _finish_grads(scratch, z1, z2, norms, out1, out2, splits, normalize):
    """out <- the splits' dZhat [splits, rows, D] summed in split order, back through the
    normalisation (z2 is z1 for a one-view layout: out2 is then out1)."""
    r, d = z1.shape
    block_r, block_d = _small_blocks(d)
    views = 1 if z2 is z1 else 2
    _grad_finish_kernel[(views * triton.cdiv(r, block_r),)](
        scratch, z1, z2, z1.stride(0), z2.stride(0), norms, out1, out2, r, d, splits, views * r * d,
        NORMALIZE=bool(normalize), ACC=_TL_DTYPES[scratch.dtype], EPS=_EPS, BLOCK_R=block_r, BLOCK_D=block_d,
    )


# None: the column splits of the NT-Xent forward / backward sweeps from the device
# (_column_splits); an int forces them (the interpreter tests, where no device is asked; tuning).
NT_XENT_FWD_SPLITS = None
NT_XENT_BWD_SPLITS = None
# A split's scratch (the backward's fp32 [S, M, D], the forward's [3, S, M]) is at most this;
# past it, fewer splits (none below 2).
_SPLIT_SCRATCH_MAX_BYTES = 256 << 20
# each split keeps at least this many column tiles (its fixed per-program work, the row
# tile and lse loads and the epilogue, stays small against its sweep)
_MIN_TILES_PER_SPLIT = 4
# Programs per SM the split aims at: the pinned configs hold one program per SM (bf16 D = 128,
# 128 x 64, 8 warps: the backward 174 registers split, 255 unsplit, x 256 threads > half of
# the 64 K), so programs past one per SM run as a second wave, which splitting further cannot
# shorten.
_SPLIT_PROGRAMS_PER_SM = 1
# rows per program of the split forward's merge (its loss partials: one per program)
_LSE_MERGE_ROWS = 16 if INTERPRET else 256


def _nt_xent_splits(forced, families, n: int, d: int, dtype: torch.dtype, precision: str, slices: int,
                    slice_bytes: int, device) -> int:
    """S for a sweep over the 2 cdiv(N, BLOCK_N) column tiles, from the pinned config of the
    call's family: `slices` programs per row block besides (the backward's output columns),
    `slice_bytes` of scratch per split."""
    if forced is not None:
        return max(1, int(forced))
    if INTERPRET or torch.device(device).type != "cuda":
        return 1
    tile = _family_configs(families, d, dtype, precision)[0].kwargs
    programs = 2 * triton.cdiv(n, tile["BLOCK_M"]) * slices
    return _column_splits(programs, 2 * triton.cdiv(n, tile["BLOCK_N"]), slice_bytes, _sm_count(device))


def _column_splits(programs: int, tiles: int, slice_bytes: int, sms: int) -> int:
    """Splits that bring a grid of `programs` to at most _SPLIT_PROGRAMS_PER_SM per SM (one
    wave) when it has fewer, each split with at least _MIN_TILES_PER_SPLIT of the `tiles`
    and their scratch within _SPLIT_SCRATCH_MAX_BYTES; 1 (no split) where that leaves < 2."""
    splits = min((_SPLIT_PROGRAMS_PER_SM * sms) // programs, tiles // _MIN_TILES_PER_SPLIT,
                 _SPLIT_SCRATCH_MAX_BYTES // slice_bytes, 64)
    return splits if splits >= 2 else 1


# ----------------------------------------------------------------------------- SupCon / InfoNCE launchers

_LOG2E = math.log2(math.e)


def _single_norms(x, acc_dtype):
    """[3 R] norms of the rows of one matrix (the one-view layout of _row_norm_kernel)."""
    r, d = x.shape
    norms = torch.empty(3 * r, dtype=acc_dtype, device=x.device)
    block_r, block_d = _small_blocks(d)
    _row_norm_kernel[(triton.cdiv(r, block_r),)](
        x, x, x.stride(0), x.stride(0), norms, r, d,
        ACC=_TL_DTYPES[acc_dtype], EPS=_EPS, BLOCK_R=block_r, BLOCK_D=block_d,
    )
    return norms


def _temperature64(temperature, device):
    """The temperature as a float64 0-dim tensor on `device`, without a host sync: a CUDA
    tensor stays where it is; a CPU tensor or float is read on the host (free) and filled."""
    if isinstance(temperature, torch.Tensor) and temperature.device == device:
        return temperature.detach().to(torch.float64)
    return torch.full((), float(temperature), dtype=torch.float64, device=device)


def _params(t64, denom, acc_dtype):
    """[log2(e) / t, 1 / (t denom)] in the accumulator dtype (denom: float or 0-dim tensor)."""
    return torch.stack([_LOG2E / t64, 1.0 / (t64 * denom)]).to(acc_dtype)


def _fwd_flags(b_mode: int, has_c: bool, labels: bool, per_q: bool = False, col_bias: bool = False,
               ids: bool = False, diag_exempt: bool = True, split: bool = False, col_part: bool = False) -> dict:
    """The mode constexprs of one _lse_fwd_kernel launch (also used by --compile-only);
    has_c: a shared queue, per_q: per-query negatives (C holds [N M, D] rows); col_bias: a
    logit bias per candidate, ids: the duplicate-id mask (diag_exempt: the diagonal stays);
    split: the queue's tiles shared among several programs per row block (_queue_splits);
    col_part: CLIP's key direction in the same sweep (column partials, _clip_fwd_launch)."""
    return dict(B_MODE=b_mode, HAS_C=bool(has_c) and not per_q, PER_Q=bool(per_q), LABELS=bool(labels),
                COL_BIAS=bool(col_bias), HAS_IDS=bool(ids), DIAG_EXEMPT=bool(diag_exempt) or not ids,
                SPLIT=bool(split), COL_PART=bool(col_part))


def _bwd_flags(b_mode: int, has_c: bool, labels: bool, row_term: bool, col_term: bool, diag_w: float,
               expect: bool, per_q: bool = False, col_bias: bool = False, row_bias: bool = False,
               ids: bool = False, diag_exempt: bool = True, split: bool = False) -> dict:
    """The mode constexprs of one _lse_bwd_kernel launch (also used by --compile-only);
    col_bias: the bias per column on the row term (A = queries), row_bias: per row on the
    column term (A = candidates)."""
    fwd = _fwd_flags(b_mode, has_c, labels, per_q, col_bias, ids, diag_exempt, split)
    del fwd["COL_PART"]  # (the forward's alone)
    return dict(fwd, ROW_TERM=bool(row_term),
                COL_TERM=bool(col_term), DIAG_W=float(diag_w), EXPECT=bool(expect), ROW_BIAS=bool(row_bias))


def _terms_args(terms, dummy):
    """(bias, queue bias, row ids, B ids, queue ids) pointers of a launch: `terms` maps those
    names to tensors (absent: an unread placeholder)."""
    terms = terms or {}
    return [terms.get(k, dummy) for k in ("bias", "cbias", "rid", "bid", "cid")]


def _fwd_launch(a, b, c, na, nb, nc, labels, par, lse, term, cnt, b_mode, normalize, per_q=0, terms=None,
                diag_exempt=True, splits=1, col_part=None):
    """One _lse_fwd_kernel launch: rows of a against b (B_MODE) and the queue c (per_q > 0:
    c holds per_q negatives per row of a). terms: the retrieval terms (_terms_args); a "bias"
    is per column of b ("cbias": of c). splits > 1 (a shared queue only): that many programs
    per row block share the queue's tiles; their statistics are merged here. col_part: the
    (column partials [2, RMAX, NB], s_ii [NA], row-block count [1]) buffers of the one-sweep
    CLIP forward (COL_PART), merged by its caller."""
    na_rows, d = a.shape
    _, meta, _ = _plan(d, a.dtype, normalize, _precision(a.dtype))
    dummy = lse
    bb = b if b is not None else a
    cc = c if c is not None else a
    terms = terms or {}
    split = splits > 1
    part = torch.empty((3, splits, na_rows), dtype=term.dtype, device=a.device) if split else dummy
    cpart, kpos, nblk = col_part if col_part is not None else (dummy, dummy, dummy)

    def grid(cfg):
        return (triton.cdiv(na_rows, cfg["BLOCK_M"]), splits)

    _lse_fwd_kernel[grid](
        a, bb, cc, a.stride(0), bb.stride(0), cc.stride(0),
        na if na is not None else dummy, nb if nb is not None else dummy, nc if nc is not None else dummy,
        labels if labels is not None else dummy, *_terms_args(terms, dummy), par, lse, term,
        cnt if cnt is not None else dummy, part, cpart, kpos, nblk,
        na_rows, bb.shape[0] if b is not None else 0, cc.shape[0] if c is not None else 0, per_q, d,
        _tune_m(na_rows), splits, cpart.shape[1] if col_part is not None else 0,
        **_fwd_flags(b_mode, c is not None, labels is not None, per_q > 0, "bias" in terms, "rid" in terms,
                     diag_exempt, split, col_part is not None),
        **meta,
    )
    if split:
        _merge_splits(part, lse, term)


def _merge_splits(part, lse, term):
    """lse (natural, float64) and term = lse - s_ii (ACC) from the splits' base-2 (m, l, s_ii)
    [3, S, N] (l: the sum beside the max's 1, _online_lse), in float64 and a fixed order:
    sum_s (1 + l_s) 2^(m_s - M), M the largest m_s, keeps a peaked row's small rest as
    _store_lse does; an empty split (m = -inf, l = -1) adds 0, a row empty everywhere -inf."""
    m, rest, spos = part[0].double(), part[1].double(), part[2, 0].double()
    top = m.max(dim=0).values
    shift = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    total = ((rest + 1.0) * torch.exp2(m - shift)).sum(dim=0)
    lse2 = shift + torch.log2(total)
    lse.copy_(lse2 * math.log(2.0))
    term.copy_(((lse2 - spos) * math.log(2.0)).to(term.dtype))


# A small batch against a long queue leaves most SMs idle (N = 256, K = 65536: 4 row blocks);
# past this many row blocks per SM nothing is split. None: from the device; an int forces it
# (the interpreter tests, tuning).
QUEUE_SPLITS = None


def _queue_splits(rows: int, queue_rows: int, device) -> int:
    """Programs per row block for the query rows' pass over a shared queue: enough for two
    programs per SM at 64-row blocks, each with at least 8 of the queue's 64-wide tiles."""
    if QUEUE_SPLITS is not None:
        return max(1, int(QUEUE_SPLITS))
    if INTERPRET or queue_rows == 0 or torch.device(device).type != "cuda":
        return 1
    sms = _sm_count(device)
    row_blocks = triton.cdiv(rows, 64)
    if row_blocks >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, row_blocks), queue_rows // (64 * 8), 64))


_SM_COUNTS = {}


def _sm_count(device) -> int:
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def _bwd_launch(a, b, c, na, nb, nc, labels, cnt, par, g, lse_r, lse_c, out, tterm, *,
                b_mode, row_term, col_term, diag_w, normalize, per_q=0, terms=None, bias_on_rows=False,
                diag_exempt=True, splits=1):
    """One _lse_bwd_kernel launch writing out = d loss / d a (and tterm when given). terms: as
    _fwd_launch's; the "bias" is per column of b on the row term, or with bias_on_rows per
    row of a on the column term."""
    na_rows, d = a.shape
    acc_dtype = _acc_dtype(a.dtype)
    _, _, meta = _plan(d, a.dtype, normalize, _precision(a.dtype))
    block_do = meta["BLOCK_DO"]
    dummy = par
    bb = b if b is not None else a
    cc = c if c is not None else a
    split = splits > 1
    fused_out = meta["FUSED_OUT"] and not split
    scratch = dummy if fused_out else torch.empty((splits * na_rows, d), dtype=acc_dtype, device=a.device)
    terms = terms or {}
    has_bias = "bias" in terms
    tterm_out = tterm
    if split and tterm is not None:
        tterm = torch.empty((splits, na_rows), dtype=tterm.dtype, device=a.device)

    def grid(cfg):
        return (triton.cdiv(na_rows, cfg["BLOCK_M"]), triton.cdiv(d, block_do), splits)

    _lse_bwd_kernel[grid](
        a, bb, cc, a.stride(0), bb.stride(0), cc.stride(0),
        na if na is not None else dummy, nb if nb is not None else dummy, nc if nc is not None else dummy,
        labels if labels is not None else dummy, cnt if cnt is not None else dummy,
        *_terms_args(terms, dummy), par, g,
        lse_r if lse_r is not None else dummy, lse_c if lse_c is not None else dummy, out, scratch,
        tterm if tterm is not None else dummy,
        na_rows, bb.shape[0] if b is not None else 0, cc.shape[0] if c is not None else 0, per_q, d,
        _tune_m(na_rows), splits,
        **_bwd_flags(b_mode, c is not None, labels is not None, row_term, col_term, diag_w, tterm is not None,
                     per_q > 0, has_bias and not bias_on_rows, has_bias and bias_on_rows, "rid" in terms,
                     diag_exempt, split),
        **meta,
    )
    if split:  # the splits' shares, summed in a fixed order
        if tterm is not None:
            tterm_out.copy_(tterm.sum(dim=0))
        scratch = scratch.view(splits, na_rows, d).sum(dim=0)
        if not normalize:
            out.copy_(scratch)
            return
    if not fused_out:
        _finish_grads(scratch, a, a, na, out, out, 1, True)


def _class_counts(labels):
    """|P(i)| = (size of i's class) - 1 per row, sort-based (no host sync)."""
    sorted_labels = torch.sort(labels).values
    hi = torch.searchsorted(sorted_labels, labels, right=True)
    lo = torch.searchsorted(sorted_labels, labels, right=False)
    return (hi - lo - 1).to(torch.int32)


def sup_con_forward(features: torch.Tensor, labels: torch.Tensor, temperature: float, normalize: bool):
    """-> (loss: 0-dim features.dtype, lse: [N] float64).

    lse_i = log sum_{a != i} exp(s_ia), every row (as the CPU op); the loss is the mean
    over anchors (rows with a positive) of lse_i - mean_{p in P(i)} s_ip, 0 without any
    anchor, reduced on the device (no host sync)."""
    x = _unit_stride(features)
    n, _ = x.shape
    acc_dtype = _acc_dtype(x.dtype)
    with _device_ctx(x):
        labels = labels.to(device=x.device, dtype=torch.int64).contiguous()
        lse = torch.empty(n, dtype=torch.float64, device=x.device)
        term = torch.empty(n, dtype=acc_dtype, device=x.device)
        cnt = torch.empty(n, dtype=acc_dtype, device=x.device)
        par = _params(_temperature64(temperature, x.device), 1.0, acc_dtype)
        (norms,) = _norms_of(normalize, acc_dtype, x)
        _fwd_launch(x, x, None, norms, norms, None, labels, par, lse, term, cnt, 1, normalize)
        anchors = (cnt > 0).sum().clamp_min(1).to(acc_dtype)
        loss = (term.sum() / anchors).to(x.dtype)
    return loss, lse


def sup_con_backward(grad_loss, features, labels, lse, temperature: float, normalize: bool):
    """-> dfeatures: contiguous [N, D] of features.dtype; consumes the forward's lse."""
    x = _unit_stride(features)
    n, d = x.shape
    acc_dtype = _acc_dtype(x.dtype)
    with _device_ctx(x):
        if grad_loss.device != x.device:
            grad_loss = grad_loss.to(x.device)
        labels = labels.to(device=x.device, dtype=torch.int64).contiguous()
        lse = lse.contiguous()
        cnt = _class_counts(labels)
        anchors = (cnt > 0).sum().clamp_min(1).to(torch.float64)
        par = _params(_temperature64(temperature, x.device), anchors, acc_dtype)
        out = torch.empty((n, d), dtype=x.dtype, device=x.device)
        (norms,) = _norms_of(normalize, acc_dtype, x)
        _bwd_launch(x, x, None, norms, norms, None, labels, cnt, par, grad_loss, lse, lse, out, None,
                    b_mode=1, row_term=True, col_term=True, diag_w=0.0, normalize=normalize)
    return out


_MAX_PER_QUERY_SPAN = 2**22  # M * row stride of per-query negatives: in-tile offsets stay int32


def _info_nce_inputs(query, key, negatives, symmetric, in_batch_negatives):
    """(query, key, negatives rows or None, M) after the checks the kernels rely on; read in
    place where possible. A shared queue [K, D] gives M = 0; per-query negatives [N, M, D]
    their [N M, D] rows (a view when the layout allows, else a copy) and M."""
    if symmetric and not in_batch_negatives:
        raise ValueError("symmetric=True needs in_batch_negatives=True (the key -> query candidates are the queries)")
    per_q = 0
    if negatives is not None and negatives.dim() == 3:
        per_q = negatives.shape[1]
        negatives = negatives.reshape(-1, negatives.shape[2])
    neg = _unit_stride(negatives) if negatives is not None and negatives.shape[0] > 0 else None
    if neg is not None and per_q and (per_q * neg.stride(0) >= _MAX_PER_QUERY_SPAN or per_q > 65535):
        raise NotImplementedError(
            f"info_nce on CUDA: per-query negatives with M * D = {per_q * neg.stride(0)} >= "
            f"{_MAX_PER_QUERY_SPAN} (or M > 65535) are not supported by the Triton kernel")
    return _unit_stride(query), _unit_stride(key), neg, (per_q if neg is not None else 0)


def _retrieval_terms(q, neg, per_q, logit_bias, anchor_ids, candidate_ids):
    """The retrieval terms of each InfoNCE launch as _terms_args maps, (query direction /
    dquery, key direction / dkey, dqueue), after the checks the kernels rely on (the ops layer
    converts: bias [N + K] in the accumulator dtype, ids int64, contiguous, on the device).

    The bias is the query direction's, per candidate (keys, then the queue): per column where
    the queries are the rows, per row in the dkey / dqueue passes (their column term is the
    query direction); the key direction's own softmax has none. A pair (query i, candidate j)
    is masked by anchor_ids[i] == candidate_ids[j] in both directions."""
    n = q.shape[0]
    k = neg.shape[0] if neg is not None and not per_q else 0
    qdir, kdir, qneg = {}, {}, {}
    if logit_bias is not None:
        assert logit_bias.shape == (n + k,) and logit_bias.is_contiguous(), "logit_bias: contiguous [N + K]"
        assert logit_bias.dtype == _acc_dtype(q.dtype) and logit_bias.device == q.device, \
            "logit_bias: the accumulator dtype, on the inputs' device"
        qdir.update(bias=logit_bias[:n], **({"cbias": logit_bias[n:]} if k else {}))
        kdir.update(bias=logit_bias[:n])
        if k:
            qneg.update(bias=logit_bias[n:])
    assert (anchor_ids is None) == (candidate_ids is None), "anchor_ids and candidate_ids: both or neither"
    if anchor_ids is not None:
        assert not per_q, "duplicate-id masks with per-query negatives [N, M, D] are not supported"
        assert anchor_ids.shape == (n,) and candidate_ids.shape == (n + k,), "ids: anchor [N], candidate [N + K]"
        for ids in (anchor_ids, candidate_ids):
            assert ids.dtype == torch.int64 and ids.is_contiguous() and ids.device == q.device, \
                "ids: contiguous int64 on the inputs' device"
        qdir.update(rid=anchor_ids, bid=candidate_ids[:n], **({"cid": candidate_ids[n:]} if k else {}))
        kdir.update(rid=candidate_ids[:n], bid=anchor_ids)
        if k:
            qneg.update(rid=candidate_ids[n:], bid=anchor_ids)
    return qdir, kdir, qneg


def _norms_of(normalize, acc_dtype, *xs):
    """[3 R] norm buffers of each matrix (None for a missing one or without normalisation)."""
    return [_single_norms(x, acc_dtype) if normalize and x is not None else None for x in xs]


# CLIP's key direction in the query rows' sweep (lead 6): None takes it while its column
# partials (N^2 / BLOCK_M x 8 B in fp32) stay under _COL_PART_MAX_BYTES, else the two-pass
# forward; True / False force one route (the interpreter tests, the device run's comparison).
CLIP_ONE_SWEEP = None
_COL_PART_MAX_BYTES = 1 << 28
_COL_MERGE_BLOCK = 64  # key columns per merge program (N = 8192: 128 programs)
_COL_MERGE_ROWS = 32  # row blocks per step of the merge


def _col_part_row_blocks(n: int, d: int, dtype: torch.dtype) -> int:
    """Row blocks the one-sweep forward's column partials must hold: as many as the smallest
    row tile its launch may take (the autotuner picks among the family's configs)."""
    configs = [_INTERPRET_CONFIG] if INTERPRET else _family_configs(_LSE_FWD_FAMILIES, d, dtype, _precision(dtype))
    return triton.cdiv(n, min(c.kwargs["BLOCK_M"] for c in configs))


def _clip_one_sweep(n: int, d: int, dtype: torch.dtype) -> bool:
    """Whether info_nce_forward takes the one-sweep route for a symmetric call."""
    if CLIP_ONE_SWEEP is not None:
        return bool(CLIP_ONE_SWEEP)
    acc_bytes = torch.finfo(_acc_dtype(dtype)).bits // 8
    return 2 * _col_part_row_blocks(n, d, dtype) * n * acc_bytes <= _COL_PART_MAX_BYTES


def _clip_fwd_launch(q, k, neg, nq, nk, nn, par, lse, term, normalize, per_q, terms, diag_exempt, splits):
    """CLIP's forward in one sweep of the query rows (lead 6): each S tile is computed once
    for both directions. lse, term: [2N], the query direction then the key direction. The
    query rows' launch (with its queue, split or not, and its terms) writes the key columns'
    partial statistics per row block; _col_lse_merge_kernel merges them in a fixed order
    (deterministic, no atomics). The key direction sees the same pair mask, no bias."""
    n, d = q.shape
    rmax = _col_part_row_blocks(n, d, q.dtype)
    cpart = torch.empty((2, rmax, n), dtype=term.dtype, device=q.device)
    nblk = torch.empty(1, dtype=torch.int32, device=q.device)
    kpos = term[n:]  # s_ii (base 2) from the sweep, then lse_i - s_ii from the merge
    _fwd_launch(q, k, neg, nq, nk, nn, None, par, lse[:n], term[:n], None, 1, normalize, per_q, terms=terms,
                diag_exempt=diag_exempt, splits=splits, col_part=(cpart, kpos, nblk))
    _col_lse_merge_kernel[(triton.cdiv(n, _COL_MERGE_BLOCK),)](
        cpart, nblk, kpos, lse[n:], term[n:], n, rmax, ACC=_TL_DTYPES[term.dtype], BLOCK_R=_COL_MERGE_ROWS,
        BLOCK=_COL_MERGE_BLOCK)


def info_nce_forward(query, key, negatives, temperature, normalize: bool, symmetric: bool,
                     in_batch_negatives: bool, negatives_grad: bool = False, logit_bias=None, anchor_ids=None,
                     candidate_ids=None, positive_on_diagonal: bool = True):
    """-> (loss: 0-dim query.dtype, lse: [N] (query direction), then [N] (key direction)
    when symmetric; float64).

    Query i's candidates: every key (in_batch_negatives) or its own key only, plus the
    shared queue `negatives` [K, D] or its own M negatives of `negatives` [N, M, D]; CLIP's
    key direction (symmetric) is a second pass with the roles swapped (candidates: the
    queries). `temperature`: float or 0-dim tensor, read on the device.

    Retrieval terms: `logit_bias` [N + K] is added to query i's logit of candidate j (keys,
    then the queue; the query direction only); candidate j leaves query i's softmax (and
    query i key j's) where anchor_ids[i] == candidate_ids[j], key i excepted while
    `positive_on_diagonal`. The target stays key i: loss_i = lse_i - (s_ii + bias_i).
    Symmetric: one sweep for both directions (_clip_fwd_launch) unless _clip_one_sweep
    declines (the column partials' size), then the second pass."""
    q, k, neg, per_q = _info_nce_inputs(query, key, negatives, symmetric, in_batch_negatives)
    qdir, kdir, _ = _retrieval_terms(q, neg, per_q, logit_bias, anchor_ids, candidate_ids)
    n, d = q.shape
    acc_dtype = _acc_dtype(q.dtype)
    rows = 2 * n if symmetric else n
    with _device_ctx(q):
        lse = torch.empty(rows, dtype=torch.float64, device=q.device)
        term = torch.empty(rows, dtype=acc_dtype, device=q.device)
        par = _params(_temperature64(temperature, q.device), 1.0, acc_dtype)
        nq, nk, nn = _norms_of(normalize, acc_dtype, q, k, neg)
        b_mode = 1 if in_batch_negatives else 2
        splits = _queue_splits(n, neg.shape[0], q.device) if neg is not None and not per_q else 1
        one_sweep = symmetric and _clip_one_sweep(n, d, q.dtype)
        if one_sweep:
            _clip_fwd_launch(q, k, neg, nq, nk, nn, par, lse, term, normalize, per_q, qdir, positive_on_diagonal,
                             splits)
        else:
            _fwd_launch(q, k, neg, nq, nk, nn, None, par, lse[:n], term[:n], None, b_mode, normalize, per_q,
                        terms=qdir, diag_exempt=positive_on_diagonal, splits=splits)
        if symmetric and not one_sweep:
            _fwd_launch(k, q, None, nk, nq, None, None, par, lse[n:], term[n:], None, 1, normalize,
                        terms={key: v for key, v in kdir.items() if key != "bias"},
                        diag_exempt=positive_on_diagonal)
        loss = (term.sum() / rows).to(q.dtype)
    return loss, lse


def info_nce_backward(grad_loss, query, key, negatives, temperature, lse, normalize: bool, symmetric: bool,
                      in_batch_negatives: bool, negatives_grad: bool, logit_bias=None, anchor_ids=None,
                      candidate_ids=None, positive_on_diagonal: bool = True):
    """-> (dquery, dkey, dnegatives (negatives' shape when they want a gradient, else an
    empty [0] tensor), dtemperature (0-dim, temperature's dtype and device)).

    Row-parallel passes, atomic-free: dquery (rows: queries; columns: keys and the queue or
    the own negatives), dkey (rows: keys; columns: queries), dnegatives (a queue: rows of the
    queue, columns: queries; per-query: one element-wise pass).
    dtemperature = -(g / (t N dirs)) sum_i (E_i[s] - s_ii) over the directions, summed by torch
    (s unbiased, the expectation under the biased, masked softmax). Retrieval terms as the
    forward's; W_ii keeps its -1 where (i, i) is masked (positive_on_diagonal=False)."""
    q, k, neg, per_q = _info_nce_inputs(query, key, negatives, symmetric, in_batch_negatives)
    qdir, kdir, qneg = _retrieval_terms(q, neg, per_q, logit_bias, anchor_ids, candidate_ids)
    has_neg = neg is not None
    n, d = q.shape
    acc_dtype = _acc_dtype(q.dtype)
    dirs = 2 if symmetric else 1
    with _device_ctx(q):
        if grad_loss.device != q.device:
            grad_loss = grad_loss.to(q.device)
        lse = lse.contiguous()
        lse_q = lse[:n]
        lse_k = lse[n:] if symmetric else None
        t64 = _temperature64(temperature, q.device)
        par = _params(t64, float(n * dirs), acc_dtype)
        nq, nk, nn = _norms_of(normalize, acc_dtype, q, k, neg)
        b_mode = 1 if in_batch_negatives else 2
        dq = torch.empty((n, d), dtype=q.dtype, device=q.device)
        dk = torch.empty((n, d), dtype=k.dtype, device=q.device)
        tterm = torch.empty(2 * n if symmetric else n, dtype=acc_dtype, device=q.device)
        splits = _queue_splits(n, neg.shape[0], q.device) if has_neg and not per_q else 1
        _bwd_launch(q, k, neg, nq, nk, nn, None, None, par, grad_loss, lse_q, lse_k, dq, tterm[:n],
                    b_mode=b_mode, row_term=True, col_term=symmetric, diag_w=dirs, normalize=normalize,
                    per_q=per_q, terms=qdir, diag_exempt=positive_on_diagonal, splits=splits)
        _bwd_launch(k, q, None, nk, nq, None, None, None, par, grad_loss, lse_k, lse_q, dk,
                    tterm[n:] if symmetric else None,
                    b_mode=b_mode, row_term=symmetric, col_term=True, diag_w=dirs, normalize=normalize,
                    terms=kdir, bias_on_rows=True, diag_exempt=positive_on_diagonal)
        if has_neg and negatives_grad and per_q:
            dneg = torch.empty(neg.shape, dtype=neg.dtype, device=q.device)
            block_r, block_d = _small_blocks(d)
            _per_query_neg_bwd_kernel[(triton.cdiv(n, block_r), per_q)](
                q, neg, q.stride(0), neg.stride(0), nq if normalize else par, nn if normalize else par, par,
                grad_loss, lse_q, dneg, n, per_q, d,
                NORMALIZE=bool(normalize), ACC=_TL_DTYPES[acc_dtype], EPS=_EPS, BLOCK_R=block_r, BLOCK_D=block_d,
            )
            dneg = dneg.view(negatives.shape)
        elif has_neg and negatives_grad:
            dneg = torch.empty(neg.shape, dtype=neg.dtype, device=q.device)
            # (queue row j against query i: no diagonal, so no exemption)
            _bwd_launch(neg, q, None, nn, nq, None, None, None, par, grad_loss, None, lse_q, dneg, None,
                        b_mode=1, row_term=False, col_term=True, diag_w=0.0, normalize=normalize,
                        terms=qneg, bias_on_rows=True, diag_exempt=False)
        else:
            dneg = q.new_empty((0,))
        coef = grad_loss.to(torch.float64) / (t64 * (n * dirs))
        dtemp = -coef * tterm.sum().to(torch.float64)
        if isinstance(temperature, torch.Tensor):
            # a CPU temperature (a float given by the user) costs one scalar copy back
            dtemp = dtemp.to(device=temperature.device, dtype=temperature.dtype)
    return dq, dk, dneg, dtemp
