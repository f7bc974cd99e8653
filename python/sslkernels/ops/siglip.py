"""SigLIP's sigmoid loss as one op.

sslkernels::siglip_loss_and_grads(image, text, logit_scale, logit_bias?, positives, want_grads)
    -> (loss, dimage, dtext, dscale, dbias)

``logits_ij = logit_scale * image_i . text_j + logit_bias``; the labels are +1 on the
pairs i == j (when ``positives``) and -1 elsewhere; ``loss = -sum_ij log sigmoid(
labels_ij logits_ij) / N``. Each logit's gradient is local, so with ``want_grads`` the
op returns the gradients for grad_loss = 1 along with the loss (one sweep on the CPU,
a row pass and a column pass on CUDA); autograd keeps them (N x D and M x D, float32
for half inputs) instead of the inputs and scales them by grad_loss before rounding
to the inputs' dtypes. Without ``want_grads`` only the loss is computed (one product
per logit tile) and the gradient outputs are empty.

``logit_scale`` / ``logit_bias`` are 0-dim tensors (the functional layer turns floats
into float64 scalars); the CPU kernel reads their values, the Triton kernels read
them through their pointers (no host sync).
"""
import math
from typing import Optional

import torch
from torch import Tensor

from sslkernels import _ext
from sslkernels._config import debug_enabled
from sslkernels._validation import check_finite
from sslkernels.ops._triton import launchers
from sslkernels.ops.contrastive import _grad_wanted


def _wide(dtype: torch.dtype) -> torch.dtype:
    # float64 inputs are computed in float64 (gradcheck); everything else in float32.
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("sslkernels::siglip_loss_and_grads", mutates_args=())
def siglip_loss_and_grads(
    image: Tensor, text: Tensor, logit_scale: Tensor, logit_bias: Optional[Tensor], positives: bool,
    want_grads: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    raise NotImplementedError(
        f"sslkernels::siglip_loss_and_grads has no kernel for device '{image.device.type}' (cpu and cuda only)"
    )


@siglip_loss_and_grads.register_fake
def _(image, text, logit_scale, logit_bias, positives, want_grads):
    wide = _wide(image.dtype)
    if want_grads:
        dimage = image.new_empty(image.shape, dtype=wide)
        dtext = text.new_empty(text.shape, dtype=wide)
    else:
        dimage = image.new_empty((0,), dtype=wide)
        dtext = text.new_empty((0,), dtype=wide)
    scalar = image.new_empty((), dtype=torch.float64)
    return image.new_empty(()), dimage, dtext, scalar, scalar.clone()


@siglip_loss_and_grads.register_kernel("cpu")
def _(image, text, logit_scale, logit_bias, positives, want_grads):
    n, d = image.shape
    m = text.shape[0]
    wide = _wide(image.dtype)
    shape_x, shape_y = ((n, d), (m, d)) if want_grads else ((0,), (0,))
    dimage = torch.empty(shape_x, dtype=wide)
    dtext = torch.empty(shape_y, dtype=wide)
    loss64 = torch.empty((), dtype=torch.float64)
    dscale = torch.zeros((), dtype=torch.float64)
    dbias = torch.zeros((), dtype=torch.float64)
    scale_value = float(logit_scale)
    bias_value = float(logit_bias) if logit_bias is not None else 0.0
    for value, name in ((scale_value, "logit_scale"), (bias_value, "logit_bias")):
        if not math.isfinite(value):  # checked here too: under torch.compile the functional cannot
            raise ValueError(f"siglip_loss: `{name}` must be finite, got {value}")
    status = _ext._C.siglip_loss_and_grads(
        image=image.data_ptr(), text=text.data_ptr(), dtype=_ext.DTYPE_CODES[image.dtype], n=n, m=m, d=d,
        image_row_stride=image.stride(0), image_col_stride=image.stride(1),
        text_row_stride=text.stride(0), text_col_stride=text.stride(1),
        logit_scale=scale_value, logit_bias=bias_value,
        positives=bool(positives), loss=loss64.data_ptr(),
        dimage=dimage.data_ptr() if want_grads else 0, dtext=dtext.data_ptr() if want_grads else 0,
        dscale=dscale.data_ptr(), dbias=dbias.data_ptr(), num_threads=_ext.num_threads(),
    )
    if status == _ext.STATUS_NONFINITE_RESULT:
        raise ValueError(
            "siglip_loss: the logits or their gradient sums overflow float32 (finite `image_features` / "
            "`text_features` too large for `logit_scale`); normalize the features"
        )
    _ext.raise_for_status(status, "siglip_loss", "image_features", "text_features")
    return loss64.to(image.dtype), dimage, dtext, dscale, dbias


@siglip_loss_and_grads.register_kernel("cuda")
def _(image, text, logit_scale, logit_bias, positives, want_grads):
    if debug_enabled():
        check_finite(image, "image_features")
        check_finite(text, "text_features")
    result = launchers("siglip").siglip_loss_and_grads(image, text, logit_scale, logit_bias, positives, want_grads)
    if debug_enabled():  # as the CPU path reports overflow; without debug no host sync
        check_finite(result[0], "siglip_loss result (the logits overflow: normalize the features)")
    return result


def _setup(ctx, inputs, output):
    _, *grads = output
    ctx.save_for_backward(*grads)
    ctx.mark_non_differentiable(*grads)
    image, text, logit_scale, logit_bias, _, want_grads = inputs
    ctx.want_grads = want_grads
    ctx.grad_dtypes = (image.dtype, text.dtype, logit_scale.dtype,
                       logit_bias.dtype if logit_bias is not None else None)


def _backward(ctx, grad_loss, *unused_grad_grads):
    """The saved gradients (for grad_loss = 1) times grad_loss, rounded to the inputs' dtypes."""
    if not ctx.want_grads:
        raise RuntimeError(
            "sslkernels::siglip_loss_and_grads was called with want_grads=False: it computed no gradients"
        )
    if torch.is_grad_enabled():
        # The saved gradients are constants to autograd: a graph through them would
        # silently drop every second-order term.
        raise NotImplementedError("sslkernels.siglip_loss: double backward (create_graph=True) is not supported")
    grads = [
        (grad_loss.to(g.dtype) * g).to(dtype) if want else None
        for g, dtype, want in zip(ctx.saved_tensors, ctx.grad_dtypes, ctx.needs_input_grad[:4])
    ]
    return (*grads, None, None)


siglip_loss_and_grads.register_autograd(_backward, setup_context=_setup)


def siglip_loss(image: Tensor, text: Tensor, logit_scale: Tensor, logit_bias: Optional[Tensor]) -> Tensor:
    """The route for validated arguments: the one sweep computes the gradients only when
    autograd will ask for them (grad mode on and an input requiring grad)."""
    want_grads = _grad_wanted(image, text, logit_scale, logit_bias)
    loss, *_ = torch.ops.sslkernels.siglip_loss_and_grads(image, text, logit_scale, logit_bias, True, want_grads)
    return loss
