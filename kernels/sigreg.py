"""Triton SIGReg (the CUDA path of `sslkernels::sigreg_stats` and its backward).

``sigreg_stats(proj, directions, knots, t_max) -> (cos_sum, sin_sum)``
    proj [B, N, D], directions [D, S] (any strides, one dtype); float64 [B, S, knots].
``sigreg_stats_backward(proj, directions, grad_cos, grad_sin, knots, t_max,
                        directions_grad) -> (dproj, ddirections)``

Kernel ``_sigreg_stats_kernel``, grid (S blocks, row splits, B): each program owns
BLOCK_S directions and a run of row tiles. A tile x = proj_tile @ directions_tile is a
tl.dot over D in BLOCK_D chunks (float32 accumulation; float64 for float64); then
cos and sin of dt * x (two transcendentals per element), the knots by angle addition
(float32 recurrence, float64 for float64) and each knot's column sums folded into a
[BLOCK_S, KPAD] register accumulator. Partial sums go to [splits, B, S, knots] and are
summed in float64 in split order (deterministic, no atomics).

Kernel ``_sigreg_dx_kernel``, grid (N blocks, S blocks, B): recomputes the x tile and
writes dL/dx = sum_k coef_sin[s, k] sin(t_k x) + coef_cos[s, k] cos(t_k x) (same
recurrence); dproj = dX @ directions^T and ddirections = proj^T dX are then two
cuBLAS products. dX is [B, N, S] (never N x S x knots), in proj's dtype except
float16, where it stays float32 (the coefficients, ~1e-5 at S = 1024, sit below
float16's normal range).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# 64 x 64 tiles with 8 warps on the GPU (tl.dot -> wgmma on Hopper); small tiles in the
# interpreter so the tests cross several tiles and splits.
BLOCK_N, BLOCK_S, BLOCK_D, NUM_WARPS = (16, 16, 16, 1) if INTERPRET else (64, 64, 64, 8)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def _project_tile(p_base, a_ptr, stride_pn, stride_pd, stride_ad, stride_as, offs_n, n_ok, offs_s, s_ok, D,
                  BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
                  IEEE: tl.constexpr):
    x = tl.zeros([BLOCK_N, BLOCK_S], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        p = tl.load(p_base + offs_n[:, None].to(tl.int64) * stride_pn + offs_d[None, :].to(tl.int64) * stride_pd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        a = tl.load(a_ptr + offs_d[:, None].to(tl.int64) * stride_ad + offs_s[None, :].to(tl.int64) * stride_as,
                    mask=d_ok[:, None] & s_ok[None, :], other=0.0)
        # out_dtype=ACC: Triton 3.6 defaults it to float32 and rejects a float64 accumulator
        if IEEE:
            x = tl.dot(p, a, x, input_precision="ieee", out_dtype=ACC)
        else:
            x = tl.dot(p, a, x, out_dtype=ACC)
    return x


@triton.jit
def _sigreg_stats_kernel(P, A, COS, SIN, B, N, D, S, rows_per_split, stride_pb, stride_pn, stride_pd, stride_ad,
                         stride_as, dt, KNOTS: tl.constexpr, KPAD: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, IEEE: tl.constexpr):
    pid_s = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = offs_s < S
    knot = tl.arange(0, KPAD)
    acc_c = tl.zeros([BLOCK_S, KPAD], dtype=ACC)
    acc_s = tl.zeros([BLOCK_S, KPAD], dtype=ACC)
    row0 = split * rows_per_split
    row_end = tl.minimum(row0 + rows_per_split, N)
    p_base = P + b.to(tl.int64) * stride_pb
    for n0 in range(row0, row_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < row_end
        x = _project_tile(p_base, A, stride_pn, stride_pd, stride_ad, stride_as, offs_n, n_ok, offs_s, s_ok, D,
                          BLOCK_N, BLOCK_S, BLOCK_D, ACC, IEEE)
        angle = x * dt
        c1 = tl.cos(angle)
        s1 = tl.sin(angle)
        live = n_ok[:, None]
        c = tl.where(live, 1.0, 0.0).to(ACC) + tl.zeros([BLOCK_N, BLOCK_S], dtype=ACC)
        s = tl.zeros([BLOCK_N, BLOCK_S], dtype=ACC)
        c1 = tl.where(live, c1, 0.0)  # padded rows contribute nothing at any knot
        s1 = tl.where(live, s1, 0.0)
        for k in tl.static_range(KNOTS):
            hit = knot[None, :] == k
            acc_c += tl.where(hit, tl.sum(c, axis=0)[:, None], 0.0)
            acc_s += tl.where(hit, tl.sum(s, axis=0)[:, None], 0.0)
            if k + 1 < KNOTS:
                next_c = c * c1 - s * s1
                s = s * c1 + c * s1
                c = next_c
    out = ((split * B + b).to(tl.int64) * S + offs_s[:, None].to(tl.int64)) * KNOTS + knot[None, :]
    mask = s_ok[:, None] & (knot[None, :] < KNOTS)
    tl.store(COS + out, acc_c, mask=mask)
    tl.store(SIN + out, acc_s, mask=mask)


@triton.jit
def _sigreg_dx_kernel(P, A, COEF_SIN, COEF_COS, DX, N, D, S, stride_pb, stride_pn, stride_pd, stride_ad, stride_as,
                      dt, KNOTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                      ACC: tl.constexpr, IEEE: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    n_ok = offs_n < N
    s_ok = offs_s < S
    x = _project_tile(P + b.to(tl.int64) * stride_pb, A, stride_pn, stride_pd, stride_ad, stride_as, offs_n, n_ok,
                      offs_s, s_ok, D, BLOCK_N, BLOCK_S, BLOCK_D, ACC, IEEE)
    angle = x * dt
    c1 = tl.cos(angle)
    s1 = tl.sin(angle)
    c = c1
    s = s1
    grad = tl.zeros([BLOCK_N, BLOCK_S], dtype=ACC)
    coef = (b.to(tl.int64) * S + offs_s.to(tl.int64)) * KNOTS
    for k in tl.static_range(1, KNOTS):  # t_0 = 0: the first knot has no gradient
        ks = tl.load(COEF_SIN + coef + k, mask=s_ok, other=0.0)
        kc = tl.load(COEF_COS + coef + k, mask=s_ok, other=0.0)
        grad += ks[None, :] * s + kc[None, :] * c
        if k + 1 < KNOTS:
            next_c = c * c1 - s * s1
            s = s * c1 + c * s1
            c = next_c
    out = (b.to(tl.int64) * N + offs_n[:, None].to(tl.int64)) * S + offs_s[None, :]
    tl.store(DX + out, grad.to(DX.dtype.element_ty), mask=n_ok[:, None] & s_ok[None, :])


def _sm_count(device: torch.device) -> int:
    if INTERPRET or device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _common(proj: torch.Tensor, directions: torch.Tensor, knots: int, t_max: float):
    b, n, d = proj.shape
    s = directions.shape[1]
    strides = (proj.stride(0), proj.stride(1), proj.stride(2), directions.stride(0), directions.stride(1))
    ieee = proj.dtype in (torch.float32, torch.float64)
    return b, n, d, s, strides, t_max / (knots - 1), ieee


def sigreg_stats(proj: torch.Tensor, directions: torch.Tensor, knots: int, t_max: float):
    b, n, d, s, strides, dt, ieee = _common(proj, directions, knots, t_max)
    acc_dtype = torch.float64 if proj.dtype == torch.float64 else torch.float32
    row_tiles = triton.cdiv(n, BLOCK_N)
    s_blocks = triton.cdiv(s, BLOCK_S)
    # About four programs per SM: split the rows, never below one tile per program.
    tiles_per_split = max(1, triton.cdiv(row_tiles * s_blocks * b, 4 * _sm_count(proj.device)))
    splits = triton.cdiv(row_tiles, tiles_per_split)
    partial_cos = torch.empty((splits, b, s, knots), dtype=acc_dtype, device=proj.device)
    partial_sin = torch.empty_like(partial_cos)
    _sigreg_stats_kernel[(s_blocks, splits, b)](
        proj, directions, partial_cos, partial_sin, b, n, d, s, tiles_per_split * BLOCK_N, *strides, dt,
        KNOTS=knots, KPAD=triton.next_power_of_2(knots), BLOCK_N=BLOCK_N, BLOCK_S=BLOCK_S, BLOCK_D=BLOCK_D,
        ACC=_acc(proj.dtype), IEEE=ieee, num_warps=NUM_WARPS)
    return partial_cos.sum(0, dtype=torch.float64), partial_sin.sum(0, dtype=torch.float64)


def sigreg_stats_backward(proj, directions, grad_cos, grad_sin, knots: int, t_max: float, directions_grad: bool):
    b, n, d, s, strides, dt, ieee = _common(proj, directions, knots, t_max)
    acc_dtype = torch.float64 if proj.dtype == torch.float64 else torch.float32
    t = torch.arange(knots, dtype=torch.float64, device=proj.device) * dt
    coef_sin = (-t * grad_cos).to(acc_dtype).contiguous()
    coef_cos = (t * grad_sin).to(acc_dtype).contiguous()
    dx_dtype = torch.float32 if proj.dtype == torch.float16 else proj.dtype
    dx = torch.empty((b, n, s), dtype=dx_dtype, device=proj.device)
    _sigreg_dx_kernel[(triton.cdiv(n, BLOCK_N), triton.cdiv(s, BLOCK_S), b)](
        proj, directions, coef_sin, coef_cos, dx, n, d, s, *strides, dt, KNOTS=knots, BLOCK_N=BLOCK_N,
        BLOCK_S=BLOCK_S, BLOCK_D=BLOCK_D, ACC=_acc(proj.dtype), IEEE=ieee, num_warps=NUM_WARPS)
    p, a = (proj.float(), directions.float()) if dx_dtype != proj.dtype else (proj, directions)
    dproj = torch.matmul(dx, a.t()).to(proj.dtype)
    if directions_grad:
        ddirections = (p.reshape(b * n, d).t() @ dx.reshape(b * n, s)).to(directions.dtype)
    else:
        ddirections = directions.new_empty((0,))
    return dproj, ddirections
