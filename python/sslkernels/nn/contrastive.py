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
