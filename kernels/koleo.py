"""Triton KoLeo nearest-neighbour search (the CUDA path of `sslkernels::koleo_neighbors`).

Two kernels return int64 [queries, topk]; the ops layer picks one (`search_route`):

* ``koleo_neighbors_symmetric(x, group_size, topk, eps)``, every row a query:
  ``_koleo_symmetric_kernel``, one program per upper-triangular pair (bi <= bj) of square
  BLOCK-row blocks sharing a group (``tile_pairs``), multiplies the tile once and keeps
  each side's own top-k (rows of bi among bj, rows of bj among bi) in a partial buffer
  [M, slots * topk], one slot per candidate block of the row's group, each slot written
  by exactly one program; ``_koleo_merge_kernel`` then takes each row's top-k from its
  slots. Half the products of the row-block sweep and ~62 programs per SM at N = 16384.
* ``koleo_neighbors(x, query_offset, query_count, group_size, topk, eps)``, any slice of
  queries (one rank's rows of a gathered batch): ``_koleo_search_kernel``, grid
  (cdiv(query_count, BLOCK_M),), one program owns a block of query rows and sweeps every
  candidate column block of their group(s).

Both rank with ``(x_i . x_j) / max(||x_j||, eps)`` (the query's own scale does not change
its ranking, so the rows are never copied normalised), fp32 accumulation of ``tl.dot``,
and mask columns past the end, outside the query's group, and the query itself. Both keep
the strict order of the CPU core: larger similarity first, then the smaller index. Under a
strict total order the top-k set is unique, so neither the sweep order, the tile
schedule nor the merge order changes it; there are no atomics, and exact ties (duplicate
rows) resolve identically in both kernels and on the CPU. The results agree up to the
rounding of the similarities (a near-tie may resolve differently: the symmetric tile
computes x_j . x_i as x_i . x_j).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from sslkernels.kernels._common import device_ctx as _device_ctx
from sslkernels.kernels.contrastive import _precision

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HOIST_DEFAULT = os.environ.get("SSLKERNELS_KOLEO_HOIST", "1") != "0"
SYM_HOIST_DEFAULT = os.environ.get("SSLKERNELS_KOLEO_SYM_HOIST", "0") == "1"

__all__ = ["koleo_neighbors", "koleo_neighbors_symmetric", "partial_bytes", "plan", "plan_symmetric"]

_NO_INDEX = tl.constexpr(2**62)  # a jit function reads only constexpr globals


@triton.jit
def _tile_product(x_ptr, rows, row_ok, cols, col_ok, D, stride_m, stride_d, acc, PRECISION: tl.constexpr,
                  ACC: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + x[rows] @ x[cols].T in BLOCK_K chunks of the features (fp32 / fp64 accumulation)."""
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + ks
        k_ok = kk < D
        a = tl.load(x_ptr + rows[:, None] * stride_m + kk[None, :] * stride_d,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(x_ptr + cols[:, None] * stride_m + kk[None, :] * stride_d,
                    mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION, out_dtype=ACC)
    return acc


@triton.jit
def _tile_topk(s, offs, AXIS: tl.constexpr, TOPK: tl.constexpr, K_PAD: tl.constexpr, EMPTY: tl.constexpr):
    """The tile's own top-k along AXIS (AXIS = 1: of each row among the columns; 0: of each
    column among the rows; offs = tl.arange over that axis), best first under the strict
    order (larger value, then the smaller in-tile offset): values [L, K_PAD] and int32
    offsets, EMPTY where nothing is left (a masked -inf entry, or NaN, is never named)."""
    # max, then the smallest offset holding it: four cheap ops per entry, where a fused
    # (value, index) reduction runs ~6 per entry (and the interpreter's raises on NaN rows)
    slots = tl.arange(0, K_PAD)
    lane = tl.expand_dims(offs, 1 - AXIS)
    vals = tl.full((s.shape[1 - AXIS], K_PAD), float("-inf"), s.dtype)
    offs_out = tl.full((s.shape[1 - AXIS], K_PAD), EMPTY, tl.int32)
    for t in tl.static_range(TOPK):
        m = tl.max(s, axis=AXIS)
        arg = tl.min(tl.where(s == tl.expand_dims(m, AXIS), lane, EMPTY), axis=AXIS)
        arg = tl.where(m > float("-inf"), arg, EMPTY)  # -inf (masked) or NaN: nothing named
        vals = tl.where(slots[None, :] == t, m[:, None], vals)
        offs_out = tl.where(slots[None, :] == t, arg[:, None], offs_out)
        if t + 1 < TOPK:
            s = tl.where(lane == tl.expand_dims(arg, AXIS), float("-inf"), s)
    return vals, offs_out


@triton.jit
def _merge_topk(run_v, run_i, cand_v, cand_i, TOPK: tl.constexpr, K_PAD: tl.constexpr):
    """The best TOPK of a running list [R, K_PAD] and candidates [R, C] (global int64
    indices, distinct within a row; _NO_INDEX with -inf where empty), under the strict
    order: larger value first, then the smaller index. The order is total, so the result
    does not depend on the order in which candidates are merged."""
    slots = tl.arange(0, K_PAD)
    new_v = tl.full(run_v.shape, float("-inf"), run_v.dtype)
    new_i = tl.full(run_i.shape, _NO_INDEX, tl.int64)
    for t in tl.static_range(TOPK):
        mc = tl.max(cand_v, axis=1)
        ic = tl.min(tl.where(cand_v == mc[:, None], cand_i, _NO_INDEX), axis=1)
        mr = tl.max(run_v, axis=1)
        ir = tl.min(tl.where(run_v == mr[:, None], run_i, _NO_INDEX), axis=1)
        take = (mc > mr) | ((mc == mr) & (ic < ir))
        new_v = tl.where(slots[None, :] == t, tl.where(take, mc, mr)[:, None], new_v)
        new_i = tl.where(slots[None, :] == t, tl.where(take, ic, ir)[:, None], new_i)
        cand_v = tl.where(take[:, None] & (cand_i == ic[:, None]), float("-inf"), cand_v)
        run_v = tl.where((~take)[:, None] & (run_i == ir[:, None]), float("-inf"), run_v)
    return new_v, new_i


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
            acc = _tile_product(x_ptr, rows, row_ok, cols, col_ok, D, stride_m, stride_d, acc, PRECISION, ACC,
                                BLOCK_K)
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
            tile_v, tile_o = _tile_topk(s, lcols, 1, TOPK, K_PAD, BLOCK_N)
            tile_i = tl.where(tile_o == BLOCK_N, _NO_INDEX, c0 + tile_o.to(tl.int64))
            run_v, run_i = _merge_topk(run_v, run_i, tile_v, tile_i, TOPK, K_PAD)

    # A slot never filled (NaN similarities, outside the debug rule) names the row itself:
    # the index stays in bounds (no device assert in the gather) and the loss comes out NaN.
    if TOPK == 1:
        best_idx = tl.where(best_idx == _NO_INDEX, rows, best_idx)
        tl.store(out_ptr + local, best_idx, mask=row_ok)
    else:
        run_i = tl.where(run_i == _NO_INDEX, rows[:, None], run_i)
        tl.store(out_ptr + local[:, None] * TOPK + slots[None, :], run_i,
                 mask=row_ok[:, None] & (slots[None, :] < TOPK))


@triton.jit
def _span_blocks(g0, group_size, BLOCK: tl.constexpr):
    """How many BLOCK-row blocks the group starting at row g0 touches: the row's slots."""
    return (g0 + group_size - 1) // BLOCK - g0 // BLOCK + 1


@triton.jit
def _symmetric_keep(rows, row_ok, c0, M, group_size, lane, BLOCK: tl.constexpr):
    """[BLOCK, BLOCK] mask of a tile of rows `rows` against columns c0 + lane: the same
    group, both inside x, not the diagonal; symmetric, so it serves the column side too.
    Built from per-row in-tile column bounds (int32 in registers, as in the row-block
    kernel)."""
    row_g0 = (rows // group_size) * group_size
    lo = tl.minimum(tl.maximum(row_g0 - c0, -1), BLOCK).to(tl.int32)
    hi = tl.minimum(tl.minimum(row_g0 + group_size, M) - c0, BLOCK)
    hi = tl.maximum(tl.where(row_ok, hi, 0), 0).to(tl.int32)
    me = tl.where((rows >= c0) & (rows < c0 + BLOCK), rows - c0, -1).to(tl.int32)
    return (lane[None, :] >= lo[:, None]) & (lane[None, :] < hi[:, None]) & (lane[None, :] != me[:, None])


@triton.jit
def _store_partials(part_v_ptr, part_i_ptr, v, o, who, who_ok, cand_block, group_size, PART_STRIDE,
                    TOPK: tl.constexpr, K_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """One side's tile top-k (values v, in-tile offsets o of candidate block `cand_block`)
    into rows `who` of the partial buffer, at the slot of that block counted from the first
    block of each row's group. A block holding several groups meets blocks outside some of
    its rows' groups: those rows have no slot there (all masked), and the store skips them."""
    kslots = tl.arange(0, K_PAD)
    idx = tl.where(o == BLOCK, -1, (cand_block * BLOCK).to(tl.int32) + o)
    g0 = (who // group_size) * group_size
    slot = cand_block - g0 // BLOCK
    at = who * PART_STRIDE + slot * TOPK
    ok = (who_ok & (slot >= 0) & (slot < _span_blocks(g0, group_size, BLOCK)))[:, None] & (kslots < TOPK)[None, :]
    tl.store(part_v_ptr + at[:, None] + kslots[None, :], v, mask=ok)
    tl.store(part_i_ptr + at[:, None] + kslots[None, :], idx, mask=ok)


@triton.jit
def _koleo_symmetric_kernel(
    x_ptr, scale_ptr, pairs_ptr, part_v_ptr, part_i_ptr,
    M, D, stride_m, stride_d, group_size, PART_STRIDE,
    TOPK: tl.constexpr, K_PAD: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One tile pair (bi <= bj, read from pairs_ptr) of square BLOCK-row blocks: the tile
    S = x[bi] @ x[bj].T multiplied once serves the rows of bi (candidates bj, ranked by
    S * scale[col]) and, off the diagonal, the rows of bj (candidates bi, ranked by
    S * scale[row]): the same ranking formula as the row-block kernel on either side. Each
    side's own top-k goes to the partial buffer [M, slots * TOPK] at the slot of the
    candidate block (counted from the first block of the row's group); every valid slot
    is written by exactly one program, so no atomics and no initialisation."""
    pid = tl.program_id(0)
    bi = tl.load(pairs_ptr + 2 * pid).to(tl.int64)
    bj = tl.load(pairs_ptr + 2 * pid + 1).to(tl.int64)
    lane = tl.arange(0, BLOCK)
    r0 = bi * BLOCK
    c0 = bj * BLOCK
    rows = r0 + lane.to(tl.int64)
    cols = c0 + lane.to(tl.int64)
    row_ok = rows < M
    col_ok = cols < M
    acc = tl.zeros((BLOCK, BLOCK), dtype=ACC)
    acc = _tile_product(x_ptr, rows, row_ok, cols, col_ok, D, stride_m, stride_d, acc, PRECISION, ACC, BLOCK_K)
    # Most tiles lie inside one group, off the diagonal and inside x: no mask there (the
    # mask's compares and selects are ~40% of the epilogue, which runs twice per tile).
    interior = (bi != bj) & (c0 + BLOCK <= M) & (r0 // group_size == (c0 + BLOCK - 1) // group_size)

    scale_c = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
    s = acc * scale_c[None, :]
    if not interior:
        s = tl.where(_symmetric_keep(rows, row_ok, c0, M, group_size, lane, BLOCK), s, float("-inf"))
    v, o = _tile_topk(s, lane, 1, TOPK, K_PAD, BLOCK)
    _store_partials(part_v_ptr, part_i_ptr, v, o, rows, row_ok, bj, group_size, PART_STRIDE, TOPK, K_PAD, BLOCK)

    if bi != bj:
        scale_r = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
        s = acc * scale_r[:, None]
        if not interior:
            s = tl.where(_symmetric_keep(rows, row_ok, c0, M, group_size, lane, BLOCK), s, float("-inf"))
        v, o = _tile_topk(s, lane, 0, TOPK, K_PAD, BLOCK)
        _store_partials(part_v_ptr, part_i_ptr, v, o, cols, col_ok, bi, group_size, PART_STRIDE, TOPK, K_PAD,
                        BLOCK)


@triton.jit
def _koleo_merge_kernel(
    part_v_ptr, part_i_ptr, out_ptr, M, group_size, PART_STRIDE,
    TOPK: tl.constexpr, K_PAD: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The final top-k of BLOCK_R rows from their slots of the partial buffer (the
    candidate blocks of the row's group, in ascending order), merged under the strict
    order (larger value, then smaller index): the same picks whatever the schedule."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = rows < M
    row_g0 = (rows // group_size) * group_size
    filled = _span_blocks(row_g0, group_size, BLOCK) * TOPK  # the row's written entries
    run_v = tl.full((BLOCK_R, K_PAD), float("-inf"), ACC)
    run_i = tl.full((BLOCK_R, K_PAD), _NO_INDEX, tl.int64)
    lc = tl.arange(0, BLOCK_C)
    for e0 in range(0, PART_STRIDE, BLOCK_C):
        ee = e0 + lc
        ok = row_ok[:, None] & (ee[None, :] < filled[:, None])
        v = tl.load(part_v_ptr + rows[:, None] * PART_STRIDE + ee[None, :], mask=ok, other=float("-inf"))
        i = tl.load(part_i_ptr + rows[:, None] * PART_STRIDE + ee[None, :], mask=ok, other=-1).to(tl.int64)
        run_v, run_i = _merge_topk(run_v, run_i, v, tl.where(i < 0, _NO_INDEX, i), TOPK, K_PAD)
    # as in the row-block kernel: a slot never filled (NaN) names the row itself
    run_i = tl.where(run_i == _NO_INDEX, rows[:, None], run_i)
    kslots = tl.arange(0, K_PAD)
    tl.store(out_ptr + rows[:, None] * TOPK + kslots[None, :], run_i,
             mask=row_ok[:, None] & (kslots < TOPK)[None, :])


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


def _ranking_scales(x: torch.Tensor, eps: float):
    """The accumulation dtype and 1 / max(||x_j||, eps) of every row: a candidate's
    similarity to a query is (x_i . x_j) * scale[j]."""
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return acc_dtype, 1.0 / x.to(acc_dtype).norm(dim=1).clamp_min(eps)


def koleo_neighbors(x: torch.Tensor, query_offset: int, query_count: int, group_size: int, topk: int,
                    eps: float, hoist=None) -> torch.Tensor:
    m, d = x.shape
    _, scale = _ranking_scales(x, eps)
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


# ---------------------------------------------------------------- the symmetric route


def plan_symmetric(d: int, topk: int, dtype: torch.dtype, hoist=None) -> dict:
    """Square tiles of BLOCK rows (a block is both a row and a column block), warps,
    pipeline stages, and the merge's row / entry chunks (sizes only). sm_90 compile (ptxas
    -v): fp16 / bf16 128 x 128 x 64 chunks, 3 stages: 96 KiB of shared memory, 200-224
    registers, no spill, HGMMA; fp32 (tf32x3) and fp64 take 64-row tiles, as they spill at
    128 in the row-block kernel. HOIST (all features in one chunk, fp16 / bf16, D <= 256)
    must run unpipelined: three stages of two 128 x 256 tiles are 384 KiB, past the 227 KiB
    of an SM, so it takes one stage (128 KiB) and nothing overlaps the load; it is off by
    default (SSLKERNELS_KOLEO_SYM_HOIST=1 turns it on) and the GPU run times both. The
    merge's topk > 1 extraction spilled at 32 x 128 entries and takes 16 x 64."""
    half = dtype in (torch.float16, torch.bfloat16)
    if hoist is None:
        hoist = SYM_HOIST_DEFAULT
    hoist = bool(hoist) and (half or INTERPRET) and d <= 256
    merge = dict(MERGE_ROWS=32, MERGE_ENTRIES=128) if topk == 1 else dict(MERGE_ROWS=16, MERGE_ENTRIES=64)
    if INTERPRET:
        return dict(BLOCK=16, BLOCK_K=max(16, triton.next_power_of_2(d)) if hoist else 16, num_warps=1,
                    num_stages=1, HOIST=hoist, MERGE_ROWS=16, MERGE_ENTRIES=16)
    block = 128 if half else 64
    block_k = max(16, triton.next_power_of_2(d)) if hoist else (64 if dtype != torch.float64 else 32)
    return dict(BLOCK=block, BLOCK_K=block_k, num_warps=8, num_stages=1 if hoist else 3, HOIST=hoist, **merge)


def partial_slots(m: int, group_size: int, block: int) -> int:
    """Entries per row of the partial buffer, in candidate blocks: the most blocks one group
    of `group_size` rows can touch (a group need not start at a block boundary)."""
    return min(triton.cdiv(m, block), (group_size + block - 2) // block + 1)


def merge_entries(cfg: dict, stride: int) -> int:
    """The merge's entries per step (BLOCK_C) for a partial buffer of `stride` entries a row:
    the plan's chunk, or the buffer's whole row (a power of two, >= 16) when shorter."""
    return min(cfg["MERGE_ENTRIES"], max(16, triton.next_power_of_2(int(stride))))


def partial_bytes(m: int, d: int, group_size: int, topk: int, dtype: torch.dtype) -> int:
    """Bytes of the symmetric search's partial buffer (a value and an int32 index per row,
    candidate block and rank): ~N^2 / BLOCK * 8 without groups (16.8 MB at N = 16384,
    268 MB at 65536), against eager's N^2 similarities."""
    block = plan_symmetric(d, topk, dtype)["BLOCK"]
    value = 8 if dtype == torch.float64 else 4
    return m * partial_slots(m, group_size, block) * topk * (value + 4)


@functools.lru_cache(maxsize=64)
def tile_pairs(m: int, group_size: int, block: int, device: torch.device) -> torch.Tensor:
    """int32 [P, 2]: every block pair (bi <= bj) that shares a group, row-major (bi, then
    bj ascending). Block bj > bi shares a group with bi iff it starts before the end of the
    group of bi's last row; each pair is one program of the symmetric kernel."""
    nb = triton.cdiv(m, block)
    bi = torch.arange(nb, dtype=torch.int64)
    last_row = torch.clamp((bi + 1) * block, max=m) - 1
    last_bj = torch.clamp(((last_row // group_size + 1) * group_size - 1) // block, max=nb - 1)
    counts = last_bj - bi + 1
    first = torch.repeat_interleave(bi, counts)
    start = torch.cumsum(counts, 0) - counts
    second = first + torch.arange(int(counts.sum())) - torch.repeat_interleave(start, counts)
    return torch.stack([first, second], dim=1).to(torch.int32).contiguous().to(device)


def koleo_neighbors_symmetric(x: torch.Tensor, group_size: int, topk: int, eps: float, hoist=None,
                              poison_partials: bool = False) -> torch.Tensor:
    """Every row of x is a query (no slice): the symmetric tiles, then the merge.
    `poison_partials` (tests) fills the partial buffer with entries that would win the
    merge and name row M (out of range), so a slot the search failed to write shows."""
    m, d = x.shape
    if m >= 2**31:
        raise ValueError(f"koleo: the symmetric search keeps int32 indices; x has {m} rows")
    acc_dtype, scale = _ranking_scales(x, eps)
    cfg = plan_symmetric(d, topk, x.dtype, hoist)
    block = cfg["BLOCK"]
    pairs = tile_pairs(m, int(group_size), block, x.device)
    stride = partial_slots(m, int(group_size), block) * int(topk)
    part_v = torch.empty((m, stride), dtype=acc_dtype, device=x.device)
    part_i = torch.empty((m, stride), dtype=torch.int32, device=x.device)
    if poison_partials:
        part_v.fill_(float("inf"))
        part_i.fill_(m)
    out = torch.empty((m, topk), dtype=torch.int64, device=x.device)
    k_pad = max(2, triton.next_power_of_2(int(topk)))
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    with _device_ctx(x):
        _koleo_symmetric_kernel[(pairs.shape[0],)](
            x, scale, pairs, part_v, part_i, m, d, x.stride(0), x.stride(1), int(group_size), stride,
            TOPK=int(topk), K_PAD=k_pad, PRECISION=_precision(x.dtype), ACC=acc,
            BLOCK=block, BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        _koleo_merge_kernel[(triton.cdiv(m, cfg["MERGE_ROWS"]),)](
            part_v, part_i, out, m, int(group_size), stride, TOPK=int(topk), K_PAD=k_pad, ACC=acc, BLOCK=block,
            BLOCK_R=cfg["MERGE_ROWS"], BLOCK_C=merge_entries(cfg, stride),
            num_warps=4 if not INTERPRET else 1)
    return out
