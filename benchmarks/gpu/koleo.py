"""KoLeo (`sslkernels.koleo`): loss and gradient in fp32 / fp16 / bf16 against
`koleo_reference` in float64 under the rule of `_core.judge` (a second fused run bitwise
equal), and the Triton search itself: every row's pick within rounding of the float64
oracle's best (a near-tie may resolve either way), never itself; timings fwd and fwdbwd
against the eager reference (lightly's: normalize, x @ x.T, argmax, PairwiseDistance),
and the search alone against eager's N x N search.

Model (benchmarks/GPU_MODEL.md, "KoLeo: the symmetric search"), N = 16384, D = 256, bf16,
topk 1, H200. The op's route for a whole batch is the symmetric search: 8256 upper-
triangular tile pairs of 128 rows (62.5 programs per SM), N^2 D = 69 GFLOP (0.088 ms at
790 TFLOP/s), each tile's row and column bests to a 16.8 MB partial buffer, a merge
kernel: predicted search 0.15-0.25 ms, fwd+bwd 0.28-0.38 ms against eager's ~0.5 ms
(1.3-1.8x, below the 3x goal). The row-block kernel (the route of a slice of queries:
every row block sweeps all columns, 137 GFLOP, 128 programs = 0.97 per SM, predicted
search 0.25-0.35 ms) is timed beside it as `koleo[search row_blocks hoist=...]`, and the
symmetric kernel's other variant (all features in one unpipelined chunk) as
`koleo[search symmetric hoist=True]`.
"""
from __future__ import annotations

import torch

from benchmarks.gpu._core import (DTYPES, CompileTarget, Ctx, Row, timing_grid, free, judge_all, log_timing, loss_and_grads,
                                  median_ms, run_check, time_pass, timed)

NAME = "koleo"

CHECK_N, CHECK_D, CHECK_DTYPES = [257, 4096], [256, 130], ["fp32", "fp16", "bf16"]
TIME_N, TIME_D, TIME_DTYPES = [4096, 16384], [256], ["bf16", "fp32"]
# (label, N, D, dtype, topk, group_size)
EXTRAS = [("topk3", 1000, 64, "fp32", 3, None), ("groups", 1024, 128, "bf16", 2, 256),
          ("fp64", 257, 33, "fp64", 1, None)]
R_CHECK_N, R_CHECK_D, R_CHECK_DTYPES = [7, 33], [16], ["fp32", "fp16"]
R_TIME_N, R_TIME_D, R_TIME_DTYPES = [33], [16], ["fp32"]


def label(n: int, d: int) -> str:
    from sslkernels._benchmark import get_op

    return get_op("koleo").shape_label({"n": n, "d": d})


def make_inputs(ctx: Ctx, n, d, dtype, seed=0):
    return torch.randn(n, d, generator=ctx.generator(seed), device=ctx.device, dtype=torch.float32).to(dtype)


def check_case(ctx: Ctx, n, d, dtype, topk=1, group=None):
    import sslkernels
    from sslkernels.reference import koleo_reference

    x = make_inputs(ctx, n, d, dtype)

    def fused_fn(t):
        return sslkernels.koleo(t, topk=topk, group_size=group)

    def eager_fn(t):
        return koleo_reference(t, topk=topk, group_size=group)

    fused = loss_and_grads(fused_fn, [x], [True])
    again = loss_and_grads(fused_fn, [x], [True])
    eager = loss_and_grads(eager_fn, [x], [True])
    ref = loss_and_grads(eager_fn, [x.double()], [True])
    return judge_all(("loss", "dx"), fused, eager, ref, dtype, again)


def search_case(ctx: Ctx, n, d, dtype, topk=1, group=None):
    """The Triton launcher's picks against the float64 similarities of the same inputs."""
    import torch.nn.functional as F

    from sslkernels.kernels import koleo as KK
    from sslkernels.reference import koleo_neighbors_reference

    x = make_inputs(ctx, n, d, dtype, seed=3)
    g = n if group is None else group
    x64 = x.double().cpu()
    xn = F.normalize(x64, eps=1e-8)
    ref = koleo_neighbors_reference(x64, 1e-8, topk, group)
    rows = torch.arange(n)[:, None]
    flat_rows = rows.expand(-1, topk).reshape(-1)
    want = (xn[flat_rows] * xn[ref.reshape(-1)]).sum(-1).view(n, topk)
    tol = 1e-12 if dtype == torch.float64 else 1e-4  # tf32x3 / fp32 accumulation of the products
    ok, msgs, picks = True, [], {}
    # both kernels (the symmetric one is the op's route for a whole batch) and both
    # variants of each, where they apply
    variants = [("symmetric", hoist, KK.plan_symmetric(d, topk, dtype, hoist)["HOIST"],
                 lambda h: KK.koleo_neighbors_symmetric(x, g, topk, 1e-8, hoist=h)) for hoist in (True, False)]
    variants += [("row_blocks", hoist, KK.plan(d, topk, dtype, hoist)["HOIST"],
                  lambda h: KK.koleo_neighbors(x, 0, n, g, topk, 1e-8, hoist=h)) for hoist in (True, False)]
    for route, hoist, planned, search in variants:
        if planned != hoist:
            continue
        idx = search(hoist)
        again = search(hoist)
        got = (xn[flat_rows] * xn[idx.cpu().reshape(-1)]).sum(-1).view(n, topk)
        short = int((got < want - tol).sum())
        selfs = int((idx.cpu() == rows).sum())
        same = float((idx.cpu() == ref).double().mean())
        ok = ok and short == 0 and selfs == 0 and torch.equal(idx, again)
        picks[(route, hoist)] = idx.cpu()
        msgs.append(f"{route} hoist={hoist}: {short} picks below the oracle's by > {tol:.0e}, {selfs} self picks, "
                    f"{same:.4f} equal to the oracle, deterministic {torch.equal(idx, again)}")
    sym = [v for (route, _), v in picks.items() if route == "symmetric"]
    blk = [v for (route, _), v in picks.items() if route == "row_blocks"]
    if sym and blk:  # the two routes round near-ties independently: report, the oracle rule above decides
        msgs.append(f"symmetric = row_blocks on {float((sym[0] == blk[0]).double().mean()):.4f} of the picks")
    return ok, "; ".join(msgs)


def check(ctx: Ctx) -> list[Row]:
    rows = []
    ns, ds, dts = (R_CHECK_N, R_CHECK_D, R_CHECK_DTYPES) if ctx.rehearse else (CHECK_N, CHECK_D, CHECK_DTYPES)
    for dt in dts:
        for d in ds:
            for n in ns:
                rows.append(run_check(ctx, Row("koleo", label(n, d), dt, "fwdbwd"),
                                      lambda: check_case(ctx, n, d, DTYPES[dt])))
                rows.append(run_check(ctx, Row("koleo[search]", label(n, d), dt, "fwd"),
                                      lambda: search_case(ctx, n, d, DTYPES[dt])))
    if ctx.extras:
        for name, n, d, dt, topk, group in EXTRAS:
            if ctx.rehearse:
                n, d, group = 24, 16, (None if group is None else 12)
                dt = "fp32" if dt == "bf16" else dt
            rows.append(run_check(ctx, Row(f"koleo[{name}]", label(n, d), dt, "fwdbwd"),
                                  lambda: check_case(ctx, n, d, DTYPES[dt], topk, group)))
            rows.append(run_check(ctx, Row(f"koleo[{name} search]", label(n, d), dt, "fwd"),
                                  lambda: search_case(ctx, n, d, DTYPES[dt], topk, group)))
    return rows


def _eager_search(x):
    import torch.nn.functional as F

    xn = F.normalize(x, eps=1e-8)
    s = xn @ xn.T
    s.fill_diagonal_(-2)
    return s.argmax(dim=1)


def time(ctx: Ctx) -> list[Row]:
    import sslkernels
    from sslkernels.reference import koleo_reference

    rows = []
    ns, ds, dts = (R_TIME_N, R_TIME_D, R_TIME_DTYPES) if ctx.rehearse else (TIME_N, TIME_D, TIME_DTYPES)
    for dt, d, n in timing_grid(ctx, "koleo", ns, ds, dts, label):
        dtype = DTYPES[dt]
        x = make_inputs(ctx, n, d, dtype, seed=1)
        for mode in ("fwd", "fwdbwd"):
            row = Row("koleo", label(n, d), dt, mode)
            for impl, fn in (("fused", sslkernels.koleo), ("eager", koleo_reference)):
                a = x.detach().clone().requires_grad_(True)
                timed(ctx, row, impl, lambda: time_pass(ctx, fn, (a,), [a], mode))
            log_timing(ctx, row)
            rows.append(row)
        row = Row("koleo[search]", label(n, d), dt, "fwd")
        search = torch.ops.sslkernels.koleo_neighbors
        timed(ctx, row, "fused", lambda: (median_ms(ctx, lambda: search(x, 0, n, n, 1, 1e-8)), None))
        timed(ctx, row, "eager", lambda: (median_ms(ctx, lambda: _eager_search(x)), None))
        log_timing(ctx, row)
        rows.append(row)
        from sslkernels.kernels import koleo as KK

        # the op's route for a whole batch is the symmetric search; beside it its other
        # variant and the row-block kernel (the route of a slice of queries), both variants
        variants = [(f"symmetric hoist={h}", lambda h=h: KK.koleo_neighbors_symmetric(x, n, 1, 1e-8, hoist=h))
                    for h in (True, False) if KK.plan_symmetric(d, 1, dtype, h)["HOIST"] == h
                    and h != KK.plan_symmetric(d, 1, dtype)["HOIST"]]
        variants += [(f"row_blocks hoist={h}", lambda h=h: KK.koleo_neighbors(x, 0, n, n, 1, 1e-8, hoist=h))
                     for h in (True, False) if KK.plan(d, 1, dtype, h)["HOIST"] == h]
        for tag, fn in variants:
            rv = Row(f"koleo[search {tag}]", label(n, d), dt, "fwd", eager_ms=row.eager_ms)
            timed(ctx, rv, "fused", lambda: (median_ms(ctx, fn), None))
            log_timing(ctx, rv)
            rows.append(rv)
        del x
        free(ctx)
    return rows


def compile_targets(ctx: Ctx) -> list[CompileTarget]:
    """The search kernel for every dtype and topk path the checks and timings launch."""
    import triton.language as tl

    from sslkernels.kernels import koleo as KK
    from sslkernels.kernels.contrastive import FP32_PRECISION

    tys = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "fp64": "fp64"}
    out = []
    for dt in ("fp32", "fp16", "bf16", "fp64"):
        dtype = DTYPES[dt]
        acc = "fp64" if dt == "fp64" else "fp32"
        for topk, hoist in ((1, False), (2, False), (3, False), (1, True), (2, True)):
            cfg = KK.plan(256, topk, dtype, hoist)
            if hoist and not cfg["HOIST"]:
                continue
            sig = {"x_ptr": f"*{tys[dt]}", "scale_ptr": f"*{acc}", "out_ptr": "*i64", "M": "i32", "D": "i32",
                   "stride_m": "i32", "query_offset": "i32", "query_count": "i32", "group_size": "i32"}
            consts = {"stride_d": 1, "TOPK": topk, "K_PAD": max(2, 1 << (topk - 1).bit_length()),
                      "PRECISION": FP32_PRECISION if dt == "fp32" else "ieee",
                      "ACC": tl.float64 if dt == "fp64" else tl.float32,
                      "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "BLOCK_K": cfg["BLOCK_K"],
                      "HOIST": cfg["HOIST"]}
            out.append(CompileTarget(f"koleo_search {dt} topk={topk} {cfg}", KK._koleo_search_kernel, sig, consts,
                                     cfg["num_warps"], None, ("D", "stride_m"), wgmma=dt in ("fp16", "bf16")))
        for topk, hoist in ((1, True), (1, False), (3, True), (3, False)):
            cfg = KK.plan_symmetric(256, topk, dtype, hoist)
            if hoist and not cfg["HOIST"]:
                continue
            k_pad = max(2, 1 << (topk - 1).bit_length())
            sig = {"x_ptr": f"*{tys[dt]}", "scale_ptr": f"*{acc}", "pairs_ptr": "*i32", "part_v_ptr": f"*{acc}",
                   "part_i_ptr": "*i32", "M": "i32", "D": "i32", "stride_m": "i32", "group_size": "i32",
                   "PART_STRIDE": "i32"}
            consts = {"stride_d": 1, "TOPK": topk, "K_PAD": k_pad,
                      "PRECISION": FP32_PRECISION if dt == "fp32" else "ieee",
                      "ACC": tl.float64 if dt == "fp64" else tl.float32, "BLOCK": cfg["BLOCK"],
                      "BLOCK_K": cfg["BLOCK_K"]}
            out.append(CompileTarget(f"koleo_symmetric {dt} topk={topk} {cfg}", KK._koleo_symmetric_kernel, sig,
                                     consts, cfg["num_warps"], cfg["num_stages"], ("D", "stride_m"),
                                     wgmma=dt in ("fp16", "bf16")))
            if hoist:
                continue
            sig = {"part_v_ptr": f"*{acc}", "part_i_ptr": "*i32", "out_ptr": "*i64", "M": "i32", "group_size": "i32",
                   "PART_STRIDE": "i32"}
            # the merge's chunk follows the buffer's row length, so each checked and timed N has its own
            entries = sorted({KK.merge_entries(cfg, KK.partial_slots(n, n, cfg["BLOCK"]) * topk)
                              for n in CHECK_N + TIME_N})
            for block_c in entries:
                consts = {"TOPK": topk, "K_PAD": k_pad, "ACC": tl.float64 if dt == "fp64" else tl.float32,
                          "BLOCK": cfg["BLOCK"], "BLOCK_R": cfg["MERGE_ROWS"], "BLOCK_C": block_c}
                out.append(CompileTarget(f"koleo_merge {dt} topk={topk} BLOCK_C={block_c}", KK._koleo_merge_kernel,
                                         sig, consts, 4, 3, ("PART_STRIDE",)))
    return out
