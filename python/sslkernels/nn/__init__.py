"""Drop-in modules: same constructor arguments and forward signature as the module they replace."""
from sslkernels.nn.attention import Attention, patch_vit
from sslkernels.nn.contrastive import ClipLoss, InfoNCELoss, NTXentLoss, SupConLoss
from sslkernels.nn.koleo import KoLeoLoss
from sslkernels.nn.jepa import PackedBlock, PackedViTEncoder
from sslkernels.nn.siglip import SigLipLoss
from sslkernels.nn.sigreg import SIGReg

__all__ = ["Attention", "ClipLoss", "InfoNCELoss", "NTXentLoss", "PackedBlock", "PackedViTEncoder", "SIGReg", "SigLipLoss", "SupConLoss", "KoLeoLoss",
           "patch_vit"]
