"""A JEPA-style context encoder on packed tokens: every visible patch of every sample
reaches the encoder (no truncation to the batch minimum, no padding work)."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from sslkernels.nn.attention import Attention
from sslkernels.packing import PackedPatches, pack_patches

__all__ = ["PackedBlock", "PackedViTEncoder"]


class PackedBlock(nn.Module):
    """Pre-norm transformer block (timm / I-JEPA layout: ``norm1``, ``attn``, ``norm2``,
    ``mlp``) whose attention runs on packed tokens ``[T, C]`` with ``cu_seqlens``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return x + self.mlp(self.norm2(x))


class PackedViTEncoder(nn.Module):
    """The context encoder of I-JEPA, on packed tokens.

    ``forward(x, keep)``: ``x [B, L, C]`` patch embeddings (positions already added),
    ``keep`` a bool ``[B, L]`` mask or a list of index tensors (per-sample counts may
    differ) -> ``(tokens [T, C], packed)``; ``sslkernels.unpack_patches(tokens, packed)``
    gives ``[B, L, C]`` back. Usage::

        context, targets = sslkernels.masks.multiblock_masks(B, grid=(14, 14))
        enc = sslkernels.nn.PackedViTEncoder(embed_dim=192, depth=6, num_heads=3)
        tokens, packed = enc(patch_embeddings + pos_embed, context)
    """

    def __init__(self, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True):
        super().__init__()
        self.blocks = nn.ModuleList(PackedBlock(embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor, keep) -> Tuple[torch.Tensor, PackedPatches]:
        packed = pack_patches(x, keep)
        tokens = packed.tokens
        for block in self.blocks:
            tokens = block(tokens, packed.cu_seqlens, packed.max_seqlen)
        return self.norm(tokens), packed
