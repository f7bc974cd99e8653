"""Drop-in contrastive loss modules."""
from __future__ import annotations

import torch
from torch import nn

from sslkernels import _validation as v
from sslkernels import functional


class NTXentLoss(nn.Module):
    """Drop-in for ``lightly.loss.NTXentLoss(temperature)`` (no memory bank, no gather).

    ``forward(out0, out1)`` returns the SimCLR loss over both views, with the rows
    L2-normalised inside the loss, as lightly does; fused, never holding the
    (2N x 2N) similarity matrix.
    """

    def __init__(self, temperature: float = 0.5, memory_bank_size=0, gather_distributed: bool = False):
        super().__init__()
        self.temperature = v.check_temperature(temperature)
        if memory_bank_size not in (0, None):
            raise NotImplementedError(
                "sslkernels.nn.NTXentLoss: memory_bank_size > 0 (the MoCo-style bank) is not built yet"
            )
        if gather_distributed:
            raise NotImplementedError(
                "sslkernels.nn.NTXentLoss: gather_distributed=True is not built yet"
            )
        self.memory_bank_size = 0
        self.gather_distributed = False

    def forward(self, out0: torch.Tensor, out1: torch.Tensor) -> torch.Tensor:
        return functional.nt_xent(out0, out1, temperature=self.temperature, normalize=True)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class SupConLoss(nn.Module):
    """Drop-in for ``pytorch_metric_learning.losses.SupConLoss(temperature)``.

    ``forward(embeddings, labels)`` returns the supervised contrastive loss with
    cosine similarity (rows L2-normalised), averaged over the anchors that have a
    positive, fused and never holding the (N x N) similarity matrix.

    One difference on a degenerate batch: when every row shares one label (no
    negative anywhere) pytorch-metric-learning returns 0, while this module (like
    the paper's L_out, whose denominator is every other row) returns the loss over
    the positives. Not built yet (they raise NotImplementedError): ``indices_tuple``,
    ``ref_emb`` / ``ref_labels``, and custom ``distance`` / ``reducer`` /
    ``embedding_regularizer`` arguments.
    """

    def __init__(self, temperature: float = 0.1, **kwargs):
        super().__init__()
        self.temperature = v.check_temperature(temperature)
        if kwargs:
            raise NotImplementedError(
                f"sslkernels.nn.SupConLoss: options {sorted(kwargs)} are not built yet "
                "(cosine similarity and the mean over anchors with positives are fixed)"
            )

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        if indices_tuple is not None or ref_emb is not None or ref_labels is not None:
            raise NotImplementedError(
                "sslkernels.nn.SupConLoss: indices_tuple / ref_emb / ref_labels are not built yet"
            )
        if labels is None:
            raise ValueError("sslkernels.nn.SupConLoss: `labels` is required")
        return functional.sup_con(embeddings, labels, temperature=self.temperature, normalize=True)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
