"""Helpers shared across the package (one place each)."""
from __future__ import annotations

import torch


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of saved statistics (lse, row maxima) and of accumulation: float64
    inputs are computed in float64 (gradcheck), every other dtype in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def no_kernel(op: str, device: torch.device) -> NotImplementedError:
    """The error of an op called on a device it has no kernel for."""
    return NotImplementedError(f"sslkernels::{op} has no kernel for device '{device.type}' (cpu and cuda only)")


def torch_distributed():
    """`torch.distributed`, imported on first use (not at `import sslkernels`)."""
    import torch.distributed as dist

    return dist


def initialized_distributed():
    """`torch.distributed` when it is available and initialised, else None."""
    dist = getattr(torch, "distributed", None)
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist
    return None
