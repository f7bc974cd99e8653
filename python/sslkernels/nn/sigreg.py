"""Drop-in for lightly's ``SIGReg`` (LeJEPA)."""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from sslkernels import _validation as v
from sslkernels import distributed as _distributed
from sslkernels import functional
from sslkernels.ops.sigreg import knot_weights


class SIGReg(nn.Module):
    """Drop-in for ``lightly.loss.SIGReg(knots=17, t_max=3.0, num_vectors=1024,
    gather_distributed=False)`` (keyword-only, as lightly's).

    Each forward draws ``num_vectors`` Gaussian directions ``[D, num_vectors]`` in proj's
    dtype and device (the same ``torch.randn`` call as lightly's, so a seeded run draws
    the same directions), broadcasts them from rank 0 under ``gather_distributed``,
    normalises each column, and returns :func:`sslkernels.sigreg` of ``proj [..., N, D]``
    along them: fused, never holding the ``N x num_vectors x knots`` tensor. With
    ``gather_distributed`` the cos / sin statistics and N are summed over the ranks
    (exact gradients, every rank gets the global loss). Buffers ``t``, ``phi`` and
    ``weights`` (= trapezoid weights times phi) as lightly's, float32.
    """

    def __init__(self, *, knots: int = 17, t_max: float = 3.0, num_vectors: int = 1024,
                 gather_distributed: bool = False):
        super().__init__()
        if isinstance(knots, bool) or not isinstance(knots, numbers.Integral) or knots <= 1:
            raise ValueError(f"`knots` must be an integer greater than one, got {knots!r}")
        if isinstance(t_max, bool) or not isinstance(t_max, numbers.Real) or not math.isfinite(t_max) or t_max <= 0:
            raise ValueError(f"`t_max` must be a finite number greater than zero, got {t_max!r}")
        self.num_vectors = v.check_num_vectors(num_vectors)
        if gather_distributed and not torch.distributed.is_available():
            raise ValueError(
                "`gather_distributed` is True but torch.distributed is not available; set it to False or "
                "install a torch build with distributed support"
            )
        self.knots, self.t_max = int(knots), float(t_max)
        self.gather_distributed = bool(gather_distributed)
        phi, weighted = knot_weights(self.knots, self.t_max, "cpu")
        self.register_buffer("t", torch.linspace(0, self.t_max, self.knots, dtype=torch.float32))
        self.register_buffer("phi", phi.float())
        self.register_buffer("weights", weighted.float())

    def _directions(self, num_features: int, device, dtype) -> torch.Tensor:
        directions = torch.randn(num_features, self.num_vectors, device=device, dtype=dtype)
        group = _distributed.default_group() if self.gather_distributed else None
        if group is not None:
            torch.distributed.broadcast(directions, src=0, group=group)
        return directions.div_(directions.norm(p=2, dim=0))

    def forward(self, proj: torch.Tensor) -> torch.Tensor:
        if not isinstance(proj, torch.Tensor) or proj.dim() < 2:
            v.check_float_tensor(proj, "proj", 2)
        v.check_float_tensor(proj, "proj", proj.dim())
        directions = self._directions(proj.shape[-1], proj.device, proj.dtype)
        group = _distributed.default_group() if self.gather_distributed else None
        return functional.sigreg(proj, directions, self.knots, self.t_max, process_group=group)
