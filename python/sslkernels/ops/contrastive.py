"""Contrastive-loss ops.

sslkernels::nt_xent_forward(z1, z2, temperature, normalize) -> (loss, lse)
sslkernels::nt_xent_backward(grad_loss, z1, z2, lse, temperature, normalize) -> (dz1, dz2)
sslkernels::sup_con_forward(features, labels, temperature, normalize) -> (loss, lse)
sslkernels::sup_con_backward(grad_loss, features, labels, lse, temperature, normalize) -> dfeatures
sslkernels::info_nce_forward(query, key, negatives?, temperature, normalize, symmetric,
                             in_batch_negatives, negatives_grad) -> (loss, lse)
sslkernels::info_nce_backward(grad_loss, query, key, negatives?, temperature, lse, normalize,
                              symmetric, in_batch_negatives, negatives_grad)
                              -> (dquery, dkey, dnegatives, dtemperature)
sslkernels::info_nce_loss_and_grads(query, key, negatives?, temperature, normalize, negatives_grad)
                              -> (loss, dquery, dkey, dnegatives, dtemperature)

Autograd saves the inputs and lse (one float64 per row, whatever the inputs' dtype: the
backward recomputes every probability from it, and a float32 lse of logits ~1e4 is off
by up to 5e-4, so would be each probability): nothing of size N x N. The
last op (one-direction InfoNCE with in-batch keys and a shared queue or none) gives
the gradients for grad_loss = 1 with the loss, in one sweep over the logit tiles;
autograd keeps them (N x D each, float32 for half inputs) and scales them by
grad_loss before rounding to the inputs' dtype.
"""

from typing import Optional

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
    return z1.new_empty(()), z1.new_empty((2 * z1.shape[0],), dtype=torch.float64)


@nt_xent_forward.register_kernel("cpu")
def _(z1, z2, temperature, normalize):
    n, d = z1.shape
    lse = torch.empty(2 * n, dtype=torch.float64)
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


# ---------------------------------------------------------------- SupCon


def _compact_classes(labels: Tensor):
    """Class ids in [0, C) and per-class counts for the C++ core (labels may be any int64)."""
    _, class_ids, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    return class_ids.contiguous(), counts.contiguous()


@torch.library.custom_op("sslkernels::sup_con_forward", mutates_args=())
def sup_con_forward(features: Tensor, labels: Tensor, temperature: float, normalize: bool) -> tuple[Tensor, Tensor]:
    raise _no_kernel("sup_con_forward", features.device)


@sup_con_forward.register_fake
def _(features, labels, temperature, normalize):
    return features.new_empty(()), features.new_empty((features.shape[0],), dtype=torch.float64)


@sup_con_forward.register_kernel("cpu")
def _(features, labels, temperature, normalize):
    n, d = features.shape
    class_ids, counts = _compact_classes(labels)
    lse = torch.empty(n, dtype=torch.float64)
    loss64 = torch.empty((), dtype=torch.float64)
    status = _ext._C.sup_con_forward(
        features.data_ptr(), _ext.DTYPE_CODES[features.dtype], n, d, features.stride(0), features.stride(1),
        class_ids.data_ptr(), counts.data_ptr(), counts.numel(),
        float(temperature), bool(normalize), lse.data_ptr(), loss64.data_ptr(), _ext.num_threads(),
    )
    _ext.raise_for_status(status, "sup_con", "features", "labels")
    return loss64.to(features.dtype), lse


@sup_con_forward.register_kernel("cuda")
def _(features, labels, temperature, normalize):
    if debug_enabled():
        check_finite(features, "features")
    return launchers("contrastive").sup_con_forward(features, labels, temperature, normalize)


@torch.library.custom_op("sslkernels::sup_con_backward", mutates_args=())
def sup_con_backward(
    grad_loss: Tensor, features: Tensor, labels: Tensor, lse: Tensor, temperature: float, normalize: bool
) -> Tensor:
    raise _no_kernel("sup_con_backward", features.device)


@sup_con_backward.register_fake
def _(grad_loss, features, labels, lse, temperature, normalize):
    return torch.empty_like(features, memory_format=torch.contiguous_format)


@sup_con_backward.register_kernel("cpu")
def _(grad_loss, features, labels, lse, temperature, normalize):
    n, d = features.shape
    class_ids, counts = _compact_classes(labels)
    dfeatures = torch.empty((n, d), dtype=features.dtype)
    lse = lse.contiguous()
    status = _ext._C.sup_con_backward(
        features.data_ptr(), _ext.DTYPE_CODES[features.dtype], n, d, features.stride(0), features.stride(1),
        class_ids.data_ptr(), counts.data_ptr(), counts.numel(), lse.data_ptr(),
        float(temperature), bool(normalize), float(grad_loss), dfeatures.data_ptr(), _ext.num_threads(),
    )
    _ext.raise_for_status(status, "sup_con backward", "features", "labels")
    return dfeatures


@sup_con_backward.register_kernel("cuda")
def _(grad_loss, features, labels, lse, temperature, normalize):
    return launchers("contrastive").sup_con_backward(grad_loss, features, labels, lse, temperature, normalize)


# ---------------------------------------------------------------- InfoNCE / CLIP
# lse holds the query-direction statistics [N], then (symmetric) the key direction [N].
# `temperature` is a 0-dim tensor so that a learnable one gets its (exact) gradient;
# `negatives_grad` says whether the queue needs a gradient (a MoCo queue does not).


def _negatives_args(x: Optional[Tensor]):
    """(rows tensor, pointer, rows, row stride, column stride, per-query count) for the
    C++ core; the caller keeps the rows tensor alive while the kernel runs.

    A shared queue [K, D] goes as is (per-query count 0); per-query hard negatives
    [N, M, D] go as their [N M, D] rows (a view when the layout allows, else a copy)
    with count M.
    """
    if x is None:
        return None, 0, 0, 0, 0, 0
    per_query = 0
    if x.dim() == 3:
        per_query = x.shape[1]
        x = x.reshape(-1, x.shape[2])
    return x, x.data_ptr(), x.shape[0], x.stride(0), x.stride(1), per_query


def _gradient_buffers(query: Tensor, key: Tensor, negatives: Optional[Tensor], negatives_grad: bool,
                      dtype: Optional[torch.dtype] = None):
    """(dquery, dkey, dnegatives, whether dnegatives is wanted) for the C++ core, in
    `dtype` (default: the inputs'); an unwanted dnegatives is an empty tensor (the op
    schema returns a tensor always)."""
    want_dneg = negatives is not None and negatives_grad
    dneg = torch.empty(negatives.shape, dtype=dtype or negatives.dtype) if want_dneg else query.new_empty((0,))
    return (torch.empty(query.shape, dtype=dtype or query.dtype), torch.empty(key.shape, dtype=dtype or key.dtype),
            dneg, want_dneg)


def _lse_key_ptr(lse: Tensor, n: int, symmetric: bool) -> int:
    return lse.data_ptr() + n * lse.element_size() if symmetric else 0


@torch.library.custom_op("sslkernels::info_nce_forward", mutates_args=())
def info_nce_forward(
    query: Tensor, key: Tensor, negatives: Optional[Tensor], temperature: Tensor, normalize: bool,
    symmetric: bool, in_batch_negatives: bool, negatives_grad: bool,
) -> tuple[Tensor, Tensor]:
    raise _no_kernel("info_nce_forward", query.device)


@info_nce_forward.register_fake
def _(query, key, negatives, temperature, normalize, symmetric, in_batch_negatives, negatives_grad):
    rows = query.shape[0] * (2 if symmetric else 1)
    return query.new_empty(()), query.new_empty((rows,), dtype=torch.float64)


@info_nce_forward.register_kernel("cpu")
def _(query, key, negatives, temperature, normalize, symmetric, in_batch_negatives, negatives_grad):
    n, d = query.shape
    lse = torch.empty(n * (2 if symmetric else 1), dtype=torch.float64)
    loss64 = torch.empty((), dtype=torch.float64)
    neg_rows, neg_ptr, k, neg_s0, neg_s1, per_query = _negatives_args(negatives)  # noqa: F841 (kept alive)
    status = _ext._C.info_nce_forward(
        query.data_ptr(), key.data_ptr(), neg_ptr, _ext.DTYPE_CODES[query.dtype], n, d, k, per_query,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), neg_s0, neg_s1,
        float(temperature), bool(normalize), bool(symmetric), bool(in_batch_negatives),
        lse.data_ptr(), _lse_key_ptr(lse, n, symmetric), loss64.data_ptr(), _ext.num_threads(),
    )
    _ext.raise_for_status(status, "info_nce", "query", "key", "negatives")
    return loss64.to(query.dtype), lse


@info_nce_forward.register_kernel("cuda")
def _(query, key, negatives, temperature, normalize, symmetric, in_batch_negatives, negatives_grad):
    if debug_enabled():
        check_finite(query, "query")
        check_finite(key, "key")
        if negatives is not None:
            check_finite(negatives, "negatives")
    return launchers("contrastive").info_nce_forward(
        query, key, negatives, temperature, normalize, symmetric, in_batch_negatives, negatives_grad
    )


@torch.library.custom_op("sslkernels::info_nce_backward", mutates_args=())
def info_nce_backward(
    grad_loss: Tensor, query: Tensor, key: Tensor, negatives: Optional[Tensor], temperature: Tensor,
    lse: Tensor, normalize: bool, symmetric: bool, in_batch_negatives: bool, negatives_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    raise _no_kernel("info_nce_backward", query.device)


@info_nce_backward.register_fake
def _(grad_loss, query, key, negatives, temperature, lse, normalize, symmetric, in_batch_negatives, negatives_grad):
    # contiguous, as the kernels return them (empty_like would copy a transposed layout)
    dneg = negatives.new_empty(negatives.shape) if negatives is not None and negatives_grad else query.new_empty((0,))
    return query.new_empty(query.shape), key.new_empty(key.shape), dneg, torch.empty_like(temperature)


@info_nce_backward.register_kernel("cpu")
def _(grad_loss, query, key, negatives, temperature, lse, normalize, symmetric, in_batch_negatives, negatives_grad):
    n, d = query.shape
    dquery, dkey, dneg, want_dneg = _gradient_buffers(query, key, negatives, negatives_grad)
    dtemp64 = torch.empty((), dtype=torch.float64)
    neg_rows, neg_ptr, k, neg_s0, neg_s1, per_query = _negatives_args(negatives)  # noqa: F841 (kept alive)
    lse = lse.contiguous()
    status = _ext._C.info_nce_backward(
        query.data_ptr(), key.data_ptr(), neg_ptr, _ext.DTYPE_CODES[query.dtype], n, d, k, per_query,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), neg_s0, neg_s1,
        lse.data_ptr(), _lse_key_ptr(lse, n, symmetric),
        float(temperature), bool(normalize), bool(symmetric), bool(in_batch_negatives), float(grad_loss),
        dquery.data_ptr(), dkey.data_ptr(), dneg.data_ptr() if want_dneg else 0, dtemp64.data_ptr(),
        _ext.num_threads(),
    )
    _ext.raise_for_status(status, "info_nce backward", "query", "key", "negatives")
    return dquery, dkey, dneg, dtemp64.to(temperature.dtype)


@info_nce_backward.register_kernel("cuda")
def _(grad_loss, query, key, negatives, temperature, lse, normalize, symmetric, in_batch_negatives, negatives_grad):
    return launchers("contrastive").info_nce_backward(
        grad_loss, query, key, negatives, temperature, lse, normalize, symmetric, in_batch_negatives, negatives_grad
    )


@torch.library.custom_op("sslkernels::info_nce_loss_and_grads", mutates_args=())
def info_nce_loss_and_grads(
    query: Tensor, key: Tensor, negatives: Optional[Tensor], temperature: Tensor, normalize: bool,
    negatives_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    raise _no_kernel("info_nce_loss_and_grads", query.device)


# The gradients come out in float32 (float64 for float64 inputs; dtemperature in
# float64), never a half type: autograd scales them by the upstream gradient (an AMP
# loss scale of 2^16, say) before they are rounded to the inputs' dtypes, so the small
# ones do not underflow.


@info_nce_loss_and_grads.register_fake
def _(query, key, negatives, temperature, normalize, negatives_grad):
    wide = _stats_dtype(query.dtype)
    want_dneg = negatives is not None and negatives_grad
    dneg = negatives.new_empty(negatives.shape, dtype=wide) if want_dneg else query.new_empty((0,))
    return (query.new_empty(()), query.new_empty(query.shape, dtype=wide), key.new_empty(key.shape, dtype=wide),
            dneg, temperature.new_empty((), dtype=torch.float64))


@info_nce_loss_and_grads.register_kernel("cpu")
def _(query, key, negatives, temperature, normalize, negatives_grad):
    n, d = query.shape
    dquery, dkey, dneg, want_dneg = _gradient_buffers(query, key, negatives, negatives_grad,
                                                      _stats_dtype(query.dtype))
    loss64 = torch.empty((), dtype=torch.float64)
    dtemp64 = torch.empty((), dtype=torch.float64)
    neg_rows, neg_ptr, k, neg_s0, neg_s1, per_query = _negatives_args(negatives)  # noqa: F841 (kept alive)
    if per_query:
        raise ValueError("info_nce_loss_and_grads takes a shared [K, D] queue, not per-query negatives")
    status = _ext._C.info_nce_loss_and_grads(
        query.data_ptr(), key.data_ptr(), neg_ptr, _ext.DTYPE_CODES[query.dtype], n, d, k,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), neg_s0, neg_s1,
        float(temperature), bool(normalize), loss64.data_ptr(),
        dquery.data_ptr(), dkey.data_ptr(), dneg.data_ptr() if want_dneg else 0, dtemp64.data_ptr(),
        _ext.num_threads(),
    )
    _ext.raise_for_status(status, "info_nce", "query", "key", "negatives")
    return loss64.to(query.dtype), dquery, dkey, dneg, dtemp64


def loss_and_grads_from_kernels(kernels, query, key, negatives, temperature, normalize, negatives_grad):
    """The one-sweep op's result from the Triton launchers `kernels` (the CUDA path;
    the interpreter tests pass interpreted ones): they recompute tiles anyway, so it
    is the forward, then the backward for grad_loss = 1. Unlike the C++ kernel, the
    Triton backward rounds the gradients to the inputs' dtype before they are widened
    here: `sslkernels.info_nce` does not send CUDA tensors to this op (it keeps the
    forward / backward ops there, which fold the upstream gradient in first)."""
    loss, lse = kernels.info_nce_forward(query, key, negatives, temperature, normalize, False, True, negatives_grad)
    dquery, dkey, dneg, dtemp = kernels.info_nce_backward(
        torch.ones_like(loss), query, key, negatives, temperature, lse, normalize, False, True, negatives_grad
    )
    wide = _stats_dtype(query.dtype)
    return loss, dquery.to(wide), dkey.to(wide), dneg.to(wide), dtemp.to(torch.float64)


@info_nce_loss_and_grads.register_kernel("cuda")
def _(query, key, negatives, temperature, normalize, negatives_grad):
    if debug_enabled():
        check_finite(query, "query")
        check_finite(key, "key")
        if negatives is not None:
            check_finite(negatives, "negatives")
    return loss_and_grads_from_kernels(
        launchers("contrastive"), query, key, negatives, temperature, normalize, negatives_grad
    )


def _setup_saved_grads(ctx, inputs, output):
    _, *grads = output
    ctx.save_for_backward(*grads)
    ctx.mark_non_differentiable(*grads)
    query, key, negatives, temperature = inputs[:4]
    ctx.grad_dtypes = (query.dtype, key.dtype, negatives.dtype if negatives is not None else None, temperature.dtype)


def _scale_saved_grads(ctx, grad_loss, *unused_grad_grads):
    """The saved gradients (for grad_loss = 1) times grad_loss, rounded to the inputs' dtypes."""
    if torch.is_grad_enabled():
        # The saved gradients are constants to autograd: a graph through them would
        # silently drop every second-order term.
        raise NotImplementedError(
            "sslkernels.info_nce: double backward (create_graph=True) is not supported"
        )
    needed = ctx.needs_input_grad
    grads = [
        (grad_loss.to(g.dtype) * g).to(dtype) if want and g.numel() else None
        for g, dtype, want in zip(ctx.saved_tensors, ctx.grad_dtypes, needed[:4])
    ]
    return (*grads, None, None)


info_nce_loss_and_grads.register_autograd(_scale_saved_grads, setup_context=_setup_saved_grads)


# ---------------------------------------------------------------- autograd


def _register_loss_autograd(forward_op, backward_op, differentiable: tuple):
    """Autograd for a fused loss op `forward(*tensors, *scalars) -> (loss, lse)`.

    Saves the tensor inputs and lse (O(rows), never a similarity matrix) and calls
    `backward_op(grad_loss, *tensors, lse, *scalars)`, which returns the gradients of
    the inputs flagged in `differentiable` (one flag per tensor input), in order.
    """
    num_tensors = len(differentiable)

    def setup_context(ctx, inputs, output):
        _, lse = output
        ctx.save_for_backward(*inputs[:num_tensors], lse)
        ctx.scalars = inputs[num_tensors:]
        ctx.mark_non_differentiable(lse)

    def backward(ctx, grad_loss, grad_lse):
        *tensors, lse = ctx.saved_tensors
        grads = backward_op(grad_loss, *tensors, lse, *ctx.scalars)
        grads = iter(grads if isinstance(grads, (tuple, list)) else (grads,))
        # An optional input that was None, or that needs no gradient, gets None.
        out = []
        for flag, tensor, needed in zip(differentiable, tensors, ctx.needs_input_grad):
            grad = next(grads) if flag else None
            out.append(grad if tensor is not None and needed else None)
        return tuple(out) + (None,) * len(ctx.scalars)

    forward_op.register_autograd(backward, setup_context=setup_context)


_register_loss_autograd(nt_xent_forward, torch.ops.sslkernels.nt_xent_backward, (True, True))
_register_loss_autograd(sup_con_forward, torch.ops.sslkernels.sup_con_backward, (True, False))
_register_loss_autograd(info_nce_forward, torch.ops.sslkernels.info_nce_backward, (True, True, True, True))
