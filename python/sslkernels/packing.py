"""Pack each sample's kept patches into one ragged token tensor, and back.

JEPA / MAE encoders see a different set of visible patches per sample. Instead of
truncating every sample to the batch minimum (I-JEPA's collator) or padding to the
maximum, pack the kept tokens of all samples into ``[T, C]`` with FlashAttention's
``cu_seqlens`` and run attention with :func:`sslkernels.varlen_attention`::

    packed = sslkernels.pack_patches(x, keep)          # x [B, L, C], keep [B, L] bool
    y = encoder_block(packed.tokens, cu_seqlens=packed.cu_seqlens, max_seqlen=packed.max_seqlen)
    out = sslkernels.unpack_patches(y, packed, fill=0.0)  # [B, L, C], fill where not kept

Gradients flow through both (an ``index_select`` and an ``index_copy``).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence, Tuple, Union

import torch

__all__ = ["PackedPatches", "pack_patches", "unpack_patches"]


class PackedPatches(NamedTuple):
    """What :func:`pack_patches` returns.

    * ``tokens``: ``[T, C]``, sample 0's kept patches in their given order, then
      sample 1's, ...
    * ``cu_seqlens``: int32 ``[B + 1]`` on the tokens' device: sample ``b`` is
      ``tokens[cu_seqlens[b]:cu_seqlens[b + 1]]``.
    * ``max_seqlen``: the largest count, a Python int (computed once at packing:
      on CUDA that is the one host sync of the round trip).
    * ``index``: int64 ``[T]``, the flat position ``b * L + l`` of each token.
    * ``batch_shape``: ``(B, L)`` of the unpacked tensor.
    """

    tokens: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    index: torch.Tensor
    batch_shape: Tuple[int, int]


KeepSpec = Union[torch.Tensor, Sequence[torch.Tensor]]


def _flat_positions(keep: KeepSpec, b: int, l: int, device: torch.device):
    """(flat index [T] int64, counts [B] int64) from a mask or a list of index tensors."""
    if isinstance(keep, torch.Tensor):
        if keep.dtype != torch.bool:
            raise TypeError(f"`keep` as a tensor must be a bool [B, L] mask, got dtype {keep.dtype}")
        if tuple(keep.shape) != (b, l):
            raise ValueError(f"`keep` must have shape [B, L] = {(b, l)}, got {tuple(keep.shape)}")
        keep = keep.to(device)
        flat = torch.nonzero(keep.reshape(-1), as_tuple=False).reshape(-1)  # raster order per sample
        return flat, keep.sum(dim=1)
    if not isinstance(keep, (list, tuple)):
        raise TypeError(f"`keep` must be a bool [B, L] tensor or a list of index tensors, got {type(keep).__name__}")
    if len(keep) != b:
        raise ValueError(f"`keep` has {len(keep)} index tensors for a batch of {b}")
    parts, counts = [], []
    for i, idx in enumerate(keep):
        if not isinstance(idx, torch.Tensor) or idx.dim() != 1:
            raise ValueError(f"`keep[{i}]` must be a 1-D index tensor")
        if idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"`keep[{i}]` must be int64 or int32, got {idx.dtype}")
        idx = idx.to(device=device, dtype=torch.int64)
        if idx.numel():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= l:
                raise ValueError(f"`keep[{i}]` holds positions outside [0, {l}): min {lo}, max {hi}")
            if torch.unique(idx).numel() != idx.numel():
                raise ValueError(f"`keep[{i}]` holds a position more than once")
        parts.append(idx + i * l)
        counts.append(idx.numel())
    flat = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64, device=device)
    return flat, torch.tensor(counts, dtype=torch.int64, device=device)


def pack_patches(x: torch.Tensor, keep: KeepSpec) -> PackedPatches:
    """Gather each sample's kept patches of ``x [B, L, C]`` into ``[T, C]``.

    ``keep`` is a bool ``[B, L]`` mask (kept patches in raster order) or a list of B
    1-D int64 index tensors (any order, no repeats; counts may differ). See
    :class:`PackedPatches` for the result.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`x` must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"`x` must be [B, L, C], got shape {tuple(x.shape)}")
    b, l, c = x.shape
    if b == 0 or l == 0:
        raise ValueError(f"`x` is empty (shape {tuple(x.shape)})")
    flat, counts = _flat_positions(keep, b, l, x.device)
    cu = torch.zeros(b + 1, dtype=torch.int32, device=x.device)
    cu[1:] = torch.cumsum(counts, 0).to(torch.int32)
    max_seqlen = int(counts.max()) if b else 0
    tokens = x.reshape(b * l, c).index_select(0, flat)
    return PackedPatches(tokens, cu, max_seqlen, flat, (b, l))


def unpack_patches(tokens: torch.Tensor, packed: PackedPatches, fill: float = 0.0) -> torch.Tensor:
    """Put ``tokens [T, C']`` back at the positions ``packed`` took them from: ``[B, L, C']``
    with ``fill`` at the patches that were not kept (C' may differ from the packed C)."""
    if not isinstance(packed, PackedPatches):
        raise TypeError(f"`packed` must be the PackedPatches that pack_patches returned, got {type(packed).__name__}")
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise ValueError("`tokens` must be a [T, C] tensor")
    if tokens.shape[0] != packed.index.numel():
        raise ValueError(f"`tokens` has {tokens.shape[0]} rows, `packed` holds {packed.index.numel()} tokens")
    b, l = packed.batch_shape
    out = tokens.new_full((b * l, tokens.shape[1]), fill)
    return out.index_copy(0, packed.index.to(tokens.device), tokens).reshape(b, l, tokens.shape[1])
