"""Contrastive-loss ops.

sslkernels::nt_xent_forward(z1, z2, temperature, normalize) -> (loss, lse, norms)
sslkernels::nt_xent_backward(grad_loss, z1, z2, lse, norms, temperature, normalize) -> (dz1, dz2)
sslkernels::sup_con_forward(features, labels, temperature, normalize) -> (loss, lse)
sslkernels::sup_con_backward(grad_loss, features, labels, lse, temperature, normalize) -> dfeatures
sslkernels::info_nce_forward(query, key, negatives?, temperature, normalize, symmetric,
                             in_batch_negatives, negatives_grad) -> (loss, lse)
sslkernels::info_nce_backward(grad_loss, query, key, negatives?, temperature, lse, normalize,
                              symmetric, in_batch_negatives, negatives_grad)
                              -> (dquery, dkey, dnegatives, dtemperature)
sslkernels::info_nce_loss_and_grads(query, key, negatives?, temperature, normalize, negatives_grad,
                                    logit_bias?, anchor_ids?, candidate_ids?)
                              -> (loss, dquery, dkey, dnegatives, dtemperature)

The InfoNCE ops end with the retrieval terms (logit_bias?, anchor_ids?, candidate_ids?,
positive_on_diagonal = True), over the candidates "keys, then the queue" [N + K]:
logit_bias[j] joins every query -> key logit of candidate j, and candidate j leaves query
i's candidates (and query i key j's, symmetric) where anchor_ids[i] == candidate_ids[j],
unless j == i and positive_on_diagonal. The target stays key i. The ring's remote blocks
pass positive_on_diagonal = False (a remote key i with query i's id is a duplicate).

Autograd saves the inputs and lse (one float64 per row, whatever the inputs' dtype: the
backward recomputes every probability from it, and a float32 lse of logits ~1e4 is off
by up to 5e-4, so would be each probability): nothing of size N x N. NT-Xent's
forward also returns the row norms its Triton kernels read ([4N] in the stats dtype:
||x|| then 1 / max(||x||, eps), with normalize), so the backward does not launch them
again; the C++ route recomputes them inside its sweeps and returns an empty tensor. The
last op (one-direction InfoNCE with in-batch keys and a shared queue or none) gives
the gradients for grad_loss = 1 with the loss, in one sweep over the logit tiles;
autograd keeps them (N x D each, float32 for half inputs) and scales them by
grad_loss before rounding to the inputs' dtype.
"""

from typing import Optional

import torch
from torch import Tensor

from sslkernels import _ext
from sslkernels._common import no_kernel as _no_kernel
from sslkernels._common import stats_dtype as _stats_dtype
from sslkernels._config import debug_enabled
from sslkernels._validation import check_finite, check_op_terms
from sslkernels.ops._triton import launchers


# ---------------------------------------------------------------- forward


@torch.library.custom_op("sslkernels::nt_xent_forward", mutates_args=())
def nt_xent_forward(z1: Tensor, z2: Tensor, temperature: float, normalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    raise _no_kernel("nt_xent_forward", z1.device)


def _nt_xent_norms_rows(z1: Tensor, normalize: bool) -> int:
    """Length of the saved row norms: 4N on the Triton route with normalize, else 0."""
    return 4 * z1.shape[0] if normalize and z1.device.type == "cuda" else 0


@nt_xent_forward.register_fake
def _(z1, z2, temperature, normalize):
    norms = z1.new_empty((_nt_xent_norms_rows(z1, normalize),), dtype=_stats_dtype(z1.dtype))
    return z1.new_empty(()), z1.new_empty((2 * z1.shape[0],), dtype=torch.float64), norms


@nt_xent_forward.register_kernel("cpu")
def _(z1, z2, temperature, normalize):
    n, d = z1.shape
    lse = torch.empty(2 * n, dtype=torch.float64)
    loss64 = torch.empty((), dtype=torch.float64)
    status = _ext._C.nt_xent_forward(
        z1=z1.data_ptr(), z2=z2.data_ptr(), dtype=_ext.DTYPE_CODES[z1.dtype], n=n, d=d,
        z1_row_stride=z1.stride(0), z1_col_stride=z1.stride(1), z2_row_stride=z2.stride(0),
        z2_col_stride=z2.stride(1), temperature=float(temperature), normalize=bool(normalize),
        lse=lse.data_ptr(), loss=loss64.data_ptr(), num_threads=_ext.num_threads(),
    )
    _ext.raise_for_status(status, "nt_xent", "z1", "z2")
    return loss64.to(z1.dtype), lse, z1.new_empty((0,), dtype=_stats_dtype(z1.dtype))


@nt_xent_forward.register_kernel("cuda")
def _(z1, z2, temperature, normalize):
    if debug_enabled():
        check_finite(z1, "z1")
        check_finite(z2, "z2")
    return launchers("contrastive").nt_xent_forward(z1, z2, temperature, normalize)


# ---------------------------------------------------------------- backward


@torch.library.custom_op("sslkernels::nt_xent_backward", mutates_args=())
def nt_xent_backward(
    grad_loss: Tensor, z1: Tensor, z2: Tensor, lse: Tensor, norms: Tensor, temperature: float, normalize: bool
) -> tuple[Tensor, Tensor]:
    raise _no_kernel("nt_xent_backward", z1.device)


@nt_xent_backward.register_fake
def _(grad_loss, z1, z2, lse, norms, temperature, normalize):
    return torch.empty_like(z1, memory_format=torch.contiguous_format), torch.empty_like(
        z2, memory_format=torch.contiguous_format
    )


@nt_xent_backward.register_kernel("cpu")
def _(grad_loss, z1, z2, lse, norms, temperature, normalize):  # norms: the C++ core recomputes them
    n, d = z1.shape
    dz1 = torch.empty((n, d), dtype=z1.dtype)
    dz2 = torch.empty((n, d), dtype=z2.dtype)
    lse = lse.contiguous()
    status = _ext._C.nt_xent_backward(
        z1=z1.data_ptr(), z2=z2.data_ptr(), dtype=_ext.DTYPE_CODES[z1.dtype], n=n, d=d,
        z1_row_stride=z1.stride(0), z1_col_stride=z1.stride(1), z2_row_stride=z2.stride(0),
        z2_col_stride=z2.stride(1), lse=lse.data_ptr(), temperature=float(temperature),
        normalize=bool(normalize), grad_loss=float(grad_loss), dz1=dz1.data_ptr(), dz2=dz2.data_ptr(),
        num_threads=_ext.num_threads(),
    )
    _ext.raise_for_status(status, "nt_xent backward", "z1", "z2")
    return dz1, dz2


@nt_xent_backward.register_kernel("cuda")
def _(grad_loss, z1, z2, lse, norms, temperature, normalize):
    return launchers("contrastive").nt_xent_backward(grad_loss, z1, z2, lse, temperature, normalize, norms)


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
        features=features.data_ptr(), dtype=_ext.DTYPE_CODES[features.dtype], n=n, d=d,
        row_stride=features.stride(0), col_stride=features.stride(1), class_ids=class_ids.data_ptr(),
        class_counts=counts.data_ptr(), num_classes=counts.numel(), temperature=float(temperature),
        normalize=bool(normalize), lse=lse.data_ptr(), loss=loss64.data_ptr(), num_threads=_ext.num_threads(),
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
        features=features.data_ptr(), dtype=_ext.DTYPE_CODES[features.dtype], n=n, d=d,
        row_stride=features.stride(0), col_stride=features.stride(1), class_ids=class_ids.data_ptr(),
        class_counts=counts.data_ptr(), num_classes=counts.numel(), lse=lse.data_ptr(),
        temperature=float(temperature), normalize=bool(normalize), grad_loss=float(grad_loss),
        dfeatures=dfeatures.data_ptr(), num_threads=_ext.num_threads(),
    )
    _ext.raise_for_status(status, "sup_con backward", "features", "labels")
    return dfeatures


@sup_con_backward.register_kernel("cuda")
def _(grad_loss, features, labels, lse, temperature, normalize):
    return launchers("contrastive").sup_con_backward(grad_loss, features, labels, lse, temperature, normalize)


# pytorch-metric-learning's SupConLoss averages with AvgNonZeroReducer: the mean over
# the anchors whose loss is > 0, and 0 for a batch with no negative pair. An anchor whose
# only positive is (nearly) its duplicate has a loss far below the rounding of
# lse_i - mean_positive_i (a few ulps of 1/t), so "non-zero" is read as "above that
# rounding level": NONZERO_ULPS ulps of |lse_i| + |mean_positive_i| in the stats dtype.
NONZERO_ULPS = 4.0


@torch.library.custom_op("sslkernels::sup_con_anchor_losses", mutates_args=())
def sup_con_anchor_losses(
    features: Tensor, labels: Tensor, lse: Tensor, temperature: float, normalize: bool
) -> tuple[Tensor, Tensor]:
    """(kept [N] float64: each anchor's loss where it is above the rounding level, else 0;
    counts [2] float64: anchors with a positive, anchors kept). O(N D): the positives
    come from class sums, the denominators from the forward's lse. No gradient (the
    caller uses it as constants)."""
    z = features.double()
    if normalize:
        z = torch.nn.functional.normalize(z, dim=1, eps=1e-12)
    _, class_ids, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    class_sum = torch.zeros(counts.numel(), z.shape[1], dtype=z.dtype, device=z.device).index_add_(0, class_ids, z)
    positives = counts[class_ids] - 1
    is_anchor = positives > 0
    mean_positive = (z * (class_sum[class_ids] - z)).sum(1) / (temperature * positives.clamp(min=1).to(z.dtype))
    loss = lse.double() - mean_positive
    # The rounding level of the kernel's own arithmetic (float32 but for float64 inputs),
    # not of the lse's storage, which is float64 for every dtype.
    rounding = NONZERO_ULPS * torch.finfo(_stats_dtype(features.dtype)).eps * (lse.double().abs() + mean_positive.abs())
    kept = is_anchor & (loss > rounding) & (counts.numel() > 1)  # one class: no negative pair, pml's 0
    counts_out = torch.stack([is_anchor.sum(), kept.sum()]).double()
    return torch.where(kept, loss, torch.zeros_like(loss)), counts_out


@sup_con_anchor_losses.register_fake
def _(features, labels, lse, temperature, normalize):
    n = features.shape[0]
    return features.new_empty((n,), dtype=torch.float64), features.new_empty((2,), dtype=torch.float64)


SUP_CON_REDUCTIONS = ("mean", "nonzero")


def sup_con(features: Tensor, labels: Tensor, temperature: float, normalize: bool, reduction: str) -> Tensor:
    """The SupCon loss with its averaging chosen here: "mean" over the anchors with a
    positive (the paper's L_out), or "nonzero" (pytorch-metric-learning's default
    AvgNonZeroReducer, see sup_con_anchor_losses). Both stay fused: "nonzero" adds an
    O(N D) pass and rescales the fused mean's gradient by |anchors| / |kept|, so the
    anchors left out still contribute their gradient, which is below the rounding
    level (|d loss_i / d s| <= 2 loss_i)."""
    loss, lse = torch.ops.sslkernels.sup_con_forward(features, labels, temperature, normalize)
    if reduction == "mean":
        return loss
    kept, counts = torch.ops.sslkernels.sup_con_anchor_losses(features.detach(), labels, lse.detach(),
                                                              temperature, normalize)
    num_anchors, num_kept = counts.unbind()
    divisor = num_kept.clamp(min=1)
    value = (kept.sum() / divisor).to(loss.dtype)
    scale = torch.where(num_kept > 0, num_anchors / divisor, torch.zeros_like(divisor)).to(loss.dtype)
    # value of the non-zero mean, gradient of the fused mean times |anchors| / |kept|
    return value + (loss - loss.detach()) * scale


# ---------------------------------------------------------------- InfoNCE / CLIP
# lse holds the query-direction statistics [N], then (symmetric) the key direction [N].
# `temperature` is a 0-dim tensor so that a learnable one gets its (exact) gradient;
# `negatives_grad` says whether the queue needs a gradient (a MoCo queue does not).


def _query_key_args(query: Tensor, key: Tensor) -> dict:
    """The C++ core's keyword arguments for the [N, D] query and key."""
    n, d = query.shape
    return dict(query=query.data_ptr(), key=key.data_ptr(), dtype=_ext.DTYPE_CODES[query.dtype], n=n, d=d,
                q_row_stride=query.stride(0), q_col_stride=query.stride(1),
                k_row_stride=key.stride(0), k_col_stride=key.stride(1))


def _negatives_args(x: Optional[Tensor]):
    """(rows tensor, the C++ core's keyword arguments for the negatives); the caller
    keeps the rows tensor alive while the kernel runs.

    A shared queue [K, D] goes as is (per-query count 0); per-query hard negatives
    [N, M, D] go as their [N M, D] rows (a view when the layout allows, else a copy)
    with count M. No negatives: zero rows (the pointer is ignored).
    """
    per_query = 0
    if x is not None and x.dim() == 3:
        per_query = x.shape[1]
        x = x.reshape(-1, x.shape[2])
    view = dict(negatives=0, negatives_rows=0, n_row_stride=0, n_col_stride=0, negatives_per_query=per_query)
    if x is not None:
        view.update(negatives=x.data_ptr(), negatives_rows=x.shape[0], n_row_stride=x.stride(0),
                    n_col_stride=x.stride(1))
    return x, view


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


def _terms_args(query: Tensor, negatives: Optional[Tensor], logit_bias: Optional[Tensor],
                anchor_ids: Optional[Tensor], candidate_ids: Optional[Tensor]):
    """(tensors to keep alive, the C++ core's keyword arguments for the retrieval terms):
    the bias as float64, the ids as int64, contiguous; 0 for what is not given. Their
    shapes are checked first: the core reads N + K entries from each pointer."""
    check_op_terms(query, negatives, logit_bias, anchor_ids, candidate_ids)
    terms = _contiguous_terms(logit_bias, anchor_ids, candidate_ids, torch.float64)
    ptrs = [x.data_ptr() if x is not None else 0 for x in terms]
    return terms, dict(bias=ptrs[0], anchor_ids=ptrs[1], candidate_ids=ptrs[2])


def _contiguous_terms(logit_bias, anchor_ids, candidate_ids, bias_dtype: torch.dtype):
    """(bias in `bias_dtype`, anchor ids, candidate ids as int64), contiguous; None kept."""
    bias = logit_bias.detach().to(bias_dtype).contiguous() if logit_bias is not None else None
    ids = [x.to(torch.int64).contiguous() if x is not None else None for x in (anchor_ids, candidate_ids)]
    return bias, *ids


def _cuda_terms(query: Tensor, logit_bias: Optional[Tensor], anchor_ids: Optional[Tensor],
                candidate_ids: Optional[Tensor], positive_on_diagonal: bool) -> dict:
    """The Triton launchers' keyword arguments for the retrieval terms: the bias in the
    accumulator dtype, the ids as int64, contiguous."""
    bias, anchors, candidates = _contiguous_terms(logit_bias, anchor_ids, candidate_ids, _stats_dtype(query.dtype))
    return dict(logit_bias=bias, anchor_ids=anchors, candidate_ids=candidates,
                positive_on_diagonal=bool(positive_on_diagonal))


@torch.library.custom_op("sslkernels::info_nce_forward", mutates_args=())
def info_nce_forward(
    query: Tensor, key: Tensor, negatives: Optional[Tensor], temperature: Tensor, normalize: bool,
    symmetric: bool, in_batch_negatives: bool, negatives_grad: bool, logit_bias: Optional[Tensor] = None,
    anchor_ids: Optional[Tensor] = None, candidate_ids: Optional[Tensor] = None,
    positive_on_diagonal: bool = True,
) -> tuple[Tensor, Tensor]:
    raise _no_kernel("info_nce_forward", query.device)


@info_nce_forward.register_fake
def _(query, key, negatives, temperature, normalize, symmetric, in_batch_negatives, negatives_grad,
      logit_bias=None, anchor_ids=None, candidate_ids=None, positive_on_diagonal=True):
    rows = query.shape[0] * (2 if symmetric else 1)
    return query.new_empty(()), query.new_empty((rows,), dtype=torch.float64)


@info_nce_forward.register_kernel("cpu")
def _(query, key, negatives, temperature, normalize, symmetric, in_batch_negatives, negatives_grad,
      logit_bias=None, anchor_ids=None, candidate_ids=None, positive_on_diagonal=True):
    n, d = query.shape
    lse = torch.empty(n * (2 if symmetric else 1), dtype=torch.float64)
    loss64 = torch.empty((), dtype=torch.float64)
    neg_rows, negatives_view = _negatives_args(negatives)  # noqa: F841 (kept alive)
    terms, terms_view = _terms_args(query, negatives, logit_bias, anchor_ids, candidate_ids)  # noqa: F841 (kept alive)
    status = _ext._C.info_nce_forward(
        **_query_key_args(query, key), **negatives_view, **terms_view,
        positive_on_diagonal=bool(positive_on_diagonal),
        temperature=float(temperature), normalize=bool(normalize), symmetric=bool(symmetric),
        in_batch_negatives=bool(in_batch_negatives), lse_query=lse.data_ptr(),
        lse_key=_lse_key_ptr(lse, n, symmetric), loss=loss64.data_ptr(), num_threads=_ext.num_threads(),
    )
    _ext.raise_for_status(status, "info_nce", "query", "key", "negatives")
    return loss64.to(query.dtype), lse


@info_nce_forward.register_kernel("cuda")
def _(query, key, negatives, temperature, normalize, symmetric, in_batch_negatives, negatives_grad,
      logit_bias=None, anchor_ids=None, candidate_ids=None, positive_on_diagonal=True):
    if debug_enabled():
        check_finite(query, "query")
        check_finite(key, "key")
        if negatives is not None:
            check_finite(negatives, "negatives")
    return launchers("contrastive").info_nce_forward(
        query, key, negatives, temperature, normalize, symmetric, in_batch_negatives, negatives_grad,
        **_cuda_terms(query, logit_bias, anchor_ids, candidate_ids, positive_on_diagonal),
    )


@torch.library.custom_op("sslkernels::info_nce_backward", mutates_args=())
def info_nce_backward(
    grad_loss: Tensor, query: Tensor, key: Tensor, negatives: Optional[Tensor], temperature: Tensor,
    lse: Tensor, normalize: bool, symmetric: bool, in_batch_negatives: bool, negatives_grad: bool,
    logit_bias: Optional[Tensor] = None, anchor_ids: Optional[Tensor] = None,
    candidate_ids: Optional[Tensor] = None, positive_on_diagonal: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    raise _no_kernel("info_nce_backward", query.device)


@info_nce_backward.register_fake
def _(grad_loss, query, key, negatives, temperature, lse, normalize, symmetric, in_batch_negatives, negatives_grad,
      logit_bias=None, anchor_ids=None, candidate_ids=None, positive_on_diagonal=True):
    # contiguous, as the kernels return them (empty_like would copy a transposed layout)
    dneg = negatives.new_empty(negatives.shape) if negatives is not None and negatives_grad else query.new_empty((0,))
    return query.new_empty(query.shape), key.new_empty(key.shape), dneg, torch.empty_like(temperature)


@info_nce_backward.register_kernel("cpu")
def _(grad_loss, query, key, negatives, temperature, lse, normalize, symmetric, in_batch_negatives, negatives_grad,
      logit_bias=None, anchor_ids=None, candidate_ids=None, positive_on_diagonal=True):
    n, d = query.shape
    dquery, dkey, dneg, want_dneg = _gradient_buffers(query, key, negatives, negatives_grad)
    dtemp64 = torch.empty((), dtype=torch.float64)
    neg_rows, negatives_view = _negatives_args(negatives)  # noqa: F841 (kept alive)
    terms, terms_view = _terms_args(query, negatives, logit_bias, anchor_ids, candidate_ids)  # noqa: F841 (kept alive)
    lse = lse.contiguous()
    status = _ext._C.info_nce_backward(
        **_query_key_args(query, key), **negatives_view, **terms_view,
        positive_on_diagonal=bool(positive_on_diagonal),
        lse_query=lse.data_ptr(), lse_key=_lse_key_ptr(lse, n, symmetric),
        temperature=float(temperature), normalize=bool(normalize), symmetric=bool(symmetric),
        in_batch_negatives=bool(in_batch_negatives), grad_loss=float(grad_loss),
        dquery=dquery.data_ptr(), dkey=dkey.data_ptr(), dnegatives=dneg.data_ptr() if want_dneg else 0,
        dtemperature=dtemp64.data_ptr(), num_threads=_ext.num_threads(),
    )
    _ext.raise_for_status(status, "info_nce backward", "query", "key", "negatives")
    return dquery, dkey, dneg, dtemp64.to(temperature.dtype)


@info_nce_backward.register_kernel("cuda")
def _(grad_loss, query, key, negatives, temperature, lse, normalize, symmetric, in_batch_negatives, negatives_grad,
      logit_bias=None, anchor_ids=None, candidate_ids=None, positive_on_diagonal=True):
    return launchers("contrastive").info_nce_backward(
        grad_loss, query, key, negatives, temperature, lse, normalize, symmetric, in_batch_negatives, negatives_grad,
        **_cuda_terms(query, logit_bias, anchor_ids, candidate_ids, positive_on_diagonal),
    )


@torch.library.custom_op("sslkernels::info_nce_loss_and_grads", mutates_args=())
def info_nce_loss_and_grads(
    query: Tensor, key: Tensor, negatives: Optional[Tensor], temperature: Tensor, normalize: bool,
    negatives_grad: bool, logit_bias: Optional[Tensor] = None, anchor_ids: Optional[Tensor] = None,
    candidate_ids: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    raise _no_kernel("info_nce_loss_and_grads", query.device)


# The gradients come out in float32 (float64 for float64 inputs; dtemperature in
# float64), never a half type: autograd scales them by the upstream gradient (an AMP
# loss scale of 2^16, say) before they are rounded to the inputs' dtypes, so the small
# ones do not underflow.


@info_nce_loss_and_grads.register_fake
def _(query, key, negatives, temperature, normalize, negatives_grad, logit_bias=None, anchor_ids=None,
      candidate_ids=None):
    wide = _stats_dtype(query.dtype)
    want_dneg = negatives is not None and negatives_grad
    dneg = negatives.new_empty(negatives.shape, dtype=wide) if want_dneg else query.new_empty((0,))
    return (query.new_empty(()), query.new_empty(query.shape, dtype=wide), key.new_empty(key.shape, dtype=wide),
            dneg, temperature.new_empty((), dtype=torch.float64))


@info_nce_loss_and_grads.register_kernel("cpu")
def _(query, key, negatives, temperature, normalize, negatives_grad, logit_bias=None, anchor_ids=None,
      candidate_ids=None):
    n, d = query.shape
    dquery, dkey, dneg, want_dneg = _gradient_buffers(query, key, negatives, negatives_grad,
                                                      _stats_dtype(query.dtype))
    loss64 = torch.empty((), dtype=torch.float64)
    dtemp64 = torch.empty((), dtype=torch.float64)
    neg_rows, negatives_view = _negatives_args(negatives)  # noqa: F841 (kept alive)
    if negatives_view.pop("negatives_per_query"):
        raise ValueError("info_nce_loss_and_grads takes a shared [K, D] queue, not per-query negatives")
    terms, terms_view = _terms_args(query, negatives, logit_bias, anchor_ids, candidate_ids)  # noqa: F841 (kept alive)
    status = _ext._C.info_nce_loss_and_grads(
        **_query_key_args(query, key), **negatives_view, **terms_view,
        temperature=float(temperature), normalize=bool(normalize), loss=loss64.data_ptr(),
        dquery=dquery.data_ptr(), dkey=dkey.data_ptr(), dnegatives=dneg.data_ptr() if want_dneg else 0,
        dtemperature=dtemp64.data_ptr(), num_threads=_ext.num_threads(),
    )
    _ext.raise_for_status(status, "info_nce", "query", "key", "negatives")
    return loss64.to(query.dtype), dquery, dkey, dneg, dtemp64


def loss_and_grads_from_kernels(kernels, query, key, negatives, temperature, normalize, negatives_grad,
                                logit_bias=None, anchor_ids=None, candidate_ids=None):
    """The one-sweep op's result from the Triton launchers `kernels` (the CUDA path;
    the interpreter tests pass interpreted ones): they recompute tiles anyway, so it
    is the forward, then the backward for grad_loss = 1. Unlike the C++ kernel, the
    Triton backward rounds the gradients to the inputs' dtype before they are widened
    here: `sslkernels.info_nce` does not send CUDA tensors to this op (it keeps the
    forward / backward ops there, which fold the upstream gradient in first)."""
    terms = _cuda_terms(query, logit_bias, anchor_ids, candidate_ids, True)
    loss, lse = kernels.info_nce_forward(query, key, negatives, temperature, normalize, False, True, negatives_grad,
                                         **terms)
    dquery, dkey, dneg, dtemp = kernels.info_nce_backward(
        torch.ones_like(loss), query, key, negatives, temperature, lse, normalize, False, True, negatives_grad,
        **terms,
    )
    wide = _stats_dtype(query.dtype)
    return loss, dquery.to(wide), dkey.to(wide), dneg.to(wide), dtemp.to(torch.float64)


@info_nce_loss_and_grads.register_kernel("cuda")
def _(query, key, negatives, temperature, normalize, negatives_grad, logit_bias=None, anchor_ids=None,
      candidate_ids=None):
    if debug_enabled():
        check_finite(query, "query")
        check_finite(key, "key")
        if negatives is not None:
            check_finite(negatives, "negatives")
    return loss_and_grads_from_kernels(
        launchers("contrastive"), query, key, negatives, temperature, normalize, negatives_grad,
        logit_bias, anchor_ids, candidate_ids,
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
    return (*grads, *[None] * (len(needed) - 4))


info_nce_loss_and_grads.register_autograd(_scale_saved_grads, setup_context=_setup_saved_grads)


# ---------------------------------------------------------------- autograd


def _register_loss_autograd(forward_op, backward_op, differentiable: tuple):
    """Autograd for a fused loss op `forward(*tensors, *scalars) -> (loss, *stats)`.

    Saves the tensor inputs and the statistics (lse, NT-Xent's row norms: O(rows), never
    a similarity matrix) and calls `backward_op(grad_loss, *tensors, *stats, *scalars)`,
    which returns the gradients of the inputs flagged in `differentiable` (one flag per
    tensor input), in order.
    """
    num_tensors = len(differentiable)

    def setup_context(ctx, inputs, output):
        _, *stats = output
        ctx.save_for_backward(*inputs[:num_tensors], *stats)
        # Tensor-valued options (InfoNCE's bias and ids) as the forward read them: eager's
        # gradient does not change when the caller updates them in place before backward.
        ctx.scalars = tuple(x.clone() if isinstance(x, Tensor) else x for x in inputs[num_tensors:])
        ctx.mark_non_differentiable(*stats)

    def backward(ctx, grad_loss, *grad_stats):
        saved = ctx.saved_tensors
        tensors, stats = saved[:num_tensors], saved[num_tensors:]
        grads = backward_op(grad_loss, *tensors, *stats, *ctx.scalars)
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


# ---------------------------------------------------------------- routes
# What functional.py, nn/ and distributed.py call, on arguments already validated: each
# picks the op for its arguments and returns the loss.


def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: float, *, normalize: bool) -> Tensor:
    loss, _, _ = torch.ops.sslkernels.nt_xent_forward(z1, z2, temperature, bool(normalize))
    return loss


def sup_con_loss(features: Tensor, labels: Tensor, temperature: float, *, normalize: bool,
                 reduction: str = "mean") -> Tensor:
    return sup_con(features, labels, temperature, bool(normalize), reduction)


def _grad_wanted(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def info_nce_loss(query: Tensor, key: Tensor, negatives: Optional[Tensor], temperature: Tensor, *,
                  normalize: bool, symmetric: bool, in_batch_negatives: bool, negatives_grad: bool,
                  logit_bias: Optional[Tensor] = None, key_ids: Optional[Tensor] = None,
                  queue_ids: Optional[Tensor] = None) -> Tensor:
    """InfoNCE / CLIP through the fastest op for the call: `temperature` a 0-dim tensor,
    `negatives` None (not empty), a shared [K, D] queue or per-query [N, M, D].

    A training step on the C++ path (a CPU tensor requires grad, grad mode on) of the
    one-direction loss with in-batch keys and a shared queue or none takes the one-sweep
    op: loss and gradients together, each logit tile multiplied once, instead of a
    forward and a backward that recomputes the tiles. The Triton kernels have no such
    variant (on CUDA the op would only run the same two kernels earlier), so CUDA, and
    every other case, keeps the forward / backward ops.

    The retrieval terms (validated: `logit_bias` [N + K], `key_ids` [N], `queue_ids` [K]
    int64) go to the ops as the bias, anchor ids (each query's own key id) and candidate ids
    (keys, then the queue).
    """
    candidate_ids = key_ids
    if key_ids is not None and queue_ids is not None:
        candidate_ids = torch.cat([key_ids, queue_ids])
    one_sweep = (query.device.type == "cpu" and not symmetric and in_batch_negatives
                 and (negatives is None or negatives.dim() == 2))
    if one_sweep and _grad_wanted(query, key, negatives, temperature):
        loss, *_ = torch.ops.sslkernels.info_nce_loss_and_grads(
            query, key, negatives, temperature, bool(normalize), bool(negatives_grad), logit_bias, key_ids,
            candidate_ids,
        )
        return loss
    loss, _ = torch.ops.sslkernels.info_nce_forward(
        query, key, negatives, temperature, bool(normalize), bool(symmetric), bool(in_batch_negatives),
        bool(negatives_grad), logit_bias, key_ids, candidate_ids,
    )
    return loss
