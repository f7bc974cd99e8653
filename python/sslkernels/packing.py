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

import itertools
from typing import NamedTuple, Sequence, Tuple, Union

import torch

__all__ = ["PackedPatches", "pack_patches", "unpack_patches"]


class PackedPatches(NamedTuple):
    """What :func:`pack_patches` returns.

    * ``tokens``: ``[T, C]``, sample 0's kept patches in their given order, then
      sample 1's, ...
    * ``cu_seqlens``: int32 ``[B + 1]`` on the tokens' device: sample ``b`` is
      ``tokens[cu_seqlens[b]:cu_seqlens[b + 1]]``.
    * ``max_seqlen``: the largest count, a Python int, computed once at packing (on
      CUDA a Python int is a host sync: pack once per batch and pass this value to
      every layer, which then need none; :func:`unpack_patches` needs none either).
    * ``index``: int64 ``[T]``, the flat position ``b * L + l`` of each token.
    * ``batch_shape``: ``(B, L)`` of the unpacked tensor.
    """

    tokens: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    index: torch.Tensor
    batch_shape: Tuple[int, int]


KeepSpec = Union[torch.Tensor, Sequence[torch.Tensor]]


def _from_mask(keep: torch.Tensor, b: int, l: int, device: torch.device):
    """(flat index [T] int64, cu_seqlens int32 [B+1], max_seqlen) from a bool [B, L] mask."""
    if keep.dtype != torch.bool:
        raise TypeError(f"`keep` as a tensor must be a bool [B, L] mask, got dtype {keep.dtype}")
    if tuple(keep.shape) != (b, l):
        raise ValueError(f"`keep` must have shape [B, L] = {(b, l)}, got {tuple(keep.shape)}")
    keep = keep.to(device)
    counts = keep.sum(dim=1)
    cu = torch.zeros(b + 1, dtype=torch.int64, device=device)
    cu[1:] = torch.cumsum(counts, 0)
    total, max_seqlen = torch.stack([cu[-1], counts.max()]).tolist()  # the one host sync
    # The kept positions in raster order without a second sync (torch.nonzero would make
    # one; nonzero_static has no CUDA kernel before torch 2.6): each kept position goes to
    # slot (its rank among the kept), the others to a spare last slot that is dropped.
    flat_keep = keep.reshape(-1)
    slot = torch.where(flat_keep, torch.cumsum(flat_keep, 0) - 1, total)
    flat = torch.empty(total + 1, dtype=torch.int64, device=device)
    flat.scatter_(0, slot, torch.arange(b * l, device=device))
    flat = flat[:total]
    return flat, cu.to(torch.int32), int(max_seqlen)


def _from_index_lists(keep: Sequence[torch.Tensor], b: int, l: int, device: torch.device):
    """(flat index [T] int64, cu_seqlens int32 [B+1], max_seqlen) from B 1-D index tensors."""
    if len(keep) != b:
        raise ValueError(f"`keep` has {len(keep)} index tensors for a batch of {b}")
    lengths = []
    for i, idx in enumerate(keep):
        if not isinstance(idx, torch.Tensor) or idx.dim() != 1:
            raise ValueError(f"`keep[{i}]` must be a 1-D index tensor, got "
                             f"{tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__}")
        if idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"`keep[{i}]` must be int64 or int32, got {idx.dtype}")
        lengths.append(idx.numel())
    total = sum(lengths)
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32).to(device)
    local = torch.cat([idx.to(device=device, dtype=torch.int64) for idx in keep])
    sample = torch.repeat_interleave(torch.arange(b, device=device),
                                     torch.tensor(lengths, device=device), output_size=total)
    flat = local + sample * l
    if total:
        # range and repeats of every sample in one host sync
        outside = (local < 0) | (local >= l)
        seen = torch.bincount(torch.where(outside, 0, flat), minlength=b * l)
        bad_range, bad_repeat = torch.stack([outside.any(), seen.max() > 1]).tolist()
        if bad_range:
            i = int(sample[outside][0])
            raise ValueError(f"`keep[{i}]` holds positions outside [0, {l}): min {int(keep[i].min())}, "
                             f"max {int(keep[i].max())}")
        if bad_repeat:
            pos = int(torch.nonzero(seen > 1)[0])
            raise ValueError(f"`keep[{pos // l}]` holds position {pos % l} more than once")
    return flat, cu, max(lengths)


def pack_patches(x: torch.Tensor, keep: KeepSpec) -> PackedPatches:
    """Gather each sample's kept patches of ``x [B, L, C]`` into ``[T, C]``.

    ``keep`` is a bool ``[B, L]`` mask (kept patches in raster order) or a list of B
    1-D int64 / int32 index tensors (any order, kept as given, no repeats; counts may
    differ, an empty one is a sample with no tokens). See :class:`PackedPatches` for
    the result. Gradients flow to ``x`` (an ``index_select``). Usage::

        context, _ = sslkernels.masks.multiblock_masks(B, grid=(14, 14))   # [B, 196] bool
        p = sslkernels.pack_patches(patch_embeddings, context)              # p.tokens [T, C]
        y = attn(p.tokens, cu_seqlens=p.cu_seqlens, max_seqlen=p.max_seqlen)
        full = sslkernels.unpack_patches(y, p, fill=0.0)                    # [B, 196, C]

    On CUDA this makes one host sync (``max_seqlen`` and the token count for a mask;
    the range / repeat check for index lists, whose lengths are already on the host).
    Reuse ``PackedPatches.max_seqlen`` for every layer rather than recomputing it.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`x` must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"`x` must be [B, L, C], got shape {tuple(x.shape)}")
    b, l, c = x.shape
    if b == 0 or l == 0:
        raise ValueError(f"`x` is empty (shape {tuple(x.shape)}): pack_patches needs B >= 1 and L >= 1")
    if isinstance(keep, torch.Tensor):
        flat, cu, max_seqlen = _from_mask(keep, b, l, x.device)
    elif isinstance(keep, (list, tuple)):
        flat, cu, max_seqlen = _from_index_lists(keep, b, l, x.device)
    else:
        raise TypeError(f"`keep` must be a bool [B, L] tensor or a list of index tensors, got {type(keep).__name__}")
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
