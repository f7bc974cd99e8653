"""The retrieval terms of the Triton InfoNCE kernels (issue 13), run by the Triton
interpreter on CPU tensors through the launchers `info_nce_forward` / `info_nce_backward`:
a per-candidate `logit_bias` [N + K] (sampling-bias correction, query direction only) and
the duplicate-id mask (`anchor_ids` [N] against `candidate_ids` [N + K], both directions),
with and without a queue, symmetric (CLIP) and MoCo (in_batch_negatives=False).

Oracle: `info_nce_reference(..., logit_bias=, key_ids=, queue_ids=)` in float64 with
autograd, under the rule of tests/_utils.py (error <= 2x eager's in the same dtype + a
floor relative to the quantity's scale). `positive_on_diagonal=False` (the ring's remote
blocks: the diagonal is masked too, the target stays key i) has a small eager of its own.
The bias is drawn representable in the input dtype, so every path adds the same value.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="the Triton interpreter tests need triton")

from sslkernels.reference import info_nce_reference  # noqa: E402
from tests._utils import assert_within_eager_error, check_masked_remote_block, logit_bound  # noqa: E402
from tests.interpret.test_info_nce_triton import _inputs  # noqa: E402  (same inputs as the plain kernels' tests)

pytestmark = pytest.mark.interpret

NAMES = ("loss", "dquery", "dkey", "dtemperature", "dnegatives")
# (N, D, K, symmetric, in_batch_negatives); interpreter tiles are 32 x 32 with BLOCK_K 32:
# D = 16 a hoisted row tile, 40 the chunked path and the dZhat scratch (normalize); N = 33 / 70
# cross one / two row and column tiles
CASES = [
    (7, 16, 5, False, True),
    (33, 40, 40, True, True),   # CLIP with a queue on the query side
    (70, 16, 0, True, True),    # CLIP, no queue, three tiles
    (33, 16, 0, False, True),
    (7, 40, 40, False, False),  # MoCo: own key + queue
]
TERMS = ["bias", "ids", "both"]



def _terms(n, k, dtype, which, seed=1):
    """(logit_bias float64 [N + K] or None, key_ids [N] or None, queue_ids [K] or None): ids
    with many duplicates (keys: i % 3, the queue: j % 5, so queue rows share the keys' ids)."""
    g = torch.Generator().manual_seed(seed)
    bias = key_ids = queue_ids = None
    if which in ("bias", "both"):
        # -log q_j of a skewed sampler, rounded to the input dtype: every path adds this value
        bias = (-torch.log(torch.rand(n + k, generator=g, dtype=torch.float64) * 0.9 + 0.05)).to(dtype).double()
    if which in ("ids", "both"):
        key_ids = torch.arange(n) % 3
        queue_ids = torch.arange(k) % 5
    return bias, key_ids, queue_ids


def _launcher_terms(q, bias, key_ids, queue_ids):
    """The launchers' keyword arguments, as the ops layer converts them."""
    kw = {}
    if bias is not None:
        kw["logit_bias"] = bias.to(torch.float64 if q.dtype == torch.float64 else torch.float32).contiguous()
    if key_ids is not None:
        kw["anchor_ids"] = key_ids.to(torch.int64).contiguous()
        ids = key_ids if queue_ids is None else torch.cat([key_ids, queue_ids])
        kw["candidate_ids"] = ids.to(torch.int64).contiguous()
    return kw


def _fused(kernels, q, key, neg, t, symmetric, in_batch, normalize, grad=1.0, negatives_grad=True, **terms):
    loss, lse = kernels.info_nce_forward(q, key, neg, t, normalize, symmetric, in_batch, negatives_grad, **terms)
    g = torch.tensor(grad, dtype=q.dtype)
    dq, dk, dneg, dt = kernels.info_nce_backward(g, q, key, neg, t, lse, normalize, symmetric, in_batch,
                                                 negatives_grad, **terms)
    out = (loss, dq, dk, dt) + ((dneg,) if neg is not None and negatives_grad else ())
    return out, lse


def _autograd(fn, q, key, neg, t):
    """(value, dq, dk, dt[, dneg]) of fn(q, key, t, neg) on fresh leaves."""
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, key, t)]
    if neg is not None:
        leaves.append(neg.detach().clone().requires_grad_(True))
    value = fn(leaves[0], leaves[1], leaves[2], leaves[3] if neg is not None else None)
    return (value.detach(), *torch.autograd.grad(value, leaves))


def _reference(q, key, neg, t, symmetric, in_batch, normalize, bias, key_ids, queue_ids):
    bias = None if bias is None else bias.to(q.dtype)  # eager in its own dtype, float64 in float64

    def fn(q, key, t, neg):
        return info_nce_reference(q, key, t, neg, symmetric=symmetric, normalize=normalize,
                                  in_batch_negatives=in_batch, logit_bias=bias, key_ids=key_ids,
                                  queue_ids=queue_ids)

    return _autograd(fn, q, key, neg, t)


def _check(kernels, dtype, case, normalize, which, t=None):
    n, d, k, symmetric, in_batch = case
    q, key, neg = _inputs(n, d, k, dtype, normalize)
    bias, key_ids, queue_ids = _terms(n, k, dtype, which)
    if t is None:
        t = (0.2 if dtype == torch.float16 else 0.07) if normalize else 0.5
    t64 = torch.tensor(t, dtype=torch.float64)
    fused, lse = _fused(kernels, q, key, neg, t64, symmetric, in_batch, normalize,
                        **_launcher_terms(q, bias, key_ids, queue_ids))
    eager = _reference(q, key, neg, t64, symmetric, in_batch, normalize, bias, key_ids, queue_ids)
    ref = _reference(*(None if x is None else x.double() for x in (q, key, neg)), t64, symmetric, in_batch,
                     normalize, bias, key_ids, queue_ids)
    terms = logit_bound(q, key, neg, temperature=t, normalize=normalize)
    if bias is not None:
        terms += float(bias.abs().max())
    for what, f, e, r in zip(NAMES, fused, eager, ref):
        assert_within_eager_error(f, e, r, dtype, what, terms)
    assert fused[0].dtype == dtype and fused[3].dtype == torch.float64
    assert lse.shape == ((2 * n) if symmetric else n,) and lse.dtype == torch.float64
    return fused, ref


def _ids(cases):
    return [f"{n}x{d}k{k}{'-sym' if s else ''}{'' if b else '-moco'}" for n, d, k, s, b in cases]


@pytest.mark.parametrize("which", TERMS)
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_matches_float64_reference(contrastive_kernels, poisoned_outputs, dtype, case, normalize, which):
    _check(contrastive_kernels, dtype, case, normalize, which)


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("case", [CASES[1], CASES[4]], ids=_ids([CASES[1], CASES[4]]))
def test_float16(contrastive_kernels, poisoned_outputs, case, normalize):
    _check(contrastive_kernels, torch.float16, case, normalize, "both")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_rows_whose_every_negative_is_masked(contrastive_kernels, poisoned_outputs, dtype):
    """In-batch: every key shares one id, so only the queue rows of other ids stay (two of
    them); MoCo: the whole queue carries query 0's id, which keeps its own key alone."""
    n, d, k = 7, 16, 6
    q, key, neg = _inputs(n, d, k, dtype, True)
    t64 = torch.tensor(0.1, dtype=torch.float64)
    bias = _terms(n, k, dtype, "bias")[0]
    setups = [
        (True, True, torch.full((n,), 4), torch.tensor([4, 4, 4, 4, 1, 2])),
        (False, True, torch.full((n,), 4), torch.full((k,), 4)),  # every row: the positive alone
        (False, False, torch.arange(n) + 10, torch.full((k,), 10)),  # MoCo: row 0 alone
    ]
    for symmetric, in_batch, key_ids, queue_ids in setups:
        fused, lse = _fused(contrastive_kernels, q, key, neg, t64, symmetric, in_batch, True,
                            **_launcher_terms(q, bias, key_ids, queue_ids))
        eager = _reference(q, key, neg, t64, symmetric, in_batch, True, bias, key_ids, queue_ids)
        ref = _reference(q.double(), key.double(), neg.double(), t64, symmetric, in_batch, True, bias, key_ids,
                         queue_ids)
        terms = logit_bound(temperature=0.1) + float(bias.abs().max())
        for what, f, e, r in zip(NAMES, fused, eager, ref):
            assert_within_eager_error(f, e, r, dtype, f"{what} (sym={symmetric}, in_batch={in_batch})", terms)
        if not in_batch:  # row 0's lse is its positive's own logit: its loss term is 0
            qn, kn = F.normalize(q.double(), dim=1), F.normalize(key.double(), dim=1)
            torch.testing.assert_close(lse[0], (qn[0] @ kn[0]) / 0.1 + bias[0], rtol=1e-5, atol=1e-5)


def _both_directions_logits(q, key, neg, t, normalize, bias):
    """(query i against keys then the queue, biased [N, N + K]; key i against the queries [N, N])."""
    if normalize:
        q, key = F.normalize(q, dim=1), F.normalize(key, dim=1)
        neg = F.normalize(neg, dim=1) if neg is not None else None
    cands = key if neg is None else torch.cat([key, neg])
    logits = q @ cands.T / t
    if bias is not None:
        logits = logits + bias.to(logits.dtype)[None, :]
    return logits, key @ q.T / t


def _eager_off_diagonal(q, key, neg, t, symmetric, in_batch, normalize, bias, anchor, cand):
    """(loss, lse) of positive_on_diagonal=False: the id mask removes (i, i) too, the target
    stays key i (loss_i = lse_i - l_ii, l_ii biased, over the rows of both directions)."""
    n = q.shape[0]
    logits, logits_t = _both_directions_logits(q, key, neg, t, normalize, bias)
    drop = anchor[:, None] == cand[None, :]
    if not in_batch:  # the keys of other rows are no candidates
        drop[:, :n] |= ~torch.eye(n, dtype=torch.bool)
    diag = logits.diagonal()  # the target's (biased) logit, masked or not
    lse = torch.logsumexp(logits.masked_fill(drop, float("-inf")), dim=1)
    losses = [lse - diag]
    lses = [lse]
    if symmetric:
        lse_t = torch.logsumexp(logits_t.masked_fill(drop[:, :n].T, float("-inf")), dim=1)
        losses.append(lse_t - logits_t.diagonal())
        lses.append(lse_t)
    return torch.cat(losses).mean(), torch.cat(lses)


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_masked_diagonal(contrastive_kernels, poisoned_outputs, dtype, case, normalize):
    """positive_on_diagonal=False: lse without the masked diagonal, W_ii = p_ii - 1 = -1 there."""
    n, d, k, symmetric, in_batch = case
    q, key, neg = _inputs(n, d, k, dtype, normalize, seed=2)
    bias, _, _ = _terms(n, k, dtype, "bias", seed=3)
    anchor = torch.arange(n) % 5  # a query's own key is masked; others of its id too
    cand = torch.cat([(torch.arange(n) + 2) % 5 if n > 1 else torch.arange(n), torch.arange(k) % 7])
    cand[: n // 2] = anchor[: n // 2]  # half the diagonal masked, half kept
    t = 0.1 if normalize else 0.5
    t64 = torch.tensor(t, dtype=torch.float64)
    kw = dict(logit_bias=_launcher_terms(q, bias, None, None)["logit_bias"], anchor_ids=anchor.contiguous(),
              candidate_ids=cand.contiguous(), positive_on_diagonal=False)
    fused, lse = _fused(contrastive_kernels, q, key, neg, t64, symmetric, in_batch, normalize, **kw)

    def loss_of(qq, kk, tt, nn):
        return _eager_off_diagonal(qq, kk, nn, tt, symmetric, in_batch, normalize, bias, anchor, cand)[0]

    eager = _autograd(loss_of, q, key, neg, t64)
    ref = _autograd(loss_of, q.double(), key.double(), None if neg is None else neg.double(), t64)
    terms = logit_bound(q, key, neg, temperature=t, normalize=normalize) + float(bias.abs().max())
    for what, f, e, r in zip(NAMES, fused, eager, ref):
        assert_within_eager_error(f, e, r, dtype, what, terms)
    _, lse_eager = _eager_off_diagonal(q, key, neg, t64, symmetric, in_batch, normalize, bias,
                                       anchor, cand)
    _, lse_ref = _eager_off_diagonal(q.double(), key.double(), None if neg is None else neg.double(), t64,
                                     symmetric, in_batch, normalize, bias, anchor, cand)
    assert_within_eager_error(lse, lse_eager, lse_ref, dtype, "lse", terms)


def test_neutral_terms_are_bitwise_the_plain_kernels(contrastive_kernels, poisoned_outputs):
    """No terms: the defaults are the old call. A zero bias and unique ids add exactly 0 and
    mask nothing, so the term variants of the kernels give bitwise the same outputs."""
    q, key, neg = _inputs(33, 40, 40, torch.float32, True)
    t64 = torch.tensor(0.07, dtype=torch.float64)
    for symmetric, in_batch in ((True, True), (False, False)):
        plain, lse = _fused(contrastive_kernels, q, key, neg, t64, symmetric, in_batch, True)
        defaults, lse_d = _fused(contrastive_kernels, q, key, neg, t64, symmetric, in_batch, True, logit_bias=None,
                                 anchor_ids=None, candidate_ids=None, positive_on_diagonal=True)
        neutral, lse_n = _fused(contrastive_kernels, q, key, neg, t64, symmetric, in_batch, True,
                                logit_bias=torch.zeros(73), anchor_ids=torch.arange(33),
                                candidate_ids=torch.arange(73))
        for other in (defaults, neutral):
            for what, a, b in zip(NAMES, plain, other):
                assert torch.equal(a, b), f"{what} (sym={symmetric}, in_batch={in_batch}) changed"
        assert torch.equal(lse, lse_d) and torch.equal(lse, lse_n)


def test_the_rule_rejects_a_dropped_term(contrastive_kernels):
    """The tolerance sees a bias or an id mask left out (the reference with them)."""
    n, d, k = 33, 16, 40
    q, key, neg = _inputs(n, d, k, torch.float32, True)
    t64 = torch.tensor(0.07, dtype=torch.float64)
    bias, key_ids, queue_ids = _terms(n, k, torch.float32, "both")
    eager = _reference(q, key, neg, t64, True, True, True, bias, key_ids, queue_ids)
    ref = _reference(q.double(), key.double(), neg.double(), t64, True, True, True, bias, key_ids, queue_ids)
    for dropped in (_launcher_terms(q, bias, None, None), _launcher_terms(q, None, key_ids, queue_ids)):
        wrong, _ = _fused(contrastive_kernels, q, key, neg, t64, True, True, True, **dropped)
        for what, f, e, r in zip(NAMES, wrong, eager, ref):
            with pytest.raises(AssertionError):
                assert_within_eager_error(f, e, r, torch.float32, what)


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")  # lse = -inf, wanted
@pytest.mark.parametrize("k", [0, 5])
def test_remote_block_with_fully_masked_rows(contrastive_kernels, poisoned_outputs, k):
    """The ring's remote-block calls (positive_on_diagonal=False, normalize=False): a row whose
    every candidate shares its id gets lse = -inf from the forward, and the backward, given
    the merged (finite) lse, weighs the block by W = p - [j == i] with p = 0 on every masked
    pair, nothing non-finite leaking from the -inf."""
    n, d = 7, 16
    q, key, neg = _inputs(n, d, k, torch.float64, False, seed=4)
    t = 0.5
    bias = _terms(n, k, torch.float64, "bias", seed=5)[0]
    anchor = torch.arange(n) % 2  # every key and queue row has id 0: rows of id 0 keep none, of id 1 all
    cand = torch.zeros(n + k, dtype=torch.int64)
    kw = dict(logit_bias=bias, anchor_ids=anchor, candidate_ids=cand, positive_on_diagonal=False)
    check_masked_remote_block(
        lambda a, b, c: contrastive_kernels.info_nce_forward(a, b, c, t, False, False, True, k > 0, **kw)[1],
        lambda g, lse: contrastive_kernels.info_nce_backward(g, q, key, neg, t, lse, False, False, True, k > 0,
                                                             **kw)[:3],
        q, key, neg, t, bias, anchor, cand)


PER_QUERY = [(7, 16, 3, False, True), (33, 40, 2, True, True), (7, 40, 1, False, False)]


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("case", PER_QUERY, ids=[f"{n}x{d}m{m}{'-sym' if s else ''}{'' if b else '-moco'}"
                                                 for n, d, m, s, b in PER_QUERY])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_bias_with_per_query_negatives(contrastive_kernels, poisoned_outputs, dtype, case, normalize):
    """logit_bias [N] (the keys' only: per-query negatives [N, M, D] carry none, as in the
    reference) beside each query's own negatives."""
    n, d, m, symmetric, in_batch = case
    q, key, _ = _inputs(n, d, 0, dtype, normalize)
    g = torch.Generator().manual_seed(6)
    hard = (q.double()[:, None, :] + torch.randn(n, m, d, generator=g, dtype=torch.float64)
            * float(q.double().norm(dim=1).mean()) / math.sqrt(d)).to(dtype)
    bias, _, _ = _terms(n, 0, dtype, "bias")
    t = 0.1 if normalize else 0.5
    t64 = torch.tensor(t, dtype=torch.float64)
    fused, _ = _fused(contrastive_kernels, q, key, hard, t64, symmetric, in_batch, normalize,
                      **_launcher_terms(q, bias, None, None))
    eager = _reference(q, key, hard, t64, symmetric, in_batch, normalize, bias, None, None)
    ref = _reference(q.double(), key.double(), hard.double(), t64, symmetric, in_batch, normalize, bias, None, None)
    terms = logit_bound(q, key, hard, temperature=t, normalize=normalize) + float(bias.abs().max())
    for what, f, e, r in zip(NAMES, fused, eager, ref):
        assert_within_eager_error(f, e, r, dtype, what, terms)


@pytest.mark.parametrize("k", [0, 40])
def test_one_sweep_op_with_terms_on_the_triton_path(contrastive_kernels, poisoned_outputs, k):
    """`sslkernels::info_nce_loss_and_grads`'s Triton route with the terms as the ops layer
    passes them (a float64 bias and int32 ids, converted there for the launchers)."""
    from sslkernels.ops.contrastive import loss_and_grads_from_kernels

    n, d = 33, 40
    q, key, neg = _inputs(n, d, k, torch.float32, True)
    t64 = torch.tensor(0.07, dtype=torch.float64)
    bias, key_ids, queue_ids = _terms(n, k, torch.float32, "both")
    cand = key_ids if queue_ids is None else torch.cat([key_ids, queue_ids])
    loss, dq, dk, dneg, dt = loss_and_grads_from_kernels(
        contrastive_kernels, q, key, neg, t64, True, True, logit_bias=bias, anchor_ids=key_ids.to(torch.int32),
        candidate_ids=cand.to(torch.int32))
    fused = (loss, dq, dk, dt) + ((dneg,) if neg is not None else ())
    eager = _reference(q, key, neg, t64, False, True, True, bias, key_ids, queue_ids)
    ref = _reference(q.double(), key.double(), None if neg is None else neg.double(), t64, False, True, True, bias,
                     key_ids, queue_ids)
    terms = logit_bound(temperature=0.07) + float(bias.abs().max())
    for what, f, e, r in zip(NAMES, fused, eager, ref):
        assert_within_eager_error(f, e, r, torch.float32, what, terms)
