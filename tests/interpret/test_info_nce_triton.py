"""The Triton InfoNCE / CLIP kernels (the CUDA path of `sslkernels::info_nce_*`) run by
the Triton interpreter on CPU tensors, through their launchers `info_nce_forward` /
`info_nce_backward`: shared queue [K, D], in-batch negatives on / off (MoCo),
symmetric (CLIP), learnable temperature, gradient to the queue.

Oracle: `info_nce_reference` in float64 with autograd. A result passes when its error
against the oracle is at most twice eager PyTorch's own error in the same dtype plus a
small floor relative to the larger of max |oracle| and the quantity's natural scale.
bfloat16 is checked on a GPU only (`benchmarks/gpu_contrastive.py`).
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton", reason="the Triton interpreter tests need triton")

from sslkernels.reference import info_nce_reference  # noqa: E402
from tests._utils import assert_within_eager_error, logit_bound  # noqa: E402

pytestmark = pytest.mark.interpret

NAMES = ("loss", "dquery", "dkey", "dtemperature", "dnegatives")
# (N, D, K, symmetric, in_batch_negatives); interpreter tiles are 32 x 32, BLOCK_K 32:
# D = 3 / 16 hoisted rows, 65 the chunked path and the dZhat scratch (normalize)
CASES = [
    (1, 3, 0, False, True),     # the positive only: loss 0
    (7, 65, 5, False, True),    # MoCo-style queue beside in-batch keys
    (33, 16, 40, True, True),   # CLIP with a queue on the query side, tails everywhere
    (33, 65, 0, True, True),    # CLIP, no queue
    (7, 16, 40, False, False),  # MoCo: own key + queue only
    (1, 65, 5, False, False),
]


def _inputs(n, d, k, dtype, normalize, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = 3.0 if normalize else 1.0 / math.sqrt(d)
    q = torch.randn(n, d, generator=g, dtype=torch.float64)
    key = q + 0.8 * torch.randn(n, d, generator=g, dtype=torch.float64)
    neg = torch.randn(k, d, generator=g, dtype=torch.float64) if k else None
    cast = lambda x: None if x is None else (x * scale).to(dtype)  # noqa: E731
    return cast(q), cast(key), cast(neg)


def _reference(q, key, neg, t, symmetric, in_batch, normalize, grad=1.0):
    """(loss, dq, dk, dt, dneg) with autograd; t is a 0-dim tensor."""
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, key, t)]
    if neg is not None:
        leaves.append(neg.detach().clone().requires_grad_(True))
    loss = info_nce_reference(leaves[0], leaves[1], leaves[2], leaves[3] if neg is not None else None,
                              symmetric=symmetric, normalize=normalize, in_batch_negatives=in_batch)
    grads = torch.autograd.grad(loss * grad, leaves)
    return (loss.detach(), *grads)


def _fused(k, q, key, neg, t, symmetric, in_batch, normalize, grad=1.0, negatives_grad=True):
    loss, lse = k.info_nce_forward(q, key, neg, t, normalize, symmetric, in_batch, negatives_grad)
    g = torch.tensor(grad, dtype=q.dtype)
    dq, dk, dneg, dt = k.info_nce_backward(g, q, key, neg, t, lse, normalize, symmetric, in_batch, negatives_grad)
    out = (loss, dq, dk, dt) + ((dneg,) if neg is not None and negatives_grad else ())
    return out, lse, dneg


def _ids(cases, letter):
    return [f"{n}x{d}{letter}{k}{'-sym' if s else ''}{'' if b else '-moco'}" for n, d, k, s, b in cases]


def _check_all(kernels, q, key, neg, tval, symmetric, in_batch, normalize):
    """Fused (loss, dq, dk, dt[, dneg]) against eager and float64 under the rule; -> (fused, lse, dneg).
    The temperature is a 0-dim float64 tensor, as a learnable one: dt is checked."""
    t = torch.tensor(tval, dtype=torch.float64)
    fused, lse, dneg = _fused(kernels, q, key, neg, t, symmetric, in_batch, normalize)
    eager = _reference(q, key, neg, t, symmetric, in_batch, normalize)
    ref = _reference(*(None if x is None else x.double() for x in (q, key, neg)), t, symmetric, in_batch, normalize)
    terms = logit_bound(q, key, neg, temperature=tval, normalize=normalize)
    for what, f, e, r in zip(NAMES, fused, eager, ref):
        assert_within_eager_error(f, e, r, q.dtype, what, terms)
    return fused, lse, dneg


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("case", CASES, ids=_ids(CASES, "k"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_matches_float64_reference(contrastive_kernels, poisoned_outputs, dtype, case, normalize):
    n, d, k, symmetric, in_batch = case
    q, key, neg = _inputs(n, d, k, dtype, normalize)
    # float16 at t = 0.2: at 0.07 eager's own error let a gradient 10% off pass the rule
    t = (0.2 if dtype == torch.float16 else 0.07) if normalize else 0.5
    fused, lse, dneg = _check_all(contrastive_kernels, q, key, neg, t, symmetric, in_batch, normalize)
    assert fused[0].dtype == dtype and fused[0].dim() == 0
    assert lse.shape == ((2 * n) if symmetric else n,) and lse.dtype == torch.float64
    for g, x in zip(fused[1:3], (q, key)):
        assert g.dtype == dtype and g.shape == x.shape and g.is_contiguous()
    assert fused[3].dtype == torch.float64 and fused[3].dim() == 0
    if neg is not None:
        assert dneg.shape == neg.shape and dneg.dtype == dtype


def test_float64_exact_lse_layout_and_queue_without_grad(contrastive_kernels, poisoned_outputs):
    """lse = [query direction (keys + queue) | key direction (queries)], as the CPU op."""
    q, key, neg = _inputs(33, 65, 40, torch.float64, True)
    t = torch.tensor(0.1, dtype=torch.float64)
    fused, lse, dneg = _fused(contrastive_kernels, q, key, neg, t, True, True, True, negatives_grad=False)
    assert dneg.shape == (0,)
    ref = _reference(q, key, neg, t, True, True, True)
    for what, f, r in zip(NAMES, fused, ref):
        torch.testing.assert_close(f, r, rtol=1e-10, atol=1e-13, msg=lambda m: f"{what}: {m}")
    qn, kn, nn = (torch.nn.functional.normalize(x, dim=1) for x in (q, key, neg))
    lse_q = torch.logsumexp(torch.cat([qn @ kn.T, qn @ nn.T], dim=1) / 0.1, dim=1)
    lse_k = torch.logsumexp(kn @ qn.T / 0.1, dim=1)
    assert lse.dtype == torch.float64
    torch.testing.assert_close(lse, torch.cat([lse_q, lse_k]), rtol=1e-12, atol=1e-12)


def test_float_temperature_and_float32_learnable_temperature(contrastive_kernels, poisoned_outputs):
    q, key, neg = _inputs(7, 16, 5, torch.float32, True)
    t32 = torch.tensor(0.05, dtype=torch.float32)
    fused, _, _ = _fused(contrastive_kernels, q, key, neg, t32, False, True, True)
    assert fused[3].dtype == torch.float32  # dtemperature in the temperature's dtype
    as_float, _, _ = _fused(contrastive_kernels, q, key, neg, 0.05, False, True, True)
    ref = _reference(q.double(), key.double(), neg.double(), torch.tensor(0.05, dtype=torch.float64), False, True, True)
    for what, f, g, r in zip(NAMES, fused, as_float, ref):
        torch.testing.assert_close(f.double(), r, rtol=2e-4, atol=1e-5, msg=lambda m: f"{what}: {m}")
        torch.testing.assert_close(g.double(), r, rtol=2e-4, atol=1e-5, msg=lambda m: f"float t, {what}: {m}")


def test_upstream_gradient_and_strided_inputs(contrastive_kernels, poisoned_outputs):
    base = torch.randn(33 + 40 + 33, 80, dtype=torch.float64)
    q, key, neg = base[:33, 2:67], base[33:66, 7:72], base[66:, :65]  # row stride 80: read in place
    t = torch.tensor(0.2, dtype=torch.float64)
    one, _, _ = _fused(contrastive_kernels, q, key, neg, t, True, True, True, grad=1.0)
    got, _, _ = _fused(contrastive_kernels, q, key, neg, t, True, True, True, grad=0.37)
    ref = _reference(q, key, neg, t, True, True, True, grad=0.37)
    for what, a, b, r in zip(NAMES, one[1:], got[1:], ref[1:]):
        torch.testing.assert_close(b, 0.37 * a, rtol=1e-12, atol=1e-16, msg=lambda m: f"{what}: {m}")
        torch.testing.assert_close(b, r, rtol=1e-10, atol=1e-14, msg=lambda m: f"{what}: {m}")
    qt = torch.randn(16, 7, dtype=torch.float64).T  # feature stride 7: copied by the launcher
    got, _, _ = _fused(contrastive_kernels, qt, qt + 0.1, None, t, False, True, False)
    ref = _reference(qt.contiguous(), qt + 0.1, None, t, False, True, False)
    for what, f, r in zip(NAMES, got, ref):
        torch.testing.assert_close(f, r, rtol=1e-10, atol=1e-13, msg=lambda m: f"{what}: {m}")


PER_QUERY = [  # (N, D, M, symmetric, in_batch_negatives)
    (7, 16, 5, False, True),
    (33, 65, 3, True, True),    # chunked rows, the dZhat scratch; key direction without them
    (7, 65, 1, False, False),   # MoCo with one hard negative per query
    (1, 3, 4, False, True),
]


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("case", PER_QUERY, ids=_ids(PER_QUERY, "m"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_per_query_negatives(contrastive_kernels, poisoned_outputs, dtype, case, normalize):
    n, d, m, symmetric, in_batch = case
    q, key, _ = _inputs(n, d, 0, dtype, normalize)
    g = torch.Generator().manual_seed(3)
    # near-duplicates of the query: hard negatives
    hard = (q.double()[:, None, :] + 1.2 * torch.randn(n, m, d, generator=g, dtype=torch.float64)
            * float(q.double().norm(dim=1).mean()) / math.sqrt(d)).to(dtype)
    _, lse, dneg = _check_all(contrastive_kernels, q, key, hard, 0.1 if normalize else 0.5, symmetric, in_batch,
                              normalize)
    assert dneg.shape == hard.shape and dneg.dtype == dtype and dneg.is_contiguous()
    assert lse.shape == ((2 * n) if symmetric else n,)


def test_per_query_negatives_strided_and_zero_rows(contrastive_kernels, poisoned_outputs):
    q, key, _ = _inputs(7, 16, 0, torch.float64, True)
    hard = torch.randn(3, 7, 16, dtype=torch.float64).transpose(0, 1)  # not viewable as rows: copied
    hard[2, 1] = 0.0  # a zero negative: its gradient goes through the eps clamp, as F.normalize's
    t = torch.tensor(0.2, dtype=torch.float64)
    fused, _, dneg = _fused(contrastive_kernels, q, key, hard, t, False, True, True)
    ref = _reference(q, key, hard, t, False, True, True)
    assert dneg.shape == hard.shape
    for what, f, r in zip(NAMES, fused, ref):
        torch.testing.assert_close(f, r, rtol=1e-10, atol=1e-13, msg=lambda m: f"{what}: {m}")
    fused, _, dneg = _fused(contrastive_kernels, q, key, hard, t, False, True, True, negatives_grad=False)
    assert dneg.shape == (0,)
    for what, f, r in zip(NAMES, fused, ref[:4]):
        torch.testing.assert_close(f, r, rtol=1e-10, atol=1e-13, msg=lambda m: f"{what}: {m}")


def test_the_rule_rejects_a_wrong_result(contrastive_kernels):
    """The tolerance is tight enough to see a temperature off by 2%."""
    q, key, neg = _inputs(33, 16, 40, torch.float32, True)
    t = torch.tensor(0.07, dtype=torch.float64)
    wrong, _, _ = _fused(contrastive_kernels, q, key, neg, t * 1.02, True, True, True)
    eager = _reference(q, key, neg, t, True, True, True)
    ref = _reference(q.double(), key.double(), neg.double(), t, True, True, True)
    for what, f, e, r in zip(NAMES, wrong, eager, ref):
        with pytest.raises(AssertionError):
            assert_within_eager_error(f, e, r, torch.float32, what)


@pytest.mark.parametrize("negatives_grad", [True, False])
@pytest.mark.parametrize("k", [0, 40])
def test_one_sweep_op_on_the_triton_path(contrastive_kernels, poisoned_outputs, k, negatives_grad):
    """`sslkernels::info_nce_loss_and_grads` on CUDA (what a one-direction training step
    calls) is the forward and the backward for grad_loss = 1: loss and gradients in the
    op's order (loss, dquery, dkey, dnegatives, dtemperature)."""
    from sslkernels.ops.contrastive import loss_and_grads_from_kernels

    q, key, neg = _inputs(33, 65, k, torch.float32, True)
    t = torch.tensor(0.07, dtype=torch.float64)
    loss, dq, dk, dneg, dt = loss_and_grads_from_kernels(contrastive_kernels, q, key, neg, t, True, negatives_grad)
    fused = (loss, dq, dk, dt) + ((dneg,) if neg is not None and negatives_grad else ())
    eager = _reference(q, key, neg, t, False, True, True)
    ref = _reference(*(None if x is None else x.double() for x in (q, key, neg)), t, False, True, True)
    for what, f, e, r in zip(NAMES, fused, eager, ref):
        assert_within_eager_error(f, e, r, q.dtype, what, logit_bound(temperature=0.07))
    if neg is None or not negatives_grad:
        assert dneg.shape == (0,)
