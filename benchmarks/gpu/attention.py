"""Masked-patch and varlen attention (`sslkernels.masked_patch_attention`,
`sslkernels.varlen_attention`): out, dq, dk, dv in fp32 / fp16 / bf16 against the eager
references in float64 under `_core.judge`, a second fused run bitwise equal (no atomics).
Cases: head dims 40 / 64 / 88 / 128, a zero-count sample, a single kept patch, kv_index
!= index with another L, varlen with a length-1 and an empty sequence.

Timings (the rule checked first on the timed inputs themselves, which also autotunes) at
the I-JEPA context shape B=32 L=196 H=12 Dh=64, kept counts ~U[78, 196], bf16 and fp32,
fwd and fwdbwd, against (a) eager gather + pad + bool mask + SDPA and (b) FlexAttention on
the gathered, padded tensors (op `masked_patch_attention[vs flex]`, Flex in the eager
columns); varlen with 32 equal sequences of 147 tokens against dense SDPA."""
from __future__ import annotations

import math
import os
import time as _time

import torch

from benchmarks.gpu._core import (DTYPES, CompileTarget, Ctx, Row, free, judge_all, log_timing,
                                  loss_and_grads, run_check, time_pass, timed)

NAME = "attention"

# (op, kind, B, Lq, Lk, H, Dh, query counts (masked) or lengths (varlen), key counts, dtypes);
# in order of importance: the checks stop at CHECK_BUDGET_S
CHECKS = [
    ("masked_patch_attention", "masked", 4, 196, 196, 3, 64, [150, 0, 1, 196], None, ["bf16", "fp32", "fp16"]),
    ("varlen_attention", "varlen", 0, 0, 0, 4, 64, [1, 147, 0, 300, 65], None, ["bf16", "fp16"]),
    ("masked_patch_attention[cross]", "masked", 3, 150, 170, 2, 88, [77, 150, 9], [170, 3, 0], ["bf16", "fp32"]),
    ("masked_patch_attention", "masked", 2, 257, 257, 2, 128, [257, 130], None, ["bf16", "fp32"]),
    ("masked_patch_attention", "masked", 2, 100, 100, 2, 40, [99, 37], None, ["bf16"]),
]
R_CHECKS = [
    ("masked_patch_attention", "masked", 2, 9, 9, 2, 16, [5, 0], None, ["fp32", "fp16"]),
    ("varlen_attention", "varlen", 0, 0, 0, 2, 16, [1, 6, 0], None, ["fp32"]),
    ("masked_patch_attention[cross]", "masked", 2, 7, 11, 1, 16, [3, 7], [11, 1], ["fp32"]),
]
TIME_MASKED = {"b": 32, "l": 196, "h": 12, "dh": 64, "lo": 78, "hi": 196}
TIME_VARLEN = {"b": 32, "tokens": 147, "h": 12, "dh": 64}
R_TIME_MASKED = {"b": 2, "l": 9, "h": 1, "dh": 16, "lo": 3, "hi": 9}
R_TIME_VARLEN = {"b": 2, "tokens": 5, "h": 1, "dh": 16}
TIME_DTYPES = ["bf16", "fp32"]
SECTION_BUDGET_S = 90.0  # past it FlexAttention (its compiles) and the remaining timings are skipped
CHECK_BUDGET_S = 40.0  # the checks' share of it
_TUNED = ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")


def _index(ctx, counts, width, length, g):
    idx = torch.full((len(counts), width), -1, dtype=torch.int64)
    for b, c in enumerate(counts):
        idx[b, :c] = torch.randperm(length, generator=g)[:c]
    return idx.to(ctx.device)


def _case_inputs(ctx, kind, b, lq, lk, h, dh, counts, kv_counts, seed=0):
    """float64 tensors (q, k, v, grad) on ctx.device and the call's extra arguments."""
    g = torch.Generator().manual_seed(seed)
    if kind == "masked":
        q = 2.0 * torch.randn(b, lq, h, dh, generator=g, dtype=torch.float64)
        k, v = (torch.randn(b, lk, h, dh, generator=g, dtype=torch.float64) for _ in range(2))
        index = _index(ctx, counts, max(max(counts), 1), lq, g)
        kv_index = None if kv_counts is None else _index(ctx, kv_counts, max(max(kv_counts), 1), lk, g)
        grad = torch.randn(b, index.shape[1], h, dh, generator=g, dtype=torch.float64)
        extra = (index, kv_index)
    else:
        t = sum(counts)
        q = 2.0 * torch.randn(t, h, dh, generator=g, dtype=torch.float64)
        k, v, grad = (torch.randn(t, h, dh, generator=g, dtype=torch.float64) for _ in range(3))
        cu = torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), dtype=torch.int32, device=ctx.device)
        extra = (cu, max(counts))
    return [x.to(ctx.device) for x in (q, k, v, grad)], extra


def _judge(kind, fused_fn, tensors, extra, dtype):
    from sslkernels.reference import masked_patch_attention_reference, varlen_attention_reference

    ref_fn = masked_patch_attention_reference if kind == "masked" else varlen_attention_reference
    q, k, v, grad = (x.to(dtype) for x in tensors)

    def run(fn, q, k, v, grad):
        return loss_and_grads(lambda *qkv: fn(*qkv, *extra), [q, k, v], [True] * 3, grad)

    fused = run(fused_fn, q, k, v, grad)
    again = run(fused_fn, q, k, v, grad)
    eager = run(ref_fn, q, k, v, grad)
    ref = run(ref_fn, q.double(), k.double(), v.double(), grad.double())
    return judge_all(("out", "dq", "dk", "dv"), fused, eager, ref, dtype, again)


def check(ctx: Ctx) -> list[Row]:
    import sslkernels
    from sslkernels.kernels import attention as A

    t0 = _time.time()
    rows = []
    autotune, A.AUTOTUNE = A.AUTOTUNE, False  # one config per kernel variant (compile time)
    try:
        for op, kind, b, lq, lk, h, dh, counts, kv_counts, dts in (R_CHECKS if ctx.rehearse else CHECKS):
            fn = sslkernels.masked_patch_attention if kind == "masked" else sslkernels.varlen_attention
            case = (f"B={b} L={lq} H={h} Dh={dh} kept={counts}" + (f" kv={kv_counts} Lk={lk}" if kv_counts else "")
                    if kind == "masked" else f"lens={counts} H={h} Dh={dh}")
            for dt in dts:
                row = Row(op, case, dt, "fwdbwd")
                if _time.time() - t0 > CHECK_BUDGET_S or ctx.time_left() < 60:
                    ctx.fail(f"{op} {case} {dt}: skipped (check budget)")
                    continue

                def one():
                    tensors, extra = _case_inputs(ctx, kind, b, lq, lk, h, dh, counts, kv_counts)
                    return _judge(kind, fn, tensors, extra, DTYPES[dt])

                rows.append(run_check(ctx, row, one))
    finally:
        A.AUTOTUNE = autotune
        # the single-config choices are cached under the timed shapes' keys: forget them
        for name in _TUNED:
            getattr(getattr(A, name), "cache", {}).clear()
    return rows + _hostile_rows(ctx)


# Hostile indices, each refused with a ValueError before a launch (the debug rule checks the
# values on CUDA): (label, index rows for L = 9)
HOSTILE = [("out of range", [[0, 9, -1]]), ("below -1", [[0, -2, -1]]), ("duplicate", [[3, 3, -1]]),
           ("-1 before a position", [[-1, 2, 4]])]


def _hostile_rows(ctx: Ctx) -> list[Row]:
    import sslkernels

    rows = []
    for name, idx in HOSTILE:
        row = Row(f"masked_patch_attention[hostile: {name}]", f"B=1 L=9 H=1 Dh=16 index={idx}", "fp32", "fwd")

        def one():
            q = torch.randn(1, 9, 1, 16, device=ctx.device)
            index = torch.tensor(idx, device=ctx.device)
            prev = sslkernels.debug_enabled()
            sslkernels.set_debug(True)
            try:
                sslkernels.masked_patch_attention(q, q, q, index)
            except ValueError as exc:
                return True, f"refused: {exc}"
            finally:
                sslkernels.set_debug(prev)
            return False, "accepted a hostile index"

        rows.append(run_check(ctx, row, one))
    return rows


def _flex_masked(index):
    """FlexAttention on the gathered, padded [B, H, K, Dh] tensors with a block mask from the
    counts (compiled once per dtype); rows past the count zeroed as the eager baseline does."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from sslkernels.reference.attention import _gather_rows

    counts = (index >= 0).sum(dim=1)
    b, width = index.shape

    def keep(bi, hi, qi, ki):
        return ki < counts[bi]

    block_mask = create_block_mask(keep, b, None, width, width, device=index.device)
    compiled = torch.compile(flex_attention, dynamic=False)
    live = (index >= 0)[:, :, None, None]

    def fn(q, k, v, idx):
        qg, kg, vg = (_gather_rows(x, idx).transpose(1, 2) for x in (q, k, v))
        out = compiled(qg, kg, vg, block_mask=block_mask).transpose(1, 2)
        return torch.where(live, out, torch.zeros((), dtype=out.dtype, device=out.device))

    return fn


def _time_masked(ctx, dt, left, rows):
    import sslkernels
    from sslkernels._benchmark import _kept_patches, get_op
    from sslkernels.reference import masked_patch_attention_reference

    s = R_TIME_MASKED if ctx.rehearse else TIME_MASKED
    case = get_op("masked_patch_attention").shape_label(s)
    dtype = DTYPES[dt]
    q, k, v, index = _kept_patches(s, dtype, ctx.device)
    leaves = [q, k, v]
    grad = torch.randn(index.shape[0], index.shape[1], s["h"], s["dh"], device=ctx.device, dtype=dtype)
    masked = sslkernels.masked_patch_attention
    verdict = run_check(ctx, Row("masked_patch_attention", case, dt, "fwdbwd"),
                        lambda: _judge("masked", masked, (q, k, v, grad), (index,), dtype)).check
    flex = None
    for mode in ("fwd", "fwdbwd"):
        if left() < 10:
            ctx.log(f"time masked_patch_attention {mode} {dt}: skipped (section budget)")
            continue
        row = Row("masked_patch_attention", case, dt, mode, check=verdict)
        timed(ctx, row, "fused", lambda: time_pass(ctx, masked, (q, k, v, index), leaves, mode, grad, True))
        timed(ctx, row, "eager", lambda: time_pass(ctx, masked_patch_attention_reference, (q, k, v, index),
                                                   leaves, mode, grad, True))
        log_timing(ctx, row)
        rows.append(row)
        frow = Row("masked_patch_attention[vs flex]", case, dt, mode, fused_ms=row.fused_ms,
                   fused_mb=row.fused_mb, check=verdict)
        rows.append(frow)
        if left() < 30 or not ctx.cuda:  # Flex compiles for the GPU (minutes on the CPU)
            frow.eager_ms = frow.eager_mb = "SKIP"
            continue
        try:
            flex = flex or _flex_masked(index)
            timed(ctx, frow, "eager", lambda: time_pass(ctx, flex, (q, k, v, index), leaves, mode, grad, True))
        except Exception as exc:  # noqa: BLE001  (a baseline that fails is a note)
            frow.eager_ms = frow.eager_mb = "ERR"
            ctx.log(f"flex {mode} {dt}: {type(exc).__name__}: {exc}")
        log_timing(ctx, frow)
    del q, k, v, index, leaves, grad, flex
    free(ctx)


def _time_varlen(ctx, dt, left, rows):
    import sslkernels
    from sslkernels._benchmark import _packed_equal, get_op
    from sslkernels.reference import dense_attention_reference

    s = R_TIME_VARLEN if ctx.rehearse else TIME_VARLEN
    case = get_op("varlen_attention").shape_label(s)
    dtype = DTYPES[dt]
    q, k, v, cu = _packed_equal(s, dtype, ctx.device)
    grad = torch.randn_like(q)
    varlen = sslkernels.varlen_attention
    verdict = run_check(ctx, Row("varlen_attention", case, dt, "fwdbwd"),
                        lambda: _judge("varlen", varlen, (q, k, v, grad), (cu, s["tokens"]), dtype)).check
    for mode in ("fwd", "fwdbwd"):
        if left() < 5:
            ctx.log(f"time varlen_attention {mode} {dt}: skipped (section budget)")
            continue
        row = Row("varlen_attention[vs dense sdpa]", case, dt, mode, check=verdict)
        timed(ctx, row, "fused", lambda: time_pass(ctx, varlen, (q, k, v, cu, s["tokens"]), [q, k, v], mode,
                                                   grad, True))
        timed(ctx, row, "eager", lambda: time_pass(ctx, dense_attention_reference, (q, k, v, s["b"]), [q, k, v],
                                                   mode, grad, True))
        log_timing(ctx, row)
        rows.append(row)
    del q, k, v, cu, grad
    free(ctx)


def time(ctx: Ctx) -> list[Row]:
    from sslkernels.kernels import attention as A

    t0 = _time.time()

    def left():
        return min(ctx.time_left(), SECTION_BUDGET_S - (_time.time() - t0))

    rows = []
    for dt in (["fp32"] if ctx.rehearse else TIME_DTYPES):  # bf16 first: the headline rows
        _time_masked(ctx, dt, left, rows)
        _time_varlen(ctx, dt, left, rows)
    for name in _TUNED:
        for key, cfg in getattr(getattr(A, name), "cache", {}).items():
            ctx.log(f"autotune {name} {key}: {cfg}")
    return rows


# ---------------------------------------------------------------------------- compile-only

# (Dh, dtype, fp32 precision, indexed, all configs?): every config of the family where
# autotuning tries them (the timed shapes), the first config (autotuning off) elsewhere.
COMPILE_PLAN = (
    [(64, "fp16", None, True, False), (88, "fp32", None, True, False), (88, "bf16", None, True, False),
     (40, "bf16", None, True, False), (128, "fp32", None, True, False), (128, "bf16", None, True, False),
     (64, "fp16", None, False, False)]
    + [(64, dt, None, ix, True) for dt in ("bf16", "fp32") for ix in (True, False)]  # timed: autotuned
    + [(128, "fp32", "tf32", True, False), (64, "fp64", None, True, False)]
)


def _arg_values(dh, indexed, b=32, length=196, h=12):
    """Integer arguments of a launch at [B, L, H, Dh] (masked, index width L) or packed B x L
    tokens (varlen), contiguous: Triton turns a 1 into a constant and marks values
    divisible by 16, so the compile sees what the run will."""
    t = b * length
    tok, head = h * dh, dh
    vals = {"H": h, "LQ": length, "LK": length, "KQ": length, "KKV": length, "T": 0,
            "TUNE": 256, "slb": h * length, "slh": length}
    if not indexed:
        vals.update({"LQ": 0, "LK": 0, "KQ": 0, "KKV": 0, "T": t, "slb": 0, "slh": t})
    align = math.gcd(16, length * tok, tok, head)  # as kernels.attention._align
    for p in ("q", "k", "v", "g", "o", "d"):
        vals.update({f"s{p}b": length * tok // align if indexed else 0, f"s{p}t": tok // align,
                     f"s{p}h": head // align, f"s{p}d": 1})
    return vals, align


def kernel_name(kernel) -> str:
    from benchmarks.gpu._core import jit_fn

    return jit_fn(kernel).fn.__name__.replace("_attn_", "").replace("_kernel", "")


def compile_targets(ctx: Ctx) -> list[CompileTarget]:
    """The attention kernel variants of COMPILE_PLAN; every config of every variant when
    SSLKERNELS_COMPILE_ALL=1."""
    import triton

    from benchmarks.gpu._core import jit_fn
    from sslkernels.kernels import attention as A
    from sslkernels.kernels import contrastive as C

    everything = os.environ.get("SSLKERNELS_COMPILE_ALL") == "1"
    tys = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
    out = []
    for dh, dt, prec, indexed, all_cfgs in COMPILE_PLAN:
        dtype = DTYPES[dt]
        ty, acc = tys[dtype], ("fp64" if dtype == torch.float64 else "fp32")
        precision = prec or ("ieee" if dtype != torch.float32 else C.FP32_PRECISION)
        meta = {**A._meta(dtype, dh, indexed), "PRECISION": precision}
        vals, align = _arg_values(dh, indexed)
        meta["ALIGN"] = align
        ptr_types = {"idx_ptr": "*i64" if indexed else "*i32", "kv_idx_ptr": "*i64" if indexed else "*i32",
                     "cnt_ptr": "*i32", "kv_cnt_ptr": "*i32", "cu_ptr": "*i32", "lse_ptr": f"*{acc}",
                     "delta_ptr": f"*{acc}"}
        fam = A._family(dtype, precision, dh)
        for kernel, fams in ((A._attn_fwd_kernel, A._FWD), (A._attn_bwd_dkdv_kernel, A._BWD_KV),
                             (A._attn_bwd_dq_kernel, A._BWD_Q), (A._attn_delta_kernel, None)):
            sig, consts, aligned = {}, {}, []
            fn = jit_fn(kernel)
            plain = {p.name for p in getattr(fn, "params", ()) if p.do_not_specialize}  # neither constant nor aligned
            for name in fn.arg_names:
                if name.isupper() and name not in vals:  # constexpr
                    continue
                if name.endswith("_ptr"):
                    sig[name] = ptr_types.get(name, f"*{ty}")
                elif name in ("scale_hi", "scale_lo"):
                    sig[name] = "fp32"
                elif name in plain:
                    sig[name] = "i32"
                elif vals[name] == 1:
                    consts[name] = 1
                else:
                    sig[name] = "i32"
                    if vals[name] % 16 == 0:
                        aligned.append(name)
            if fams is None:
                cfgs = [triton.Config({}, num_warps=4, num_stages=1)]
                consts.update(INDEXED=indexed, HEAD_DIM=dh, ALIGN=align, BLOCK_M=A._DELTA_ROWS,
                              BLOCK_D=A._block_d(dh))
            else:
                cfgs = fams[fam] if (all_cfgs or everything) else fams[fam][:1]
                consts.update(meta)
            head = f"attn Dh={dh} {dt} {precision} {'masked' if indexed else 'varlen'} ALIGN={align} ({fam})"
            for cfg in cfgs:
                out.append(CompileTarget(f"{head} {kernel_name(kernel)} {cfg.kwargs} w{cfg.num_warps} "
                                         f"s{cfg.num_stages}", kernel, sig, {**consts, **cfg.kwargs},
                                         cfg.num_warps, cfg.num_stages, tuple(aligned),
                                         wgmma=fams is not None and dtype in (torch.float16, torch.bfloat16)))
    return out
