"""Triton KoLeo nearest-neighbour search (the CUDA path of `sslkernels::koleo_neighbors`).

``koleo_neighbors(x, query_offset, query_count, group_size, topk, eps) -> int64 [query_count, topk]``

Kernel ``_koleo_search_kernel``, grid (cdiv(query_count, BLOCK_M),): one program owns a
block of query rows and sweeps every candidate column block of their group(s) with
``tl.dot`` (fp32 accumulation), so no atomics and no N x N. Cosine similarity for the
ranking is ``(x_i . x_j) / max(||x_j||, eps)``: the query's own scale does not change its
ranking, so the rows are never copied normalised. Masked: columns past the end, outside
the query's group, and the query itself. The running top-k per row:

* topk = 1: a running max and arg-max; columns are swept in ascending order and a later
  tile replaces the best only when strictly larger, so ties go to the smaller index;
* topk > 1: a [BLOCK_M, K_PAD] list; each tile is merged in ``topk`` extraction rounds
  (the best of the tile and of the list, larger value first, then smaller index).

Both are deterministic (no atomics, fixed sweep order). The result equals the CPU
core's up to the rounding of the similarities (near-ties may resolve differently).
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from sslkernels.kernels.contrastive import _precision

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HOIST_DEFAULT = os.environ.get("SSLKERNELS_KOLEO_HOIST", "1") != "0"

__all__ = ["koleo_neighbors", "plan"]

_NO_INDEX = tl.constexpr(2**62)  # a jit function reads only constexpr globals


@triton.jit
def _koleo_search_kernel(
    x_ptr, scale_ptr, out_ptr,
    M, D, stride_m, stride_d, query_offset, query_count, group_size,
    TOPK: tl.constexpr, K_PAD: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HOIST: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    local = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = local < query_count
    rows = query_offset + tl.where(row_ok, local, 0)
    row_group = rows // group_size
    first_row = query_offset + pid * BLOCK_M
    last_row = query_offset + tl.minimum(pid * BLOCK_M + BLOCK_M, query_count) - 1
    col_start = (first_row // group_size) * group_size
    col_end = (last_row // group_size + 1) * group_size
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    neg_inf = float("-inf")

    if TOPK == 1:
        best = tl.full((BLOCK_M,), neg_inf, ACC)
        best_idx = tl.full((BLOCK_M,), _NO_INDEX, tl.int64)
    else:
        slots = tl.arange(0, K_PAD)
        run_v = tl.full((BLOCK_M, K_PAD), neg_inf, ACC)
        run_i = tl.full((BLOCK_M, K_PAD), _NO_INDEX, tl.int64)

    if HOIST:  # the whole row tile (BLOCK_K >= D) loaded once, not once per column tile
        a_rows = tl.load(x_ptr + rows[:, None] * stride_m + ks[None, :] * stride_d,
                         mask=row_ok[:, None] & (ks < D)[None, :], other=0.0)
    lcols = tl.arange(0, BLOCK_N)  # in-tile column offsets: int32 masks and arg-max (registers)
    for c0 in range(col_start, col_end, BLOCK_N):
        cols = c0 + lcols.to(tl.int64)
        col_ok = cols < col_end
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        if HOIST:
            b = tl.load(x_ptr + cols[:, None] * stride_m + ks[None, :] * stride_d,
                        mask=col_ok[:, None] & (ks < D)[None, :], other=0.0)
            acc = tl.dot(a_rows, tl.trans(b), acc, input_precision=PRECISION, out_dtype=ACC)
        else:
            for k0 in range(0, D, BLOCK_K):
                kk = k0 + ks
                k_ok = kk < D
                a = tl.load(x_ptr + rows[:, None] * stride_m + kk[None, :] * stride_d,
                            mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(x_ptr + cols[:, None] * stride_m + kk[None, :] * stride_d,
                            mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION, out_dtype=ACC)
        scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
        s = acc * scale[None, :]
        # the row's group, the end of the sweep and the row itself, as in-tile offsets
        lo = (row_group * group_size - c0).to(tl.int32)
        hi = tl.minimum(row_group * group_size + group_size, col_end) - c0
        hi = tl.minimum(hi, BLOCK_N).to(tl.int32)
        lo = tl.maximum(lo, -1)
        me = tl.where((rows >= c0) & (rows < c0 + BLOCK_N), rows - c0, -1).to(tl.int32)
        keep = (lcols[None, :] >= lo[:, None]) & (lcols[None, :] < hi[:, None]) & (lcols[None, :] != me[:, None])
        s = tl.where(keep, s, neg_inf)
        if TOPK == 1:
            m = tl.max(s, axis=1)
            arg = c0 + tl.min(tl.where(s == m[:, None], lcols[None, :], BLOCK_N), axis=1).to(tl.int64)
            better = m > best  # equal later columns lose: ties go to the smaller index
            best_idx = tl.where(better, arg, best_idx)
            best = tl.where(better, m, best)
        else:
            new_v = tl.full((BLOCK_M, K_PAD), neg_inf, ACC)
            new_i = tl.full((BLOCK_M, K_PAD), _NO_INDEX, tl.int64)
            for t in tl.static_range(TOPK):
                mt = tl.max(s, axis=1)
                it = c0 + tl.min(tl.where(s == mt[:, None], lcols[None, :], BLOCK_N), axis=1).to(tl.int64)
                mr = tl.max(run_v, axis=1)
                ir = tl.min(tl.where(run_v == mr[:, None], run_i, _NO_INDEX), axis=1)
                take_tile = (mt > mr) | ((mt == mr) & (it < ir))
                new_v = tl.where(slots[None, :] == t, tl.where(take_tile, mt, mr)[:, None], new_v)
                new_i = tl.where(slots[None, :] == t, tl.where(take_tile, it, ir)[:, None], new_i)
                s = tl.where(take_tile[:, None] & (lcols[None, :] == (it - c0).to(tl.int32)[:, None]), neg_inf, s)
                run_v = tl.where((~take_tile)[:, None] & (run_i == ir[:, None]), neg_inf, run_v)
            run_v = new_v
            run_i = new_i

    # A slot never filled (NaN similarities, outside the debug rule) names the row itself:
    # the index stays in bounds (no device assert in the gather) and the loss comes out NaN.
    if TOPK == 1:
        best_idx = tl.where(best_idx == _NO_INDEX, rows, best_idx)
        tl.store(out_ptr + local, best_idx, mask=row_ok)
    else:
        run_i = tl.where(run_i == _NO_INDEX, rows[:, None], run_i)
        tl.store(out_ptr + local[:, None] * TOPK + slots[None, :], run_i,
                 mask=row_ok[:, None] & (slots[None, :] < TOPK))


def plan(d: int, topk: int, dtype: torch.dtype, hoist=None) -> dict:
    """Block sizes and warps of one launch (sizes only). sm_90 compile (ptxas -v, 8 warps):
    128 x 128 tiles fit the registers for fp16 / bf16 at topk = 1 (232 regs, HGMMA); fp32
    (tf32x3, three products) spilled there and takes 128 x 64, fp64 64 x 64. HOIST (the
    row tile loaded once; fp16 / bf16, D <= 256) is the default there unless
    SSLKERNELS_KOLEO_HOIST=0; the GPU run times both (benchmarks/gpu/koleo.py)."""
    half = dtype in (torch.float16, torch.bfloat16)
    if hoist is None:
        hoist = HOIST_DEFAULT
    hoist = bool(hoist) and (half or INTERPRET) and d <= 256
    if INTERPRET:
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=max(16, triton.next_power_of_2(d)) if hoist else 16,
                    num_warps=1, HOIST=hoist)
    if hoist:
        return dict(BLOCK_M=128, BLOCK_N=128 if topk == 1 and d <= 128 else 64,
                    BLOCK_K=max(16, triton.next_power_of_2(d)), num_warps=8, HOIST=True)
    block_k = min(64 if dtype != torch.float64 else 32, max(16, triton.next_power_of_2(d)))
    return dict(BLOCK_M=64 if dtype == torch.float64 else 128, BLOCK_N=128 if half and topk == 1 else 64,
                BLOCK_K=block_k, num_warps=8, HOIST=False)


def _device_ctx(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def koleo_neighbors(x: torch.Tensor, query_offset: int, query_count: int, group_size: int, topk: int,
                    eps: float, hoist=None) -> torch.Tensor:
    m, d = x.shape
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    scale = 1.0 / x.to(acc_dtype).norm(dim=1).clamp_min(eps)
    out = torch.empty((query_count, topk), dtype=torch.int64, device=x.device)
    cfg = plan(d, topk, x.dtype, hoist)
    grid = (triton.cdiv(query_count, cfg["BLOCK_M"]),)
    with _device_ctx(x):
        _koleo_search_kernel[grid](
            x, scale, out, m, d, x.stride(0), x.stride(1), int(query_offset), int(query_count), int(group_size),
            TOPK=int(topk), K_PAD=max(2, triton.next_power_of_2(int(topk))), PRECISION=_precision(x.dtype),
            ACC=tl.float64 if x.dtype == torch.float64 else tl.float32,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], HOIST=cfg["HOIST"],
            num_warps=cfg["num_warps"])
    return out
