"""torch.library custom ops: schema, fake kernel, cpu -> _C, cuda -> Triton, autograd.

Importing this package registers every op under the `sslkernels` namespace.
"""
from sslkernels.ops import contrastive, spectral  # noqa: F401
from sslkernels.ops import siglip  # noqa: F401

__all__ = ["contrastive", "spectral", "siglip"]
