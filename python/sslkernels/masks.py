"""I-JEPA-style multiblock masks, kept per sample (no truncation to the batch minimum).

I-JEPA's collator samples, per batch, one target-block size (scale 0.15-0.2 of the
patches, aspect 0.75-1.5) and one context-block size (scale 0.85-1.0, aspect 1);
per sample it places ``num_targets`` target blocks and one context block, and the
context is the context block minus every target block. Counts then differ per
sample, and the reference collator cuts every sample to the shortest one. Here
each sample keeps all of its patches: pack them with :func:`sslkernels.pack_patches`.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = ["multiblock_masks"]


def _block_size(gen, grid, scale, aspect):
    h, w = grid
    s = scale[0] + float(torch.rand((), generator=gen)) * (scale[1] - scale[0])
    lo, hi = math.log(aspect[0]), math.log(aspect[1])
    a = math.exp(lo + float(torch.rand((), generator=gen)) * (hi - lo))
    area = s * h * w
    bh = max(1, min(h, int(round(math.sqrt(area * a)))))
    bw = max(1, min(w, int(round(math.sqrt(area / a)))))
    return bh, bw


def _place(gen, grid, size):
    h, w = grid
    bh, bw = size
    top = int(torch.randint(0, h - bh + 1, (), generator=gen))
    left = int(torch.randint(0, w - bw + 1, (), generator=gen))
    m = torch.zeros(h, w, dtype=torch.bool)
    m[top:top + bh, left:left + bw] = True
    return m.reshape(-1)


def multiblock_masks(batch_size: int, grid: Tuple[int, int] = (14, 14), num_targets: int = 4,
                     target_scale=(0.15, 0.2), target_aspect=(0.75, 1.5), context_scale=(0.85, 1.0),
                     min_keep: int = 4, generator: Optional[torch.Generator] = None,
                     max_tries: int = 20) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> ``(context [B, L] bool, targets [B, num_targets, L] bool)`` with L = H W.

    A sample whose context keeps fewer than ``min_keep`` patches is redrawn (up to
    ``max_tries`` times, then ValueError). Counts differ between samples.
    """
    if batch_size < 1 or num_targets < 1:
        raise ValueError(f"`batch_size` and `num_targets` must be >= 1, got {batch_size} and {num_targets}")
    if len(grid) != 2 or min(grid) < 1:
        raise ValueError(f"`grid` must be (H, W) with H, W >= 1, got {grid!r}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    target_size = _block_size(gen, grid, target_scale, target_aspect)
    context_size = _block_size(gen, grid, context_scale, (1.0, 1.0))
    contexts, targets = [], []
    for _ in range(batch_size):
        for _ in range(max_tries):
            tg = torch.stack([_place(gen, grid, target_size) for _ in range(num_targets)])
            ctx = _place(gen, grid, context_size) & ~tg.any(0)
            if int(ctx.sum()) >= min_keep:
                break
        else:
            raise ValueError(f"could not draw a context with >= {min_keep} patches in {max_tries} tries")
        contexts.append(ctx)
        targets.append(tg)
    return torch.stack(contexts), torch.stack(targets)
