"""Eager SIGReg (LeJEPA), the formulas of lightly's ``SIGReg`` written out: the test
oracle (in float64) and the benchmark baseline. It builds the N x S x knots tensor
of t_k * x (and its cos and sin), which is what the fused op avoids."""
from __future__ import annotations

import torch


def sigreg_reference(proj: torch.Tensor, directions: torch.Tensor, knots: int = 17, t_max: float = 3.0,
                     num_samples=None) -> torch.Tensor:
    """proj [..., N, D], directions [D, S]: mean over (..., s) of
    N * sum_k w_k phi_k ((mean_n cos(t_k x_ns) - phi_k)^2 + (mean_n sin(t_k x_ns))^2).
    `num_samples` overrides N (the global batch of a distributed run)."""
    x = proj @ directions
    t = torch.linspace(0.0, t_max, knots, dtype=proj.dtype, device=proj.device)
    angles = x.unsqueeze(-1) * t
    n = proj.shape[-2] if num_samples is None else num_samples
    cos_mean = angles.cos().sum(-3) / n
    sin_mean = angles.sin().sum(-3) / n
    dt = t_max / (knots - 1)
    weights = torch.full((knots,), 2 * dt, dtype=proj.dtype, device=proj.device)
    weights[0] = dt
    weights[-1] = dt
    phi = torch.exp(-t.square() / 2)
    err = (cos_mean - phi).square() + sin_mean.square()
    return ((err @ (weights * phi)) * n).mean()
