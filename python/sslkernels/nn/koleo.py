"""Drop-in KoLeo module."""
from __future__ import annotations

from torch import nn

from sslkernels import _validation as v
from sslkernels import distributed as _distributed
from sslkernels.ops import koleo as _koleo_ops


class KoLeoLoss(nn.Module):
    """Drop-in for ``lightly.loss.KoLeoLoss(p=2, eps=1e-8)``, with DINOv3's ``topk`` and
    ``group_size`` and lightly's ``gather_distributed``; see :func:`sslkernels.koleo`.

    ``forward(x)`` takes ``[N, D]`` features and returns the scalar loss. Only ``p = 2``
    is fused (the search is by cosine similarity, the distance L2); other ``p`` raise
    NotImplementedError. With ``gather_distributed=True`` and an initialised process
    group of more than one rank, every rank's rows are candidates and each rank returns
    the loss over its own rows; ``group_size`` then counts rows of the gathered batch.
    """

    def __init__(self, p: float = 2, eps: float = 1e-8, topk: int = 1, group_size: int = None,
                 gather_distributed: bool = False):
        super().__init__()
        if p != 2:
            raise NotImplementedError(f"sslkernels.nn.KoLeoLoss fuses p = 2 only, got p = {p!r}")
        self.p = p
        self.eps = eps
        self.topk = topk
        self.group_size = group_size
        self.gather_distributed = bool(gather_distributed)
        # lightly's attribute, kept so code that inspects it still works (no parameters).
        self.pairwise_distance = nn.PairwiseDistance(p=p, eps=eps)

    def forward(self, x):
        group = _distributed.default_group() if self.gather_distributed else None
        if group is not None:
            return _distributed.koleo(x, self.eps, self.topk, self.group_size, group)
        eps, topk, group_rows = v.check_koleo(x, self.eps, self.topk, self.group_size)
        return _koleo_ops.koleo_loss(x, eps, topk, group_rows)
