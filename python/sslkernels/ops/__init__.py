"""torch.library custom ops: schema, fake kernel, cpu -> _C, cuda -> Triton, autograd.

Importing this package registers every op under the `sslkernels` namespace.
"""
from sslkernels.ops import contrastive, koleo, siglip, sigreg, spectral  # noqa: F401

__all__ = ["contrastive", "koleo", "siglip", "sigreg", "spectral"]
