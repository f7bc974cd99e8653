"""Drop-in modules: same constructor arguments and forward signature as the module they replace."""
from sslkernels.nn.contrastive import NTXentLoss, SupConLoss

__all__ = ["NTXentLoss", "SupConLoss"]
