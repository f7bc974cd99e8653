"""sslkernels: fused kernels for self-supervised representation learning.

    import sslkernels
    loss = sslkernels.nt_xent(z1, z2, temperature=0.5)
    criterion = sslkernels.nn.NTXentLoss(temperature=0.5)   # drop-in for lightly's
"""
from __future__ import annotations

import torch  # noqa: F401  (load torch's OpenMP runtime before the C++ core)

from sslkernels import _ext  # noqa: F401  (fails loudly if the C++ core is missing)
from sslkernels import nn, ops, reference  # noqa: F401
from sslkernels import metrics  # noqa: F401
from sslkernels._config import debug_enabled, set_debug
from sslkernels.functional import info_nce, nt_xent, sup_con
from sslkernels.functional import svdvals, svdvals_ex
from sslkernels.functional import masked_patch_attention, varlen_attention
from sslkernels.functional import sigreg
from sslkernels.functional import siglip_loss
from sslkernels.functional import koleo
from sslkernels.metrics import alpha_req, effective_rank, lidar, nesum, rankme
from sslkernels.monitor import RankMeMonitor
from sslkernels import masks  # noqa: F401
from sslkernels.nn.attention import patch_vit
from sslkernels.packing import PackedPatches, pack_patches, unpack_patches

__version__ = "0.1.0"

__all__ = [
    "pack_patches", "unpack_patches", "PackedPatches", "patch_vit", "masks",
    "masked_patch_attention", "varlen_attention",
    "svdvals", "svdvals_ex", "RankMeMonitor", "rankme", "effective_rank", "lidar", "alpha_req", "nesum", "metrics",
    "info_nce", "nt_xent", "sup_con", "sigreg",
    "siglip_loss", "koleo", "nn", "reference", "set_debug", "debug_enabled", "__version__"]
