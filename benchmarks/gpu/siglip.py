"""SigLIP's sigmoid loss (`sslkernels.siglip_loss`, issue 13): the loss and the gradients
of both feature sets, the learnable scale and the bias in fp32 / fp16 / bf16 against
`siglip_reference` in float64 under the rule of `_core.judge`, a second fused run
bitwise equal; extras (fp64, the ring's negatives-only block with M != N through the
op); timings fwd and fwdbwd against the eager reference (open_clip's formula) at the
issue's shapes. The model behind the kernel's tiles is in benchmarks/GPU_MODEL.md."""
from __future__ import annotations

import torch

from benchmarks.gpu._core import (DTYPES, CompileTarget, Ctx, Row, timing_grid, free, judge_all, log_timing, run_check,
                                  time_pass, timed)

NAME = "siglip"

SCALE, BIAS = 10.0, -10.0  # SigLIP's initialisation
CHECK_N, CHECK_D, CHECK_DTYPES = [1, 257, 4096], [130, 256], ["fp32", "fp16", "bf16"]
TIME_N, TIME_D, TIME_DTYPES = [8192, 32768], [256], ["bf16", "fp32"]
QUICK_N = [8192]
# rehearsal: the same code on CPU tensors under the interpreter (bf16 tl.dot is garbage there)
R_CHECK_N, R_CHECK_D, R_CHECK_DTYPES = [1, 7], [16], ["fp32", "fp16"]
R_TIME_N, R_TIME_D, R_TIME_DTYPES = [33], [16], ["fp32"]
NAMES = ("loss", "dimage", "dtext", "dscale", "dbias")


def label(n: int, d: int) -> str:
    from sslkernels._benchmark import get_op

    return get_op("siglip").shape_label({"n": n, "d": d})


def make_inputs(ctx: Ctx, n, d, dtype, m=None, seed=0):
    """Unit image rows, texts correlated with them (M = N unless given), as open_clip's
    models return them."""
    g = ctx.generator(seed)
    image = torch.nn.functional.normalize(torch.randn(n, d, generator=g, device=ctx.device), dim=1)
    text = torch.randn(m or n, d, generator=g, device=ctx.device)
    text[: min(n, m or n)] += image[: min(n, m or n)] / 0.8
    text = torch.nn.functional.normalize(text, dim=1)
    return image.to(dtype), text.to(dtype)


def _loss_and_grads(fn, image, text, scale_dtype):
    leaves = [image.detach().clone().requires_grad_(True), text.detach().clone().requires_grad_(True),
              torch.tensor(SCALE, device=image.device, dtype=scale_dtype, requires_grad=True),
              torch.tensor(BIAS, device=image.device, dtype=scale_dtype, requires_grad=True)]
    out = fn(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves)]


def check_case(ctx: Ctx, n, d, dtype):
    import sslkernels
    from sslkernels.reference import siglip_reference

    image, text = make_inputs(ctx, n, d, dtype)
    fused = _loss_and_grads(sslkernels.siglip_loss, image, text, dtype)
    again = _loss_and_grads(sslkernels.siglip_loss, image, text, dtype)
    eager = _loss_and_grads(siglip_reference, image, text, dtype)
    ref = _loss_and_grads(siglip_reference, image.double(), text.double(), torch.float64)
    return judge_all(NAMES, fused, eager, ref, dtype, again)


def check_negatives_block(ctx: Ctx, dtype):
    """The op as the ring calls it: another rank's texts (positives off), here M != N."""
    import sslkernels  # noqa: F401  (registers the op)

    n, m, d = (7, 12, 16) if ctx.rehearse else (1000, 1536, 256)
    image, text = make_inputs(ctx, n, d, dtype, m=m)

    def op_outputs(x, y, wide):
        scale = torch.tensor(SCALE, device=x.device, dtype=wide)
        bias = torch.tensor(BIAS, device=x.device, dtype=wide)
        return list(torch.ops.sslkernels.siglip_loss_and_grads(x, y, scale, bias, False, True))

    def reference(x, y):
        leaves = [x.detach().clone().requires_grad_(True), y.detach().clone().requires_grad_(True),
                  torch.tensor(SCALE, device=x.device, dtype=x.dtype, requires_grad=True),
                  torch.tensor(BIAS, device=x.device, dtype=x.dtype, requires_grad=True)]
        logits = leaves[2] * leaves[0] @ leaves[1].T + leaves[3]
        loss = -torch.nn.functional.logsigmoid(-logits).sum() / x.shape[0]
        return [loss.detach(), *torch.autograd.grad(loss, leaves)]

    fused = op_outputs(image, text, dtype)
    again = op_outputs(image, text, dtype)
    return judge_all(NAMES, fused, reference(image, text), reference(image.double(), text.double()), dtype, again)


def check(ctx: Ctx) -> list[Row]:
    rows = []
    ns, ds, dts = (R_CHECK_N, R_CHECK_D, R_CHECK_DTYPES) if ctx.rehearse else (CHECK_N, CHECK_D, CHECK_DTYPES)
    for dt in dts:
        for d in ds:
            for n in ns:
                row = Row("siglip", label(n, d), dt, "fwdbwd")
                rows.append(run_check(ctx, row, lambda: check_case(ctx, n, d, DTYPES[dt])))
                free(ctx)
    if ctx.extras:
        n, d = (7, 16) if ctx.rehearse else (257, 130)
        rows.append(run_check(ctx, Row("siglip[fp64]", label(n, d), "fp64", "fwdbwd"),
                              lambda: check_case(ctx, n, d, torch.float64)))
        for dt in (["fp32"] if ctx.rehearse else ["fp32", "bf16"]):
            rows.append(run_check(ctx, Row("siglip[negatives block M!=N]", "op", dt, "fwdbwd"),
                                  lambda: check_negatives_block(ctx, DTYPES[dt])))
    return rows


def time(ctx: Ctx) -> list[Row]:
    import sslkernels
    from sslkernels.reference import siglip_reference

    rows = []
    if ctx.rehearse:
        ns, ds, dts = R_TIME_N, R_TIME_D, R_TIME_DTYPES
    else:
        ns, ds, dts = (QUICK_N if ctx.quick else TIME_N), TIME_D, TIME_DTYPES
    for dt, d, n in timing_grid(ctx, "siglip", ns, ds, dts, label):
        dtype = DTYPES[dt]
        image, text = make_inputs(ctx, n, d, dtype)
        leaves = [image.requires_grad_(True), text.requires_grad_(True),
                  torch.tensor(SCALE, device=ctx.device, requires_grad=True),
                  torch.tensor(BIAS, device=ctx.device, requires_grad=True)]
        for mode in ("fwd", "fwdbwd"):
            row = Row("siglip", label(n, d), dt, mode)
            timed(ctx, row, "fused", lambda: time_pass(ctx, sslkernels.siglip_loss, leaves, leaves, mode, graph=True))
            timed(ctx, row, "eager", lambda: time_pass(ctx, siglip_reference, leaves, leaves, mode, graph=True))
            log_timing(ctx, row)
            rows.append(row)
        image = text = leaves = None
        free(ctx)
    return rows


def compile_targets(ctx: Ctx) -> list[CompileTarget]:
    """The pass kernel as the launcher plans it, per dtype, at D = 256 and 130: the row pass
    (loss statistics and dimage), the column pass (dtext) and the loss-only row pass."""
    from sslkernels.kernels import siglip as SK
    from sslkernels.kernels.contrastive import _precision

    out = []
    for dt in ("bf16", "fp16", "fp32", "fp64"):
        dtype = DTYPES[dt]
        acc = "fp64" if dt == "fp64" else "fp32"
        precision = _precision(dtype)
        for d in (256, 130):
            cfg = SK.plan(d, dtype, precision)
            meta = {k: v for k, v in cfg.items() if k.startswith("BLOCK_")}
            sig = {"a_ptr": f"*{dt}", "b_ptr": f"*{dt}", "stride_a": "i32", "stride_b": "i32", "NA": "i32",
                   "NB": "i32", "D": "i32", "scale_ptr": "*fp32", "bias_ptr": "*fp32", "out_ptr": f"*{acc}",
                   "row_loss_ptr": f"*{acc}", "row_grad_ptr": f"*{acc}", "row_dot_ptr": f"*{acc}", "inv_n": "fp32"}
            for tag, stats, grads in (("rows", True, True), ("cols", False, True), ("loss-only", True, False)):
                consts = dict(POSITIVES=True, HAS_BIAS=True, STATS=stats, GRADS=grads,
                              ACC=SK._TL_DTYPES[torch.float64 if dt == "fp64" else torch.float32],
                              PRECISION=precision, **meta)
                out.append(CompileTarget(
                    f"siglip {tag} {dt} D={d} BLOCK {meta['BLOCK_M']}x{meta['BLOCK_N']}x{meta['BLOCK_K']} "
                    f"DO {meta['BLOCK_DO']} w{cfg['num_warps']}",
                    SK._siglip_pass_kernel, sig, consts, cfg["num_warps"], cfg.get("num_stages", 3),
                    aligned=("stride_a", "stride_b", "D") if d % 16 == 0 else (),
                    wgmma=dt in ("bf16", "fp16")))
    return out
