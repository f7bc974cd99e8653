"""NT-Xent (`sslkernels.nt_xent`): loss and both gradients in fp32 / fp16 / bf16 against
`nt_xent_reference` in float64 under the rule of `_core.judge`, a second fused run
bitwise equal; extras (fp64, no normalisation, TF32, row-strided views, an upstream
gradient of 0.37); timings fwd and fwdbwd against the eager reference, the step with the
column splits off (`nt_xent[unsplit]`) beside the default, and fp32 products on the FMA
units ("ieee") beside the tf32x3 default."""
from __future__ import annotations

import math

import torch

from benchmarks.gpu._core import (DTYPES, CompileTarget, Ctx, Row, timing_grid, fp32_precision, free, judge_all,
                                  log_timing, loss_and_grads, run_check, time_pass, timed)

NAME = "nt_xent"

CHECK_N, CHECK_D, CHECK_DTYPES, CHECK_T = [1, 257, 4096], [128, 130], ["fp32", "fp16", "bf16"], 0.1
TIME_N, TIME_D, TIME_DTYPES, TIME_T = [1024, 4096, 8192, 32768], [128, 256], ["bf16", "fp32"], 0.5
QUICK_N = [1024, 4096, 8192]
CHECK_TIMED_MAX_N = 8192  # timed shapes up to this N are also checked (same inputs' shape)
# (label, N, D, dtype, temperature, normalize, tf32, layout, upstream gradient)
EXTRAS = [
    ("fp64", 257, 130, "fp64", 0.3, True, False, "contiguous", 1.0),
    ("no-normalize", 257, 130, "fp32", 0.5, False, False, "contiguous", 1.0),
    ("tf32", 257, 128, "fp32", 0.1, True, True, "contiguous", 1.0),
    ("row-strided", 257, 128, "bf16", 0.1, True, False, "row-strided", 1.0),
    ("grad x0.37", 257, 128, "fp16", 0.1, True, False, "contiguous", 0.37),
]
# rehearsal: the same code on CPU tensors (bf16 is left to the GPU: the C++ path and the
# interpreter both handle it, but it is the slowest there)
R_CHECK_N, R_CHECK_D, R_CHECK_DTYPES = [1, 7], [16], ["fp32", "fp16"]
R_TIME_N, R_TIME_D, R_TIME_DTYPES = [33], [16], ["fp32"]


def label(n: int, d: int) -> str:
    from sslkernels._benchmark import get_op

    return get_op("nt_xent").shape_label({"n": n, "d": d})


def make_inputs(ctx: Ctx, n, d, dtype, normalize=True, layout="contiguous", seed=0):
    g = ctx.generator(seed)
    scale = 3.0 if normalize else 1.0 / math.sqrt(d)
    z1 = torch.randn(n, d, generator=g, device=ctx.device, dtype=torch.float32)
    z2 = z1 + 0.8 * torch.randn(n, d, generator=g, device=ctx.device, dtype=torch.float32)
    z1, z2 = (z1 * scale).to(dtype), (z2 * scale).to(dtype)
    if layout == "row-strided":  # views with row stride d + 8, read in place
        b1 = torch.full((n, d + 8), float("nan"), device=ctx.device, dtype=dtype)
        b2 = torch.full((n, d + 8), float("nan"), device=ctx.device, dtype=dtype)
        b1[:, 3: d + 3] = z1
        b2[:, 5: d + 5] = z2
        z1, z2 = b1[:, 3: d + 3], b2[:, 5: d + 5]
    return z1, z2


def _loss_and_grads(fn, z1, z2, t, normalize, grad):
    def call(a, b):
        return fn(a, b, temperature=t, normalize=normalize) * grad

    if z1.is_contiguous():
        return loss_and_grads(call, [z1, z2], [True, True])
    a, b = z1.detach().requires_grad_(True), z2.detach().requires_grad_(True)  # keep the strides
    out = call(a, b)
    return [out.detach(), *torch.autograd.grad(out, (a, b))]


def check_case(ctx: Ctx, n, d, dtype, t, normalize=True, tf32=False, layout="contiguous", grad=1.0):
    import sslkernels
    from sslkernels._tolerance import logit_bound  # the loss's terms: logits up to 1 / t
    from sslkernels.reference import nt_xent_reference

    with fp32_precision(tf32):
        z1, z2 = make_inputs(ctx, n, d, dtype, normalize, layout)
        fused = _loss_and_grads(sslkernels.nt_xent, z1, z2, t, normalize, grad)
        again = _loss_and_grads(sslkernels.nt_xent, z1, z2, t, normalize, grad)
        eager = _loss_and_grads(nt_xent_reference, z1, z2, t, normalize, grad)
        ref = _loss_and_grads(nt_xent_reference, z1.double(), z2.double(), t, normalize, grad)
        # judged under the switch: on a GPU, TF32 products take their own floor (_core.resolution_for)
        return judge_all(("loss", "dz1", "dz2"), fused, eager, ref, dtype, again,
                         terms=abs(grad) * logit_bound(z1, z2, temperature=t, normalize=normalize))


def check(ctx: Ctx) -> list[Row]:
    from sslkernels.kernels import contrastive as K

    autotune, K.AUTOTUNE = K.AUTOTUNE, False  # one (pinned) config per kernel variant: compile time
    # A key's choice is kept for the process (the Autotuner's and the launchers'), and
    # N = 4096 D = 128 is both checked and timed (one key): forgotten before, so the checks
    # run the pinned configs after timings (--time-first), and after, so the timings tune.
    _forget_tuning(K)
    try:
        return _check(ctx)
    finally:
        K.AUTOTUNE = autotune
        _forget_tuning(K)


def _forget_tuning(K) -> None:
    for launcher in (K._nt_xent_fwd, K._nt_xent_bwd):
        launcher.forget()


def _check(ctx: Ctx) -> list[Row]:
    rows = []
    ns, ds, dts = (R_CHECK_N, R_CHECK_D, R_CHECK_DTYPES) if ctx.rehearse else (CHECK_N, CHECK_D, CHECK_DTYPES)
    for dt in dts:
        for d in ds:
            for n in ns:
                row = Row("nt_xent", label(n, d), dt, "fwdbwd")
                rows.append(run_check(ctx, row, lambda: check_case(ctx, n, d, DTYPES[dt], CHECK_T)))
    if ctx.extras:
        for name, n, d, dt, t, normalize, tf32, layout, grad in EXTRAS:
            if ctx.rehearse:
                n, d = 7, 16
            row = Row(f"nt_xent[{name}]", label(n, d), dt, "fwdbwd")
            rows.append(run_check(ctx, row, lambda: check_case(ctx, n, d, DTYPES[dt], t, normalize, tf32,
                                                                layout, grad)))
    return rows


def time(ctx: Ctx) -> list[Row]:
    import sslkernels
    from sslkernels.reference import nt_xent_reference

    rows = []
    if ctx.rehearse:
        ns, ds, dts = R_TIME_N, R_TIME_D, R_TIME_DTYPES
    else:
        ns, ds, dts = (QUICK_N if ctx.quick else TIME_N), TIME_D, TIME_DTYPES
    for dt, d, n in timing_grid(ctx, "nt_xent", ns, ds, dts, label):
        dtype = DTYPES[dt]
        verdict = ""
        if n <= CHECK_TIMED_MAX_N:
            probe = run_check(ctx, Row("nt_xent", label(n, d), dt, "fwdbwd"),
                              lambda: check_case(ctx, n, d, dtype, TIME_T))
            verdict = probe.check
        z1, z2 = make_inputs(ctx, n, d, dtype, seed=1)
        for mode in ("fwd", "fwdbwd"):
            row = Row("nt_xent", label(n, d), dt, mode, check=verdict)
            for impl, fn in (("fused", sslkernels.nt_xent), ("eager", nt_xent_reference)):
                a = z1.detach().clone().requires_grad_(True)
                b = z2.detach().clone().requires_grad_(True)
                timed(ctx, row, impl, lambda: time_pass(ctx, lambda x, y: fn(x, y, temperature=TIME_T),
                                                        (a, b), [a, b], mode, graph=True))
            log_timing(ctx, row)
            rows.append(row)
        del z1, z2
        free(ctx)
    rows += _unsplit(ctx)
    rows += _fp32_products(ctx)
    return rows


def _unsplit(ctx: Ctx) -> list[Row]:
    """The step with the column splits turned off (lead 2 for NT-Xent): beside the default
    rows of the shapes that split (bf16 D = 128, N = 1024 and 4096 on 132 SMs), the same
    step as before the split, its check included (the unsplit kernels' key)."""
    import sslkernels
    from sslkernels.kernels import contrastive as K

    rows = []
    ns, d, dt = (R_TIME_N, R_TIME_D[0], R_TIME_DTYPES[0]) if ctx.rehearse else ([1024, 4096], 128, "bf16")
    forced = K.NT_XENT_FWD_SPLITS, K.NT_XENT_BWD_SPLITS
    K.NT_XENT_FWD_SPLITS = K.NT_XENT_BWD_SPLITS = 1
    try:
        for n in ns:
            if ctx.time_left() < 20:
                break
            row = run_check(ctx, Row("nt_xent[unsplit]", label(n, d), dt, "fwdbwd"),
                            lambda: check_case(ctx, n, d, DTYPES[dt], TIME_T))
            z1, z2 = make_inputs(ctx, n, d, DTYPES[dt], seed=1)
            a = z1.detach().clone().requires_grad_(True)
            b = z2.detach().clone().requires_grad_(True)
            timed(ctx, row, "fused", lambda: time_pass(ctx, lambda x, y: sslkernels.nt_xent(x, y, temperature=TIME_T),
                                                       (a, b), [a, b], "fwdbwd", graph=True))
            log_timing(ctx, row)
            rows.append(row)
            del z1, z2, a, b
            free(ctx)
    finally:
        K.NT_XENT_FWD_SPLITS, K.NT_XENT_BWD_SPLITS = forced
    return rows


def _fp32_products(ctx: Ctx) -> list[Row]:
    """fp32 products on the FMA units ("ieee") and as tf32x3 (the default with TF32 off)."""
    import sslkernels
    from sslkernels.kernels import contrastive as K

    rows = []
    n = R_TIME_N[0] if ctx.rehearse else 8192
    for d in (R_TIME_D if ctx.rehearse else TIME_D):
        if ctx.time_left() < 20:
            break
        z1, z2 = make_inputs(ctx, n, d, torch.float32, seed=1)
        default = K.FP32_PRECISION
        try:
            for prec in ("ieee", "tf32x3"):
                K.FP32_PRECISION = prec
                row = run_check(ctx, Row(f"nt_xent[{prec}]", label(n, d), "fp32", "fwdbwd"),
                                lambda: check_case(ctx, 257 if not ctx.rehearse else 7, d, torch.float32, TIME_T))
                a = z1.detach().clone().requires_grad_(True)
                b = z2.detach().clone().requires_grad_(True)
                timed(ctx, row, "fused", lambda: time_pass(ctx, lambda x, y: sslkernels.nt_xent(x, y, temperature=TIME_T),
                                                           (a, b), [a, b], "fwdbwd"))
                log_timing(ctx, row)
                rows.append(row)
        finally:
            K.FP32_PRECISION = default
        del z1, z2
        free(ctx)
    return rows


def compile_targets(ctx: Ctx) -> list[CompileTarget]:
    """Every NT-Xent kernel variant and config the checks and timings launch."""
    import triton
    import triton.language as tl

    from sslkernels.kernels import contrastive as K

    tys = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
    cases = {(d, DTYPES[dt], True, "ieee") for d in CHECK_D + TIME_D for dt in CHECK_DTYPES}
    cases |= {(e[2], DTYPES[e[3]], e[5], "tf32" if e[6] else "ieee") for e in EXTRAS}
    cases |= {(1, torch.bfloat16, True, "ieee"), (512, torch.bfloat16, True, "ieee")}  # edges
    out = []
    for d, dtype, normalize, prec in sorted(cases, key=str):
        if dtype != torch.float32:
            prec = "ieee"
        elif prec == "ieee":  # the TF32 switch off: the kernel's fp32 default
            prec = K.FP32_PRECISION
        family, fmeta, bmeta = K._plan(d, dtype, normalize, prec)
        ty, acc = tys[dtype], tys[K._acc_dtype(dtype)]
        aligned = ("D", "stride1", "stride2") if d % 16 == 0 else ()
        common = {"z1_ptr": f"*{ty}", "z2_ptr": f"*{ty}", "stride1": "i32", "stride2": "i32", "norm_ptr": f"*{acc}"}
        fsig = dict(common, lse_ptr="*fp64", partial_ptr="*fp64", ticket_ptr="*i32", loss_ptr=f"*{ty}",
                    part_ptr=f"*{acc}", N="i32", D="i32", TUNE_M="i32", SPLITS="i32",
                    scale_hi="fp32", scale_lo="fp32")
        bsig = dict(common, lse_ptr="*fp64", g_ptr=f"*{ty}", out1_ptr=f"*{ty}", out2_ptr=f"*{ty}",
                    scratch_ptr=f"*{acc}", N="i32", D="i32", TUNE_M="i32", SPLITS="i32", scale_hi="fp32",
                    scale_lo="fp32", c_hi="fp32", c_lo="fp32")
        one = {}
        if d == 1:  # a unit row stride is specialised to the constant 1 at run time
            for sig in (fsig, bsig):
                sig.pop("stride1"), sig.pop("stride2")
            one = {"stride1": 1, "stride2": 1}
        head = f"nt_xent D={d} {ty} normalize={normalize} {prec} ({family})"
        half = dtype in (torch.float16, torch.bfloat16)
        fmeta = dict(fmeta, RED_BLOCK=K._RED_BLOCK)  # the NT-Xent forward's own (folded loss)
        # the column split (lead 2) where the timed shapes' grids leave SMs idle
        variants = [("fwd", K._nt_xent_fwd_kernel, K._FWD_FAMILIES, fsig, dict(fmeta, SPLIT=False)),
                    ("fwd split", K._nt_xent_fwd_kernel, K._FWD_FAMILIES, fsig, dict(fmeta, SPLIT=True)),
                    ("bwd", K._nt_xent_bwd_kernel, K._BWD_FAMILIES, bsig, dict(bmeta, SPLIT=False)),
                    ("bwd split", K._nt_xent_bwd_kernel, K._BWD_FAMILIES, bsig, dict(bmeta, SPLIT=True))]
        for which, kernel, fams, sig, meta in variants:
            for c in K._family_configs(fams, d, dtype, prec):
                out.append(CompileTarget(f"{head} {which} {c.kwargs} w{c.num_warps} s{c.num_stages}", kernel, sig,
                                         {**one, **meta, **c.kwargs}, c.num_warps, c.num_stages, aligned,
                                         wgmma=half and d >= 16))
        br, bd = K._small_blocks(d)
        small = triton.Config({}, num_warps=4, num_stages=2)
        # the split forward's merge (lse and the folded loss)
        msig = {"part_ptr": f"*{acc}", "lse_ptr": "*fp64", "partial_ptr": "*fp64", "ticket_ptr": "*i32",
                "loss_ptr": f"*{ty}", "N": "i32", "SPLITS": "i32"}
        out.append(CompileTarget(f"{head} lse_merge", K._nt_xent_lse_merge_kernel, msig,
                                 {"BLOCK_R": K._LSE_MERGE_ROWS, "RED_BLOCK": K._RED_BLOCK},
                                 small.num_warps, None))  # launched without num_stages: Triton's default
        if normalize:
            nsig = ({**common, "N": "i32", "D": "i32"} if d != 1 else
                    {"z1_ptr": f"*{ty}", "z2_ptr": f"*{ty}", "norm_ptr": f"*{acc}", "N": "i32", "D": "i32"})
            out.append(CompileTarget(f"{head} row_norm", K._row_norm_kernel, nsig,
                                     {**one, "ACC": getattr(tl, {"fp32": "float32", "fp64": "float64"}[acc]),
                                      "EPS": K._EPS, "BLOCK_R": br, "BLOCK_D": bd},
                                     small.num_warps, small.num_stages, aligned))
        # the scratch's finishing kernel: unsplit (D > BLOCK_DO with normalisation) and the split
        # backward's merge (every case; normalize as the case's)
        nsig = {"scratch_ptr": f"*{acc}", **common, "out1_ptr": f"*{ty}", "out2_ptr": f"*{ty}",
                "N": "i32", "D": "i32", "SPLITS": "i32", "SLICE": "i32"}
        if d == 1:
            nsig.pop("stride1"), nsig.pop("stride2")
        out.append(CompileTarget(f"{head} grad_finish", K._grad_finish_kernel, nsig,
                                 {**one, "NORMALIZE": normalize, "ACC": bmeta["ACC"], "EPS": K._EPS,
                                  "BLOCK_R": br, "BLOCK_D": bd},
                                 small.num_warps, None, aligned))  # (Triton's default num_stages, as launched)
    return out
