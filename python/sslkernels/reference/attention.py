"""Eager attention over kept patches and packed sequences, written the way users
write it today: the test oracle (run it in float64) and the benchmark baseline."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, L, H, Dh] at index [B, K] (-1 padding reads row 0) -> a padded copy [B, K, H, Dh]."""
    b, k = index.shape
    idx = index.clamp_min(0).view(b, k, 1, 1).expand(b, k, x.shape[2], x.shape[3])
    return torch.gather(x, 1, idx)


def masked_patch_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: torch.Tensor,
    kv_index: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Gather the kept patches, pad to the index width, mask padded keys with a boolean
    mask and call ``F.scaled_dot_product_attention``; rows where ``index`` is -1 are 0.

    q, k, v ``[B, L, H, Dh]``; index ``[B, K]``, kv_index ``[B, Kv]`` (default: index),
    int64 positions padded with -1. Returns ``[B, K, H, Dh]``. A sample without keys
    gives zero rows (its mask is opened so SDPA makes no NaN, then the rows are zeroed).
    """
    kv_index = index if kv_index is None else kv_index
    qg = _gather_rows(q, index).transpose(1, 2)       # [B, H, K, Dh]
    kg = _gather_rows(k, kv_index).transpose(1, 2)    # [B, H, Kv, Dh]
    vg = _gather_rows(v, kv_index).transpose(1, 2)
    key_kept = kv_index >= 0                          # [B, Kv]
    no_keys = ~key_kept.any(dim=1, keepdim=True)
    mask = (key_kept | no_keys)[:, None, None, :]     # [B, 1, 1, Kv]
    out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=scale)
    out = out.transpose(1, 2)                         # [B, K, H, Dh]
    live = ((index >= 0) & ~no_keys)[:, :, None, None]
    return torch.where(live, out, torch.zeros((), dtype=out.dtype, device=out.device))


def varlen_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Packed ``[T, H, Dh]`` sequences, attention within each: one SDPA call per
    sequence (``cu_seqlens`` [B + 1] offsets). ``max_seqlen`` is accepted for the
    FlashAttention signature; the loop does not need it."""
    bounds = [int(x) for x in cu_seqlens.tolist()]
    pieces = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        seq = [x[start:end].transpose(0, 1) for x in (q, k, v)]   # [H, n, Dh]
        pieces.append(F.scaled_dot_product_attention(*seq, scale=scale).transpose(0, 1))
    if not pieces:
        return q.new_zeros(q.shape[0], q.shape[1], v.shape[2])
    return torch.cat(pieces, dim=0)


def dense_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: int,
                              scale: Optional[float] = None) -> torch.Tensor:
    """Equal-length packed sequences ``[B * n, H, Dh]`` as the dense ``[B, H, n, Dh]``
    views ``F.scaled_dot_product_attention`` takes (no copy in), back to ``[B * n, H, Dh]``:
    the baseline varlen attention has to beat when no sequence is shorter."""
    t, h, dh = q.shape
    views = [x.view(batch, t // batch, h, x.shape[-1]).transpose(1, 2) for x in (q, k, v)]
    out = F.scaled_dot_product_attention(*views, scale=scale)
    return out.transpose(1, 2).reshape(t, h, v.shape[-1])
