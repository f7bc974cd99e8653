"""Eager singular-value metrics through torch.linalg.svdvals: the oracle (in
float64) and the baseline of ``sslkernels bench``."""
from __future__ import annotations

import torch


def svdvals_reference(A: torch.Tensor) -> torch.Tensor:
    """torch.linalg.svdvals (LAPACK gesdd on CPU)."""
    return torch.linalg.svdvals(A)


def rankme_reference(Z: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """RankMe as users write it today (stable-ssl, decalmlutils): svdvals of the
    uncentred Z, p = s / ||s||_1 + eps, exp(entropy). Computes in Z's dtype."""
    s = torch.linalg.svdvals(Z)
    p = s / s.sum(dim=-1, keepdim=True) + eps
    return torch.exp(-(p * torch.log(p)).sum(dim=-1))
