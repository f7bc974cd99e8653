"""The documented functions: validation, then one op call. No math here."""
from __future__ import annotations

import torch

from sslkernels import _validation as v
from sslkernels import ops  # noqa: F401  (registers torch.ops.sslkernels.*)


def nt_xent(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, normalize: bool = True
) -> torch.Tensor:
    """SimCLR NT-Xent loss over the 2N rows of ``cat(z1, z2)``, fused.

    ``s_ij = z_i . z_j / temperature`` for all ``j != i``; the positive of row ``i``
    is its other view; the loss is the mean over the 2N rows of
    ``-log softmax(s_i)[positive(i)]``, accumulated in float32 (float64 for float64
    inputs) and returned as a 0-dim tensor of the inputs' dtype. With ``normalize``
    each row is L2-normalised first (eps 1e-12, as ``F.normalize``).

    Never allocates the (2N x 2N) logits, forward or backward: autograd keeps the
    inputs and 2N log-sum-exp values.

    Args:
        z1, z2: ``[N, D]`` embeddings of the two views; same shape, dtype (float32,
            float16, bfloat16 or float64) and device (cpu or cuda). N, D >= 1.
        temperature: finite, > 0.
        normalize: L2-normalise the rows first.
    """
    v.check_float_tensor(z1, "z1", 2)
    v.check_float_tensor(z2, "z2", 2)
    v.check_same(z1, z2, "z1", "z2")
    v.check_nonempty_rows(z1, "z1")
    temperature = v.check_temperature(temperature)
    loss, _ = torch.ops.sslkernels.nt_xent_forward(z1, z2, temperature, bool(normalize))
    return loss


def sup_con(
    features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1, normalize: bool = True
) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, the "L_out" form), fused.

    For anchor ``i`` with positives ``P(i) = {p != i : labels[p] == labels[i]}``:
    ``loss_i = -(1/|P(i)|) sum_{p in P(i)} log( exp(s_ip) / sum_{a != i} exp(s_ia) )``,
    ``s = z z^T / temperature`` (rows L2-normalised first when ``normalize``). The
    result is the mean over anchors with at least one positive; anchors without
    one are left out, and if none has one the loss is 0 with zero gradients.
    With one label per instance and its two views stacked this equals ``nt_xent``.

    Never allocates the (N x N) logits: autograd keeps the inputs and N floats.

    Args:
        features: ``[N, D]`` (all views stacked), float32/float16/bfloat16/float64.
        labels: integer ``[N]`` class ids (any values), same device.
        temperature: finite, > 0.
    """
    v.check_float_tensor(features, "features", 2)
    v.check_nonempty_rows(features, "features")
    labels = v.check_labels(labels, "labels", features.shape[0], features.device)
    temperature = v.check_temperature(temperature)
    loss, _ = torch.ops.sslkernels.sup_con_forward(features, labels, temperature, bool(normalize))
    return loss


def info_nce(
    query: torch.Tensor,
    key: torch.Tensor,
    temperature: float = 0.07,
    negatives: torch.Tensor = None,
    symmetric: bool = False,
    normalize: bool = True,
) -> torch.Tensor:
    """InfoNCE (MoCo / CPC) and, with ``symmetric=True``, the CLIP loss, fused.

    Row ``i`` of ``key`` is the positive of row ``i`` of ``query``; the other keys are
    its negatives, and a shared ``negatives`` ``[K, D]`` (a MoCo queue) joins them:
    ``loss_i = -log( exp(q_i.k_i/t) / (sum_j exp(q_i.k_j/t) + sum_n exp(q_i.n/t)) )``,
    mean over the N queries, inputs L2-normalised first when ``normalize``.
    ``symmetric=True`` averages that with the key -> query loss, whose candidates are
    the queries only; one pass over the logit tiles serves both directions.

    Never allocates the (N x (N + K)) logits: autograd keeps the inputs and N (2N)
    floats. The queue gets a gradient only if it requires one.

    Not built yet (NotImplementedError): per-query hard negatives ``[N, M, D]`` and a
    tensor (learnable) ``temperature``.
    """
    v.check_float_tensor(query, "query", 2)
    v.check_float_tensor(key, "key", 2)
    v.check_same(query, key, "query", "key")
    v.check_nonempty_rows(query, "query")
    if isinstance(temperature, torch.Tensor):
        raise NotImplementedError("sslkernels.info_nce: a tensor (learnable) temperature is not built yet; pass a float")
    temperature = v.check_temperature(temperature)
    negatives_grad = False
    if negatives is not None:
        if isinstance(negatives, torch.Tensor) and negatives.dim() == 3:
            raise NotImplementedError("sslkernels.info_nce: per-query negatives [N, M, D] are not built yet")
        v.check_float_tensor(negatives, "negatives", 2)
        if negatives.shape[1] != query.shape[1]:
            raise ValueError(
                f"`negatives` must have D = {query.shape[1]} columns like `query`, got shape {tuple(negatives.shape)}"
            )
        if negatives.dtype != query.dtype:
            raise TypeError(f"`negatives` must share the dtype of `query` ({query.dtype}), got {negatives.dtype}")
        if negatives.device != query.device:
            raise ValueError(f"`negatives` is on {negatives.device} but `query` is on {query.device}")
        if negatives.shape[0] == 0:
            negatives = None
        else:
            negatives_grad = negatives.requires_grad
    loss, _ = torch.ops.sslkernels.info_nce_forward(
        query, key, negatives, temperature, bool(normalize), bool(symmetric), negatives_grad
    )
    return loss
