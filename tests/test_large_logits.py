"""Accuracy independent of the logits' magnitude: unnormalised inputs of scale s give
logits ~ s^2 D (1e4 at s = 100), where the backward's probabilities exp(s_ij - lse_i) lose
every digit the saved lse lacks. With a float32 lse, or logits recomputed differently from
the forward's, nt_xent's gradient error was 2e-2 against eager's 1.5e-6 at s = 100 (issue
15); the kernels now keep the lse in float64 and recompute the very same logits. The
shared rule (2x eager's error + RESOLUTION * max|ref|) judges, in float32."""
from __future__ import annotations

import pytest
import torch

import sslkernels
from sslkernels.reference import (info_nce_reference, masked_patch_attention_reference, nt_xent_reference,
                                  sup_con_reference, varlen_attention_reference)
from tests._utils import assert_within_eager_error, logit_bound, loss_and_grads

SCALES = [10.0, 100.0]


def _views(n, d, s, seed):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64) * s
    z2 = 0.6 * z1 + 0.8 * torch.randn(n, d, generator=g, dtype=torch.float64) * s
    return z1, z2


def _judge(fn, ref_fn, args64, terms, what):
    args32 = [a.float() if a.is_floating_point() else a for a in args64]
    fused, eager, ref = loss_and_grads(fn, *args32), loss_and_grads(ref_fn, *args32), loss_and_grads(ref_fn, *args64)
    for name, f, e, r in zip(("loss",) + tuple(f"grad {i}" for i in range(len(fused) - 1)), fused, eager, ref):
        assert_within_eager_error(f, e, r, torch.float32, f"{what} {name}", terms)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("s", SCALES)
def test_nt_xent_large_logits(s, seed):
    z1, z2 = _views(63, 8, s, seed)  # the case
    kw = dict(normalize=False, temperature=1.0)
    _judge(lambda a, b: sslkernels.nt_xent(a, b, **kw), lambda a, b: nt_xent_reference(a, b, **kw), (z1, z2),
           logit_bound(z1, z2, **kw), f"nt_xent s={s}")


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("s", SCALES)
def test_sup_con_large_logits(s, seed):
    z1, z2 = _views(40, 8, s, seed)
    x = torch.cat([z1, z2])
    labels = torch.arange(40).repeat(2) % 13  # classes of 4 to 8 rows
    kw = dict(normalize=False, temperature=1.0)
    _judge(lambda a: sslkernels.sup_con(a, labels, **kw), lambda a: sup_con_reference(a, labels, **kw), (x,),
           logit_bound(x, **kw), f"sup_con s={s}")


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("s", SCALES)
def test_info_nce_large_logits(s, symmetric):
    q, k = _views(63, 8, s, 3)
    neg = torch.randn(17, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * s
    kw = dict(normalize=False, temperature=1.0, symmetric=symmetric)
    _judge(lambda a, b, c: sslkernels.info_nce(a, b, negatives=c, **kw),
           lambda a, b, c: info_nce_reference(a, b, negatives=c, **kw), (q, k, neg),
           logit_bound(q, k, neg, **{x: kw[x] for x in ("normalize", "temperature")}), f"info_nce s={s}")


@pytest.mark.parametrize("s", SCALES)
def test_attention_large_logits(s):
    """q.k / sqrt(Dh) ~ s^2 sqrt(Dh): 2.8e4 at s = 100 (Dh = 8)."""
    g = torch.Generator().manual_seed(5)
    b, length, h, dh = 2, 37, 2, 8
    q, k, v = (torch.randn(b, length, h, dh, generator=g, dtype=torch.float64) * f for f in (s, s, 1.0))
    index = torch.stack([torch.randperm(length, generator=g)[:29] for _ in range(b)])
    grad_out = torch.randn(b, 29, h, dh, generator=g, dtype=torch.float64)

    def out_and_grads(fn, *x):
        leaves = [t.detach().clone().requires_grad_(True) for t in x]
        out = fn(*leaves, index)
        return (out.detach(), *torch.autograd.grad(out, leaves, grad_out.to(out.dtype)))

    fused = out_and_grads(sslkernels.masked_patch_attention, q.float(), k.float(), v.float())
    eager = out_and_grads(masked_patch_attention_reference, q.float(), k.float(), v.float())
    ref = out_and_grads(masked_patch_attention_reference, q, k, v)
    for name, f, e, r in zip(("out", "dq", "dk", "dv"), fused, eager, ref):
        assert_within_eager_error(f, e, r, torch.float32, f"attention s={s} {name}")


@pytest.mark.xfail(strict=True, reason=(
    "known limit of the CPU attention backward: D = rowsum(dO * O) from the saved output (as "
    "FlashAttention) loses digits against eager's sum(P * dP) when the softmax saturates at a "
    "tiny head dim; computing D from the backward's own P fixes it but costs ~30% of the "
    "backward (measured: masked-patch fwd+bwd 55.9 -> 75.3 ms at the JEPA shape), so it waits "
    "for a row-resident variant for L <= 512"))
def test_attention_saturated_softmax_head_dim_1():
    """varlen, q.k up to ~400 at Dh = 1 (inputs x 10): over 30 seeds the fused dq / dk exceed twice
    eager's error on some."""
    worst = []
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(7, 2, 1, generator=g, dtype=torch.float64) * f for f in (10.0, 10.0, 1.0))
        cu = torch.tensor([0, 7], dtype=torch.int32)
        grad_out = torch.randn(7, 2, 1, generator=g, dtype=torch.float64)

        def out_and_grads(fn, *x):
            leaves = [t.detach().clone().requires_grad_(True) for t in x]
            out = fn(*leaves, cu, 7)
            return (out.detach(), *torch.autograd.grad(out, leaves, grad_out.to(out.dtype)))

        fused = out_and_grads(sslkernels.varlen_attention, q.float(), k.float(), v.float())
        eager = out_and_grads(varlen_attention_reference, q.float(), k.float(), v.float())
        ref = out_and_grads(varlen_attention_reference, q, k, v)
        for name, f, e, r in zip(("out", "dq", "dk", "dv"), fused, eager, ref):
            try:
                assert_within_eager_error(f, e, r, torch.float32, f"attention Dh=1 seed={seed} {name}")
            except AssertionError as err:
                worst.append(str(err))
    assert not worst, "\n".join(worst[:5])


@pytest.mark.parametrize("loss", ["nt_xent", "info_nce", "clip"])
def test_small_loss_subtracts_the_positive_its_lse_was_taken_over(loss):
    """A converged loss (0.01 here, from logits of ~90) is lse_i - s_pos, a difference that
    cancels: the positive must be the very logit of the tile the lse came from, not a second
    dot product one ulp apart (which made the fused loss 13x eager's error)."""
    from sslkernels.reference import info_nce_reference, nt_xent_reference

    g = torch.Generator().manual_seed(0)
    z1 = 3 * torch.randn(7, 16, generator=g)
    z2 = z1 + 2.4 * torch.randn(7, 16, generator=g)
    fused_fn, eager_fn = {
        "nt_xent": (lambda a, b: sslkernels.nt_xent(a, b, 0.1), lambda a, b: nt_xent_reference(a, b, 0.1)),
        "info_nce": (lambda a, b: sslkernels.info_nce(a, b, 0.1), lambda a, b: info_nce_reference(a, b, 0.1)),
        "clip": (lambda a, b: sslkernels.info_nce(a, b, 0.1, symmetric=True),
                 lambda a, b: info_nce_reference(a, b, 0.1, symmetric=True)),
    }[loss]
    ref = eager_fn(z1.double(), z2.double())
    assert float(ref) < 0.05  # the regime this is about
    with torch.no_grad():
        fused_err = float((fused_fn(z1, z2).double() - ref).abs())
        eager_err = float((eager_fn(z1, z2).double() - ref).abs())
    assert fused_err <= eager_err, f"{loss}: fused error {fused_err:.2e} > eager's {eager_err:.2e}"
