#!/usr/bin/env python
"""GPU section of the Triton SupCon and InfoNCE / CLIP paths, imported by
`benchmarks/gpu_check.py`, which calls `contrastive_section(rows, failed, log)` (and
`compile_contrastive(build)` under --compile-only).

    python benchmarks/gpu_contrastive.py                 # this section alone (needs a GPU)
    python benchmarks/gpu_contrastive.py --compile-only  # no GPU: compile its kernel variants for sm_90

1. Correctness of `sslkernels.sup_con` / `sslkernels.info_nce` on cuda tensors (so the
   registered ops and their Triton launchers) in fp32 / fp16 / bf16 against the eager
   references in float64: loss and every gradient (features; query, key, a learnable
   temperature, a queue that requires grad), |fused - ref64| <= 2 |eager - ref64| +
   floor * max(|ref64|, natural scale); a second fused run must be bitwise equal.
2. Timings with `triton.testing.do_bench` against the eager references, fwd and fwd+bwd,
   bf16 and fp32, and peak memory above the inputs (torch.cuda.max_memory_allocated):
   sup_con N=8192 D=128 C=100; info_nce N=8192 D=256 K=16384 (MoCo queue, detached);
   CLIP symmetric N=8192 D=256 (no queue, learnable temperature). Per-query hard
   negatives [N, M, D] are checked, not timed.

Correctness runs on single launch configs (autotuning off: each op compiles several
kernel variants per dtype, ~1 s each); timings autotune. Rows are keyed (op, N, D, dtype)
as in gpu_check.py.
"""
from __future__ import annotations

import gc
import math
import os
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))

# (name, kind, N, D, classes or K, dtypes, options). The interpreter tests cover fp32 / fp16
# semantics on small shapes (no normalisation, symmetric + queue, ...); here the GPU-only
# risks: real tensor-core numerics, bf16, compiled layouts, odd D at realistic N. Checks
# share D with the timings so that their compiled variants are reused (~40 variants).
CHECKS = [
    ("sup_con", "sup_con", 1000, 128, 100, ["fp32", "fp16", "bf16"], {}),
    ("sup_con odd", "sup_con", 257, 130, 7, ["bf16"], {}),
    ("info_nce queue", "info_nce", 1000, 256, 3000, ["fp32", "fp16", "bf16"], {"queue_grad": True}),
    ("clip", "info_nce", 1000, 256, 0, ["fp32", "fp16", "bf16"], {"symmetric": True}),
    ("moco odd", "info_nce", 257, 130, 300, ["bf16"], {"in_batch": False, "queue_grad": True}),
    # per-query hard negatives [N, M, D] (here M = 7)
    ("hard negatives", "info_nce", 257, 130, 7, ["bf16"], {"per_query": True, "queue_grad": True}),
]
# (op label, kind, N, D, classes or K, options)
TIMINGS = [
    ("sup_con C=100", "sup_con", 8192, 128, 100, {}),
    ("info_nce K=16384", "info_nce", 8192, 256, 16384, {}),
    ("clip symmetric", "info_nce", 8192, 256, 0, {"symmetric": True}),
]
TIME_DTYPES = ["fp32", "bf16"]
CHECK_WIDTH = 1  # configs compiled per kernel variant of a check (--compile-only); timings autotune over 2
SUP_CON_T = 0.1
INFO_NCE_T = 0.07
DEVICE = "cuda"  # the checks' logic runs on "cpu" too (then through the C++ ops), for a dry test


def _host():
    """gpu_check.py's helpers (_median_ms, _peak_mb, DTYPES, REL_FLOOR, time_left, DIV16):
    the running script when it is gpu_check.py, else the module imported for this run."""
    main = sys.modules.get("__main__")
    if main is not None and all(hasattr(main, a) for a in ("_median_ms", "_peak_mb", "REL_FLOOR", "DIV16")):
        return main
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import gpu_check  # noqa: PLC0415  (argv is set by __main__ below)

    return gpu_check


# ---------------------------------------------------------------------------- inputs


def _inputs(kind, n, d, extra, dtype, opts, seed=0):
    """Device tensors (x, labels) for sup_con, (query, key, queue or None) for info_nce."""
    import torch

    g = torch.Generator(device=DEVICE).manual_seed(seed)
    scale = 1.0 if opts.get("normalize", True) else 1.0 / math.sqrt(d)
    if kind == "sup_con":
        labels = torch.randint(0, extra, (n,), generator=g, device=DEVICE)
        centers = torch.randn(extra, d, generator=g, device=DEVICE)
        x = centers[labels] + 0.9 * torch.randn(n, d, generator=g, device=DEVICE)
        return (x * scale).to(dtype), labels
    q = torch.randn(n, d, generator=g, device=DEVICE)
    k = q + 0.8 * torch.randn(n, d, generator=g, device=DEVICE)
    shape = (n, extra, d) if opts.get("per_query") else (extra, d)
    neg = torch.randn(*shape, generator=g, device=DEVICE) * scale if extra else None
    return (q * scale).to(dtype), (k * scale).to(dtype), None if neg is None else neg.to(dtype)


def _loss_fn(kind, impl, opts, labels=None):
    """fn(*leaves) -> loss, for the fused op (impl 'fused') or the eager reference."""
    import sslkernels
    from sslkernels.reference import info_nce_reference, sup_con_reference

    normalize = opts.get("normalize", True)
    if kind == "sup_con":
        f = sslkernels.sup_con if impl == "fused" else sup_con_reference
        return lambda x, t: f(x, labels, temperature=t, normalize=normalize)
    f = sslkernels.info_nce if impl == "fused" else info_nce_reference
    kw = dict(symmetric=opts.get("symmetric", False), normalize=normalize,
              in_batch_negatives=opts.get("in_batch", True))
    return lambda q, k, t, neg=None: f(q, k, t, negatives=neg, **kw)


def _loss_and_grads(fn, tensors, wants):
    """(loss, grads of the tensors flagged in `wants`) on fresh leaves."""
    import torch

    leaves = [x.detach().clone().requires_grad_(w) if isinstance(x, torch.Tensor) else x
              for x, w in zip(tensors, wants)]
    loss = fn(*leaves)
    grads = torch.autograd.grad(loss, [x for x, w in zip(leaves, wants) if w])
    return [loss.detach(), *grads]


# ---------------------------------------------------------------------------- correctness


def check_case(host, kind, n, d, extra, dt, opts):
    """-> (passed, message)."""
    import torch

    dtype = host.DTYPES[dt]
    normalize = opts.get("normalize", True)
    if kind == "sup_con":
        x, labels = _inputs(kind, n, d, extra, dtype, opts)
        t = SUP_CON_T if normalize else 0.5
        tensors, wants, names = [x, t], [True, False], ["loss", "dx"]
        run = {impl: _loss_fn(kind, impl, opts, labels) for impl in ("fused", "eager")}
        norm = float(x.double().norm(dim=1).mean())
    else:
        q, k, neg = _inputs(kind, n, d, extra, dtype, opts)
        tv = INFO_NCE_T if normalize else 0.5
        t = torch.tensor(tv, device=DEVICE)  # learnable, float32 on the device (as CLIP trains it)
        tensors = [q, k, t] + ([neg] if neg is not None else [])
        wants = [True, True, True] + ([opts.get("queue_grad", False)] if neg is not None else [])
        names = ["loss", "dquery", "dkey", "dtemperature"] + (["dqueue"] if neg is not None and wants[3] else [])
        run = {impl: _loss_fn(kind, impl, opts) for impl in ("fused", "eager")}
        norm = float(q.double().norm(dim=1).mean())
    tval = t if isinstance(t, float) else float(t)
    grad_scale = 1.0 / (tval * n * norm) if normalize else norm / (tval * n)
    fused = _loss_and_grads(run["fused"], tensors, wants)
    again = _loss_and_grads(run["fused"], tensors, wants)
    eager = _loss_and_grads(run["eager"], tensors, wants)
    ref = _loss_and_grads(run["eager"], [x.double() if isinstance(x, torch.Tensor) else x for x in tensors], wants)
    ok, msgs = True, []
    for what, f, f2, e, r in zip(names, fused, again, eager, ref):
        if f.shape != r.shape:
            ok = False
            msgs.append(f"{what}: shape {tuple(f.shape)} != {tuple(r.shape)}")
            continue
        if not torch.equal(f, f2):
            ok = False
            msgs.append(f"{what}: second run differs (not deterministic)")
        if not torch.isfinite(f.double()).all():
            ok = False
            msgs.append(f"{what}: NaN/Inf")
            continue
        natural = 1.0 if what == "loss" else (1.0 / tval if what == "dtemperature" else grad_scale)
        scale = max(float(r.abs().max()), natural)
        err_f = float((f.double() - r).abs().max())
        err_e = float((e.double() - r).abs().max())
        bound = 2 * err_e + host.REL_FLOOR[dtype] * scale
        ok = ok and err_f <= bound
        msgs.append(f"{what} err {err_f / scale:.1e} (eager {err_e / scale:.1e}, bound {bound / scale:.1e})"
                    + ("" if err_f <= bound else " FAIL"))
    return ok, "; ".join(msgs)


# ---------------------------------------------------------------------------- timing


def time_case(host, kind, impl, mode, n, d, extra, dtype, opts):
    """-> (ms, MB) or raises torch.cuda.OutOfMemoryError."""
    import torch

    if kind == "sup_con":
        x, labels = _inputs(kind, n, d, extra, dtype, opts, seed=1)
        leaves = [x.requires_grad_(True)]
        fn = _loss_fn(kind, impl, opts, labels)
        args = [leaves[0], SUP_CON_T]
    else:
        q, k, neg = _inputs(kind, n, d, extra, dtype, opts, seed=1)
        # CLIP: a learnable temperature on the device; MoCo: a float and a detached queue
        t = torch.tensor(INFO_NCE_T, device=DEVICE, requires_grad=True) if opts.get("symmetric") else INFO_NCE_T
        leaves = [q.requires_grad_(True), k.requires_grad_(True)] + ([t] if isinstance(t, torch.Tensor) else [])
        fn = _loss_fn(kind, impl, opts)
        args = [leaves[0], leaves[1], t, neg]

    try:
        return host.time_pass(fn, args, leaves, mode)
    finally:
        del leaves, args


# ---------------------------------------------------------------------------- section


def _row(rows, op, n, d, dt):
    return rows.setdefault((op, n, d, dt), {"pass": "-", "eager_ms": None, "fused_ms": None,
                                            "eager_mb": None, "fused_mb": None})


def contrastive_section(rows, failed, log):
    """Adds the rows and failures of SupCon and InfoNCE / CLIP (see the module docstring)."""
    import torch

    from sslkernels.kernels import contrastive as K

    host = _host()
    time_left = getattr(host, "time_left", lambda: float("inf"))
    autotune = K.AUTOTUNE
    K.AUTOTUNE = False  # correctness: one config per kernel variant (compile time)
    try:
        for name, kind, n, d, extra, dts, opts in CHECKS:
            for dt in dts:
                if time_left() < 60:
                    failed.append(f"{name} N={n} D={d} {dt}: skipped (deadline)")
                    continue
                try:
                    ok, msg = check_case(host, kind, n, d, extra, dt, opts)
                except Exception:  # noqa: BLE001
                    ok, msg = False, "EXCEPTION " + traceback.format_exc(limit=4)
                _row(rows, f"check:{name}", n, d, dt)["pass"] = "PASS" if ok else "FAIL"
                if not ok:
                    failed.append(f"{name} N={n} D={d} {dt}: {msg}")
                log(f"check {name} N={n} D={d} extra={extra} {dt}: {'PASS' if ok else 'FAIL'}  {msg}")
    finally:
        K.AUTOTUNE = autotune

    for label, kind, n, d, extra, opts in TIMINGS:
        for dt in TIME_DTYPES:
            for mode in ("fwd", "fwd+bwd"):
                r = _row(rows, f"{label} {mode}", n, d, dt)
                if time_left() < 40:
                    log(f"time {label} {mode} {dt}: skipped (deadline)")
                    continue
                for impl in ("fused", "eager"):
                    try:
                        r[f"{impl}_ms"], r[f"{impl}_mb"] = time_case(host, kind, impl, mode, n, d, extra,
                                                                    host.DTYPES[dt], opts)
                    except torch.cuda.OutOfMemoryError:
                        r[f"{impl}_ms"] = r[f"{impl}_mb"] = "OOM"
                        gc.collect()
                        torch.cuda.empty_cache()
                    except Exception:  # noqa: BLE001
                        r[f"{impl}_ms"] = r[f"{impl}_mb"] = "ERR"
                        failed.append(f"timing {impl} {label} {mode} {dt}: " + traceback.format_exc(limit=4))
                log(f"time {label} {mode} N={n} D={d} {dt}: eager {r['eager_ms']} ms {r['eager_mb']} MB, "
                    f"fused {r['fused_ms']} ms {r['fused_mb']} MB")
    for name in ("_lse_fwd_kernel", "_lse_bwd_kernel"):
        for key, cfg in getattr(getattr(K, name), "cache", {}).items():
            log(f"autotune {name} {key}: {cfg}")


# ---------------------------------------------------------------------------- compile-only


def _launch_plan(kind, d, dtype, opts):
    """[(kernel name, mode flags, labels pointer type, counts pointer type)] of one call, as
    the launchers issue them."""
    K = _kernels()
    if kind == "sup_con":
        return [("fwd", K._fwd_flags(1, False, True), "i64", None),
                ("bwd", K._bwd_flags(1, False, True, True, True, 0.0, False), "i64", "i32")]
    sym, ib, has_c = opts.get("symmetric", False), opts.get("in_batch", True), opts.get("K", 0) > 0
    per_q = has_c and opts.get("per_query", False)
    b_mode, dirs = (1 if ib else 2), (2 if sym else 1)
    out = [("fwd", K._fwd_flags(b_mode, has_c, False, per_q), None, None)]
    if sym:
        out.append(("fwd", K._fwd_flags(1, False, False), None, None))
    out.append(("bwd", K._bwd_flags(b_mode, has_c, False, True, sym, dirs, True, per_q), None, None))
    out.append(("bwd", K._bwd_flags(b_mode, False, False, sym, True, dirs, sym), None, None))
    if has_c and opts.get("queue_grad", False):
        out.append(("pq_bwd", {}, None, None) if per_q else
                   ("bwd", K._bwd_flags(1, False, False, False, True, 0.0, False), None, None))
    return out


def _kernels():
    from sslkernels.kernels import contrastive as K

    return K


def compile_contrastive(build):
    """Compile, for sm_90, every kernel variant and config the checks and timings launch
    (build: gpu_check.compile_only's compiler + ptxas report). -> number of failures."""
    import torch

    K = _kernels()
    host = _host()
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
    variants = {}  # (kernel, d, dtype, normalize, flags...) -> configs (as many as the launch tries)
    for kind, d, dt, opts, width in sorted(calls, key=str):
        opts = dict(opts)
        dtype = host.DTYPES[dt]
        normalize = opts.get("normalize", True)
        prec = K.FP32_PRECISION if dtype == torch.float32 else "ieee"  # TF32 off: the default
        for which, flags, lab_ty, cnt_ty in _launch_plan(kind, d, dtype, opts):
            key = (which, d, dt, normalize, prec, tuple(sorted(flags.items())), lab_ty, cnt_ty)
            variants[key] = max(variants.get(key, 0), width)
    failures = 0
    for (which, d, dt, normalize, prec, flags, lab_ty, cnt_ty), width in sorted(variants.items(), key=str):
        dtype = host.DTYPES[dt]
        family, fmeta, bmeta = K._plan(d, dtype, normalize, prec)
        ty, acc = tys[dtype], tys[K._acc_dtype(dtype)]
        host.DIV16.clear()
        host.DIV16.update({"D": d % 16 == 0, "stride_a": d % 16 == 0, "stride_b": d % 16 == 0,
                           "stride_c": d % 16 == 0})
        common = {"a_ptr": f"*{ty}", "b_ptr": f"*{ty}", "c_ptr": f"*{ty}", "stride_a": "i32", "stride_b": "i32",
                  "stride_c": "i32", "na_ptr": f"*{acc}", "nb_ptr": f"*{acc}", "nc_ptr": f"*{acc}",
                  "lab_ptr": f"*{lab_ty or acc}"}
        sizes = {"NA": "i32", "NB": "i32", "NC": "i32", "M": "i32", "D": "i32", "TUNE_M": "i32"}
        if which == "pq_bwd":  # per-query negatives' gradient: element-wise, one launch shape
            br, bd = K._small_blocks(d)
            sig = {"q_ptr": f"*{ty}", "c_ptr": f"*{ty}", "stride_q": "i32", "stride_c": "i32", "nq_ptr": f"*{acc}",
                   "nc_ptr": f"*{acc}", "par_ptr": f"*{acc}", "g_ptr": f"*{ty}", "lse_ptr": f"*{acc}",
                   "out_ptr": f"*{ty}", "N": "i32", "M": "i32", "D": "i32"}
            host.DIV16.update({"stride_q": d % 16 == 0, "stride_c": d % 16 == 0})
            consts = {"NORMALIZE": normalize, "ACC": bmeta["ACC"], "EPS": K._EPS, "BLOCK_R": br, "BLOCK_D": bd}
            tag = f"per_query_neg_bwd D={d} {dt}"
            try:
                build(K._per_query_neg_bwd_kernel, sig, consts, K.triton.Config({}, num_warps=4, num_stages=2), tag)
            except Exception as exc:  # noqa: BLE001
                failures += 1
                print(f"  {tag}: COMPILE FAILED: {type(exc).__name__}: {str(exc)[-1500:]}", flush=True)
            continue
        if which == "fwd":
            kernel, families, meta = K._lse_fwd_kernel, K._LSE_FWD_FAMILIES, fmeta
            sig = dict(common, par_ptr=f"*{acc}", lse_ptr=f"*{acc}", term_ptr=f"*{acc}", cnt_ptr=f"*{acc}", **sizes)
        else:
            kernel, families, meta = K._lse_bwd_kernel, K._LSE_BWD_FAMILIES, bmeta
            sig = dict(common, cnt_ptr=f"*{cnt_ty or acc}", par_ptr=f"*{acc}", g_ptr=f"*{ty}",
                       lse_r_ptr=f"*{acc}", lse_c_ptr=f"*{acc}", out_ptr=f"*{ty}", scratch_ptr=f"*{acc}",
                       tterm_ptr=f"*{acc}", **sizes)
        consts = {**dict(flags), **meta}
        print(f"{which} D={d} {dt} normalize={normalize} {prec}: family {family}, {dict(flags)}")
        for cfg in K._family_configs(families, d, dtype, prec)[:width]:
            tag = f"lse_{which} {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}"
            try:
                build(kernel, sig, consts, cfg, tag)
            except Exception as exc:  # noqa: BLE001
                failures += 1
                print(f"  {tag}: COMPILE FAILED: {type(exc).__name__}: {str(exc)[-1500:]}", flush=True)
    return failures


# ---------------------------------------------------------------------------- standalone


def main(argv):
    compile_only = "--compile-only" in argv
    sys.argv = [os.path.join(HERE, "gpu_check.py")] + (["--compile-only"] if compile_only else [])
    host = _host()
    import torch

    if compile_only:
        # gpu_check's compile_only() with its NT-Xent variants left out and this section's in
        # place of the spectral ones (its ptxas report and alignment rules reused)
        host.CHECK_D, host.TIME_D, host.EXTRAS = [], [], []
        host.compile_spectral = compile_contrastive
        return host.compile_only()
    if not torch.cuda.is_available():
        print("gpu_contrastive: no CUDA device; nothing to check here (use --compile-only without a GPU)")
        return 0
    rows, failed = {}, []
    contrastive_section(rows, failed, host.log)
    return host.report_section(rows, failed)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
