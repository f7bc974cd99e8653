"""SupCon and InfoNCE / CLIP (`sslkernels.sup_con`, `sslkernels.info_nce`): loss and every
gradient (features; query, key, a learnable temperature, a queue that requires grad) in
fp32 / fp16 / bf16 against the eager references in float64 under `_core.judge`, a second
fused run bitwise equal. Timings fwd and fwdbwd, bf16 and fp32, against the eager
references: sup_con N=8192 D=128 C=100; info_nce N=8192 D=256 K=16384 (MoCo queue,
detached); CLIP symmetric N=8192 D=256 (learnable temperature); retrieval N=8192 D=128
(logit_bias and duplicate ids, in-batch). Per-query hard negatives [N, M, D] are checked,
not timed.

The checks run one config per kernel variant (autotuning off: each op compiles several
variants per dtype); the timings autotune."""
from __future__ import annotations

import contextlib
import math

import torch

from benchmarks.gpu._core import (DTYPES, CompileTarget, Ctx, Row, free, judge_all, log_timing,
                                  loss_and_grads, run_check, time_pass, timed)

NAME = "contrastive"

# (op, kind, N, D, classes or K, dtypes, options). The interpreter tests cover fp32 / fp16
# semantics on small shapes; here the GPU-only risks: tensor-core numerics, bf16, compiled
# layouts, odd D at realistic N. Checks share D with the timings (compiled variants reused).
CHECKS = [
    ("sup_con", "sup_con", 1000, 128, 100, ["fp32", "fp16", "bf16"], {}),
    ("sup_con", "sup_con", 257, 130, 7, ["bf16"], {}),
    ("info_nce[queue grad]", "info_nce", 1000, 256, 3000, ["fp32", "fp16", "bf16"], {"queue_grad": True}),
    ("clip", "info_nce", 1000, 256, 0, ["fp32", "fp16", "bf16"], {"symmetric": True}),
    ("info_nce[moco]", "info_nce", 257, 130, 300, ["bf16"], {"in_batch": False, "queue_grad": True}),
    ("info_nce[hard negatives]", "info_nce", 257, 130, 7, ["bf16"], {"per_query": True, "queue_grad": True}),
    # the retrieval terms (issue 13): logit_bias and duplicate ids, with a queue, and CLIP's
    ("info_nce[terms, queue grad]", "info_nce", 1000, 256, 3000, ["fp32", "bf16"],
     {"queue_grad": True, "terms": True}),
    ("clip[terms]", "info_nce", 1000, 256, 0, ["fp32", "bf16"], {"symmetric": True, "terms": True}),
    # the two-pass forward, still the route past the one sweep's partial-buffer limit
    ("clip[two-pass]", "info_nce", 1000, 256, 0, ["bf16"], {"symmetric": True, "two_pass": True}),
]
TIMINGS = [
    ("sup_con", "sup_con", 8192, 128, 100, {}),
    ("info_nce", "info_nce", 8192, 256, 16384, {}),
    ("clip", "info_nce", 8192, 256, 0, {"symmetric": True}),
    # the same call on the two-pass forward (lead 6's baseline: K.CLIP_ONE_SWEEP = False)
    ("clip[two-pass]", "info_nce", 8192, 256, 0, {"symmetric": True, "two_pass": True}),
    ("info_nce_retrieval", "info_nce", 8192, 128, 0, {"terms": True}),
    # MoCo's small batch against a long queue: 4 row blocks, so the queue is split (_queue_splits)
    ("moco[N=256]", "info_nce", 256, 128, 65536, {"in_batch": False, "split": True}),
]
TIME_DTYPES = ["bf16", "fp32"]
# Compiled only (the checks above do not run them): the retrieval terms' kernel variants
# (logit_bias + duplicate-id masks, issue 13) of every InfoNCE launch, at the timings' D.
# (kind, D, K, dtypes, options) as CHECKS'; "terms": bias and ids, "diag_exempt": False is
# the ring's remote-block call (the diagonal masked too).
TERM_VARIANTS = [
    ("info_nce", 256, 40, ["bf16", "fp32"], {"symmetric": True, "queue_grad": True, "terms": True}),
    ("info_nce", 256, 40, ["bf16"], {"in_batch": False, "queue_grad": True, "terms": True,
                                     "diag_exempt": False}),
    # the queue split's variants (the query rows' forward and dquery passes)
    ("info_nce", 128, 40, ["bf16", "fp32"], {"queue_grad": True, "split": True}),
    ("info_nce", 256, 40, ["bf16"], {"queue_grad": True, "terms": True, "split": True}),
    # the one-sweep CLIP forward (COL_PART) at the other tile families' D
    ("info_nce", 128, 0, ["bf16", "fp32"], {"symmetric": True}),
    ("info_nce", 130, 0, ["bf16", "fp16"], {"symmetric": True, "terms": True}),
    ("info_nce", 256, 40, ["bf16"], {"symmetric": True, "split": True}),  # split 0 writes the partials
]
CHECK_WIDTH = 1  # configs compiled per variant of a check; timings autotune over 2
SUP_CON_T = 0.1
INFO_NCE_T = 0.07
R_CHECK_DTYPES = ["fp32", "fp16"]


def _tiny(n, d, extra):
    return min(n, 9), min(d, 16), (min(extra, 5) if extra else 0)


def label(kind, n, d, extra, opts) -> str:
    from sslkernels._benchmark import get_op

    if kind == "sup_con":
        return get_op("sup_con").shape_label({"n": n, "d": d, "classes": extra})
    if opts.get("per_query"):
        return f"N={n} D={d} M={extra}"
    return get_op("info_nce").shape_label({"n": n, "d": d, "k": extra})


def _inputs(ctx: Ctx, kind, n, d, extra, dtype, opts, seed=0):
    """(x, labels) for sup_con, (query, key, negatives or None) for info_nce."""
    g = ctx.generator(seed)
    dev = ctx.device
    scale = 1.0 if opts.get("normalize", True) else 1.0 / math.sqrt(d)
    if kind == "sup_con":
        labels = torch.randint(0, extra, (n,), generator=g, device=dev)
        centers = torch.randn(extra, d, generator=g, device=dev)
        x = centers[labels] + 0.9 * torch.randn(n, d, generator=g, device=dev)
        return (x * scale).to(dtype), labels
    q = torch.randn(n, d, generator=g, device=dev)
    k = q + 0.8 * torch.randn(n, d, generator=g, device=dev)
    shape = (n, extra, d) if opts.get("per_query") else (extra, d)
    neg = torch.randn(*shape, generator=g, device=dev) * scale if extra else None
    return (q * scale).to(dtype), (k * scale).to(dtype), None if neg is None else neg.to(dtype)


def _terms(ctx: Ctx, n, extra, opts, seed=0) -> dict:
    """info_nce's retrieval terms for opts["terms"]: a bias per candidate (keys, then the
    queue) and ids drawn from n / 4 values, so that duplicates are common."""
    if not opts.get("terms"):
        return {}
    g = ctx.generator(seed + 100)
    dev, values = ctx.device, max(2, n // 4)
    terms = dict(logit_bias=1.5 * torch.randn(n + extra, generator=g, device=dev),
                 key_ids=torch.randint(0, values, (n,), generator=g, device=dev))
    if extra:
        terms["queue_ids"] = torch.randint(0, values, (extra,), generator=g, device=dev)
    return terms


def _loss_fn(kind, impl, opts, labels=None, terms=None):
    import sslkernels
    from sslkernels.reference import info_nce_reference, sup_con_reference

    normalize = opts.get("normalize", True)
    if kind == "sup_con":
        f = sslkernels.sup_con if impl == "fused" else sup_con_reference
        return lambda x, t: f(x, labels, temperature=t, normalize=normalize)
    f = sslkernels.info_nce if impl == "fused" else info_nce_reference
    kw = dict(symmetric=opts.get("symmetric", False), normalize=normalize,
              in_batch_negatives=opts.get("in_batch", True), **(terms or {}))

    bias_in = {}  # the bias in each inputs' dtype (the oracle's float64 too), converted once

    def loss(q, k, t, neg=None):
        extra = {}
        if kw.get("logit_bias") is not None:
            if q.dtype not in bias_in:
                bias_in[q.dtype] = kw["logit_bias"].to(q.dtype)
            extra["logit_bias"] = bias_in[q.dtype]
        return f(q, k, t, negatives=neg, **{**kw, **extra})
    return loss


def check_case(ctx: Ctx, kind, n, d, extra, dtype, opts):
    if kind == "sup_con":
        x, labels = _inputs(ctx, kind, n, d, extra, dtype, opts)
        tensors, wants, names = [x, SUP_CON_T], [True, False], ["loss", "dx"]
        run = {impl: _loss_fn(kind, impl, opts, labels) for impl in ("fused", "eager")}
    else:
        q, k, neg = _inputs(ctx, kind, n, d, extra, dtype, opts)
        t = torch.tensor(INFO_NCE_T, device=ctx.device)  # learnable, float32 on the device (as CLIP)
        tensors = [q, k, t] + ([neg] if neg is not None else [])
        wants = [True, True, True] + ([opts.get("queue_grad", False)] if neg is not None else [])
        names = ["loss", "dquery", "dkey", "dtemperature"] + (["dqueue"] if neg is not None and wants[3] else [])
        terms = _terms(ctx, n, extra, opts)
        run = {impl: _loss_fn(kind, impl, opts, terms=terms) for impl in ("fused", "eager")}
    fused = loss_and_grads(run["fused"], tensors, wants)
    again = loss_and_grads(run["fused"], tensors, wants)
    eager = loss_and_grads(run["eager"], tensors, wants)
    ref = loss_and_grads(run["eager"], [x.double() if isinstance(x, torch.Tensor) and x.is_floating_point()
                                        else x for x in tensors], wants)
    from sslkernels._tolerance import logit_bound

    # the loss and the temperature's gradient are scalars: differences of logits up to 1 / t
    size = logit_bound(*(x for x in tensors if isinstance(x, torch.Tensor) and x.dim() > 0),
                       temperature=SUP_CON_T if kind == "sup_con" else INFO_NCE_T,
                       normalize=opts.get("normalize", True))
    if kind != "sup_con" and terms.get("logit_bias") is not None:
        size += float(terms["logit_bias"].abs().max())
    return judge_all(names, fused, eager, ref, dtype, again, terms=size)


def check(ctx: Ctx) -> list[Row]:
    from sslkernels.kernels import contrastive as K

    rows = []
    autotune, K.AUTOTUNE = K.AUTOTUNE, False  # one config per kernel variant (compile time)
    try:
        for op, kind, n, d, extra, dts, opts in CHECKS:
            if ctx.rehearse:
                n, d, extra = _tiny(n, d, extra)
                dts = [dt for dt in dts if dt in R_CHECK_DTYPES] or R_CHECK_DTYPES[:1]
            for dt in dts:
                row = Row(op, label(kind, n, d, extra, opts), dt, "fwdbwd")
                if ctx.time_left() < 60:
                    ctx.fail(f"{op} {row.case} {dt}: skipped (deadline)")
                    continue
                with _clip_route(K, opts):
                    rows.append(run_check(ctx, row, lambda: check_case(ctx, kind, n, d, extra, DTYPES[dt], opts)))
    finally:
        K.AUTOTUNE = autotune
    return rows


@contextlib.contextmanager
def _clip_route(K, opts):
    """A row's CLIP forward: the two-pass one where opts["two_pass"] (lead 6's baseline), else
    the launcher's own choice (the one sweep at the checked and timed sizes)."""
    saved = K.CLIP_ONE_SWEEP
    if opts.get("two_pass"):
        K.CLIP_ONE_SWEEP = False
    try:
        yield
    finally:
        K.CLIP_ONE_SWEEP = saved


def _time_case(ctx: Ctx, kind, impl, mode, n, d, extra, dtype, opts):
    if kind == "sup_con":
        x, labels = _inputs(ctx, kind, n, d, extra, dtype, opts, seed=1)
        leaves = [x.requires_grad_(True)]
        fn = _loss_fn(kind, impl, opts, labels)
        args = [leaves[0], SUP_CON_T]
    else:
        q, k, neg = _inputs(ctx, kind, n, d, extra, dtype, opts, seed=1)
        # CLIP: a learnable temperature on the device; MoCo: a float and a detached queue
        t = torch.tensor(INFO_NCE_T, device=ctx.device, requires_grad=True) if opts.get("symmetric") else INFO_NCE_T
        leaves = [q.requires_grad_(True), k.requires_grad_(True)] + ([t] if isinstance(t, torch.Tensor) else [])
        fn = _loss_fn(kind, impl, opts, terms=_terms(ctx, n, extra, opts, seed=1))
        args = [leaves[0], leaves[1], t, neg]
    return time_pass(ctx, fn, args, leaves, mode, graph=True)


def time(ctx: Ctx) -> list[Row]:
    from sslkernels.kernels import contrastive as K

    rows = []
    for op, kind, n, d, extra, opts in TIMINGS:
        if ctx.rehearse:
            n, d, extra = _tiny(n, d, extra)
        for dt in (["fp32"] if ctx.rehearse else TIME_DTYPES):
            for mode in ("fwd", "fwdbwd"):
                row = Row(op, label(kind, n, d, extra, opts), dt, mode)
                if ctx.time_left() < 40:
                    ctx.log(f"time {op} {row.case} {dt} {mode}: skipped (deadline)")
                    continue
                with _clip_route(K, opts):
                    for impl in ("fused", "eager"):
                        timed(ctx, row, impl,
                              lambda: _time_case(ctx, kind, impl, mode, n, d, extra, DTYPES[dt], opts))
                log_timing(ctx, row)
                rows.append(row)
                free(ctx)
    for name in ("_lse_fwd_kernel", "_lse_bwd_kernel"):
        for key, cfg in getattr(getattr(K, name), "cache", {}).items():
            ctx.log(f"autotune {name} {key}: {cfg}")
    return rows


# ---------------------------------------------------------------------------- compile-only


def _launch_plan(K, kind, opts):
    """[(kernel, mode flags, labels pointer type, counts pointer type)] of one call, as the
    launchers issue them."""
    if kind == "sup_con":
        return [("fwd", K._fwd_flags(1, False, True), "i64", None),
                ("bwd", K._bwd_flags(1, False, True, True, True, 0.0, False), "i64", "i32")]
    sym, ib, has_c = opts.get("symmetric", False), opts.get("in_batch", True), opts.get("K", 0) > 0
    per_q = has_c and opts.get("per_query", False)
    b_mode, dirs = (1 if ib else 2), (2 if sym else 1)
    # retrieval terms, as info_nce_forward / _backward issue them: the bias on the query
    # direction (columns where the queries are the rows, rows in the dkey / dqueue passes)
    terms, exempt = opts.get("terms", False), opts.get("diag_exempt", True)
    bias = dict(col_bias=terms, ids=terms, diag_exempt=exempt)
    on_rows = dict(row_bias=terms, ids=terms, diag_exempt=exempt)
    split = dict(split=bool(opts.get("split")) and has_c and not per_q)  # the query rows' passes only
    # CLIP: one sweep for both directions (column partials + their merge), or two passes
    one_sweep = sym and not opts.get("two_pass", False)
    out = [("fwd", K._fwd_flags(b_mode, has_c, False, per_q, **bias, **split, col_part=one_sweep), None, None)]
    if one_sweep:
        out.append(("merge", {}, None, None))
    elif sym:
        out.append(("fwd", K._fwd_flags(1, False, False, ids=terms, diag_exempt=exempt), None, None))
    out.append(("bwd", K._bwd_flags(b_mode, has_c, False, True, sym, dirs, True, per_q, **bias, **split), None, None))
    out.append(("bwd", K._bwd_flags(b_mode, False, False, sym, True, dirs, sym, **on_rows), None, None))
    if has_c and opts.get("queue_grad", False):
        out.append(("pq_bwd", {}, None, None) if per_q else
                   ("bwd", K._bwd_flags(1, False, False, False, True, 0.0, False, row_bias=terms, ids=terms,
                                        diag_exempt=False), None, None))
    return out


def compile_targets(ctx: Ctx) -> list[CompileTarget]:
    """Every kernel variant and config the checks and timings launch."""
    from sslkernels.kernels import contrastive as K

    tys = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
    calls = set()
    for _, kind, n, d, extra, dts, opts in CHECKS:
        for dt in dts:
            calls.add((kind, d, dt, tuple(sorted({**opts, "K": extra if kind == "info_nce" else 0}.items())),
                       CHECK_WIDTH))
    for _, kind, n, d, extra, opts in TIMINGS:
        for dt in TIME_DTYPES:
            calls.add((kind, d, dt, tuple(sorted({**opts, "K": extra if kind == "info_nce" else 0,
                                                   "queue_grad": False}.items())), 2))
    for kind, d, extra, dts, opts in TERM_VARIANTS:
        for dt in dts:
            calls.add((kind, d, dt, tuple(sorted({**opts, "K": extra}.items())), CHECK_WIDTH))
    variants = {}  # (kernel, d, dtype, normalize, flags...) -> configs (as many as the launch tries)
    for kind, d, dt, opts, width in sorted(calls, key=str):
        opts = dict(opts)
        dtype = DTYPES[dt]
        normalize = opts.get("normalize", True)
        prec = K.FP32_PRECISION if dtype == torch.float32 else "ieee"  # TF32 off: the default
        for which, flags, lab_ty, cnt_ty in _launch_plan(K, kind, opts):
            key = (which, d, dt, normalize, prec, tuple(sorted(flags.items())), lab_ty, cnt_ty)
            variants[key] = max(variants.get(key, 0), width)
    out = []
    for (which, d, dt, normalize, prec, flags, lab_ty, cnt_ty), width in sorted(variants.items(), key=str):
        dtype = DTYPES[dt]
        family, fmeta, bmeta = K._plan(d, dtype, normalize, prec)
        ty, acc = tys[dtype], tys[K._acc_dtype(dtype)]
        aligned = ("D", "stride_a", "stride_b", "stride_c", "stride_q") if d % 16 == 0 else ()
        common = {"a_ptr": f"*{ty}", "b_ptr": f"*{ty}", "c_ptr": f"*{ty}", "stride_a": "i32", "stride_b": "i32",
                  "stride_c": "i32", "na_ptr": f"*{acc}", "nb_ptr": f"*{acc}", "nc_ptr": f"*{acc}",
                  "lab_ptr": f"*{lab_ty or acc}", "bias_ptr": f"*{acc}", "cbias_ptr": f"*{acc}",
                  "rid_ptr": "*i64", "bid_ptr": "*i64", "cid_ptr": "*i64"}
        sizes = {"NA": "i32", "NB": "i32", "NC": "i32", "M": "i32", "D": "i32", "TUNE_M": "i32", "SPLITS": "i32"}
        head = f"lse D={d} {dt} normalize={normalize} {prec} ({family})"
        if which == "pq_bwd":  # per-query negatives' gradient: element-wise, one launch shape
            br, bd = K._small_blocks(d)
            sig = {"q_ptr": f"*{ty}", "c_ptr": f"*{ty}", "stride_q": "i32", "stride_c": "i32", "nq_ptr": f"*{acc}",
                   "nc_ptr": f"*{acc}", "par_ptr": f"*{acc}", "g_ptr": f"*{ty}", "lse_ptr": "*fp64",
                   "out_ptr": f"*{ty}", "N": "i32", "M": "i32", "D": "i32"}
            consts = {"NORMALIZE": normalize, "ACC": bmeta["ACC"], "EPS": K._EPS, "BLOCK_R": br, "BLOCK_D": bd}
            out.append(CompileTarget(f"per_query_neg_bwd D={d} {dt}", K._per_query_neg_bwd_kernel, sig, consts,
                                     4, 2, aligned))
            continue
        if which == "merge":  # the one-sweep CLIP forward's key-column merge (element-wise)
            if any(t.tag == f"col_lse_merge {acc}" for t in out):
                continue
            sig = {"cpart_ptr": f"*{acc}", "nblk_ptr": "*i32", "kpos_ptr": f"*{acc}", "lse_ptr": "*fp64",
                   "term_ptr": f"*{acc}", "NB": "i32", "RMAX": "i32"}
            out.append(CompileTarget(f"col_lse_merge {acc}", K._col_lse_merge_kernel, sig,
                                     {"ACC": bmeta["ACC"], "BLOCK_R": K._COL_MERGE_ROWS, "BLOCK": K._COL_MERGE_BLOCK}, 4, 3))
            continue
        if which == "fwd":
            kernel, families, meta = K._lse_fwd_kernel, K._LSE_FWD_FAMILIES, fmeta
            sig = dict(common, par_ptr=f"*{acc}", lse_ptr="*fp64", term_ptr=f"*{acc}", cnt_ptr=f"*{acc}",
                       part_ptr=f"*{acc}", cpart_ptr=f"*{acc}", kpos_ptr=f"*{acc}", nblk_ptr="*i32", **sizes,
                       RMAX="i32")
        else:
            kernel, families, meta = K._lse_bwd_kernel, K._LSE_BWD_FAMILIES, bmeta
            sig = dict(common, cnt_ptr=f"*{cnt_ty or acc}", par_ptr=f"*{acc}", g_ptr=f"*{ty}",
                       lse_r_ptr="*fp64", lse_c_ptr="*fp64", out_ptr=f"*{ty}", scratch_ptr=f"*{acc}",
                       tterm_ptr=f"*{acc}", **sizes)
        for cfg in K._family_configs(families, d, dtype, prec)[:width]:
            out.append(CompileTarget(f"{head} {which} {dict(flags)} {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}",
                                     kernel, sig, {**dict(flags), **meta, **cfg.kwargs}, cfg.num_warps,
                                     cfg.num_stages, aligned,
                                     wgmma=dtype in (torch.float16, torch.bfloat16)))
    return out
