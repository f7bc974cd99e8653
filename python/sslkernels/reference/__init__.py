"""Eager PyTorch implementations: the test oracle (run in float64) and the
benchmark baseline. They are never a silent fallback of a fused path."""
from sslkernels.reference.attention import (
    dense_attention_reference, masked_patch_attention_reference, varlen_attention_reference)
from sslkernels.reference.contrastive import info_nce_reference, nt_xent_reference, sup_con_reference

from sslkernels.reference.sigreg import sigreg_reference
from sslkernels.reference.koleo import koleo_neighbors_reference, koleo_reference
from sslkernels.reference.spectral import rankme_reference, svdvals_reference
from sslkernels.reference.siglip import siglip_reference

__all__ = [
    "dense_attention_reference", "masked_patch_attention_reference", "varlen_attention_reference",
    "rankme_reference", "sigreg_reference", "svdvals_reference", "siglip_reference", "info_nce_reference", "nt_xent_reference", "sup_con_reference",
    "koleo_neighbors_reference", "koleo_reference"]
