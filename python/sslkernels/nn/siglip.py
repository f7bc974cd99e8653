"""Drop-in for open_clip's SigLipLoss."""
from __future__ import annotations

from torch import nn

from sslkernels import distributed as _distributed
from sslkernels import functional

DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


class SigLipLoss(nn.Module):
    """Drop-in for ``open_clip.loss.SigLipLoss(cache_labels, rank, world_size, dist_impl)``.

    ``forward(image_features, text_features, logit_scale, logit_bias=None, output_dict=False)``:
    :func:`sslkernels.siglip_loss` (``logit_scale`` already exponentiated, as open_clip's
    models return it), ``{"contrastive_loss": loss}`` when ``output_dict``. No (N x N)
    labels or logits are ever built, so ``cache_labels`` has nothing to cache (kept for
    the signature).

    ``world_size > 1`` (torch.distributed initialised, default group, ``rank`` its rank):
    as open_clip, this rank's loss is its own images against its own texts plus, as
    negatives, every other rank's texts, over its N images. Every ``dist_impl`` of
    open_clip (``bidir``, ``shift``, ``reduce``, ``gather``) gives that same value and
    gradient; here they all take one ring (the texts travel round it one block at a
    time, O(N D) memory per rank, exact gradients back to their owners).
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1, dist_impl=None):
        super().__init__()
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"`world_size` must be an int >= 1, got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"`rank` must be an int in [0, world_size={world_size}), got {rank!r}")
        dist_impl = dist_impl or "bidir"  # open_clip's default
        if dist_impl not in DIST_IMPLS:
            raise ValueError(f"`dist_impl` must be one of {DIST_IMPLS} or None, got {dist_impl!r}")
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict: bool = False):
        group = None
        if self.world_size > 1:
            group = _distributed.default_group()
            if group is None:
                raise ValueError(
                    f"SigLipLoss(world_size={self.world_size}) needs torch.distributed initialised "
                    "with that many ranks (init_process_group)"
                )
            import torch.distributed as dist

            if dist.get_world_size(group) != self.world_size or dist.get_rank(group) != self.rank:
                raise ValueError(
                    f"SigLipLoss(rank={self.rank}, world_size={self.world_size}) does not match the "
                    f"default group (rank {dist.get_rank(group)} of {dist.get_world_size(group)})"
                )
        loss = functional.siglip_loss(image_features, text_features, logit_scale, logit_bias, process_group=group)
        return {"contrastive_loss": loss} if output_dict else loss
