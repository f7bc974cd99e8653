"""Triton kernels of SigLIP's sigmoid loss (the CUDA path of `sslkernels::siglip_loss_and_grads`).

Each logit's gradient is local, G'_ij = -label_ij sigmoid(-label_ij l_ij) (times 1/N),
so no statistic has to be known before the gradients: one generic kernel,
``_siglip_pass_kernel``, runs twice and nothing is ever accumulated across programs
(no atomics, deterministic).

* row pass, grid (cdiv(N, BLOCK_M), cdiv(D, BLOCK_DO)): a program owns BLOCK_M image
  rows (and one BLOCK_DO slice of their gradient) and sweeps every text tile:
  S = X_I Y_J^T (``tl.dot``, fp32 accumulation, fp64 for fp64 inputs), l = scale S +
  bias, the loss term softplus(-label l) and G' from one exp(-|l|), then
  dX_I += G' Y_J. Writes the per-row loss sums and G' sums (slice 0 only), the
  per-row x_i . (G' Y)_i of its slice (for d loss / d scale), and dX scaled by
  scale / N in float32.
* column pass: the same kernel with the roles of X and Y swapped (the labels are
  symmetric in i, j), giving dY; it writes no statistics.
The launcher reduces the O(N) partial sums with torch in float64 (deterministic).
Without gradients only the row pass runs, without its second product.

logit_scale and logit_bias are read on the device through their pointers (no host
sync). Addressing: explicit row strides, int64 row offsets, every size masked.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from sslkernels.kernels.contrastive import _acc_dtype, _device_ctx, _precision, _unit_stride

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

__all__ = ["siglip_loss_and_grads", "plan"]

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def _pair_terms(l, positive, WIDE: tl.constexpr):
    """Loss term softplus(-label l) = -log sigmoid(label l) and G' = -label sigmoid(-label l),
    label = +1 where `positive`, from one exp(-|l|). log(1 + e), accurate for tiny e too:
    in float32 2 atanh(e / (2 + e)) (odd series through t^13, t <= 1/3: FMAs, no second
    transcendental); in float64 (WIDE) log(u) e / (u - 1) with u = 1 + e."""
    e = tl.exp(-tl.abs(l))
    u = 1.0 + e
    r = 1.0 / u
    if WIDE:
        log1p_e = tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))
    else:
        t = e / (2.0 + e)
        t2 = t * t
        p = 1.0 / 13.0
        p = p * t2 + 1.0 / 11.0
        p = p * t2 + 1.0 / 9.0
        p = p * t2 + 1.0 / 7.0
        p = p * t2 + 1.0 / 5.0
        p = p * t2 + 1.0 / 3.0
        p = p * t2 + 1.0
        log1p_e = 2.0 * t * p
    z = tl.where(positive, -l, l)  # the term is softplus(z)
    term = tl.maximum(z, 0.0) + log1p_e
    sig_z = tl.where(z >= 0, r, e * r)
    grad = tl.where(positive, -sig_z, sig_z)
    return term, grad


@triton.jit(do_not_specialize=["NA", "NB"])
def _siglip_pass_kernel(
    a_ptr, b_ptr, stride_a, stride_b, NA, NB, D,
    scale_ptr, bias_ptr, out_ptr, row_loss_ptr, row_grad_ptr, row_dot_ptr, inv_n,
    POSITIVES: tl.constexpr, HAS_BIAS: tl.constexpr, STATS: tl.constexpr, GRADS: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < NA
    dcols = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    dcol_ok = dcols < D
    scale = tl.load(scale_ptr).to(ACC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr).to(ACC)
    else:
        bias = scale * 0.0
    acc = tl.zeros([BLOCK_M, BLOCK_DO], dtype=ACC)
    loss_i = tl.zeros([BLOCK_M], dtype=ACC)
    grad_i = tl.zeros([BLOCK_M], dtype=ACC)
    for c0 in range(0, NB, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < NB
        s = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < D
            a = tl.load(a_ptr + rows[:, None] * stride_a + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            b = tl.load(b_ptr + cols[:, None] * stride_b + ks[None, :], mask=col_ok[:, None] & k_ok[None, :],
                        other=0.0)
            s = tl.dot(a, tl.trans(b), s, input_precision=PRECISION, out_dtype=ACC)
        logit = s * scale + bias
        if POSITIVES:
            positive = rows[:, None] == cols[None, :]
        else:
            positive = (rows[:, None] < 0) & (cols[None, :] < 0)  # never
        term, g = _pair_terms(logit, positive, ACC == tl.float64)
        valid = row_ok[:, None] & col_ok[None, :]
        g = tl.where(valid, g, 0.0)
        if STATS:
            loss_i += tl.sum(tl.where(valid, term, 0.0), axis=1)
            grad_i += tl.sum(g, axis=1)
        if GRADS:
            bv = tl.load(b_ptr + cols[:, None] * stride_b + dcols[None, :], mask=col_ok[:, None] & dcol_ok[None, :],
                         other=0.0)
            acc = tl.dot(g.to(bv.dtype), bv, acc, input_precision=PRECISION, out_dtype=ACC)
    if STATS:
        if pid_d == 0:
            tl.store(row_loss_ptr + rows, loss_i, mask=row_ok)
            tl.store(row_grad_ptr + rows, grad_i, mask=row_ok)
    if GRADS:
        omask = row_ok[:, None] & dcol_ok[None, :]
        if STATS:  # this slice's share of sum_i a_i . (G' B)_i, for d loss / d scale
            a_out = tl.load(a_ptr + rows[:, None] * stride_a + dcols[None, :], mask=omask, other=0.0)
            tl.store(row_dot_ptr + pid_d * NA + rows, tl.sum(a_out.to(ACC) * acc, axis=1), mask=row_ok)
        tl.store(out_ptr + rows[:, None] * D + dcols[None, :], acc * (scale * inv_n), mask=omask)


def plan(d: int, dtype: torch.dtype, precision: str) -> dict:
    """Pinned tiles (no autotuning yet; see benchmarks/GPU_MODEL.md): tensor-core dtypes
    take 64-row programs with whole output rows up to D = 256 (one S per pass), fp64 /
    IEEE fp32 smaller FMA tiles. The interpreter takes small ones."""
    pow2 = max(16, triton.next_power_of_2(d))
    if INTERPRET:
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=min(pow2, 32), BLOCK_DO=min(pow2, 64), num_warps=4)
    if dtype == torch.float64 or precision == "ieee" and dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, BLOCK_DO=min(pow2, 64), num_warps=4)
    # fp32 as tf32x3 (three products per dot): whole 256-wide gradient rows spilled registers
    # for sm_90 (ptxas, --compile-only), 128-wide slices do not (S then runs twice per pass).
    # Its operands split in two halves each: 32-wide K chunks keep D = 130 (masked chunks) unspilled.
    fp32 = dtype == torch.float32
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=min(pow2, 32 if fp32 else 64), BLOCK_DO=min(pow2, 128 if fp32 else 256),
                num_warps=8, num_stages=2)


def _pass(a, b, scale, bias, out, row_loss, row_grad, row_dot, inv_n, positives, stats, grads, acc_dtype, cfg,
          precision):
    na, d = a.shape
    n_do = triton.cdiv(d, cfg["BLOCK_DO"]) if grads else 1
    meta = dict(cfg)
    _siglip_pass_kernel[(triton.cdiv(na, cfg["BLOCK_M"]), n_do)](
        a, b, a.stride(0), b.stride(0), na, b.shape[0], d,
        scale, bias if bias is not None else scale, out, row_loss, row_grad, row_dot, inv_n,
        POSITIVES=bool(positives), HAS_BIAS=bias is not None, STATS=stats, GRADS=grads,
        ACC=_TL_DTYPES[acc_dtype], PRECISION=precision, **meta,
    )


def siglip_loss_and_grads(image, text, logit_scale, logit_bias, positives: bool, want_grads: bool):
    """-> (loss: 0-dim image.dtype, dimage [N, D], dtext [M, D] (float32, float64 for
    float64 inputs; empty without want_grads), dscale, dbias (0-dim float64)), the
    gradients for grad_loss = 1."""
    image = _unit_stride(image)
    text = _unit_stride(text)
    n, d = image.shape
    m = text.shape[0]
    acc_dtype = _acc_dtype(image.dtype)
    precision = _precision(image.dtype)
    cfg = plan(d, image.dtype, precision)
    n_do = triton.cdiv(d, cfg["BLOCK_DO"]) if want_grads else 1
    dev = image.device
    with _device_ctx(image):
        scale = logit_scale.to(dev)
        bias = logit_bias.to(dev) if logit_bias is not None else None
        row_loss = torch.empty(n, dtype=acc_dtype, device=dev)
        row_grad = torch.empty(n, dtype=acc_dtype, device=dev)
        row_dot = torch.empty((n_do, n), dtype=acc_dtype, device=dev)
        shape_x, shape_y = ((n, d), (m, d)) if want_grads else ((0,), (0,))
        dimage = torch.empty(shape_x, dtype=acc_dtype, device=dev)
        dtext = torch.empty(shape_y, dtype=acc_dtype, device=dev)
        inv_n = 1.0 / n
        _pass(image, text, scale, bias, dimage if want_grads else row_loss, row_loss, row_grad, row_dot, inv_n,
              positives, True, want_grads, acc_dtype, cfg, precision)
        if want_grads:
            _pass(text, image, scale, bias, dtext, row_loss, row_grad, row_dot, inv_n, positives, False, True,
                  acc_dtype, cfg, precision)
        loss = (row_loss.to(torch.float64).sum() / n).to(image.dtype)
        dbias = row_grad.to(torch.float64).sum() / n
        dscale = row_dot.to(torch.float64).sum() / n if want_grads else torch.zeros((), dtype=torch.float64,
                                                                                      device=dev)
    return loss, dimage, dtext, dscale, dbias
