"""SigLIP's sigmoid loss across processes: the texts travel round a ring.

Rank r's loss is open_clip's (``SigLipLoss(rank, world_size)``): its b images against
its own b texts (positives on the diagonal) plus, as negatives only, every other
rank's texts, over b. The other ranks' texts visit one block at a time (rank r sends
to r + 1 and receives from r - 1, the next transfer overlapping the current block's
work; :class:`sslkernels._ring.Ring`), so a rank holds its own features, the block
it works on, the one in flight and O(b D) gradient buffers: never the gathered batch.

Gradients are exact. Every block is a call of the one-sweep op
``siglip_loss_and_grads``, which returns the block's gradients for grad_loss = 1 with
its loss: the image, scale and bias gradients stay here, and the text gradient
travels on with the block, each rank adding its own, back to its owner. The owner's
texts thus get the gradient of the SUM of every rank's loss (as open_clip's
neighbour exchange with gradients gives them), and DDP's average over the ranks is
the gradient of the one-process loss on the concatenated batch (which is the mean
of the ranks' losses).

Those sums are formed in the forward, for grad_loss = 1. In the backward every
rank's upstream gradient is all-gathered (one scalar each): when they are all equal
(grad_loss = 1, or one AMP loss scale everywhere) the saved sums are scaled; when
they differ, the ring runs again with each rank weighting its text gradients by its
own grad_loss. Every rank must call ``backward``.
"""
from __future__ import annotations

import torch

from sslkernels._ring import Ring
from sslkernels.ops import siglip as _siglip_ops  # noqa: F401  (registers the op)


def _op():
    return torch.ops.sslkernels.siglip_loss_and_grads


def _sweep(image, text, logit_scale, logit_bias, ring: Ring, weight=None):
    """This rank's loss (float64) and gradients for grad_loss = 1 over its own and every
    visiting text block: (loss, dimage, dscale, dbias, dtext_own, dtext_remote), where
    dtext_remote is the other ranks' gradients of this rank's texts, each multiplied by
    that rank's `weight` (a float64 scalar tensor, None for 1)."""
    op = _op()
    loss, dimage, dtext, dscale, dbias = op(image, text, logit_scale, logit_bias, True, True)
    total = {"loss": loss.to(torch.float64), "dimage": dimage, "dscale": dscale, "dbias": dbias}

    def visit(block):
        (texts,) = block
        block_loss, block_dimage, block_dtext, block_dscale, block_dbias = op(
            image, texts, logit_scale, logit_bias, False, True)
        total["loss"] = total["loss"] + block_loss.to(torch.float64)
        total["dimage"] = total["dimage"] + block_dimage
        total["dscale"] = total["dscale"] + block_dscale
        total["dbias"] = total["dbias"] + block_dbias
        return [block_dtext if weight is None else block_dtext * weight.to(block_dtext.dtype)]

    remote = ring.visit_with_grads([text], visit)
    remote = remote[0] if remote is not None else torch.zeros_like(dtext)
    return total["loss"], total["dimage"], total["dscale"], total["dbias"], dtext, remote


class _RingSigLip(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, text, logit_scale, logit_bias, ring):
        image_d, text_d = image.detach(), text.detach()
        scale_d = logit_scale.detach()
        bias_d = logit_bias.detach() if logit_bias is not None else None
        loss, dimage, dscale, dbias, dtext_own, dtext_remote = _sweep(image_d, text_d, scale_d, bias_d, ring)
        ctx.ring = ring
        ctx.has_bias = logit_bias is not None
        ctx.dtypes = (image.dtype, text.dtype, logit_scale.dtype, logit_bias.dtype if logit_bias is not None else None)
        # The features are kept only to rerun the ring when the ranks' grad_loss differ.
        ctx.save_for_backward(dimage, dtext_own, dtext_remote, dscale, dbias, image_d, text_d, scale_d,
                              bias_d if bias_d is not None else scale_d)
        return loss.to(image.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():
            raise NotImplementedError("sslkernels.siglip_loss: double backward (create_graph=True) is not supported")
        dist = torch.distributed
        dimage, dtext_own, dtext_remote, dscale, dbias, image, text, scale, bias = ctx.saved_tensors
        ring = ctx.ring
        g = grad_loss.detach().to(torch.float64).reshape(1)
        weights = [torch.empty_like(g) for _ in range(ring.world)]
        dist.all_gather(weights, g, group=ring.group)
        weights = torch.cat(weights)
        if bool((weights == weights[0]).all()):
            remote = dtext_remote * g.to(dtext_remote.dtype)
        else:  # the other ranks' text gradients, each scaled by its own rank's grad_loss
            *_, remote = _sweep(image, text, scale, bias if ctx.has_bias else None, ring, weight=g.reshape(()))
        gw = g.reshape(())
        dx = (dimage * gw.to(dimage.dtype)).to(ctx.dtypes[0])
        dy = (dtext_own * gw.to(dtext_own.dtype) + remote).to(ctx.dtypes[1])
        ds = (dscale * gw).to(ctx.dtypes[2])
        db = (dbias * gw).to(ctx.dtypes[3]) if ctx.has_bias else None
        needed = ctx.needs_input_grad
        return (dx if needed[0] else None, dy if needed[1] else None, ds if needed[2] else None,
                db if needed[3] else None, None)


def siglip_loss(image_features, text_features, logit_scale, logit_bias, group):
    """This rank's SigLIP loss against every rank's texts (see the module docstring);
    arguments already validated by :func:`sslkernels.siglip_loss`."""
    from sslkernels import distributed as _distributed  # ops-layer helpers, no functional import

    _distributed.check_same_batch_size(image_features.shape[0], group, image_features.device, "image_features")
    return _RingSigLip.apply(image_features, text_features, logit_scale, logit_bias, Ring(group))
