"""Singular values: `sslkernels.svdvals` (the registered op) and the Jacobi launcher
against float64 LAPACK on the CPU (cuSOLVER is itself under test), the torch default
driver's error beside them; on a Jacobi failure, the launcher again with other warp counts.
Timings against `torch.linalg.svdvals` (each driver in its own row) and the variant the
op does not use by default (tl.gather partners or the scratch tile)."""
from __future__ import annotations

import traceback

import torch

from benchmarks.gpu._core import DTYPES, CompileTarget, Ctx, Row, free, median_ms, run_check, timed

NAME = "spectral"

SHAPES = [(4096, 32, 32), (512, 128, 128), (100, 65, 33)]
R_SHAPES = [(3, 7, 5), (2, 4, 6)]
DTYPE_NAMES = ["fp32", "fp64"]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}  # max |S - ref| / sigma_max vs float64 LAPACK
DRIVERS = ["gesvd", "gesvdj", "gesvda"]
DRIVER_MAX_MS = 200.0  # a default driver slower than this on a shape: the others are not timed
# RankMe's own shape (the monitor's default buffer): full rank and a collapsed rank-10 embedding;
# the metrics built on svdvals are checked there against the same metric on the float64 input
# (another CUDA route: QR + cuSOLVER), relative error <= METRIC_RTOL
METRIC_SHAPES = [(25600, 2048, 2048), (25600, 2048, 10)]
R_METRIC_SHAPES = [(300, 140, 140), (300, 140, 10)]
METRIC_RTOL = 1e-4
METRICS = ("rankme", "effective_rank", "nesum", "alpha_req")


def label(b, m, n) -> str:
    return f"B={b} {m}x{n}"  # as `sslkernels bench` labels its square svdvals cases


def _error(S, ref):
    """max |S - ref| / sigma_max per matrix, against float64 LAPACK values on the CPU."""
    return ((S.double().cpu() - ref).abs() / ref.amax(-1, keepdim=True).clamp_min(1e-300)).amax(-1)


def _verdict(S, info, ref, tol):
    errs = _error(S, ref)
    good = tuple(S.shape) == tuple(ref.shape) and bool(torch.isfinite(S).all()) and float(errs.max()) <= tol
    if info is not None:
        good = good and bool((info == 0).all())
    return good, errs


def _matrices(ctx, b, m, n, dtype):
    g = ctx.generator(b + m + n)
    return torch.randn(b, m, n, generator=g, device=ctx.device, dtype=torch.float64).to(dtype)


def check(ctx: Ctx) -> list[Row]:
    import sslkernels
    from sslkernels.kernels import spectral as SK

    rows = []
    for b, m, n in (R_SHAPES if ctx.rehearse else SHAPES):
        for dt in DTYPE_NAMES:
            dtype = DTYPES[dt]
            A = _matrices(ctx, b, m, n, dtype)
            ref = torch.linalg.svdvals(A.double().cpu())
            tol = TOL[dtype]
            eager_err = float(_error(torch.linalg.svdvals(A), ref).max())
            for op, fn in (("svdvals", lambda: sslkernels.svdvals_ex(A)),
                           ("svdvals[jacobi launcher]", lambda: SK.jacobi_svdvals(A))):
                row = Row(op, label(b, m, n), dt, "fwd")
                try:
                    S, info = fn()
                    good, errs = _verdict(S, info, ref, tol)
                    msg = f"err {float(errs.max()):.1e} (tol {tol:.0e}; torch default driver {eager_err:.1e})"
                    if not good:
                        msg += (f" FAIL: {int((errs > tol).sum())}/{b} matrices over tol, unconverged "
                                f"{int((info != 0).sum()) if info is not None else '-'}")
                        if op.startswith("svdvals[jacobi") and ctx.cuda:  # which launch shapes are right here?
                            for w in (1, 2, 4, 8, 16):
                                S2, i2 = SK.jacobi_svdvals(A, num_warps=w)
                                msg += (f" [w{w}: err {float(_error(S2, ref).max()):.1e}, unconverged "
                                        f"{int((i2 != 0).sum())}]")
                except Exception:  # noqa: BLE001
                    good, msg = False, "EXCEPTION " + traceback.format_exc(limit=3)
                row.check, row.note = ("PASS" if good else "FAIL"), msg
                ctx.log(f"check {op} {row.case} {dt}: {row.check}  {msg}")
                if not good:
                    ctx.failures.append(f"{op} {row.case} {dt}: {msg}")
                rows.append(row)
            A = ref = None
            free(ctx)
    return rows + _no_sync_rows(ctx)


def time(ctx: Ctx) -> list[Row]:
    import sslkernels
    from sslkernels.kernels import spectral as SK

    rows = []
    for b, m, n in (R_SHAPES if ctx.rehearse else SHAPES):
        for dt in DTYPE_NAMES:
            if ctx.time_left() < 60:
                ctx.log(f"svdvals {label(b, m, n)} {dt}: skipped (deadline)")
                continue
            dtype = DTYPES[dt]
            A = _matrices(ctx, b, m, n, dtype)
            ref = torch.linalg.svdvals(A.double().cpu())
            row = Row("svdvals", label(b, m, n), dt, "fwd")
            row.check = "PASS" if _verdict(*sslkernels.svdvals_ex(A), ref, TOL[dtype])[0] else "FAIL"
            timed(ctx, row, "fused", lambda: (median_ms(ctx, lambda: sslkernels.svdvals(A)), None))
            timed(ctx, row, "eager", lambda: (median_ms(ctx, lambda: torch.linalg.svdvals(A)), None))
            rows.append(row)
            other = not SK.USE_GATHER  # the variant the op does not use by default
            rg = Row(f"svdvals[gather={other}]", row.case, dt, "fwd", eager_ms=row.eager_ms)
            try:
                good, _ = _verdict(*SK.jacobi_svdvals(A, gather=other), ref, TOL[dtype])
                rg.check = "PASS" if good else "FAIL"
                rg.fused_ms = median_ms(ctx, lambda: SK.jacobi_svdvals(A, gather=other))
            except Exception:  # noqa: BLE001  (an unproven variant: recorded, not a failure of the op)
                rg.fused_ms = "ERR"
                ctx.log(f"svdvals gather={other} {row.case} {dt}: " + traceback.format_exc(limit=3))
            rows.append(rg)
            slow = isinstance(row.eager_ms, float) and row.eager_ms > DRIVER_MAX_MS
            for drv in ([] if slow or not ctx.cuda else DRIVERS):  # drivers: cuSOLVER's only
                rd = Row(f"svdvals[vs torch {drv}]", row.case, dt, "fwd", fused_ms=row.fused_ms)
                timed(ctx, rd, "eager", lambda: (median_ms(ctx, lambda: torch.linalg.svdvals(A, driver=drv)), None),
                      baseline=True)
                rows.append(rd)
            ctx.log(f"svdvals {row.case} {dt}: fused {row.fused_ms} ms, torch {row.eager_ms} ms, "
                    f"gather={other} {rg.fused_ms} ms")
            A = ref = None
            free(ctx)
    return rows + _metric_rows(ctx)


# shapes of the routes promised sync-free: jacobi, qr_jacobi (tall and wide)
NO_SYNC_SHAPES = [(4096, 32, 32), (2, 2000, 64), (2, 64, 2000)]


def _no_sync_rows(ctx: Ctx) -> list[Row]:
    """svdvals_ex under torch.cuda.set_sync_debug_mode("error"): a host sync raises."""
    import sslkernels
    from sslkernels.ops.spectral import svdvals_route

    rows = []
    if not ctx.cuda:
        return rows
    for b, m, n in NO_SYNC_SHAPES:
        A = _matrices(ctx, b, m, n, torch.float32)
        route = svdvals_route(A.shape, A.device, A.dtype)
        sslkernels.svdvals_ex(A)  # compile / load outside the guarded call
        torch.cuda.synchronize()

        def one():
            torch.cuda.set_sync_debug_mode("error")
            try:
                sslkernels.svdvals_ex(A)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            return True, f"route {route}: no host sync"

        rows.append(run_check(ctx, Row(f"svdvals[no host sync, {route}]", label(b, m, n), "fp32", "fwd"), one))
    return rows


def _embedding(ctx, n, d, rank):
    from sslkernels._benchmark import _embeddings_of_rank

    return _embeddings_of_rank({"n": n, "d": d, "rank": rank}, torch.float32, ctx.device)[0]


def _metric_rows(ctx: Ctx) -> list[Row]:
    """Each metric on CUDA (float32: the Gram route) against itself on the float64 input,
    RankMe timed against its reference through torch.linalg.svdvals, and RankMeMonitor."""
    import sslkernels
    from sslkernels._benchmark import get_op

    rows = []
    for n, d, rank in (R_METRIC_SHAPES if ctx.rehearse else METRIC_SHAPES):
        if ctx.time_left() < 45:
            ctx.log(f"metrics N={n} D={d} rank={rank}: skipped (deadline)")
            continue
        case = get_op("rankme").shape_label({"n": n, "d": d, "rank": rank})
        Z = _embedding(ctx, n, d, rank)
        Z64 = Z.double()
        for name in METRICS:
            if name == "alpha_req" and rank < 100:
                # its power-law fit runs over the values 10..100: below rank 100 those are the
                # input's own rounding noise (~1e-7 sigma_max), under the promise's resolution
                continue
            fn = getattr(sslkernels, name)
            row = Row(name, case, "fp32", "fwd")

            def one():
                got, want = float(fn(Z)), float(fn(Z64))
                rel = abs(got - want) / max(abs(want), 1e-300)
                return rel <= METRIC_RTOL, f"{got:.6g} vs float64 {want:.6g}: rel err {rel:.1e} (tol {METRIC_RTOL:.0e})"

            run_check(ctx, row, one)
            if name == "rankme":
                from sslkernels.reference import rankme_reference

                timed(ctx, row, "fused", lambda: (median_ms(ctx, lambda: sslkernels.rankme(Z)), None))
                timed(ctx, row, "eager", lambda: (median_ms(ctx, lambda: rankme_reference(Z)), None))
            rows.append(row)
        mon_row = Row("RankMeMonitor", case, "fp32", "fwd")

        def monitor():
            mon = sslkernels.RankMeMonitor(every=1, max_samples=n, metrics=("rankme",), distributed=False)
            out = None
            for chunk in Z.split(max(1, n // 4)):
                out = mon.update(chunk) or out
            out = out or mon.compute()
            want = float(sslkernels.rankme(Z64))
            got = float(next(v for k, v in out.items() if "rankme" in k))
            rel = abs(got - want) / max(abs(want), 1e-300)
            return rel <= METRIC_RTOL, f"{got:.6g} vs float64 {want:.6g}: rel err {rel:.1e}"

        rows.append(run_check(ctx, mon_row, monitor))
        Z = Z64 = None
        free(ctx)
    return rows


def compile_targets(ctx: Ctx) -> list[CompileTarget]:
    """The Jacobi kernel for every (BLOCK_M, BLOCK_N, dtype) of the plan, both partner paths."""
    from sslkernels.kernels import spectral as SK

    cases = set()
    for _, m, n in SHAPES + [(1, 7, 5), (1, 1, 1)]:
        for dt in DTYPE_NAMES:
            cases.add((SK._blocks(max(m, n), min(m, n)), dt))
    out = []
    for (bm, bn), dt in sorted(cases):
        dtype = DTYPES[dt]
        sig = {"a_ptr": f"*{dt}", "s_ptr": f"*{dt}", "info_ptr": "*i32", "scratch_ptr": f"*{dt}",
               "M": "i32", "N": "i32", "stride_b": "i64", "stride_m": "i32", "stride_n": "i32",
               "stride_sb": "i32", "max_sweeps": "i32", "tol": "fp32"}
        warps = SK._num_warps(bm, bn, dtype)
        for gather in (False, True):
            consts = {"ACC": SK._TL[dtype], "BLOCK_M": bm, "BLOCK_N": bn, "USE_GATHER": gather}
            out.append(CompileTarget(f"jacobi_svdvals {dt} BLOCK {bm}x{bn} w{warps} gather={gather}",
                                     SK._jacobi_svdvals_kernel, sig, consts, warps, 1))
    return out
