"""SIGReg (`sslkernels.sigreg`): the loss and the gradients of proj and directions in fp32 /
fp16 / bf16 against `sigreg_reference` in float64 under the rule of `_core.judge`, a second
fused run bitwise equal (the statistics are summed in split order, no atomics); timings
fwd and fwdbwd (gradient to proj only, as nn.SIGReg) at the issue's shape, N = 4096,
D = 512, 1024 directions, 17 knots, against the eager reference (lightly's N x S x knots
formulas); compile targets of both kernels for sm_90."""
from __future__ import annotations

import torch

from benchmarks.gpu._core import (DTYPES, CompileTarget, Ctx, Row, free, judge_all, log_timing, loss_and_grads,
                                  run_check, time_pass, timed)

NAME = "sigreg"

KNOTS, T_MAX = 17, 3.0
CHECK_SHAPES = [(1, 3, 5), (257, 130, 33), (4096, 512, 1024)]  # (N, D, S)
CHECK_DTYPES = ["fp32", "fp16", "bf16"]
TIME_SHAPES = [(4096, 512, 1024), (16384, 512, 1024)]
TIME_DTYPES = ["bf16", "fp32"]
# rehearsal: CPU tensors (the C++ core), bf16 left to the GPU
R_CHECK_SHAPES, R_CHECK_DTYPES = [(1, 3, 5), (37, 20, 33)], ["fp32", "fp16"]
R_TIME_SHAPES, R_TIME_DTYPES = [(64, 16, 32)], ["fp32"]


def label(n: int, d: int, s: int) -> str:
    from sslkernels._benchmark import get_op

    return get_op("sigreg").shape_label({"n": n, "d": d, "s": s})


def make_inputs(ctx: Ctx, n, d, s, dtype, seed=0):
    g = ctx.generator(seed)
    proj = torch.randn(n, d, generator=g, device=ctx.device, dtype=torch.float32)
    directions = torch.randn(d, s, generator=g, device=ctx.device, dtype=torch.float32)
    return proj.to(dtype), (directions / directions.norm(dim=0)).to(dtype)


def check_case(ctx: Ctx, n, d, s, dtype):
    import sslkernels
    from sslkernels.reference import sigreg_reference

    proj, directions = make_inputs(ctx, n, d, s, dtype)

    def run(fn, p, a):
        return loss_and_grads(lambda x, y: fn(x, y, KNOTS, T_MAX), [p, a], [True, True])

    fused = run(sslkernels.sigreg, proj, directions)
    again = run(sslkernels.sigreg, proj, directions)
    eager = run(sigreg_reference, proj, directions)
    ref = run(sigreg_reference, proj.double(), directions.double())
    return judge_all(("loss", "dproj", "ddirections"), fused, eager, ref, dtype, again)


def check(ctx: Ctx) -> list[Row]:
    rows = []
    shapes, dts = (R_CHECK_SHAPES, R_CHECK_DTYPES) if ctx.rehearse else (CHECK_SHAPES, CHECK_DTYPES)
    for dt in dts:
        for n, d, s in shapes:
            row = Row("sigreg", label(n, d, s), dt, "fwdbwd")
            rows.append(run_check(ctx, row, lambda: check_case(ctx, n, d, s, DTYPES[dt])))
            free(ctx)
    return rows


def time(ctx: Ctx) -> list[Row]:
    import sslkernels
    from sslkernels.reference import sigreg_reference

    rows = []
    shapes, dts = (R_TIME_SHAPES, R_TIME_DTYPES) if ctx.rehearse else (TIME_SHAPES[:1] if ctx.quick else TIME_SHAPES,
                                                                       TIME_DTYPES)
    for dt in dts:
        for n, d, s in shapes:
            if ctx.time_left() < 25:
                ctx.log(f"sigreg timing {label(n, d, s)} {dt}: skipped (deadline)")
                continue
            proj, directions = make_inputs(ctx, n, d, s, DTYPES[dt], seed=1)
            for mode in ("fwd", "fwdbwd"):
                row = Row("sigreg", label(n, d, s), dt, mode)
                for impl, fn in (("fused", sslkernels.sigreg), ("eager", sigreg_reference)):
                    p = proj.detach().clone().requires_grad_(True)
                    timed(ctx, row, impl, lambda: time_pass(ctx, lambda x: fn(x, directions, KNOTS, T_MAX),
                                                            (p,), [p], mode))
                log_timing(ctx, row)
                rows.append(row)
            del proj, directions
            free(ctx)
    return rows


LAUNCH_STAGES = None  # kernels/sigreg.py launches name no num_stages: Triton's default applies


def compile_targets(ctx: Ctx) -> list[CompileTarget]:
    """Both SIGReg kernels in every dtype the checks launch (and fp64), 17 knots."""
    import triton

    from sslkernels.kernels import sigreg as K

    out = []
    for dt in ("fp32", "fp16", "bf16", "fp64"):
        dtype = DTYPES[dt]
        acc = "fp64" if dt == "fp64" else "fp32"
        strides = {"stride_pb": "i32", "stride_pn": "i32", "stride_ad": "i32"}
        unit = {"stride_pd": 1, "stride_as": 1}  # contiguous inputs: Triton specialises a stride of 1
        meta = {**unit, "KNOTS": KNOTS, "BLOCK_N": K.BLOCK_N, "BLOCK_S": K.BLOCK_S, "BLOCK_D": K.BLOCK_D,
                "ACC": K._acc(dtype), "IEEE": dtype in (torch.float32, torch.float64)}
        stats_sig = {"P": f"*{dt}", "A": f"*{dt}", "COS": f"*{acc}", "SIN": f"*{acc}", "B": "i32", "N": "i32",
                     "D": "i32", "S": "i32", "rows_per_split": "i32", **strides, "dt": "fp32"}
        out.append(CompileTarget(f"sigreg_stats {dt} {K.BLOCK_N}x{K.BLOCK_S}x{K.BLOCK_D} w{K.NUM_WARPS}",
                                 K._sigreg_stats_kernel, stats_sig,
                                 {**meta, "KPAD": triton.next_power_of_2(KNOTS)}, K.NUM_WARPS, LAUNCH_STAGES,
                                 ("D", "S", "stride_pn", "stride_ad"), wgmma=dt in ("fp16", "bf16")))
        dx = "fp32" if dt == "fp16" else dt
        dx_sig = {"P": f"*{dt}", "A": f"*{dt}", "COEF_SIN": f"*{acc}", "COEF_COS": f"*{acc}", "DX": f"*{dx}",
                  "N": "i32", "D": "i32", "S": "i32", **strides, "dt": "fp32"}
        out.append(CompileTarget(f"sigreg_dx {dt} {K.BLOCK_N}x{K.BLOCK_S}x{K.BLOCK_D} w{K.NUM_WARPS}",
                                 K._sigreg_dx_kernel, dx_sig, meta, K.NUM_WARPS, LAUNCH_STAGES,
                                 ("D", "S", "stride_pn", "stride_ad"), wgmma=dt in ("fp16", "bf16")))
    return out
