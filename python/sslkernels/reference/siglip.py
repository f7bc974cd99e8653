"""Eager SigLIP loss, written the way open_clip writes it."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def siglip_reference(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                     logit_bias=None, positives: bool = True) -> torch.Tensor:
    """``-sum(logsigmoid(labels * (logit_scale * I T^T + logit_bias))) / N``, labels +1 on
    the diagonal (when ``positives``) and -1 elsewhere, as open_clip's SigLipLoss._loss.

    Holds the (N x M) logits and labels. Computes in the inputs' dtype (pass float64
    tensors for the oracle)."""
    logits = logit_scale * image_features @ text_features.T
    if logit_bias is not None:
        logits = logits + logit_bias
    labels = -torch.ones_like(logits)
    if positives:
        labels.diagonal().fill_(1.0)
    return -F.logsigmoid(labels * logits).sum() / image_features.shape[0]
