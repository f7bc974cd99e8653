"""Drop-in modules: same constructor arguments and forward signature as the module they replace."""
from sslkernels.nn.attention import Attention, patch_vit
from sslkernels.nn.contrastive import ClipLoss, InfoNCELoss, NTXentLoss, SupConLoss
from sslkernels.nn.jepa import PackedBlock, PackedViTEncoder
from sslkernels.nn.koleo import KoLeoLoss

__all__ = ["Attention", "ClipLoss", "InfoNCELoss", "KoLeoLoss", "NTXentLoss", "PackedBlock", "PackedViTEncoder", "SupConLoss",
           "patch_vit"]
