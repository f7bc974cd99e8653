"""Contrastive-loss ops.

sslkernels::nt_xent_forward(z1, z2, temperature, normalize) -> (loss, lse)
sslkernels::nt_xent_backward(grad_loss, z1, z2, lse, temperature, normalize) -> (dz1, dz2)

Autograd saves the two inputs and lse (2N floats): nothing of size N x N.
"""

import torch
from torch import Tensor

from sslkernels import _ext
from sslkernels._config import debug_enabled
from sslkernels._validation import check_finite
from sslkernels.ops._triton import launchers


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    # float64 inputs are computed in float64 (gradcheck); everything else in float32.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _no_kernel(op: str, device: torch.device):
    return NotImplementedError(f"sslkernels::{op} has no kernel for device '{device.type}' (cpu and cuda only)")


# ---------------------------------------------------------------- forward


@torch.library.custom_op("sslkernels::nt_xent_forward", mutates_args=())
def nt_xent_forward(z1: Tensor, z2: Tensor, temperature: float, normalize: bool) -> tuple[Tensor, Tensor]:
    raise _no_kernel("nt_xent_forward", z1.device)


@nt_xent_forward.register_fake
def _(z1, z2, temperature, normalize):
    return z1.new_empty(()), z1.new_empty((2 * z1.shape[0],), dtype=_stats_dtype(z1.dtype))


@nt_xent_forward.register_kernel("cpu")
def _(z1, z2, temperature, normalize):
    n, d = z1.shape
    lse = torch.empty(2 * n, dtype=_stats_dtype(z1.dtype))
    loss64 = torch.empty((), dtype=torch.float64)
    status = _ext._C.nt_xent_forward(
        z1.data_ptr(), z2.data_ptr(), _ext.DTYPE_CODES[z1.dtype], n, d,
        z1.stride(0), z1.stride(1), z2.stride(0), z2.stride(1),
        float(temperature), bool(normalize), lse.data_ptr(), loss64.data_ptr(), _ext.num_threads(),
    )
    _ext.raise_for_status(status, "nt_xent", "z1", "z2")
    return loss64.to(z1.dtype), lse


@nt_xent_forward.register_kernel("cuda")
def _(z1, z2, temperature, normalize):
    if debug_enabled():
        check_finite(z1, "z1")
        check_finite(z2, "z2")
    return launchers("contrastive").nt_xent_forward(z1, z2, temperature, normalize)


# ---------------------------------------------------------------- backward


@torch.library.custom_op("sslkernels::nt_xent_backward", mutates_args=())
def nt_xent_backward(
    grad_loss: Tensor, z1: Tensor, z2: Tensor, lse: Tensor, temperature: float, normalize: bool
) -> tuple[Tensor, Tensor]:
    raise _no_kernel("nt_xent_backward", z1.device)


@nt_xent_backward.register_fake
def _(grad_loss, z1, z2, lse, temperature, normalize):
    return torch.empty_like(z1, memory_format=torch.contiguous_format), torch.empty_like(
        z2, memory_format=torch.contiguous_format
    )


@nt_xent_backward.register_kernel("cpu")
def _(grad_loss, z1, z2, lse, temperature, normalize):
    n, d = z1.shape
    dz1 = torch.empty((n, d), dtype=z1.dtype)
    dz2 = torch.empty((n, d), dtype=z2.dtype)
    lse = lse.contiguous()
    status = _ext._C.nt_xent_backward(
        z1.data_ptr(), z2.data_ptr(), _ext.DTYPE_CODES[z1.dtype], n, d,
        z1.stride(0), z1.stride(1), z2.stride(0), z2.stride(1),
        lse.data_ptr(), float(temperature), bool(normalize), float(grad_loss),
        dz1.data_ptr(), dz2.data_ptr(), _ext.num_threads(),
    )
    _ext.raise_for_status(status, "nt_xent backward", "z1", "z2")
    return dz1, dz2


@nt_xent_backward.register_kernel("cuda")
def _(grad_loss, z1, z2, lse, temperature, normalize):
    return launchers("contrastive").nt_xent_backward(grad_loss, z1, z2, lse, temperature, normalize)


# ---------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output):
    z1, z2, temperature, normalize = inputs
    _, lse = output
    ctx.save_for_backward(z1, z2, lse)
    ctx.temperature = temperature
    ctx.normalize = normalize
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_loss, grad_lse):
    z1, z2, lse = ctx.saved_tensors
    dz1, dz2 = torch.ops.sslkernels.nt_xent_backward(grad_loss, z1, z2, lse, ctx.temperature, ctx.normalize)
    return dz1, dz2, None, None


nt_xent_forward.register_autograd(_backward, setup_context=_setup_context)
