"""Triton kernels for masked-patch and packed varlen attention (the CUDA path of
`sslkernels::masked_patch_attention_*` and `sslkernels::varlen_attention_*`).

One kernel body per pass serves both ops; a constexpr ``INDEXED`` picks how a row's
token is found:

* masked (INDEXED): sample b's query row i is token ``index[b, i]`` of q[b] and key
  row j is token ``kv_index[b, j]`` of k[b] / v[b]. The index block is loaded first,
  then the rows by pointer arithmetic (int64 offsets): no gathered or padded copy.
  Rows i >= count[b] (and indices outside [0, L)) are invalid: never read, their
  outputs are zero and their lse -inf.
* varlen (not INDEXED): sequence b is tokens ``cu_seqlens[b] + i`` of packed
  [T, H, Dh] tensors (batch stride 0), queries and keys alike.

Grid (cdiv(rows, BLOCK), B * H) with rows = the index width K (masked: no host sync,
the counts stay on the device) or max_seqlen (varlen). A program whose tile starts at
or past its sample's count runs its loop zero times (the loop bound is the count, or
0), so each sample costs work proportional to its own counts.

* ``_attn_fwd_kernel``   FlashAttention-2 forward: the program's [BLOCK_M, Dh] query
  tile against the sample's key tiles, online softmax in base 2, fp32 accumulation
  (fp64 for fp64 inputs). Writes out [B, K, H, Dh] / [T, H, Dh] and the natural-log
  lse [B, H, K] / [H, T]; masked rows get zeros and -inf.
* ``_attn_delta_kernel`` D_i = rowsum(dO_i * O_i), layout of lse.
* ``_attn_bwd_dkdv_kernel`` parallel over key tiles: recomputes P^T per query tile,
  dV += P^T dO, dK += dS^T Q; scatters to the kv positions.
* ``_attn_bwd_dq_kernel`` parallel over query tiles: dQ += dS K; scatters to the query
  positions. No atomics: deterministic. Positions are unique within a sample, so no two
  programs write one gradient row; gradients of the masked op start from zeros.

Head dims 16..128 (any, BLOCK_D = next power of two, masked columns). fp32 products
follow torch's TF32 switch (as in `contrastive.py`). Every load is masked to its
tensor: indices are clamped to [0, L) and out-of-range ones treated as invalid;
cu_seqlens are clamped to [0, T].
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sslkernels.kernels._common import autotune_enabled, device_ctx as _device_ctx
from sslkernels.kernels.contrastive import _precision
from sslkernels.kernels._common import interpret_mode, split_float as _split, stats_dtype as _stats_dtype

INTERPRET = interpret_mode()
MAX_HEAD_DIM = 128  # BLOCK_D = next power of two of the head dim, at most 128
AUTOTUNE = autotune_enabled(INTERPRET)  # off: the first config of each family

__all__ = [
    "masked_patch_attention_forward",
    "masked_patch_attention_backward",
    "varlen_attention_forward",
    "varlen_attention_backward",
]

# ----------------------------------------------------------------------------- configs
#
# Families by operand kind and head-dim class (BLOCK_D 64 or 128): "half" (fp16 / bf16),
# "tf32" (fp32, TF32 allowed), "x3" (fp32 by default: tf32x3, three TF32 products on split
# operands, ~2x the shared memory and registers), "fma" (fp64, or fp32 with
# SSLKERNELS_FP32_DOT=ieee). Chosen from ptxas -v for sm_90 (`python
# benchmarks/gpu_attention.py --compile-only`): the first config of each family, the one
# used without autotuning, fits shared memory and spills nothing (x3 at Dh > 64: the
# least spill found, 40-240 B); autotuning (key: head dim, a bucket of the row count,
# the precision, the dtypes) picks among the family.


def _cfg(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


_FWD = {
    "half64": [_cfg(64, 64, 4, 3), _cfg(128, 64, 8, 3), _cfg(64, 32, 4, 2)],
    "half128": [_cfg(64, 64, 4, 3), _cfg(128, 64, 8, 3), _cfg(64, 32, 4, 2)],
    "tf3264": [_cfg(64, 64, 4, 3), _cfg(128, 64, 8, 3), _cfg(64, 32, 4, 2)],
    "tf32128": [_cfg(64, 64, 8, 2), _cfg(64, 32, 8, 2), _cfg(32, 64, 8, 2)],
    "x364": [_cfg(64, 32, 4, 2), _cfg(64, 64, 4, 3), _cfg(128, 64, 8, 3)],
    "x3128": [_cfg(32, 32, 4, 2), _cfg(32, 64, 8, 2)],
    "fma64": [_cfg(32, 32, 4, 2), _cfg(64, 32, 4, 2)],
    "fma128": [_cfg(32, 32, 4, 2), _cfg(64, 32, 4, 2)],
}
# dk/dv: BLOCK_N key rows held, BLOCK_M query rows streamed
_BWD_KV = {
    "half64": [_cfg(64, 64, 4, 2), _cfg(32, 64, 4, 2), _cfg(32, 128, 8, 2)],
    "half128": [_cfg(32, 64, 4, 2), _cfg(32, 128, 8, 2), _cfg(64, 64, 8, 2)],
    "tf3264": [_cfg(64, 64, 4, 2), _cfg(32, 128, 8, 2), _cfg(64, 128, 8, 2)],
    "tf32128": [_cfg(32, 32, 8, 2), _cfg(16, 32, 4, 2), _cfg(16, 64, 4, 2)],
    "x364": [_cfg(16, 64, 4, 2), _cfg(32, 128, 8, 2), _cfg(16, 32, 4, 2)],
    "x3128": [_cfg(32, 32, 8, 2), _cfg(16, 32, 4, 2)],
    "fma64": [_cfg(32, 32, 4, 2), _cfg(16, 32, 4, 2)],
    "fma128": [_cfg(16, 32, 4, 2), _cfg(32, 32, 4, 2)],
}
# dq: BLOCK_M query rows held, BLOCK_N key rows streamed
_BWD_Q = {
    "half64": [_cfg(64, 64, 4, 2), _cfg(128, 64, 8, 2), _cfg(64, 32, 4, 2)],
    "half128": [_cfg(64, 64, 4, 2), _cfg(128, 64, 8, 2), _cfg(64, 32, 4, 2)],
    "tf3264": [_cfg(64, 64, 4, 2), _cfg(128, 64, 8, 2), _cfg(64, 32, 4, 2)],
    "tf32128": [_cfg(64, 32, 8, 2), _cfg(32, 32, 8, 2), _cfg(128, 32, 8, 2)],
    "x364": [_cfg(64, 32, 4, 2), _cfg(128, 32, 8, 2), _cfg(64, 16, 4, 2)],
    "x3128": [_cfg(32, 32, 8, 2), _cfg(32, 16, 4, 2)],
    "fma64": [_cfg(32, 32, 4, 2), _cfg(32, 16, 4, 2)],
    "fma128": [_cfg(32, 16, 4, 2), _cfg(32, 32, 4, 2)],
}
_INTERPRET_CONFIG = _cfg(16, 16, 4, 1)
# Arguments that change from batch to batch (index widths, token counts, the lse / output
# layouts that follow them): not specialised, so a new batch never recompiles.
# (Each list names only its kernel's parameters: older Triton looks every name up.)
_PER_BATCH_FWD = ["KQ", "KKV", "T", "TUNE", "slb", "slh", "sob"]
_PER_BATCH_DELTA = ["KQ", "T", "slb", "slh", "sob", "sgb"]
_PER_BATCH_BWD = ["KQ", "KKV", "T", "TUNE", "slb", "slh", "sgb"]
_DELTA_ROWS = 16 if INTERPRET else 64


def _family(dtype, precision: str, head_dim: int) -> str:
    """Config family of a call: operand kind + BLOCK_D class (64 or 128)."""
    width = "64" if head_dim <= 64 else "128"
    if dtype in (torch.float64, tl.float64) or (dtype in (torch.float32, tl.float32) and precision == "ieee"):
        return "fma" + width
    if dtype in (torch.float32, tl.float32):
        return ("tf32" if precision == "tf32" else "x3") + width
    return "half" + width


def _all(families):
    if INTERPRET:
        return [_INTERPRET_CONFIG]
    return [c for fam in families.values() for c in fam]


def _pruner(families):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        fam = families[_family(args["q_ptr"].dtype, args["PRECISION"], args["HEAD_DIM"])]
        return fam if AUTOTUNE else fam[:1]

    if INTERPRET:
        return None
    return {"early_config_prune": prune}


def _tune_rows(n: int) -> int:
    """Autotune bucket of the row count (part of the key)."""
    return max(64, min(4096, triton.next_power_of_2(max(int(n), 1))))


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _sequence(b, cnt_ptr, kv_cnt_ptr, cu_ptr, KQ, KKV, T, INDEXED: tl.constexpr):
    """(first token, query rows, key rows) of sample / sequence b, clamped so that
    every row they name lies inside its tensor."""
    if INDEXED:
        start = b * 0
        n_q = tl.minimum(tl.maximum(tl.load(cnt_ptr + b), 0), KQ)
        n_kv = tl.minimum(tl.maximum(tl.load(kv_cnt_ptr + b), 0), KKV)
    else:
        start = tl.minimum(tl.maximum(tl.load(cu_ptr + b), 0), T)
        end = tl.minimum(tl.maximum(tl.load(cu_ptr + b + 1), start), T)
        n_q = end - start
        n_kv = n_q
    return start, n_q, n_kv


@triton.jit
def _positions(idx_ptr, b, width, start, rows, n, L, INDEXED: tl.constexpr):
    """Token positions (int64, clamped to [0, L)) of local rows `rows` and whether
    each is valid (row < n and, masked, index in [0, L))."""
    inb = rows < n
    if INDEXED:
        p = tl.load(idx_ptr + b.to(tl.int64) * width + rows, mask=inb, other=-1).to(tl.int64)
        ok = inb & (p >= 0) & (p < L)
        p = tl.where(ok, p, 0)
    else:
        p = (start + rows).to(tl.int64)
        ok = inb
    return p, ok


@triton.jit
def _rows_ptrs(ptr, b, sb, pos, st, h, sh, dcols, sd, ALIGN: tl.constexpr):
    """ptr[b, pos, h, dcols] through explicit strides (int64 offsets). The batch, token
    and head strides arrive divided by ALIGN (a power of two dividing all of them):
    multiplied back here, they tell the compiler rows start on ALIGN-element boundaries,
    so head dims like 40 or 88 still get vector loads."""
    base = ptr + b.to(tl.int64) * sb * ALIGN + h.to(tl.int64) * sh * ALIGN
    return base + (pos * st * ALIGN)[:, None] + dcols[None, :] * sd


@triton.jit
def _program(H, cnt_ptr, kv_cnt_ptr, cu_ptr, KQ, KKV, T, INDEXED: tl.constexpr):
    """(sample, head, first token, query rows, key rows) of this program (axis 1 = B * H)."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh - b * H
    start, n_q, n_kv = _sequence(b, cnt_ptr, kv_cnt_ptr, cu_ptr, KQ, KKV, T, INDEXED)
    return b, h, start, n_q, n_kv


@triton.jit
def _kv_tiles(k_ptr, v_ptr, b, h, kpos, kok, dcols, dok, skb, skt, skh, skd, svb, svt, svh, svd,
              ALIGN: tl.constexpr):
    """The key and value rows at kpos (zeros where not kok), [BLOCK_N, BLOCK_D] each."""
    kmask = kok[:, None] & dok[None, :]
    kt = tl.load(_rows_ptrs(k_ptr, b, skb, kpos, skt, h, skh, dcols, skd, ALIGN), mask=kmask, other=0.0)
    vt = tl.load(_rows_ptrs(v_ptr, b, svb, kpos, svt, h, svh, dcols, svd, ALIGN), mask=kmask, other=0.0)
    return kt, vt


@triton.jit
def _stat_offsets(b, h, start, rows, slb, slh):
    """Offsets of lse / delta entries: masked [B, H, K] (slb = H K, slh = K),
    varlen [H, T] (slb = 0, slh = T, rows shifted by the sequence start)."""
    return b.to(tl.int64) * slb + h.to(tl.int64) * slh + start + rows


@triton.jit
def _scale2(scale_hi, scale_lo, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """scale * log2(e) in ACC (a float64 scale arrives as a float32 hi/lo pair)."""
    return (tl.zeros([BLOCK], dtype=ACC) + scale_hi + scale_lo) * _log2e(BLOCK, ACC)


@triton.jit
def _log2e(BLOCK: tl.constexpr, ACC: tl.constexpr):
    return 1.0 / tl.log(tl.full([BLOCK], 2.0, ACC))


# ----------------------------------------------------------------------------- forward


@triton.autotune(configs=_all(_FWD), key=["HEAD_DIM", "TUNE", "PRECISION"], prune_configs_by=_pruner(_FWD))
@triton.jit(do_not_specialize=_PER_BATCH_FWD)
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, idx_ptr, kv_idx_ptr, cnt_ptr, kv_cnt_ptr, cu_ptr,
    sqb, sqt, sqh, sqd, skb, skt, skh, skd, svb, svt, svh, svd,
    sob, sot, soh, sod, slb, slh,
    H, LQ, LK, KQ, KKV, T, TUNE, scale_hi, scale_lo,
    INDEXED: tl.constexpr, HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b, h, start, n_q, n_kv = _program(H, cnt_ptr, kv_cnt_ptr, cu_ptr, KQ, KKV, T, INDEXED)
    m0 = pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    dcols = tl.arange(0, BLOCK_D)
    dok = dcols < HEAD_DIM
    qpos, qok = _positions(idx_ptr, b, KQ, start, rows, n_q, LQ, INDEXED)
    q = tl.load(_rows_ptrs(q_ptr, b, sqb, qpos, sqt, h, sqh, dcols, sqd, ALIGN),
                mask=qok[:, None] & dok[None, :], other=0.0)
    scale2 = _scale2(scale_hi, scale_lo, BLOCK_M, ACC)

    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    lcols = tl.arange(0, BLOCK_N)
    hi = tl.where(m0 < n_q, n_kv, 0)  # a tile past the count does no work
    for n0 in range(0, hi, BLOCK_N):
        kpos, kok = _positions(kv_idx_ptr, b, KKV, start, n0 + lcols, n_kv, LK, INDEXED)
        kt, vt = _kv_tiles(k_ptr, v_ptr, b, h, kpos, kok, dcols, dok, skb, skt, skh, skd, svb, svt, svh, svd,
                        ALIGN)
        s = tl.dot(q, tl.trans(kt), input_precision=PRECISION, out_dtype=ACC) * scale2[:, None]
        s = tl.where(kok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(vt.dtype), vt, acc, input_precision=PRECISION, out_dtype=ACC)
        m_i = m_new

    live = qok & (l_i > 0)
    inv = 1.0 / tl.where(live, l_i, 1.0)
    out = tl.where(live[:, None], acc * inv[:, None], 0.0)
    ln2 = tl.log(tl.full([BLOCK_M], 2.0, ACC))
    lse = tl.where(live, (m_i + tl.log2(tl.where(live, l_i, 1.0))) * ln2, float("-inf"))
    # masked: every row of the index width is written (zeros past the count);
    # varlen: the sequence's own rows only
    if INDEXED:
        wrow = rows < KQ
    else:
        wrow = rows < n_q
    orow = (start + rows).to(tl.int64)
    o_ptrs = _rows_ptrs(o_ptr, b, sob, orow, sot, h, soh, dcols, sod, ALIGN)
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=wrow[:, None] & dok[None, :])
    tl.store(lse_ptr + _stat_offsets(b, h, start, rows, slb, slh), lse, mask=wrow)


# ----------------------------------------------------------------------------- backward


@triton.jit(do_not_specialize=_PER_BATCH_DELTA)
def _attn_delta_kernel(
    o_ptr, do_ptr, delta_ptr, cnt_ptr, cu_ptr,
    sob, sot, soh, sod, sgb, sgt, sgh, sgd, slb, slh,
    H, KQ, T,
    INDEXED: tl.constexpr, HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta = rowsum(dO * O) in fp32 (fp64), for the rows below the count."""
    pid_m = tl.program_id(0)
    b, h, start, n_q, _ = _program(H, cnt_ptr, cnt_ptr, cu_ptr, KQ, KQ, T, INDEXED)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = rows < n_q
    orow = (start + rows).to(tl.int64)
    dcols = tl.arange(0, BLOCK_D)
    mask = ok[:, None] & (dcols < HEAD_DIM)[None, :]
    o = tl.load(_rows_ptrs(o_ptr, b, sob, orow, sot, h, soh, dcols, sod, ALIGN), mask=mask, other=0.0)
    g = tl.load(_rows_ptrs(do_ptr, b, sgb, orow, sgt, h, sgh, dcols, sgd, ALIGN), mask=mask, other=0.0)
    acc_ty = delta_ptr.dtype.element_ty
    d = tl.sum(o.to(acc_ty) * g.to(acc_ty), axis=1)
    tl.store(delta_ptr + _stat_offsets(b, h, start, rows, slb, slh), d, mask=ok)


@triton.jit
def _query_side(q_ptr, do_ptr, lse_ptr, delta_ptr, b, h, start, rows, n_q, idx_ptr, KQ, LQ, log2e,
                sqb, sqt, sqh, sqd, sgb, sgt, sgh, sgd, slb, slh, dcols, dok,
                INDEXED: tl.constexpr, ACC: tl.constexpr, ALIGN: tl.constexpr):
    """A query tile's (positions, valid, q, dO, lse in base 2, delta); log2e: log2(e) in
    ACC, [BLOCK_M]. A row whose lse is -inf (no keys) counts as invalid."""
    qpos, qok = _positions(idx_ptr, b, KQ, start, rows, n_q, LQ, INDEXED)
    soff = _stat_offsets(b, h, start, rows, slb, slh)
    lse = tl.load(lse_ptr + soff, mask=qok, other=0.0).to(ACC)
    qok = qok & (lse > float("-inf"))
    mask = qok[:, None] & dok[None, :]
    q = tl.load(_rows_ptrs(q_ptr, b, sqb, qpos, sqt, h, sqh, dcols, sqd, ALIGN), mask=mask, other=0.0)
    orow = (start + rows).to(tl.int64)
    do = tl.load(_rows_ptrs(do_ptr, b, sgb, orow, sgt, h, sgh, dcols, sgd, ALIGN), mask=mask, other=0.0)
    delta = tl.load(delta_ptr + soff, mask=qok, other=0.0).to(ACC)
    lse2 = tl.where(qok, lse * log2e, 0.0)
    return qpos, qok, q, do, lse2, delta


@triton.autotune(configs=_all(_BWD_KV), key=["HEAD_DIM", "TUNE", "PRECISION"], prune_configs_by=_pruner(_BWD_KV))
@triton.jit(do_not_specialize=_PER_BATCH_BWD)
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    idx_ptr, kv_idx_ptr, cnt_ptr, kv_cnt_ptr, cu_ptr,
    sqb, sqt, sqh, sqd, skb, skt, skh, skd, svb, svt, svh, svd,
    sgb, sgt, sgh, sgd, slb, slh, sdb, sdt, sdh,
    H, LQ, LK, KQ, KKV, T, TUNE, scale_hi, scale_lo,
    INDEXED: tl.constexpr, HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b, h, start, n_q, n_kv = _program(H, cnt_ptr, kv_cnt_ptr, cu_ptr, KQ, KKV, T, INDEXED)
    n0 = pid_n * BLOCK_N
    dcols = tl.arange(0, BLOCK_D)
    dok = dcols < HEAD_DIM
    kpos, kok = _positions(kv_idx_ptr, b, KKV, start, n0 + tl.arange(0, BLOCK_N), n_kv, LK, INDEXED)
    kmask = kok[:, None] & dok[None, :]
    kt, vt = _kv_tiles(k_ptr, v_ptr, b, h, kpos, kok, dcols, dok, skb, skt, skh, skd, svb, svt, svh, svd,
                        ALIGN)
    scale2 = _scale2(scale_hi, scale_lo, BLOCK_N, ACC)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    lrows = tl.arange(0, BLOCK_M)
    log2e = _log2e(BLOCK_M, ACC)
    hi = tl.where(n0 < n_kv, n_q, 0)
    for m0 in range(0, hi, BLOCK_M):
        _, qok, q, do, lse2, delta = _query_side(
            q_ptr, do_ptr, lse_ptr, delta_ptr, b, h, start, m0 + lrows, n_q, idx_ptr, KQ, LQ, log2e,
            sqb, sqt, sqh, sqd, sgb, sgt, sgh, sgd, slb, slh, dcols, dok, INDEXED, ACC, ALIGN)
        st = tl.dot(kt, tl.trans(q), input_precision=PRECISION, out_dtype=ACC) * scale2[:, None]
        pt = tl.where(kok[:, None] & qok[None, :], tl.exp2(st - lse2[None, :]), 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PRECISION, out_dtype=ACC)
        dpt = tl.dot(vt, tl.trans(do), input_precision=PRECISION, out_dtype=ACC)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=PRECISION, out_dtype=ACC)

    dk = dk * (tl.zeros([BLOCK_N], dtype=ACC) + scale_hi + scale_lo)[:, None]
    tl.store(_rows_ptrs(dk_ptr, b, sdb, kpos, sdt, h, sdh, dcols, 1, ALIGN), dk.to(dk_ptr.dtype.element_ty),
             mask=kmask)
    tl.store(_rows_ptrs(dv_ptr, b, sdb, kpos, sdt, h, sdh, dcols, 1, ALIGN), dv.to(dv_ptr.dtype.element_ty),
             mask=kmask)


@triton.autotune(configs=_all(_BWD_Q), key=["HEAD_DIM", "TUNE", "PRECISION"], prune_configs_by=_pruner(_BWD_Q))
@triton.jit(do_not_specialize=_PER_BATCH_BWD)
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    idx_ptr, kv_idx_ptr, cnt_ptr, kv_cnt_ptr, cu_ptr,
    sqb, sqt, sqh, sqd, skb, skt, skh, skd, svb, svt, svh, svd,
    sgb, sgt, sgh, sgd, slb, slh, sdb, sdt, sdh,
    H, LQ, LK, KQ, KKV, T, TUNE, scale_hi, scale_lo,
    INDEXED: tl.constexpr, HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b, h, start, n_q, n_kv = _program(H, cnt_ptr, kv_cnt_ptr, cu_ptr, KQ, KKV, T, INDEXED)
    m0 = pid_m * BLOCK_M
    dcols = tl.arange(0, BLOCK_D)
    dok = dcols < HEAD_DIM
    qpos, qok, q, do, lse2, delta = _query_side(
        q_ptr, do_ptr, lse_ptr, delta_ptr, b, h, start, m0 + tl.arange(0, BLOCK_M), n_q, idx_ptr, KQ, LQ,
        _log2e(BLOCK_M, ACC),
        sqb, sqt, sqh, sqd, sgb, sgt, sgh, sgd, slb, slh, dcols, dok, INDEXED, ACC, ALIGN)
    scale2 = _scale2(scale_hi, scale_lo, BLOCK_M, ACC)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    lcols = tl.arange(0, BLOCK_N)
    hi = tl.where(m0 < n_q, n_kv, 0)
    for n0 in range(0, hi, BLOCK_N):
        kpos, kok = _positions(kv_idx_ptr, b, KKV, start, n0 + lcols, n_kv, LK, INDEXED)
        kt, vt = _kv_tiles(k_ptr, v_ptr, b, h, kpos, kok, dcols, dok, skb, skt, skh, skd, svb, svt, svh, svd,
                        ALIGN)
        s = tl.dot(q, tl.trans(kt), input_precision=PRECISION, out_dtype=ACC) * scale2[:, None]
        p = tl.where(qok[:, None] & kok[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(vt), input_precision=PRECISION, out_dtype=ACC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), kt, dq, input_precision=PRECISION, out_dtype=ACC)

    dq = dq * (tl.zeros([BLOCK_M], dtype=ACC) + scale_hi + scale_lo)[:, None]
    tl.store(_rows_ptrs(dq_ptr, b, sdb, qpos, sdt, h, sdh, dcols, 1, ALIGN), dq.to(dq_ptr.dtype.element_ty),
             mask=qok[:, None] & dok[None, :])


# ----------------------------------------------------------------------------- launchers

_TL_ACC = {torch.float64: tl.float64}


def _acc(dtype: torch.dtype):
    return _TL_ACC.get(dtype, tl.float32)


def _block_d(dh: int) -> int:
    return max(16, triton.next_power_of_2(int(dh)))


def _strides4(x: torch.Tensor, align: int = 1):
    """(batch, token, head, feature) strides of [B, L, H, Dh] or packed [T, H, Dh] (batch
    0), the first three divided by `align` (the kernels multiply them back)."""
    s = tuple(x.stride()) if x.dim() == 4 else (0,) + tuple(x.stride())
    return tuple(v // align for v in s[:3]) + (s[3],)


def _align(*tensors) -> int:
    """The largest power of two <= 16 dividing every batch, token and head stride of the
    tensors (1 if a feature stride is not 1): the kernels' ALIGN."""
    g = 16
    for x in tensors:
        s = _strides4(x)
        if s[3] != 1:
            return 1
        for v in s[:3]:
            g = math.gcd(g, v)
    return g


def _meta(dtype: torch.dtype, dh: int, indexed: bool) -> dict:
    return dict(INDEXED=indexed, HEAD_DIM=int(dh), PRECISION=_precision(dtype), ACC=_acc(dtype), BLOCK_D=_block_d(dh))


class _Call:
    """Everything a launch needs besides q, k, v: (B, H, Dh), row maps and counts,
    grid rows, and the output / lse layout."""

    def __init__(self, q, k, index, count, kv_index, kv_count, cu_seqlens, max_seqlen, scale):
        self.indexed = cu_seqlens is None
        self.dh = q.shape[-1]
        if not 1 <= self.dh <= MAX_HEAD_DIM:
            raise ValueError(f"`q` head dim {self.dh} is out of range: the Triton kernels take 1..{MAX_HEAD_DIM}")
        self.scale = _split(float(scale))
        if self.indexed:
            self.b, self.lq, self.h = q.shape[0], q.shape[1], q.shape[2]
            self.lk = k.shape[1]
            self.kq, self.kkv = index.shape[1], kv_index.shape[1]
            self.t = 0
            self.rows_q, self.rows_kv = self.kq, self.kkv
            dummy = count
            self.maps = (index.contiguous(), kv_index.contiguous(), count.contiguous(), kv_count.contiguous(), dummy)
            self.out_shape = (self.b, self.kq, self.h, self.dh)
            self.lse_shape = (self.b, self.h, self.kq)
            self.stat = (self.h * self.kq, self.kq)  # (slb, slh)
        else:
            self.b, self.h = cu_seqlens.shape[0] - 1, q.shape[1]
            self.t = q.shape[0]
            self.lq = self.lk = 0  # unused: rows are the sequence's own tokens
            self.kq = self.kkv = 0
            self.rows_q = self.rows_kv = max(int(max_seqlen), 0)
            cu = cu_seqlens.contiguous()
            self.maps = (cu, cu, cu, cu, cu)  # index / count slots unused
            self.out_shape = (self.t, self.h, self.dh)
            self.lse_shape = (self.h, self.t)
            self.stat = (0, self.t)
        self.tune = _tune_rows(max(self.rows_q, self.rows_kv))

    def sizes(self):
        return (self.h, self.lq, self.lk, self.kq, self.kkv, self.t, self.tune) + self.scale


def _forward(q, k, v, call: _Call):
    meta = _meta(q.dtype, call.dh, call.indexed)
    idx, kv_idx, cnt, kv_cnt, cu = call.maps
    with _device_ctx(q):
        out = torch.empty(call.out_shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(call.lse_shape, dtype=_stats_dtype(q.dtype), device=q.device)
        if call.b == 0 or call.h == 0 or call.rows_q == 0 or out.numel() == 0:
            lse.fill_(float("-inf"))
            out.zero_()
            return out, lse

        def grid(cfg):
            return (triton.cdiv(call.rows_q, cfg["BLOCK_M"]), call.b * call.h)

        a = _align(q, k, v, out)
        _attn_fwd_kernel[grid](
            q, k, v, out, lse, idx, kv_idx, cnt, kv_cnt, cu,
            *_strides4(q, a), *_strides4(k, a), *_strides4(v, a), *_strides4(out, a), *call.stat,
            *call.sizes(), ALIGN=a, **meta,
        )
    return out, lse


def _backward(grad_out, q, k, v, out, lse, call: _Call):
    meta = _meta(q.dtype, call.dh, call.indexed)
    idx, kv_idx, cnt, kv_cnt, cu = call.maps
    alloc = torch.zeros if call.indexed else torch.empty  # varlen: every token is some row
    with _device_ctx(q):
        dq = alloc(q.shape, dtype=q.dtype, device=q.device)
        dk = alloc(k.shape, dtype=k.dtype, device=k.device)
        dv = alloc(v.shape, dtype=v.dtype, device=v.device)
        if call.b == 0 or call.h == 0 or call.rows_q == 0 or call.rows_kv == 0:
            return dq.zero_(), dk.zero_(), dv.zero_()
        lse = lse.contiguous()
        delta = torch.empty(call.lse_shape, dtype=_stats_dtype(q.dtype), device=q.device)
        a = _align(q, k, v, grad_out, out, dq, dk)
        meta["ALIGN"] = a
        _attn_delta_kernel[(triton.cdiv(call.rows_q, _DELTA_ROWS), call.b * call.h)](
            out, grad_out, delta, cnt, cu, *_strides4(out, a), *_strides4(grad_out, a), *call.stat,
            call.h, call.kq, call.t,
            INDEXED=call.indexed, HEAD_DIM=call.dh, ALIGN=a, BLOCK_M=_DELTA_ROWS, BLOCK_D=meta["BLOCK_D"],
        )
        common = (*_strides4(q, a), *_strides4(k, a), *_strides4(v, a), *_strides4(grad_out, a), *call.stat)

        def grid_kv(cfg):
            return (triton.cdiv(call.rows_kv, cfg["BLOCK_N"]), call.b * call.h)

        _attn_bwd_dkdv_kernel[grid_kv](
            q, k, v, grad_out, lse, delta, dk, dv, idx, kv_idx, cnt, kv_cnt, cu,
            *common, *_strides4(dk, a)[:3], *call.sizes(), **meta,
        )

        def grid_q(cfg):
            return (triton.cdiv(call.rows_q, cfg["BLOCK_M"]), call.b * call.h)

        _attn_bwd_dq_kernel[grid_q](
            q, k, v, grad_out, lse, delta, dq, idx, kv_idx, cnt, kv_cnt, cu,
            *common, *_strides4(dq, a)[:3], *call.sizes(), **meta,
        )
    return dq, dk, dv


def masked_patch_attention_forward(q, k, v, index, count, kv_index, kv_count, scale):
    """-> (out [B, K, H, Dh] in q.dtype, lse [B, H, K] float32 (float64 for float64)).

    q [B, Lq, H, Dh], k / v [B, Lk, H, Dh] with any strides; index [B, K], kv_index
    [B, Kv] int64 (-1 padding after the count); count / kv_count int32 [B] on the device."""
    call = _Call(q, k, index, count, kv_index, kv_count, None, None, scale)
    return _forward(q, k, v, call)


def masked_patch_attention_backward(grad_out, q, k, v, index, count, kv_index, kv_count, out, lse, scale):
    """-> (dq, dk, dv), contiguous, shaped like q, k, v; zero at positions nobody keeps."""
    call = _Call(q, k, index, count, kv_index, kv_count, None, None, scale)
    return _backward(grad_out, q, k, v, out, lse, call)


def varlen_attention_forward(q, k, v, cu_seqlens, max_seqlen, scale):
    """-> (out [T, H, Dh] in q.dtype, lse [H, T] float32 (float64 for float64))."""
    call = _Call(q, k, None, None, None, None, cu_seqlens, max_seqlen, scale)
    return _forward(q, k, v, call)


def varlen_attention_backward(grad_out, q, k, v, cu_seqlens, max_seqlen, out, lse, scale):
    """-> (dq, dk, dv), contiguous [T, H, Dh]."""
    call = _Call(q, k, None, None, None, None, cu_seqlens, max_seqlen, scale)
    return _backward(grad_out, q, k, v, out, lse, call)
