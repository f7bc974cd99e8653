"""Eager contrastive losses, written the way users write them today."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent_reference(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, normalize: bool = True
) -> torch.Tensor:
    """SimCLR NT-Xent, eager: F.normalize, Z @ Z.T, diagonal masked to -inf, F.cross_entropy.

    Holds the full (2N x 2N) logit matrix. Computes in the inputs' dtype (pass
    float64 tensors for the oracle); returns a 0-dim tensor of that dtype.
    """
    n = z1.shape[0]
    z = torch.cat([z1, z2], dim=0)
    if normalize:
        z = F.normalize(z, dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, targets)
