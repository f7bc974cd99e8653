"""Drop-in modules: same constructor arguments and forward signature as the module they replace."""
from sslkernels.nn.contrastive import ClipLoss, InfoNCELoss, NTXentLoss, SupConLoss

__all__ = ["ClipLoss", "InfoNCELoss", "NTXentLoss", "SupConLoss"]
