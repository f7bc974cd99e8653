"""pack_patches / unpack_patches and the I-JEPA-style multiblock masks."""
from __future__ import annotations

import pytest
import torch

import sslkernels
from sslkernels.masks import multiblock_masks


def test_pack_mask_round_trip_and_gradients():
    x = torch.randn(4, 11, 6, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(4, 11) > 0.5
    keep[2] = False  # a sample with nothing kept
    keep[3, 7] = True
    p = sslkernels.pack_patches(x, keep)
    counts = keep.sum(1)
    assert p.tokens.shape == (int(counts.sum()), 6)
    assert p.cu_seqlens.dtype == torch.int32
    assert p.cu_seqlens.tolist() == [0] + torch.cumsum(counts, 0).tolist()
    assert p.max_seqlen == int(counts.max())
    for b in range(4):  # raster order within each sample
        assert torch.equal(p.tokens[p.cu_seqlens[b]:p.cu_seqlens[b + 1]], x[b][keep[b]])
    back = sslkernels.unpack_patches(p.tokens * 2, p, fill=-3.0)
    assert torch.equal(back[keep], 2 * x[keep])
    assert bool((back[~keep] == -3.0).all())
    back.sum().backward()
    assert torch.equal(x.grad, 2.0 * keep[..., None].double().expand_as(x))
    assert torch.autograd.gradcheck(lambda t: sslkernels.unpack_patches(sslkernels.pack_patches(t, keep).tokens,
                                                                        p), (x.detach().requires_grad_(),))


def test_pack_index_lists_keep_their_order():
    x = torch.randn(2, 9, 3)
    idx = [torch.tensor([8, 0, 3]), torch.tensor([5])]
    p = sslkernels.pack_patches(x, idx)
    assert p.cu_seqlens.tolist() == [0, 3, 4] and p.max_seqlen == 3
    assert torch.equal(p.tokens, torch.stack([x[0, 8], x[0, 0], x[0, 3], x[1, 5]]))
    assert torch.equal(p.index, torch.tensor([8, 0, 3, 9 + 5]))
    out = sslkernels.unpack_patches(p.tokens[:, :2], p)  # another width comes back too
    assert out.shape == (2, 9, 2) and torch.equal(out[1, 5], x[1, 5, :2]) and float(out[1, 4].abs().sum()) == 0


@pytest.mark.parametrize("keep, err, match", [
    (torch.ones(2, 5, dtype=torch.int64), TypeError, "`keep`"),
    (torch.ones(2, 4, dtype=torch.bool), ValueError, "`keep` must have shape"),
    ([torch.tensor([0, 5])], ValueError, "index tensors for a batch of 2"),
    ([torch.tensor([0, 5]), torch.tensor([1])], ValueError, r"`keep\[0\]` holds positions outside"),
    ([torch.tensor([1, 1]), torch.tensor([1])], ValueError, r"`keep\[0\]` holds position 1 more than once"),
    ([torch.tensor([1]), torch.tensor([4, 0, 4])], ValueError, r"`keep\[1\]` holds position 4 more than once"),
    ([torch.tensor([1]), torch.tensor([2, -1])], ValueError, r"`keep\[1\]` holds positions outside \[0, 5\): min -1"),
    ([torch.tensor([1]), torch.tensor([[1]])], ValueError, r"`keep\[1\]` must be a 1-D"),
    ([torch.tensor([1]), [1]], ValueError, r"`keep\[1\]` must be a 1-D"),
    (torch.ones(2, 5, 1, dtype=torch.bool), ValueError, "`keep` must have shape"),
    ([torch.tensor([1.0]), torch.tensor([1])], TypeError, r"`keep\[0\]`"),
    ("all", TypeError, "`keep`"),
])
def test_pack_bad_input(keep, err, match):
    with pytest.raises(err, match=match):
        sslkernels.pack_patches(torch.randn(2, 5, 3), keep)


def test_pack_and_unpack_bad_input():
    with pytest.raises(ValueError, match="`x` must be"):
        sslkernels.pack_patches(torch.randn(5, 3), torch.ones(5, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="`x` is empty"):
        sslkernels.pack_patches(torch.randn(0, 5, 3), torch.ones(0, 5, dtype=torch.bool))
    p = sslkernels.pack_patches(torch.randn(2, 5, 3), torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="`tokens` has 9 rows"):
        sslkernels.unpack_patches(torch.randn(9, 3), p)
    with pytest.raises(TypeError, match="`packed`"):
        sslkernels.unpack_patches(p.tokens, tuple(p))


def test_multiblock_masks_keep_every_sample_its_own_count():
    g = torch.Generator().manual_seed(3)
    context, targets = multiblock_masks(16, grid=(14, 14), generator=g)
    assert context.shape == (16, 196) and targets.shape == (16, 4, 196)
    counts = context.sum(1)
    assert int(counts.min()) >= 4
    assert len(set(counts.tolist())) > 1  # counts differ: truncation would drop patches
    assert not bool((context[:, None, :] & targets).any())  # the context never sees a target
    sizes = targets.sum(-1)
    assert bool((sizes == sizes[0, 0]).all())  # one target-block size per batch, as I-JEPA
    with pytest.raises(ValueError, match="`batch_size`"):
        multiblock_masks(0)


def test_pack_int32_and_empty_index_lists():
    x = torch.randn(3, 6, 4, requires_grad=True)
    idx = [torch.tensor([5, 1], dtype=torch.int32), torch.empty(0, dtype=torch.int64), torch.tensor([0])]
    p = sslkernels.pack_patches(x, idx)
    assert p.cu_seqlens.tolist() == [0, 2, 2, 3] and p.max_seqlen == 2 and p.batch_shape == (3, 6)
    assert torch.equal(p.tokens, torch.stack([x[0, 5], x[0, 1], x[2, 0]]))
    out = sslkernels.unpack_patches(p.tokens, p, fill=float("nan"))
    assert bool(out[1].isnan().all()) and torch.equal(out[2, 0], x[2, 0])
    out[0, 5].sum().backward()
    assert torch.equal(x.grad[0, 5], torch.ones(4)) and float(x.grad.abs().sum()) == 4.0
    nothing = sslkernels.pack_patches(x, [torch.empty(0, dtype=torch.int64)] * 3)
    assert nothing.tokens.shape == (0, 4) and nothing.cu_seqlens.tolist() == [0, 0, 0, 0]
    assert nothing.max_seqlen == 0
    assert sslkernels.pack_patches(x, torch.zeros(3, 6, dtype=torch.bool)).max_seqlen == 0


def test_pack_mask_and_index_lists_agree_on_masks_from_the_collator():
    g = torch.Generator().manual_seed(11)
    context, _ = multiblock_masks(9, grid=(10, 12), generator=g)
    x = torch.randn(9, 120, 5)
    a = sslkernels.pack_patches(x, context)
    b = sslkernels.pack_patches(x, [row.nonzero().reshape(-1) for row in context])
    for u, v in zip(a, b):
        assert torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v
    assert a.tokens.shape[0] == int(context.sum()) and a.max_seqlen == int(context.sum(1).max())
