#!/usr/bin/env python
"""The one prepared script for a GPU machine: the Triton NT-Xent path.

    pip install -e .                      # first (builds the C++ core too)
    python benchmarks/gpu_check.py        # checks, timings, one table last (~3-5 min on an H100)
    python benchmarks/gpu_check.py --dry-run        # no GPU: import and print the plan
    python benchmarks/gpu_check.py --compile-only   # no GPU: compile every kernel variant of
                                                    # the plan for sm_90 (ptxas), report spills

1. Prints the device, torch and triton versions.
2. Checks `sslkernels.nt_xent` on cuda tensors (so the registered op and its Triton
   launchers) in fp32 / fp16 / bf16 against `nt_xent_reference` in float64, loss and
   both gradients: |fused - ref64| <= 2 |eager - ref64| + floor * max(|ref64|, natural
   scale), eager being the same reference in the inputs' dtype. Also: bitwise
   determinism of a second run, and a few extra cases (fp64, no normalisation, TF32,
   row-strided inputs, an upstream gradient of 0.37).
3. Times eager (`nt_xent_reference`) against fused with `triton.testing.do_bench`,
   forward and forward+backward, and the peak memory above the inputs
   (torch.cuda.max_memory_allocated). Eager may run out of memory: printed as OOM.
4. Prints one table last. Exits 1 if any correctness check failed.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import math
import os
import sys
import time
import traceback

P = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
P.add_argument("--dry-run", action="store_true", help="import, print the plan, exit (no GPU needed)")
P.add_argument("--compile-only", action="store_true",
               help="compile every kernel variant of the plan for sm_90 with ptxas (no GPU needed)")
P.add_argument("--no-autotune", action="store_true", help="one default config per kernel (SSLKERNELS_AUTOTUNE=0)")
P.add_argument("--quick", action="store_true", help="timings for N <= 8192 only")
P.add_argument("--no-extras", action="store_true", help="skip the extra correctness cases")
P.add_argument("--deadline", type=float, default=0.0,
               help="seconds: past it, remaining checks and timings are skipped and the table printed")
ARGS = P.parse_args()
if ARGS.no_autotune:
    os.environ["SSLKERNELS_AUTOTUNE"] = "0"  # read when the kernel module is imported

import torch  # noqa: E402
import triton  # noqa: E402

import sslkernels  # noqa: E402
from sslkernels.reference import nt_xent_reference  # noqa: E402

T0 = time.time()
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
# floor of the tolerance rule, relative to max(|ref64|, the natural scale of the quantity)
REL_FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}

CHECK_N = [1, 257, 4096]
CHECK_D = [128, 130]
CHECK_DTYPES = ["fp32", "fp16", "bf16"]
CHECK_T = 0.1
TIME_N = [1024, 4096, 8192, 32768]
TIME_D = [128, 256]
TIME_DTYPES = ["fp32", "bf16"]
TIME_T = 0.5
CHECK_TIMED_MAX_N = 8192  # timing rows up to this N also get the correctness check
# (name, N, D, dtype, temperature, normalize, tf32, layout, upstream gradient)
EXTRAS = [
    ("fp64", 257, 130, "fp64", 0.3, True, False, "contiguous", 1.0),
    ("no-normalize", 257, 130, "fp32", 0.5, False, False, "contiguous", 1.0),
    ("tf32", 257, 128, "fp32", 0.1, True, True, "contiguous", 1.0),
    ("row-strided", 257, 128, "bf16", 0.1, True, False, "row-strided", 1.0),
    ("grad x0.37", 257, 128, "fp16", 0.1, True, False, "contiguous", 0.37),
]


def timed_sizes():
    return [n for n in TIME_N if n in (1024, 8192)] if ARGS.quick else TIME_N


def time_left():
    return float("inf") if ARGS.deadline <= 0 else ARGS.deadline - (time.time() - T0)


def log(msg):
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def plan_lines():
    time_n = timed_sizes()
    lines = [
        f"checks : N {CHECK_N} x D {CHECK_D} x {CHECK_DTYPES}, t={CHECK_T}, normalize, fwd+bwd vs fp64 "
        "reference (2x eager rule) + determinism",
        f"timings: N {time_n} x D {TIME_D} x {TIME_DTYPES}, t={TIME_T}: fwd and fwd+bwd, do_bench + peak MB",
    ]
    lines.append(f"svdvals: {SPEC_SHAPES} x {SPEC_DTYPES}: sslkernels.svdvals + jacobi_svdvals vs float64 "
                 f"torch.linalg.svdvals; timed vs torch drivers {SPEC_DRIVERS}")
    if not ARGS.no_extras:
        lines += [f"extra  : {e[0]}: N={e[1]} D={e[2]} {e[3]} t={e[4]} normalize={e[5]} tf32={e[6]} "
                  f"{e[7]} grad={e[8]}" for e in EXTRAS]
    return lines


# ---------------------------------------------------------------------------- inputs / rule


def make_inputs(n, d, dtype, normalize, layout="contiguous", seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    scale = 3.0 if normalize else 1.0 / math.sqrt(d)
    z1 = torch.randn(n, d, generator=g, device="cuda", dtype=torch.float32)
    z2 = z1 + 0.8 * torch.randn(n, d, generator=g, device="cuda", dtype=torch.float32)
    z1, z2 = (z1 * scale).to(dtype), (z2 * scale).to(dtype)
    if layout == "row-strided":  # views with row stride d + 8, read in place
        b1 = torch.zeros(n, d + 8, device="cuda", dtype=dtype)
        b2 = torch.zeros(n, d + 8, device="cuda", dtype=dtype)
        b1[:, 3 : d + 3] = z1
        b2[:, 5 : d + 5] = z2
        z1, z2 = b1[:, 3 : d + 3], b2[:, 5 : d + 5]
    return z1, z2


def loss_and_grads(fn, z1, z2, t, normalize, grad=1.0):
    a = z1.detach().clone().requires_grad_(True) if z1.is_contiguous() else z1.detach().requires_grad_(True)
    b = z2.detach().clone().requires_grad_(True) if z2.is_contiguous() else z2.detach().requires_grad_(True)
    loss = fn(a, b, temperature=t, normalize=normalize)
    ga, gb = torch.autograd.grad(loss * grad, (a, b))
    return loss.detach(), ga, gb


def natural_scales(z1, z2, t, normalize):
    m = 2 * z1.shape[0]
    norm = float(torch.cat([z1, z2]).double().norm(dim=1).mean())
    g = 1.0 / (t * m * norm) if normalize else norm / (t * m)
    return 1.0, g, g


def check_case(n, d, dtype, t, normalize, tf32=False, layout="contiguous", grad=1.0):
    """-> (passed, message). Compares fused and eager (same dtype) to the fp64 reference."""
    matmul = torch.backends.cuda.matmul
    prev = matmul.allow_tf32
    prev_prec = getattr(matmul, "fp32_precision", None)
    matmul.allow_tf32 = tf32
    if prev_prec is not None:  # torch >= 2.9: the knob eager reads
        matmul.fp32_precision = "tf32" if tf32 else "ieee"
    try:
        z1, z2 = make_inputs(n, d, dtype, normalize, layout)
        fused = loss_and_grads(sslkernels.nt_xent, z1, z2, t, normalize, grad)
        again = loss_and_grads(sslkernels.nt_xent, z1, z2, t, normalize, grad)
        eager = loss_and_grads(nt_xent_reference, z1, z2, t, normalize, grad)
        ref = loss_and_grads(nt_xent_reference, z1.double(), z2.double(), t, normalize, grad)
    finally:
        matmul.allow_tf32 = prev
        if prev_prec is not None:
            matmul.fp32_precision = prev_prec
    ok, worst = True, []
    for what, f, f2, e, r, sc in zip(("loss", "dz1", "dz2"), fused, again, eager, ref,
                                     natural_scales(z1, z2, t, normalize)):
        if f.dtype != dtype or f.shape != r.shape:
            ok = False
            worst.append(f"{what}: dtype/shape {f.dtype} {tuple(f.shape)}")
            continue
        if not torch.equal(f, f2):
            ok = False
            worst.append(f"{what}: second run differs (not deterministic)")
        if not torch.isfinite(f.double()).all():
            ok = False
            worst.append(f"{what}: NaN/Inf")
            continue
        err_f = float((f.double() - r).abs().max())
        err_e = float((e.double() - r).abs().max())
        scale = max(float(r.abs().max()), sc * abs(grad) if what != "loss" else sc)
        # TF32 keeps fp16's 10-bit mantissa: the fp16 floor (cuBLAS may not use TF32 for eager)
        bound = 2 * err_e + REL_FLOOR[torch.float16 if tf32 else dtype] * scale
        if not err_f <= bound:
            ok = False
        worst.append(f"{what} err {err_f / scale:.1e} (eager {err_e / scale:.1e}, bound {bound / scale:.1e})")
    return ok, "; ".join(worst)


# ---------------------------------------------------------------------------- timing / memory


def _median_ms(fn, grad_to_none=None):
    from triton.testing import do_bench

    r = do_bench(fn, warmup=10, rep=40, grad_to_none=grad_to_none, quantiles=[0.5])
    return float(r[0] if isinstance(r, (list, tuple)) else r)


def _peak_mb(fn):
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def time_pass(fn, args, leaves, mode, grad=None, no_grad_fwd=False):
    """-> (ms, MB) of ``fn(*args)`` ("fwd"; under no_grad if ``no_grad_fwd``) or of
    ``fn(*args).backward(grad)`` ("fwd+bwd"): median do_bench time, and the peak memory of
    one step above what was allocated before it. Compiles / autotunes outside the
    measurements; raises torch.cuda.OutOfMemoryError. Shared by every family's section."""
    if mode == "fwd":
        def step():
            with torch.set_grad_enabled(not no_grad_fwd):
                fn(*args)
    else:
        def step():
            fn(*args).backward(grad)

    def clear():
        for leaf in leaves:
            leaf.grad = None

    def one():  # memory of one step, gradients not yet allocated
        clear()
        step()

    try:
        step()
        clear()
        mb = _peak_mb(one)
        ms = _median_ms(step, grad_to_none=leaves)
        return ms, mb
    finally:
        clear()
        gc.collect()
        torch.cuda.empty_cache()


def time_case(impl, op, z1, z2, t):
    """NT-Xent: -> (ms, MB) or raises torch.cuda.OutOfMemoryError."""
    a = z1.detach().clone().requires_grad_(True)
    b = z2.detach().clone().requires_grad_(True)
    return time_pass(lambda x, y: impl(x, y, temperature=t), (a, b), [a, b], op)


def report_section(rows, failed):
    """A family section run on its own (python benchmarks/gpu_<family>.py): its rows and
    failures, printed plainly; -> the exit status."""
    for (op, n, d, dt), r in rows.items():
        print(f"{op:48s} {str(n):28s} D={d:4d} {dt}: {r}")
    for f in failed:
        print("FAIL " + f)
    print(f"{'FAILED' if failed else 'ALL CHECKS PASSED'} ({len(failed)} failure(s))")
    return 1 if failed else 0


# ---------------------------------------------------------------------------- spectral (svdvals)

SPEC_SHAPES = [(4096, 32, 32), (512, 128, 128), (100, 65, 33)]
SPEC_DTYPES = ["fp32", "fp64"]
SPEC_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}  # error / sigma_max vs float64 LAPACK
SPEC_DRIVERS = [None, "gesvd", "gesvdj", "gesvda"]
SPEC_DRIVER_MAX_MS = 200.0  # drivers slower than this on a shape are timed once, not per driver


def _spec_error(S, ref):
    """max |S - ref| / sigma_max per matrix, against the float64 LAPACK values on the CPU."""
    return ((S.double().cpu() - ref).abs() / ref.amax(-1, keepdim=True).clamp_min(1e-300)).amax(-1)


def spectral_section(rows, failed):
    """Checks the registered op and the Jacobi launcher against float64 LAPACK (on the CPU:
    cuSOLVER's batched Jacobi is itself under test), and the eager driver's own error
    beside it; on a failure, retries the launcher with other warp counts and prints which
    pass. Times the op against each torch driver."""
    from sslkernels.kernels import spectral as SK

    op = getattr(sslkernels, "svdvals", None)
    for (b, m, n) in SPEC_SHAPES:
        for dt in SPEC_DTYPES:
            if time_left() < 90:
                log(f"svdvals {b}x{m}x{n} {dt}: skipped (deadline)")
                continue
            dtype = DTYPES[dt]
            g = torch.Generator(device="cuda").manual_seed(b + m + n)
            A = torch.randn(b, m, n, generator=g, device="cuda", dtype=torch.float64).to(dtype)
            ref = torch.linalg.svdvals(A.double().cpu())
            eager_err = float(_spec_error(torch.linalg.svdvals(A), ref).max())
            tol = SPEC_TOL[dtype]  # 1e-5 at 128 x 128 fp32 too (Rutishauser rotations; run 1: 1.8e-5)
            r = rows.setdefault(("svdvals", b, f"{m}x{n}", dt),
                                {"pass": "-", "eager_ms": None, "fused_ms": None, "eager_mb": None,
                                 "fused_mb": None})
            msgs, ok = [], True
            for name, fn in (("jacobi", lambda: SK.jacobi_svdvals(A)), ("op", (lambda: (op(A), None)) if op else None)):
                if fn is None:
                    ok = False
                    msgs.append("sslkernels.svdvals not available")
                    continue
                try:
                    S, info = fn()
                    errs = _spec_error(S, ref)
                    err = float(errs.max())
                    good = S.shape == ref.shape and bool(torch.isfinite(S).all()) and err <= tol
                    if info is not None:
                        good = good and bool((info == 0).all())
                    msgs.append(f"{name} err {err:.1e}")
                    if not good:
                        bad = int((errs > tol).sum())
                        msgs.append(f"[{name} FAIL: {bad}/{b} matrices over tol; S max {float(S.max()):.3e} "
                                    f"ref max {float(ref.max()):.3e}; unconverged "
                                    f"{int((info != 0).sum()) if info is not None else '-'}]")
                        if name == "jacobi":  # which launch shapes are right on this GPU?
                            for w in (1, 2, 4, 8, 16):
                                S2, i2 = SK.jacobi_svdvals(A, num_warps=w)
                                msgs.append(f"[w{w}: err {float(_spec_error(S2, ref).max()):.1e}, "
                                            f"unconverged {int((i2 != 0).sum())}]")
                    ok = ok and good
                except Exception:  # noqa: BLE001
                    ok = False
                    msgs.append(f"{name} EXCEPTION " + traceback.format_exc(limit=3))
            msg = "; ".join(msgs) + f" (tol {tol:.0e}; torch default driver err {eager_err:.1e})"
            r["pass"] = "PASS" if ok else "FAIL"
            if not ok:
                failed.append(f"svdvals {b}x{m}x{n} {dt}: {msg}")
            if op is not None:
                try:
                    r["fused_ms"] = _median_ms(lambda: op(A))
                except Exception:  # noqa: BLE001
                    r["fused_ms"] = "ERR"
            try:  # "eager" column: torch.linalg.svdvals with the default driver
                r["eager_ms"] = _median_ms(lambda: torch.linalg.svdvals(A))
            except Exception:  # noqa: BLE001
                r["eager_ms"] = "ERR"
            log(f"svdvals {b}x{m}x{n} {dt}: {r['pass']} {msg}; {r['fused_ms']} ms vs torch {r['eager_ms']} ms")
            other = not SK.USE_GATHER  # the variant the op does not use by default
            rg = rows.setdefault((f"svdvals [gather={other}]", b, f"{m}x{n}", dt),
                                 {"pass": "-", "eager_ms": r["eager_ms"], "fused_ms": None, "eager_mb": None,
                                  "fused_mb": None})
            try:
                S, info = SK.jacobi_svdvals(A, gather=other)
                err = float(_spec_error(S, ref).max())
                rg["pass"] = "PASS" if err <= tol and bool((info == 0).all()) else "FAIL"
                rg["fused_ms"] = _median_ms(lambda: SK.jacobi_svdvals(A, gather=other))
                log(f"svdvals gather={other} {b}x{m}x{n} {dt}: {rg['pass']} err {err:.1e}; {rg['fused_ms']} ms")
            except Exception:  # noqa: BLE001  (an unproven variant: recorded, not a failure of the op)
                rg["pass"] = "ERR"
                log(f"svdvals gather={other} {b}x{m}x{n} {dt}: " + traceback.format_exc(limit=3))
            slow = isinstance(r["eager_ms"], float) and r["eager_ms"] > SPEC_DRIVER_MAX_MS
            for drv in ([] if slow else SPEC_DRIVERS[1:]):
                rd = rows.setdefault((f"svdvals torch[{drv}]", b, f"{m}x{n}", dt),
                                     {"pass": "-", "eager_ms": None, "fused_ms": r["fused_ms"], "eager_mb": None,
                                      "fused_mb": None})
                try:
                    rd["eager_ms"] = _median_ms(lambda: torch.linalg.svdvals(A, driver=drv))
                except Exception as exc:  # noqa: BLE001  (a driver may refuse a shape: not a failure)
                    rd["eager_ms"] = "ERR"
                    log(f"torch svdvals driver={drv} {b}x{m}x{n} {dt}: {type(exc).__name__}")
            A = ref = None  # free before the next shape (not `del`: the lambdas above name A)
            gc.collect()
            torch.cuda.empty_cache()


def compile_spectral(build):
    """Compile the Jacobi kernel for every (BLOCK_M, BLOCK_N, dtype) of the plan."""
    from sslkernels.kernels import spectral as SK

    failures = 0
    cases = set()
    for (_, m, n) in SPEC_SHAPES + [(1, 7, 5), (1, 1, 1)]:
        mm, nn = max(m, n), min(m, n)
        for dt in SPEC_DTYPES:
            cases.add((SK._blocks(mm, nn), dt))
    for (bm, bn), dt in sorted(cases):
        dtype = DTYPES[dt]
        ty = {"fp32": "fp32", "fp64": "fp64"}[dt]
        sig = {"a_ptr": f"*{ty}", "s_ptr": f"*{ty}", "info_ptr": "*i32", "scratch_ptr": f"*{ty}",
               "M": "i32", "N": "i32", "stride_b": "i64", "stride_m": "i32", "stride_n": "i32",
               "stride_sb": "i32", "max_sweeps": "i32", "tol": "fp32"}
        cfg = triton.Config({}, num_warps=SK._num_warps(bm, bn, dtype), num_stages=1)
        for gather in (False, True):
            consts = {"ACC": SK._TL[dtype], "BLOCK_M": bm, "BLOCK_N": bn, "USE_GATHER": gather}
            tag = f"jacobi_svdvals {dt} BLOCK {bm}x{bn} w{cfg.num_warps} gather={gather}"
            DIV16.clear()
            try:
                build(SK._jacobi_svdvals_kernel, sig, consts, cfg, tag)
            except Exception as exc:  # noqa: BLE001
                failures += 1
                print(f"  {tag}: COMPILE FAILED: {type(exc).__name__}: {str(exc)[-1500:]}", flush=True)
    return failures


# ---------------------------------------------------------------------------- compile-only


def compile_only():
    """Compile every kernel variant the plan would launch, for sm_90, without a GPU."""
    import re
    import subprocess

    import triton.language as tl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    from sslkernels.kernels import contrastive as K

    target = GPUTarget("cuda", 90, 32)
    ptxas = None
    for name in ("ptxas-blackwell", "ptxas"):
        cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.exists(cand):
            ptxas = cand
            break
    tys = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}

    def jit_fn(k):
        while not isinstance(k, triton.runtime.jit.JITFunction):
            k = k.fn
        return k

    def build(kernel, sig, consts, cfg, tag):
        fn = jit_fn(kernel)
        names = fn.arg_names
        consts = {**consts, **cfg.kwargs}
        full = {k: sig[k] if k in sig else "constexpr" for k in names}  # in the kernel's order
        assert set(full) == set(sig) | set(consts), (sorted(full), sorted(sig), sorted(consts))
        # alignment as at run time: pointers 16-byte aligned, sizes/strides divisible by 16
        attrs = {(names.index(k),): BaseBackend.parse_attr("D") for k, v in sig.items()
                 if v.startswith("*") or (k in DIV16 and DIV16[k])}
        src = ASTSource(fn, full, constexprs=consts, attrs=attrs)
        opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        t = time.time()
        ck = triton.compile(src, target=target, options=opts)
        info = ""
        if ptxas:
            with open("/tmp/_sslk_gpu_check.ptx", "w") as f:
                f.write(ck.asm["ptx"])
            out = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", "/tmp/_sslk_gpu_check.ptx", "-o",
                                  "/tmp/_sslk_gpu_check.o"], capture_output=True, text=True)
            regs = re.findall(r"Used (\d+) registers", out.stderr)
            spill = re.findall(r"(\d+) bytes spill stores", out.stderr)
            info = f"regs {regs[0] if regs else '?'} spill {spill[0] if spill else '?'}B" + (
                "" if out.returncode == 0 else f" PTXAS FAILED: {out.stderr[-300:]}")
        print(f"  {tag:70s} {time.time() - t:5.1f}s smem {ck.metadata.shared:6d} {info}", flush=True)

    cases = {(n_, d, DTYPES[dt], True, "ieee") for n_ in (4096,) for d in CHECK_D + TIME_D for dt in CHECK_DTYPES}
    cases |= {(257, e[2], DTYPES[e[3]], e[5], "tf32" if e[6] else "ieee") for e in EXTRAS}
    cases |= {(257, 1, torch.bfloat16, True, "ieee"), (257, 512, torch.bfloat16, True, "ieee")}  # edges
    failures = 0
    for (_, d, dtype, normalize, prec) in sorted(cases, key=str):
        if dtype == torch.float16 and prec == "tf32":
            continue
        if dtype != torch.float32:
            prec = "ieee"
        elif prec == "ieee":  # the TF32 switch off: the kernel's fp32 default
            prec = K.FP32_PRECISION
        family, fmeta, bmeta = K._plan(d, dtype, normalize, prec)
        ty, acc = tys[dtype], tys[K._acc_dtype(dtype)]
        DIV16.clear()
        DIV16.update({"D": d % 16 == 0, "stride1": d % 16 == 0, "stride2": d % 16 == 0})
        print(f"D={d} {ty} normalize={normalize} {prec}: family {family}, fwd {fmeta}, bwd {bmeta}")
        common = {"z1_ptr": f"*{ty}", "z2_ptr": f"*{ty}", "stride1": "i32", "stride2": "i32", "norm_ptr": f"*{acc}"}
        fsig = dict(common, lse_ptr=f"*{acc}", loss_ptr=f"*{acc}", N="i32", D="i32", TUNE_M="i32",
                    scale_hi="fp32", scale_lo="fp32")
        bsig = dict(common, lse_ptr=f"*{acc}", g_ptr=f"*{ty}", out1_ptr=f"*{ty}", out2_ptr=f"*{ty}",
                    scratch_ptr=f"*{acc}", N="i32", D="i32", TUNE_M="i32", scale_hi="fp32", scale_lo="fp32",
                    c_hi="fp32", c_lo="fp32")
        if d == 1:  # a unit row stride is specialised to the constant 1 at run time
            for sig in (fsig, bsig):
                sig.pop("stride1"), sig.pop("stride2")
        one = {"stride1": 1, "stride2": 1} if d == 1 else {}
        jobs = [(K._nt_xent_fwd_kernel, fsig, {**one, **fmeta}, c, "fwd")
                for c in K._family_configs(K._FWD_FAMILIES, d, dtype, prec)]
        jobs += [(K._nt_xent_bwd_kernel, bsig, {**one, **bmeta}, c, "bwd")
                 for c in K._family_configs(K._BWD_FAMILIES, d, dtype, prec)]
        br, bd = K._small_blocks(d)
        small = triton.Config({}, num_warps=4, num_stages=2)
        if normalize:
            jobs.append((K._row_norm_kernel, {k: v for k, v in common.items()} | {"N": "i32", "D": "i32"}
                         if d != 1 else {"z1_ptr": f"*{ty}", "z2_ptr": f"*{ty}", "norm_ptr": f"*{acc}",
                                         "N": "i32", "D": "i32"},
                         {**one, "ACC": getattr(tl, {"fp32": "float32", "fp64": "float64"}[acc]), "EPS": K._EPS,
                          "BLOCK_R": br, "BLOCK_D": bd}, small, "row_norm"))
        if not bmeta["FUSED_OUT"]:
            nsig = {"scratch_ptr": f"*{acc}", **common, "out1_ptr": f"*{ty}", "out2_ptr": f"*{ty}",
                    "N": "i32", "D": "i32"}
            jobs.append((K._norm_bwd_kernel, nsig, {"ACC": bmeta["ACC"], "EPS": K._EPS, "BLOCK_R": br,
                                                     "BLOCK_D": bd}, small, "norm_bwd"))
        for kernel, sig, consts, cfg, name in jobs:
            tag = f"{name} {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}"
            try:
                build(kernel, sig, consts, cfg, tag)
            except Exception as exc:  # noqa: BLE001
                failures += 1
                print(f"  {tag}: COMPILE FAILED: {type(exc).__name__}: {str(exc)[-1500:]}", flush=True)
    failures += compile_spectral(build)
    for mod, fn in (("gpu_contrastive", "compile_contrastive"), ("gpu_attention", "compile_attention")):
        failures += getattr(importlib.import_module(mod), fn)(build)
    print(f"compile-only: {failures} failure(s)")
    return 1 if failures else 0


DIV16: dict = {}


# ---------------------------------------------------------------------------- main


def main():
    print(f"torch {torch.__version__}, triton {triton.__version__}, python {sys.version.split()[0]}")
    if torch.cuda.is_available():
        gib = torch.cuda.get_device_properties(0).total_memory / 2**30
        print(f"device: {torch.cuda.get_device_name()} ({gib:.0f} GiB)")
    else:
        print("device: no CUDA device")
    print("plan:")
    for line in plan_lines():
        print("  " + line)
    if ARGS.dry_run:
        k = importlib.import_module("sslkernels.kernels.contrastive")
        print(f"kernel module {k.__file__}: autotune={k.AUTOTUNE}, interpret={k.INTERPRET}")
        sk = importlib.import_module("sslkernels.kernels.spectral")
        print(f"kernel module {sk.__file__}: interpret={sk.INTERPRET}; "
              f"sslkernels.svdvals {'present' if hasattr(sslkernels, 'svdvals') else 'MISSING'}")
        print("dry run: nothing executed")
        return 0
    if ARGS.compile_only:
        return compile_only()
    if not torch.cuda.is_available():
        print("no CUDA device: use --dry-run or --compile-only here")
        return 2

    rows = {}  # (op, N, D, dtype) -> dict
    failed = []

    def row(op, n, d, dt):
        return rows.setdefault((op, n, d, dt), {"pass": "-", "eager_ms": None, "fused_ms": None,
                                                "eager_mb": None, "fused_mb": None})

    # -- 2. correctness
    log("correctness checks")
    for dt in CHECK_DTYPES:
        for d in CHECK_D:
            for n in CHECK_N:
                try:
                    ok, msg = check_case(n, d, DTYPES[dt], CHECK_T, True)
                except Exception:  # noqa: BLE001
                    ok, msg = False, "EXCEPTION " + traceback.format_exc(limit=3)
                row("fwd+bwd", n, d, dt)["pass"] = "PASS" if ok else "FAIL"
                if not ok:
                    failed.append(f"N={n} D={d} {dt}: {msg}")
                log(f"check N={n:5d} D={d} {dt}: {'PASS' if ok else 'FAIL'}  {msg}")
    if not ARGS.no_extras:
        for name, n, d, dt, t, normalize, tf32, layout, grad in EXTRAS:
            try:
                ok, msg = check_case(n, d, DTYPES[dt], t, normalize, tf32, layout, grad)
            except Exception:  # noqa: BLE001
                ok, msg = False, "EXCEPTION " + traceback.format_exc(limit=3)
            row(f"check:{name}", n, d, dt)["pass"] = "PASS" if ok else "FAIL"
            if not ok:
                failed.append(f"{name}: {msg}")
            log(f"extra {name}: {'PASS' if ok else 'FAIL'}  {msg}")

    # -- the other families: each section adds its rows and failures
    # (first the families no GPU has run yet, svdvals after them)
    sections = []
    for mod, fn in (("gpu_contrastive", "contrastive_section"), ("gpu_attention", "attention_section")):
        if os.path.exists(os.path.join(os.path.dirname(os.path.abspath(__file__)), mod + ".py")):
            sections.append((mod, lambda mod=mod, fn=fn: getattr(importlib.import_module(mod), fn)(rows, failed, log)))
        else:
            failed.append(f"{mod}.py missing: its family was not checked")
    sections.append(("svdvals", lambda: spectral_section(rows, failed)))
    for name, section in sections:
        if time_left() < 30:
            failed.append(f"{name}: skipped, deadline reached")
            continue
        log(f"section {name}")
        try:
            section()
        except Exception:  # noqa: BLE001
            failed.append(f"{name} section: EXCEPTION " + traceback.format_exc(limit=5))

    # -- 3. timings
    log("timings")
    for dt in TIME_DTYPES:
        for d in TIME_D:
            for n in timed_sizes():
                if time_left() < 25:
                    log(f"NT-Xent timing N={n} D={d} {dt}: skipped (deadline)")
                    continue
                dtype = DTYPES[dt]
                z1, z2 = make_inputs(n, d, dtype, True, seed=1)
                if n <= CHECK_TIMED_MAX_N:
                    try:
                        ok, msg = check_case(n, d, dtype, TIME_T, True)
                    except Exception:  # noqa: BLE001
                        ok, msg = False, "EXCEPTION " + traceback.format_exc(limit=3)
                    if not ok:
                        failed.append(f"timed N={n} D={d} {dt}: {msg}")
                    for op in ("fwd", "fwd+bwd"):
                        r = row(op, n, d, dt)
                        r["pass"] = "PASS" if ok and r["pass"] != "FAIL" else "FAIL"
                for op in ("fwd", "fwd+bwd"):
                    r = row(op, n, d, dt)
                    for impl_name, impl in (("fused", sslkernels.nt_xent), ("eager", nt_xent_reference)):
                        try:
                            ms, mb = time_case(impl, op, z1, z2, TIME_T)
                            r[f"{impl_name}_ms"], r[f"{impl_name}_mb"] = ms, mb
                        except torch.cuda.OutOfMemoryError:
                            r[f"{impl_name}_ms"] = r[f"{impl_name}_mb"] = "OOM"
                            gc.collect()
                            torch.cuda.empty_cache()
                        except Exception:  # noqa: BLE001
                            r[f"{impl_name}_ms"] = r[f"{impl_name}_mb"] = "ERR"
                            failed.append(f"timing {impl_name} {op} N={n} D={d} {dt}: "
                                          + traceback.format_exc(limit=3))
                    log(f"time {op:7s} N={n:5d} D={d} {dt}: eager {r['eager_ms']} ms {r['eager_mb']} MB, "
                        f"fused {r['fused_ms']} ms {r['fused_mb']} MB")
                del z1, z2
                gc.collect()
                torch.cuda.empty_cache()

    # -- fp32 products on the FMA units ("ieee") against the default (tf32x3 when TF32 is off)
    from sslkernels.kernels import contrastive as K

    for d in TIME_D:
        if time_left() < 20:
            break
        z1, z2 = make_inputs(8192, d, torch.float32, True, seed=1)
        default = K.FP32_PRECISION
        for prec in ("ieee", "tf32x3"):
            K.FP32_PRECISION = prec
            r = row(f"fwd+bwd [{prec}]", 8192, d, "fp32")
            try:
                ok, msg = check_case(257, d, torch.float32, TIME_T, True)
                r["pass"] = "PASS" if ok else "FAIL"
                if not ok:
                    failed.append(f"fp32 {prec} D={d}: {msg}")
                r["fused_ms"], r["fused_mb"] = time_case(sslkernels.nt_xent, "fwd+bwd", z1, z2, TIME_T)
                r["eager_ms"] = rows.get(("fwd+bwd", 8192, d, "fp32"), {}).get("eager_ms")
            except Exception:  # noqa: BLE001
                r["pass"] = "FAIL"
                failed.append(f"fp32 {prec} D={d}: " + traceback.format_exc(limit=3))
            log(f"fp32 products {prec} N=8192 D={d}: {r['pass']} {r['fused_ms']} ms")
        K.FP32_PRECISION = default
        del z1, z2

    # -- autotune choices (for the record)
    try:
        from sslkernels.kernels import contrastive as K

        for name in ("_nt_xent_fwd_kernel", "_nt_xent_bwd_kernel"):
            cache = getattr(getattr(K, name), "cache", {})
            for key, cfg in cache.items():
                print(f"autotune {name} {key}: {cfg}")
    except Exception:  # noqa: BLE001
        pass

    if failed:
        print("\nFAILURES:")
        for f in failed:
            print("  " + f)

    # -- 4. the table, last
    def fmt(x, spec):
        return x if isinstance(x, str) else ("-" if x is None else format(x, spec))

    def ratio(a, b):
        return f"{a / b:.2f}x" if isinstance(a, float) and isinstance(b, float) and b > 0 else "-"

    dev = torch.cuda.get_device_name()
    print(f"\nTriton path vs eager PyTorch on {dev} (torch {torch.__version__}, triton "
          f"{triton.__version__}); ms = median of do_bench, MB = peak above inputs; "
          f"speedup = eager/fused, mem ratio = eager/fused")
    hdr = ["op", "N", "D", "dtype", "pass", "eager ms", "fused ms", "speedup", "eager MB", "fused MB", "mem ratio"]
    lines = [hdr]
    for (op, n, d, dt), r in rows.items():
        lines.append([op, str(n), str(d), dt, r["pass"], fmt(r["eager_ms"], ".3f"), fmt(r["fused_ms"], ".3f"),
                      ratio(r["eager_ms"], r["fused_ms"]), fmt(r["eager_mb"], ".1f"), fmt(r["fused_mb"], ".1f"),
                      ratio(r["eager_mb"], r["fused_mb"])])
    widths = [max(len(line[i]) for line in lines) for i in range(len(hdr))]
    for i, line in enumerate(lines):
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(f"{'FAILED' if failed else 'ALL CHECKS PASSED'} ({len(failed)} failure(s)); total {time.time() - T0:.0f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
