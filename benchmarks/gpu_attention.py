#!/usr/bin/env python
"""GPU section of the Triton masked-patch and varlen attention, imported by
`benchmarks/gpu_check.py`, which calls `attention_section(rows, failed, log)` (and
`compile_attention(build)` under --compile-only).

    python benchmarks/gpu_attention.py                 # this section alone (needs a GPU)
    python benchmarks/gpu_attention.py --compile-only  # no GPU: compile its kernel variants for sm_90
                                                       # (--all: every config of every variant)

1. Correctness of `sslkernels.masked_patch_attention` / `sslkernels.varlen_attention` on
   cuda tensors (the registered ops and their Triton launchers; the launchers directly,
   said so in the log, if the functional API is missing) in fp32 / fp16 / bf16 against the
   eager references in float64: out, dq, dk, dv with |fused - ref64| <= 2 |eager - ref64|
   + floor * max |ref64|; a second fused run must be bitwise equal (no atomics). Cases:
   head dims 40 / 64 / 88 / 128, a zero-count sample, a single kept patch, kv_index !=
   index with another L, varlen with a length-1 and an empty sequence.
2. Timings (do_bench medians, peak memory above the inputs; the rule of 1. checked first on
   the timed inputs themselves, which also autotunes) at the I-JEPA context shape
   B=32 L=196 H=12 Dh=64, kept counts ~U[78, 196] (fixed seed), bf16 and fp32, fwd and
   fwd+bwd, against (a) eager gather + pad + bool mask + SDPA and (b) FlexAttention on the
   gathered, padded tensors with a block mask from the counts (compiled once per dtype;
   "ERR" if it fails); and varlen with 32 equal sequences of 147 tokens against dense SDPA.

Rows are keyed (op, N, D, dtype) as in gpu_check.py; a FlexAttention row carries Flex in
its eager columns (its op name says so).
"""
from __future__ import annotations

import gc
import math
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))

# (name, kind, B, Lq, Lk, H, Dh, query counts (masked) or lengths (varlen), key counts or None, dtypes)
# in order of importance: the checks stop at their budget (CHECK_BUDGET_S)
CHECKS = [
    ("mpa self", "masked", 4, 196, 196, 3, 64, [150, 0, 1, 196], None, ["bf16", "fp32", "fp16"]),
    ("varlen", "varlen", 0, 0, 0, 4, 64, [1, 147, 0, 300, 65], None, ["bf16", "fp16"]),
    ("mpa cross", "masked", 3, 150, 170, 2, 88, [77, 150, 9], [170, 3, 0], ["bf16", "fp32"]),
    ("mpa Dh=128", "masked", 2, 257, 257, 2, 128, [257, 130], None, ["bf16", "fp32"]),
    ("mpa Dh=40", "masked", 2, 100, 100, 2, 40, [99, 37], None, ["bf16"]),
]
TIME_MASKED = {"b": 32, "l": 196, "h": 12, "dh": 64, "lo": 78, "hi": 196}
TIME_VARLEN = {"b": 32, "tokens": 147, "h": 12, "dh": 64}
TIME_DTYPES = ["bf16", "fp32"]
SECTION_BUDGET_S = 90.0  # past it, FlexAttention (its compiles) and the remaining timings are skipped
CHECK_BUDGET_S = 40.0  # the checks' share of it (first-config compiles of ~9 kernel variants)
DEVICE = "cuda"
_TUNED = ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")


def _host():
    """gpu_check.py's helpers (_median_ms, _peak_mb, DTYPES, REL_FLOOR, DIV16, time_left):
    the running script when it is gpu_check.py, else the module imported for this run."""
    main = sys.modules.get("__main__")
    if main is not None and all(hasattr(main, a) for a in ("_median_ms", "_peak_mb", "REL_FLOOR", "DIV16")):
        return main
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import gpu_check  # noqa: PLC0415  (argv is set by main below)

    return gpu_check


# ---------------------------------------------------------------------------- fused entry points


def _api():
    """(masked fn, varlen fn, how): the functional API, else autograd wrappers around the
    launchers (then `how` says so)."""
    import sslkernels

    mpa, vla = getattr(sslkernels, "masked_patch_attention", None), getattr(sslkernels, "varlen_attention", None)
    if mpa is not None and vla is not None:
        return mpa, vla, "sslkernels.masked_patch_attention / varlen_attention"
    import torch

    from sslkernels.kernels import attention as A

    def counts(ix):
        return (ix >= 0).sum(dim=1, dtype=torch.int32)

    class _Masked(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, index, kv_index, scale):
            c, kc = counts(index), counts(kv_index)
            out, lse = A.masked_patch_attention_forward(q, k, v, index, c, kv_index, kc, scale)
            ctx.save_for_backward(q, k, v, index, c, kv_index, kc, out, lse)
            ctx.scale = scale
            return out

        @staticmethod
        def backward(ctx, g):
            q, k, v, index, c, kv_index, kc, out, lse = ctx.saved_tensors
            return (*A.masked_patch_attention_backward(g, q, k, v, index, c, kv_index, kc, out, lse, ctx.scale),
                    None, None, None)

    class _Varlen(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, cu, max_seqlen, scale):
            out, lse = A.varlen_attention_forward(q, k, v, cu, max_seqlen, scale)
            ctx.save_for_backward(q, k, v, cu, out, lse)
            ctx.max_seqlen, ctx.scale = max_seqlen, scale
            return out

        @staticmethod
        def backward(ctx, g):
            q, k, v, cu, out, lse = ctx.saved_tensors
            return (*A.varlen_attention_backward(g, q, k, v, cu, ctx.max_seqlen, out, lse, ctx.scale),
                    None, None, None)

    def masked(q, k, v, index, kv_index=None, scale=None):
        kv_index = index if kv_index is None else kv_index
        return _Masked.apply(q, k, v, index, kv_index, q.shape[-1] ** -0.5 if scale is None else scale)

    def varlen(q, k, v, cu, max_seqlen, scale=None):
        return _Varlen.apply(q, k, v, cu, max_seqlen, q.shape[-1] ** -0.5 if scale is None else scale)

    return masked, varlen, "the launchers of sslkernels.kernels.attention directly (functional API missing)"


# ---------------------------------------------------------------------------- correctness


def _index(counts, width, length, g):
    import torch

    idx = torch.full((len(counts), width), -1, dtype=torch.int64)
    for b, c in enumerate(counts):
        idx[b, :c] = torch.randperm(length, generator=g)[:c]
    return idx.to(DEVICE)


def _case_inputs(kind, b, lq, lk, h, dh, counts, kv_counts, seed=0):
    """float64 device tensors (q, k, v, grad) and the call's extra arguments."""
    import torch

    g = torch.Generator().manual_seed(seed)
    if kind == "masked":
        q = 2.0 * torch.randn(b, lq, h, dh, generator=g, dtype=torch.float64)
        k, v = (torch.randn(b, lk, h, dh, generator=g, dtype=torch.float64) for _ in range(2))
        index = _index(counts, max(max(counts), 1), lq, g)
        kv_index = None if kv_counts is None else _index(kv_counts, max(max(kv_counts), 1), lk, g)
        grad = torch.randn(b, index.shape[1], h, dh, generator=g, dtype=torch.float64)
        extra = (index, kv_index)
    else:
        t = sum(counts)
        q = 2.0 * torch.randn(t, h, dh, generator=g, dtype=torch.float64)
        k, v, grad = (torch.randn(t, h, dh, generator=g, dtype=torch.float64) for _ in range(3))
        cu = torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
        extra = (cu, max(counts))
    return [x.to(DEVICE) for x in (q, k, v, grad)], extra


def _out_and_grads(fn, q, k, v, grad, extra):
    import torch

    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    out = fn(*leaves, *extra)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad)]


def check_case(host, kind, b, lq, lk, h, dh, counts, kv_counts, dt, fused_fns):
    """-> (passed, message)."""
    (q, k, v, grad), extra = _case_inputs(kind, b, lq, lk, h, dh, counts, kv_counts)
    return _judge(host, kind, fused_fns[0] if kind == "masked" else fused_fns[1], (q, k, v, grad), extra,
                  host.DTYPES[dt])


def _judge(host, kind, fused_fn, tensors, extra, dtype):
    """The rule on out, dq, dk, dv of fused_fn at `tensors` (q, k, v, grad; cast to dtype)
    against the eager reference in dtype and in float64; a second fused run must be
    bitwise equal. -> (passed, message)."""
    import torch

    from sslkernels.reference import masked_patch_attention_reference, varlen_attention_reference

    ref_fn = masked_patch_attention_reference if kind == "masked" else varlen_attention_reference
    cast = [x.to(dtype) for x in tensors]
    fused = _out_and_grads(fused_fn, *cast, extra)
    again = _out_and_grads(fused_fn, *cast, extra)
    eager = _out_and_grads(ref_fn, *cast, extra)
    ref = _out_and_grads(ref_fn, *[x.double() for x in cast], extra)
    ok, msgs = True, []
    for what, f, f2, e, r in zip(("out", "dq", "dk", "dv"), fused, again, eager, ref):
        if f.shape != r.shape or f.dtype != dtype:
            ok = False
            msgs.append(f"{what}: {f.dtype} {tuple(f.shape)} != {dtype} {tuple(r.shape)}")
            continue
        if not torch.equal(f, f2):
            ok = False
            msgs.append(f"{what}: second run differs (not deterministic)")
        if not torch.isfinite(f.double()).all():
            ok = False
            msgs.append(f"{what}: NaN/Inf")
            continue
        scale = max(float(r.abs().max()), 1e-3)
        err_f = float((f.double() - r).abs().max())
        err_e = float((e.double() - r).abs().max())
        bound = 2 * err_e + host.REL_FLOOR[dtype] * scale
        ok = ok and err_f <= bound
        msgs.append(f"{what} err {err_f / scale:.1e} (eager {err_e / scale:.1e}, bound {bound / scale:.1e})"
                    + ("" if err_f <= bound else " FAIL"))
    return ok, "; ".join(msgs)


# ---------------------------------------------------------------------------- baselines


def _flex_masked(index, dtype):
    """FlexAttention on the gathered, padded [B, H, K, Dh] tensors with a block mask from
    the counts (keys past a sample's count masked; compiled once per dtype), rows past the
    count zeroed as the eager baseline does. -> fn(q, k, v, index)."""
    import torch
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


def _time(host, fn, args, leaves, mode, grad):
    """-> (ms, MB) of fn(*args) (fwd, no autograd) or fn(*args).backward(grad) (fwd+bwd)."""
    return host.time_pass(fn, args, leaves, mode, grad, no_grad_fwd=True)


def _timed(rows, failed, log, key, impl, thunk):
    import torch

    r = _row(rows, *key)
    try:
        r[f"{impl}_ms"], r[f"{impl}_mb"] = thunk()
    except torch.cuda.OutOfMemoryError:
        r[f"{impl}_ms"] = r[f"{impl}_mb"] = "OOM"
        gc.collect()
        torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        r[f"{impl}_ms"] = r[f"{impl}_mb"] = "ERR"
        msg = f"timing {impl} {key[0]} {key[3]}: " + traceback.format_exc(limit=4)
        log(msg)
        if impl == "fused":  # a baseline that fails is a note; the fused path failing is a failure
            failed.append(msg)
    return r


def _row(rows, op, n, d, dt):
    return rows.setdefault((op, n, d, dt), {"pass": "-", "eager_ms": None, "fused_ms": None,
                                            "eager_mb": None, "fused_mb": None})


def _timed_check(host, failed, log, kind, fn, tensors, extra, dtype, label):
    """The rule at the timed shape itself (it also autotunes before the timings). -> PASS / FAIL."""
    try:
        ok, msg = _judge(host, kind, fn, tensors, extra, dtype)
    except Exception:  # noqa: BLE001
        ok, msg = False, "EXCEPTION " + traceback.format_exc(limit=4)
    if not ok:
        failed.append(f"timed {kind} {label} {dtype}: {msg}")
    log(f"check timed {kind} {label} {str(dtype).replace('torch.', '')}: {'PASS' if ok else 'FAIL'}  {msg}")
    return "PASS" if ok else "FAIL"


def _time_masked(host, rows, failed, log, dt, masked, left):
    """I-JEPA context shape: fused vs eager gather+pad+mask SDPA vs FlexAttention."""
    import torch

    from sslkernels._benchmark import _kept_patches
    from sslkernels.reference import masked_patch_attention_reference

    s = TIME_MASKED
    n_label = f"B={s['b']} L={s['l']} H={s['h']} U[{s['lo']},{s['hi']}]"
    dtype = host.DTYPES[dt]
    q, k, v, index = _kept_patches(s, dtype, torch.device(DEVICE))
    leaves = [q, k, v]
    grad = torch.randn(index.shape[0], index.shape[1], s["h"], s["dh"], device=DEVICE, dtype=dtype)
    verdict = _timed_check(host, failed, log, "masked", masked, (q, k, v, grad), (index,), dtype, n_label)
    flex = None
    for mode in ("fwd", "fwd+bwd"):
        if left() < 10:
            log(f"time masked_patch_attention {mode} {dt}: skipped (section budget)")
            continue
        key = (f"masked_patch_attention {mode}", n_label, s["dh"], dt)
        _timed(rows, failed, log, key, "fused", lambda: _time(host, masked, (q, k, v, index), leaves, mode, grad))
        _timed(rows, failed, log, key, "eager", lambda: _time(host, masked_patch_attention_reference,
                                                              (q, k, v, index), leaves, mode, grad))
        r = _row(rows, *key)
        r["pass"] = verdict
        log(f"time {key[0]} {n_label} {dt}: eager {r['eager_ms']} ms {r['eager_mb']} MB, "
            f"fused {r['fused_ms']} ms {r['fused_mb']} MB")
        fkey = (f"masked_patch_attention {mode} [eager=flex]", n_label, s["dh"], dt)
        rf = _row(rows, *fkey)
        rf["pass"], rf["fused_ms"], rf["fused_mb"] = verdict, r["fused_ms"], r["fused_mb"]
        if left() < 30:
            rf["eager_ms"] = rf["eager_mb"] = "SKIP"
            log(f"flex {mode} {dt}: skipped (section budget)")
            continue
        try:
            flex = flex or _flex_masked(index, dtype)
            _timed(rows, failed, log, fkey, "eager", lambda: _time(host, flex, (q, k, v, index), leaves, mode, grad))
        except Exception:  # noqa: BLE001
            rf["eager_ms"] = rf["eager_mb"] = "ERR"
            log(f"flex {mode} {dt}: " + traceback.format_exc(limit=4))
        log(f"time {fkey[0]} {dt}: flex {rf['eager_ms']} ms {rf['eager_mb']} MB")
    del q, k, v, index, leaves, grad, flex
    gc.collect()
    torch.cuda.empty_cache()


def _time_varlen(host, rows, failed, log, dt, varlen, left):
    """32 equal sequences of 147 tokens: fused varlen vs SDPA on the dense [B, H, n, Dh] views."""
    import torch

    from sslkernels._benchmark import _packed_equal
    from sslkernels.reference import dense_attention_reference

    s = TIME_VARLEN
    n_label = f"B={s['b']}x{s['tokens']} H={s['h']}"
    q, k, v, cu = _packed_equal(s, host.DTYPES[dt], torch.device(DEVICE))
    grad = torch.randn_like(q)
    verdict = _timed_check(host, failed, log, "varlen", varlen, (q, k, v, grad), (cu, s["tokens"]),
                           host.DTYPES[dt], n_label)
    for mode in ("fwd", "fwd+bwd"):
        if left() < 5:
            log(f"time varlen_attention {mode} {dt}: skipped (section budget)")
            continue
        key = (f"varlen_attention {mode} [eager=dense sdpa]", n_label, s["dh"], dt)
        _timed(rows, failed, log, key, "fused",
               lambda: _time(host, varlen, (q, k, v, cu, s["tokens"]), [q, k, v], mode, grad))
        _timed(rows, failed, log, key, "eager",
               lambda: _time(host, dense_attention_reference, (q, k, v, s["b"]), [q, k, v], mode, grad))
        r = _row(rows, *key)
        r["pass"] = verdict
        log(f"time {key[0]} {n_label} {dt}: dense {r['eager_ms']} ms {r['eager_mb']} MB, "
            f"fused {r['fused_ms']} ms {r['fused_mb']} MB")
    del q, k, v, cu, grad
    gc.collect()
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- section


def attention_section(rows, failed, log):
    """Adds the rows and failures of masked-patch and varlen attention (see the docstring)."""
    from sslkernels.kernels import attention as A

    host = _host()
    t0 = time.time()
    outer_left = getattr(host, "time_left", lambda: float("inf"))

    def left():
        return min(outer_left(), SECTION_BUDGET_S - (time.time() - t0))

    masked, varlen, how = _api()
    log(f"attention: fused path = {how}; autotune={A.AUTOTUNE}")
    autotune = A.AUTOTUNE
    A.AUTOTUNE = False  # correctness: one config per kernel variant (compile time)
    try:
        for name, kind, b, lq, lk, h, dh, counts, kv_counts, dts in CHECKS:
            for dt in dts:
                n_label = f"B={b} L={lq}" if kind == "masked" else f"lens={counts}"
                if left() < SECTION_BUDGET_S - CHECK_BUDGET_S:
                    failed.append(f"{name} {dt}: skipped (check budget)")
                    continue
                try:
                    ok, msg = check_case(host, kind, b, lq, lk, h, dh, counts, kv_counts, dt, (masked, varlen))
                except Exception:  # noqa: BLE001
                    ok, msg = False, "EXCEPTION " + traceback.format_exc(limit=4)
                _row(rows, f"check:{name}", n_label, dh, dt)["pass"] = "PASS" if ok else "FAIL"
                if not ok:
                    failed.append(f"{name} {n_label} Dh={dh} {dt}: {msg}")
                log(f"check {name} {n_label} H={h} Dh={dh} {dt}: {'PASS' if ok else 'FAIL'}  {msg}")
    finally:
        A.AUTOTUNE = autotune
        # the checks' single-config choices are cached under the same keys as the timed
        # shapes (head dim, row bucket, precision, dtypes): forget them so timings autotune
        for name in _TUNED:
            getattr(getattr(A, name), "cache", {}).clear()

    for dt in TIME_DTYPES:  # bf16 first: the headline rows, if the budget runs short
        _time_masked(host, rows, failed, log, dt, masked, left)
        _time_varlen(host, rows, failed, log, dt, varlen, left)

    for name in _TUNED:
        for key, cfg in getattr(getattr(A, name), "cache", {}).items():
            log(f"autotune {name} {key}: {cfg}")
    log(f"attention section: {time.time() - t0:.0f}s")


# ---------------------------------------------------------------------------- compile-only

# (Dh, dtype, fp32 precision, indexed, all configs?): the variants the checks and timings
# launch: every config of the family where autotuning tries them (the timed shapes), the
# first config (the one used with autotuning off, as in the checks) elsewhere.
COMPILE_PLAN = (
    [(64, dt, None, True, False) for dt in ("fp16",)]
    + [(88, dt, None, True, False) for dt in ("fp32", "bf16")]
    + [(40, "bf16", None, True, False)]
    + [(128, dt, None, True, False) for dt in ("fp32", "bf16")]
    + [(64, dt, None, False, False) for dt in ("fp16",)]
    + [(64, dt, None, ix, True) for dt in ("bf16", "fp32") for ix in (True, False)]  # timed: autotuned
    + [(128, "fp32", "tf32", True, False), (64, "fp64", None, True, False)]
)


def _arg_values(dh, indexed, b=32, length=196, h=12):
    """Integer arguments of a launch at [B, L, H, Dh] (masked, index width L) or packed
    B x L tokens (varlen), contiguous: Triton turns a 1 into a constant and marks values
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


def compile_attention(build, plan=None, everything=None):
    """Compile, for sm_90, the attention kernel variants of the plan (build: gpu_check's
    compile_only compiler + ptxas report); every config of every variant when
    `everything` (default: SSLKERNELS_COMPILE_ALL=1). -> number of failures."""
    import torch
    import triton

    from sslkernels.kernels import attention as A
    from sslkernels.kernels import contrastive as C

    host = _host()
    if everything is None:
        everything = os.environ.get("SSLKERNELS_COMPILE_ALL") == "1"
    tys = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
    failures = 0
    for dh, dt, prec, indexed, all_cfgs in plan or COMPILE_PLAN:
        dtype = host.DTYPES[dt]
        ty, acc = tys[dtype], ("fp64" if dtype == torch.float64 else "fp32")
        precision = prec or ("ieee" if dtype != torch.float32 else C.FP32_PRECISION)
        meta = {**A._meta(dtype, dh, indexed), "PRECISION": precision}
        vals, align = _arg_values(dh, indexed)
        meta["ALIGN"] = align
        # the varlen launch passes cu_seqlens (int32) in the index slots
        ptr_types = {"idx_ptr": "*i64" if indexed else "*i32", "kv_idx_ptr": "*i64" if indexed else "*i32",
                     "cnt_ptr": "*i32", "kv_cnt_ptr": "*i32", "cu_ptr": "*i32", "lse_ptr": f"*{acc}",
                     "delta_ptr": f"*{acc}"}
        fam = A._family(dtype, precision, dh)
        jobs = []
        for kernel, fams in ((A._attn_fwd_kernel, A._FWD), (A._attn_bwd_dkdv_kernel, A._BWD_KV),
                             (A._attn_bwd_dq_kernel, A._BWD_Q), (A._attn_delta_kernel, None)):
            sig, consts = {}, {}
            host.DIV16.clear()
            fn = _jit(kernel)
            plain = {p.name for p in fn.params if p.do_not_specialize}  # neither constant nor aligned
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
                    host.DIV16[name] = vals[name] % 16 == 0
            if fams is None:
                cfgs = [triton.Config({}, num_warps=4, num_stages=1)]
                consts.update(INDEXED=indexed, HEAD_DIM=dh, ALIGN=align, BLOCK_M=A._DELTA_ROWS, BLOCK_D=A._block_d(dh))
            else:
                cfgs = fams[fam] if (all_cfgs or everything) else fams[fam][:1]
                consts.update(meta)
            print(f"attention Dh={dh} {dt} {precision} {'masked' if indexed else 'varlen'} ALIGN={align}: "
                  f"{kernel_name(kernel)} family {fam}", flush=True)
            for cfg in cfgs:
                tag = f"attn_{kernel_name(kernel)} {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}"
                try:
                    build(kernel, sig, consts, cfg, tag)
                except Exception as exc:  # noqa: BLE001
                    failures += 1
                    print(f"  {tag}: COMPILE FAILED: {type(exc).__name__}: {str(exc)[-1500:]}", flush=True)
    return failures


def _jit(k):
    import triton

    while not isinstance(k, triton.runtime.jit.JITFunction):
        k = k.fn
    return k


def kernel_name(kernel):
    return _jit(kernel).fn.__name__.replace("_attn_", "").replace("_kernel", "")


# ---------------------------------------------------------------------------- standalone


def main(argv):
    compile_only = "--compile-only" in argv
    sys.argv = [os.path.join(HERE, "gpu_check.py")] + (["--compile-only"] if compile_only else [])
    import torch

    if not compile_only and not torch.cuda.is_available():
        print("gpu_attention: no CUDA device; nothing to check here (use --compile-only without a GPU)")
        return 0
    if compile_only and "--all" in argv:
        os.environ["SSLKERNELS_COMPILE_ALL"] = "1"
    host = _host()
    if compile_only:
        # gpu_check's compile_only() (its ptxas report and alignment rules) with the other
        # families' variants left out: it calls compile_attention itself
        import types

        host.CHECK_D, host.TIME_D, host.EXTRAS = [], [], []
        host.compile_spectral = lambda build: 0
        sys.modules["gpu_contrastive"] = types.SimpleNamespace(compile_contrastive=lambda build: 0)
        return host.compile_only()
    rows, failed = {}, []
    attention_section(rows, failed, host.log)
    return host.report_section(rows, failed)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
