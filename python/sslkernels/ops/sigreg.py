"""SIGReg ops (LeJEPA's regulariser, as lightly's ``SIGReg`` computes it).

sslkernels::sigreg_stats(proj, directions, knots, t_max) -> (cos_sum, sin_sum)
    proj [B, N, D] (the functional layer flattens leading dims), directions [D, S],
    same dtype. cos_sum[b, s, k] = sum_n cos(t_k x_bns), sin_sum likewise, with
    x = proj @ directions and t_k = k * t_max / (knots - 1); float64 [B, S, knots].
    Nothing of size N x S x knots is held: the CPU core forms x tile by tile (OpenBLAS)
    and takes cos / sin of dt * x only, the other knots by angle addition in float64;
    the Triton kernel does the same on tl.dot tiles (float32 recurrence).
sslkernels::sigreg_stats_backward(proj, directions, grad_cos, grad_sin, knots, t_max,
                                  directions_grad) -> (dproj, ddirections)
    dproj [B, N, D] and ddirections [D, S] (empty [0] when directions_grad is False),
    both in proj's dtype.

The loss is a few elementwise ops on the [B, S, knots] statistics (``loss_from_stats``),
so the distributed version only sums the statistics across ranks in between
(:func:`sslkernels.distributed.sigreg`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from sslkernels import _ext
from sslkernels._config import debug_enabled
from sslkernels._validation import check_finite
from sslkernels.ops._triton import launchers
from sslkernels.ops.contrastive import _no_kernel

STATS_DTYPE = torch.float64  # the statistics are tiny ([B, S, knots]); float64 on every path


def _problem(proj: Tensor, directions: Tensor, knots: int, t_max: float) -> dict:
    b, n, d = proj.shape
    return dict(proj=proj.data_ptr(), directions=directions.data_ptr(), dtype=_ext.DTYPE_CODES[proj.dtype],
                batch=b, rows=n, dim=d, num_directions=directions.shape[1], batch_stride=proj.stride(0),
                row_stride=proj.stride(1), col_stride=proj.stride(2), dir_row_stride=directions.stride(0),
                dir_col_stride=directions.stride(1), knots=int(knots), t_max=float(t_max))


def _raise_for_status(status: int, op: str) -> None:
    if status == _ext.STATUS_OK:
        return
    if status == _ext.STATUS_NONFINITE_FIRST:
        raise ValueError(f"{op}: `proj` contains NaN or Inf")
    if status == _ext.STATUS_NONFINITE_SECOND:
        raise ValueError(f"{op}: `directions` contains NaN or Inf")
    if status == _ext.STATUS_NONFINITE_RESULT:
        raise ValueError(
            f"{op}: the projections proj @ directions overflow (finite `proj` / `directions` too large); "
            "scale the inputs down"
        )
    raise ValueError(f"{op}: the C++ core rejected its arguments (status {status})")


# ---------------------------------------------------------------- statistics


@torch.library.custom_op("sslkernels::sigreg_stats", mutates_args=())
def sigreg_stats(proj: Tensor, directions: Tensor, knots: int, t_max: float) -> tuple[Tensor, Tensor]:
    raise _no_kernel("sigreg_stats", proj.device)


@sigreg_stats.register_fake
def _(proj, directions, knots, t_max):
    shape = (proj.shape[0], directions.shape[1], knots)
    return proj.new_empty(shape, dtype=STATS_DTYPE), proj.new_empty(shape, dtype=STATS_DTYPE)


@sigreg_stats.register_kernel("cpu")
def _(proj, directions, knots, t_max):
    shape = (proj.shape[0], directions.shape[1], knots)
    cos_sum = torch.empty(shape, dtype=STATS_DTYPE)
    sin_sum = torch.empty(shape, dtype=STATS_DTYPE)
    status = _ext._C.sigreg_stats(**_problem(proj, directions, knots, t_max), cos_sum=cos_sum.data_ptr(),
                                  sin_sum=sin_sum.data_ptr(), num_threads=_ext.num_threads())
    _raise_for_status(status, "sigreg")
    return cos_sum, sin_sum


@sigreg_stats.register_kernel("cuda")
def _(proj, directions, knots, t_max):
    if debug_enabled():
        check_finite(proj, "proj")
        check_finite(directions, "directions")
    return launchers("sigreg").sigreg_stats(proj, directions, int(knots), float(t_max))


@torch.library.custom_op("sslkernels::sigreg_stats_backward", mutates_args=())
def sigreg_stats_backward(
    proj: Tensor, directions: Tensor, grad_cos: Tensor, grad_sin: Tensor, knots: int, t_max: float,
    directions_grad: bool,
) -> tuple[Tensor, Tensor]:
    raise _no_kernel("sigreg_stats_backward", proj.device)


@sigreg_stats_backward.register_fake
def _(proj, directions, grad_cos, grad_sin, knots, t_max, directions_grad):
    ddirections_shape = tuple(directions.shape) if directions_grad else (0,)
    return proj.new_empty(proj.shape), directions.new_empty(ddirections_shape)


@sigreg_stats_backward.register_kernel("cpu")
def _(proj, directions, grad_cos, grad_sin, knots, t_max, directions_grad):
    dproj = torch.empty(proj.shape, dtype=proj.dtype)
    ddirections = torch.empty(tuple(directions.shape) if directions_grad else (0,), dtype=directions.dtype)
    grad_cos = grad_cos.to(STATS_DTYPE).contiguous()
    grad_sin = grad_sin.to(STATS_DTYPE).contiguous()
    status = _ext._C.sigreg_stats_backward(
        **_problem(proj, directions, knots, t_max), grad_cos=grad_cos.data_ptr(), grad_sin=grad_sin.data_ptr(),
        dproj=dproj.data_ptr(), ddirections=ddirections.data_ptr() if directions_grad else 0,
        num_threads=_ext.num_threads())
    _raise_for_status(status, "sigreg backward")
    return dproj, ddirections


@sigreg_stats_backward.register_kernel("cuda")
def _(proj, directions, grad_cos, grad_sin, knots, t_max, directions_grad):
    return launchers("sigreg").sigreg_stats_backward(
        proj, directions, grad_cos.to(STATS_DTYPE), grad_sin.to(STATS_DTYPE), int(knots), float(t_max),
        bool(directions_grad))


def _setup_context(ctx, inputs, output):
    proj, directions, knots, t_max = inputs
    ctx.save_for_backward(proj, directions)
    ctx.knots, ctx.t_max = knots, t_max


def _backward(ctx, grad_cos, grad_sin):
    proj, directions = ctx.saved_tensors
    if grad_cos is None and grad_sin is None:
        return None, None, None, None
    shape = (proj.shape[0], directions.shape[1], ctx.knots)
    zeros = lambda: proj.new_zeros(shape, dtype=STATS_DTYPE)  # noqa: E731
    grad_cos = zeros() if grad_cos is None else grad_cos
    grad_sin = zeros() if grad_sin is None else grad_sin
    wants_directions = bool(ctx.needs_input_grad[1])
    dproj, ddirections = sigreg_stats_backward(proj, directions, grad_cos, grad_sin, ctx.knots, ctx.t_max,
                                               wants_directions)
    return (dproj if ctx.needs_input_grad[0] else None), (ddirections if wants_directions else None), None, None


sigreg_stats.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- the loss


def knot_weights(knots: int, t_max: float, device) -> tuple[Tensor, Tensor]:
    """phi_k = exp(-t_k^2 / 2) and the trapezoid weights over [-t_max, t_max] times phi
    (2 dt inside, dt at both ends: the integrand is even), float64 [knots]."""
    t = torch.linspace(0.0, float(t_max), int(knots), dtype=STATS_DTYPE, device=device)
    dt = float(t_max) / (int(knots) - 1)
    weights = torch.full((int(knots),), 2.0 * dt, dtype=STATS_DTYPE, device=device)
    weights[0] = dt
    weights[-1] = dt
    phi = torch.exp(-t.square() / 2.0)
    return phi, weights * phi


def loss_from_stats(cos_sum: Tensor, sin_sum: Tensor, num_samples, knots: int, t_max: float) -> Tensor:
    """N * sum_k w_k phi_k ((mean cos - phi_k)^2 + (mean sin)^2), averaged over (B, S);
    `num_samples` (an int or a 0-dim tensor) is the N the means divide by. Float64."""
    phi, weights = knot_weights(knots, t_max, cos_sum.device)
    cos_mean = cos_sum / num_samples
    sin_mean = sin_sum / num_samples
    err = (cos_mean - phi).square() + sin_mean.square()
    return ((err @ weights) * num_samples).mean()


def sigreg(proj: Tensor, directions: Tensor, knots: int, t_max: float) -> Tensor:
    """The SIGReg loss of proj [B, N, D] along directions [D, S], in proj's dtype."""
    cos_sum, sin_sum = sigreg_stats(proj, directions, knots, t_max)
    return loss_from_stats(cos_sum, sin_sum, proj.shape[1], knots, t_max).to(proj.dtype)
