"""info_nce's retrieval terms (issue 13): `logit_bias` (the sampling-bias correction
-log q_j, query -> key direction) and `key_ids` / `queue_ids` (duplicates of a positive
left out, both directions), on the C++ path, against the float64 eager oracle."""
import pytest
import torch

import sslkernels
from sslkernels.reference import info_nce_reference
from tests._utils import assert_within_eager_error, check_masked_remote_block, logit_bound, loss_and_grads

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _case(n, d, k, dtype, seed=0, num_ids=4):
    """query, key, queue (or None), bias [N + K], key ids [N], queue ids [K] (or None)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=g)
    key = (q + 0.8 * torch.randn(n, d, generator=g)).to(dtype)
    neg = torch.randn(k, d, generator=g).to(dtype) if k else None
    bias = 1.5 * torch.randn(n + k, generator=g)
    ids = torch.randint(0, num_ids, (n,), generator=g)
    queue_ids = torch.randint(0, num_ids, (k,), generator=g) if k else None
    return q.to(dtype), key, neg, bias, ids, queue_ids


def _compare(dtype, args, terms, **kw):
    """The fused loss and gradients within the rule of the eager ones, in `dtype` (the bias
    rounded to it too, so that eager adds it in `dtype`; the oracle takes the same values)."""
    bias = terms.get("logit_bias")
    if bias is not None:
        terms = dict(terms, logit_bias=bias.to(dtype))

    def run(fn, wide=False):
        extra = dict(terms, logit_bias=terms["logit_bias"].double()) if wide and bias is not None else terms
        return lambda a, b, t, *c: fn(a, b, t, c[0] if c else None, **kw, **extra)

    fused = loss_and_grads(run(sslkernels.info_nce), *args)
    eager = loss_and_grads(run(info_nce_reference), *args)
    ref = loss_and_grads(run(info_nce_reference, wide=True), *[a.double() for a in args])
    # the logits' size: 1 / t (unit rows) or |x|^2 / t, plus the largest bias
    bound = logit_bound(*args[:2], *args[3:], temperature=args[2], normalize=kw.get("normalize", True))
    bound += float(bias.abs().max()) if bias is not None else 0.0
    for what, f, e, r in zip(("loss", "grad query", "grad key", "grad t", "grad negatives"), fused, eager, ref):
        assert_within_eager_error(f, e, r, dtype, what, bound)
    return fused, ref


def _which_terms(name, bias, ids, queue_ids):
    return {"bias": dict(logit_bias=bias), "ids": dict(key_ids=ids, queue_ids=queue_ids),
            "both": dict(logit_bias=bias, key_ids=ids, queue_ids=queue_ids)}[name]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d,k,symmetric", [(1, 3, 0, False), (7, 40, 0, False), (7, 40, 5, False),
                                             (300, 33, 270, False), (1, 3, 0, True), (7, 40, 0, True),
                                             (300, 33, 0, True)])
@pytest.mark.parametrize("which", ["bias", "ids", "both"])
def test_matches_float64_reference(dtype, n, d, k, symmetric, which):
    q, key, neg, bias, ids, queue_ids = _case(n, d, k, dtype)
    terms = _which_terms(which, bias, ids, queue_ids)
    t = torch.tensor(0.2, dtype=torch.float64)
    _compare(dtype, (q, key, t) + ((neg,) if k else ()), terms, symmetric=symmetric)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("k", [0, 9])
def test_forward_backward_ops_match_the_one_sweep(dtype, k):
    """The one-direction loss takes the one-sweep op when a gradient is wanted; the
    forward / backward ops (the ring's, CUDA's) must give the same loss and gradients."""
    q, key, neg, bias, ids, queue_ids = _case(70, 24, k, dtype, seed=3)
    cand = torch.cat([ids, queue_ids]) if k else ids
    t = torch.tensor(0.15, dtype=dtype)

    def two_ops(a, b, tt, *c):
        loss, _ = torch.ops.sslkernels.info_nce_forward(a, b, c[0] if c else None, tt, True, False, True, bool(c),
                                                        bias.to(dtype), ids, cand)
        return loss

    args = (q, key, t) + ((neg,) if k else ())
    sweep = loss_and_grads(lambda a, b, tt, *c: sslkernels.info_nce(
        a, b, tt, c[0] if c else None, logit_bias=bias, key_ids=ids, queue_ids=queue_ids), *args)
    ops = loss_and_grads(two_ops, *args)
    ref = loss_and_grads(lambda a, b, tt, *c: info_nce_reference(
        a, b, tt, c[0] if c else None, logit_bias=bias.double(), key_ids=ids, queue_ids=queue_ids),
        *[a.double() for a in args])
    for what, s, o, r in zip(("loss", "grad query", "grad key", "grad t", "grad negatives"), sweep, ops, ref):
        assert_within_eager_error(o, s, r, dtype, f"{what} (forward / backward ops)", logit_bound(temperature=0.15) + 6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bias_and_queue_ids_in_moco_mode(dtype):
    q, key, neg, bias, ids, queue_ids = _case(33, 16, 20, dtype, seed=5)
    t = torch.tensor(0.2, dtype=torch.float64)
    _compare(dtype, (q, key, t, neg), dict(logit_bias=bias, key_ids=ids, queue_ids=queue_ids),
             in_batch_negatives=False)


@pytest.mark.parametrize("normalize", [True, False])
def test_unnormalised_rows(normalize):
    q, key, neg, bias, ids, queue_ids = _case(41, 12, 13, torch.float32, seed=7)
    scale = 1.0 if normalize else 12 ** -0.5
    args = (q * scale, key * scale, torch.tensor(0.3, dtype=torch.float64), neg * scale)
    _compare(torch.float32, args, dict(logit_bias=bias, key_ids=ids, queue_ids=queue_ids), normalize=normalize)


def test_the_terms_change_the_loss_as_the_formula_says():
    """Bias: loss_i = -log softmax(s_i + b)_i; with every other candidate sharing the
    positive's id, each loss is exactly 0 and so is every gradient."""
    q, key, neg, bias, _, _ = _case(9, 8, 4, torch.float64, seed=11)
    t = 0.5
    s = torch.cat([torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(x, dim=1).T / t
                   for x in (key, neg)], dim=1) + bias
    want = (torch.logsumexp(s, dim=1) - s.diagonal()).mean()
    torch.testing.assert_close(sslkernels.info_nce(q, key, t, neg, logit_bias=bias), want, rtol=1e-12, atol=0)
    same = torch.zeros(9, dtype=torch.int64)
    leaves = [x.clone().requires_grad_() for x in (q, key, neg)]
    loss = sslkernels.info_nce(*leaves[:2], t, leaves[2], key_ids=same, queue_ids=torch.zeros(4, dtype=torch.int64),
                               symmetric=False)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert all(float(x.grad.abs().max()) == 0.0 for x in leaves)


def test_symmetric_bias_is_query_to_key_only():
    """The key -> query direction of CLIP carries no bias: shifting every key's bias by a
    constant changes nothing at all (softmax is shift-invariant in that direction too)."""
    q, key, _, bias, ids, _ = _case(17, 8, 0, torch.float64, seed=2)
    bias = bias.double()  # so that bias + 3 is exact
    base = sslkernels.info_nce(q, key, 0.2, symmetric=True, logit_bias=bias, key_ids=ids)
    shifted = sslkernels.info_nce(q, key, 0.2, symmetric=True, logit_bias=bias + 3.0, key_ids=ids)
    torch.testing.assert_close(shifted, base, rtol=1e-12, atol=1e-12)
    one_dir = sslkernels.info_nce(q, key, 0.2, logit_bias=bias, key_ids=ids)
    back = sslkernels.info_nce(key, q, 0.2, key_ids=ids)
    torch.testing.assert_close(base, 0.5 * (one_dir + back), rtol=1e-12, atol=1e-12)


def test_gradcheck_float64():
    q, key, neg, bias, ids, queue_ids = _case(6, 5, 4, torch.float64, seed=4, num_ids=3)
    t = torch.tensor(0.4, dtype=torch.float64)
    for leaf in (q, key, neg, t):
        leaf.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b, c, tt: sslkernels.info_nce(
        a, b, tt, c, logit_bias=bias, key_ids=ids, queue_ids=queue_ids), (q, key, neg, t))
    assert torch.autograd.gradcheck(lambda a, b, tt: sslkernels.info_nce(
        a, b, tt, symmetric=True, logit_bias=bias[:6], key_ids=ids), (q, key, t))


def test_opcheck():
    q, key, neg, bias, ids, queue_ids = _case(7, 6, 5, torch.float32, seed=8)
    t = torch.tensor(0.3)
    cand = torch.cat([ids, queue_ids])
    b64 = bias.double()
    for sym, negatives, cand_ids, b in ((False, neg, cand, b64), (True, None, ids, b64[:7])):
        torch.library.opcheck(torch.ops.sslkernels.info_nce_forward.default,
                              (q.requires_grad_(), key, negatives, t, True, sym, True, False, b, ids, cand_ids, True))
    torch.library.opcheck(torch.ops.sslkernels.info_nce_forward.default,
                          (q, key, None, t, True, False, True, False, None, ids, ids, False))
    torch.library.opcheck(torch.ops.sslkernels.info_nce_loss_and_grads.default,
                          (q, key, neg, t, True, False, b64, ids, cand))


def test_torch_compile_fullgraph_cpu():
    q, key, neg, bias, ids, queue_ids = _case(19, 8, 6, torch.float32, seed=9)
    fn = torch.compile(lambda a, b, c: sslkernels.info_nce(a, b, 0.1, c, logit_bias=bias, key_ids=ids,
                                                           queue_ids=queue_ids), fullgraph=True)
    torch.testing.assert_close(fn(q, key, neg), sslkernels.info_nce(q, key, 0.1, neg, logit_bias=bias, key_ids=ids,
                                                                     queue_ids=queue_ids))


def test_thread_count_independent():
    q, key, neg, bias, ids, queue_ids = _case(700, 32, 300, torch.float32, seed=12)
    out = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for symmetric in (False, True):
                leaves = [x.clone().requires_grad_() for x in (q, key, neg)]
                loss = sslkernels.info_nce(*leaves[:2], 0.1, None if symmetric else leaves[2], symmetric=symmetric,
                                           logit_bias=bias[:700] if symmetric else bias, key_ids=ids,
                                           queue_ids=None if symmetric else queue_ids)
                loss.backward()
                out.append([loss.detach()] + [x.grad for x in leaves if x.grad is not None])
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(out[:2], out[2:]):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


N, K = 5, 3
_q = torch.randn(N, 4)
_queue = torch.randn(K, 4)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(logit_bias=torch.randn(N + K + 1)), ValueError, "logit_bias"),
    (dict(logit_bias=torch.randn(N)), ValueError, r"logit_bias.*\[N \+ K\]"),
    (dict(logit_bias=torch.randn(N + K, 1)), ValueError, "logit_bias"),
    (dict(logit_bias=torch.arange(N + K)), TypeError, "logit_bias"),
    (dict(logit_bias=[0.0] * (N + K)), TypeError, "logit_bias"),
    (dict(logit_bias=torch.full((N + K,), float("nan"))), ValueError, "logit_bias.*NaN"),
    (dict(logit_bias=torch.full((N + K,), float("inf"))), ValueError, "logit_bias.*NaN or Inf"),
    (dict(logit_bias=torch.randn(N + K, requires_grad=True)), NotImplementedError, "logit_bias.*detach"),
    (dict(key_ids=torch.arange(N).float(), queue_ids=torch.arange(K)), TypeError, "key_ids"),
    (dict(key_ids=torch.ones(N, dtype=torch.bool), queue_ids=torch.arange(K)), TypeError, "key_ids"),
    (dict(key_ids=torch.arange(N + 1), queue_ids=torch.arange(K)), ValueError, r"key_ids.*\[5\]"),
    (dict(key_ids=torch.arange(N), queue_ids=torch.arange(K + 2)), ValueError, r"queue_ids.*\[3\]"),
    (dict(key_ids=torch.arange(N), queue_ids=torch.arange(K).double()), TypeError, "queue_ids"),
    (dict(key_ids=torch.arange(N)), ValueError, "queue_ids"),
    (dict(queue_ids=torch.arange(K)), ValueError, "queue_ids.*key_ids"),
    (dict(key_ids=[0] * N, queue_ids=torch.arange(K)), TypeError, "key_ids"),
])
def test_bad_terms_raise(kw, exc, match):
    with pytest.raises(exc, match=match):
        sslkernels.info_nce(_q, _q + 0.1, 0.1, _queue, **kw)


def test_terms_need_shared_candidates():
    with pytest.raises(NotImplementedError, match="per-query negatives"):
        sslkernels.info_nce(_q, _q, 0.1, torch.randn(N, 2, 4), key_ids=torch.arange(N))
    with pytest.raises(ValueError, match="queue_ids.*without a queue"):
        sslkernels.info_nce(_q, _q, 0.1, key_ids=torch.arange(N), queue_ids=torch.arange(K))
    with pytest.raises(ValueError, match=r"logit_bias.*\[5\]"):
        sslkernels.info_nce(_q, _q, 0.1, logit_bias=torch.randn(N + K))


def test_int32_ids_and_a_bias_under_no_grad_are_taken():
    bias = torch.randn(N + K, requires_grad=True)
    ids = torch.tensor([0, 1, 0, 2, 1], dtype=torch.int32)
    with torch.no_grad():
        got = sslkernels.info_nce(_q, _q + 0.1, 0.1, _queue, logit_bias=bias, key_ids=ids,
                                  queue_ids=torch.arange(K, dtype=torch.int16))
    want = info_nce_reference(_q, _q + 0.1, 0.1, _queue, logit_bias=bias.detach(), key_ids=ids.long(),
                              queue_ids=torch.arange(K))
    torch.testing.assert_close(got, want)


def test_module_passes_the_terms():
    q, key, neg, bias, ids, queue_ids = _case(12, 6, 5, torch.float32, seed=13)
    module = sslkernels.nn.InfoNCELoss(temperature=0.2)
    got = module(q, key, neg, logit_bias=bias, key_ids=ids, queue_ids=queue_ids)
    torch.testing.assert_close(got, info_nce_reference(q, key, 0.2, neg, logit_bias=bias, key_ids=ids,
                                                       queue_ids=queue_ids))


# ---------------------------------------------------------------- review: edge cases of the C++ path


@pytest.mark.parametrize("k", [0, 5])
def test_remote_block_with_fully_masked_rows(k):
    """The ring's remote-block call on the CPU (positive_on_diagonal=False, normalize=False):
    a query whose every candidate in the block shares its id has lse = -inf there (no
    candidate: a value, not an overflow, so the call must not raise), the other rows the
    eager lse; the backward, given the merged (finite) lse, weighs the block by
    W = p - [j == i] with p = 0 on every masked pair."""
    g = torch.Generator().manual_seed(21)
    n, d, t = 7, 16, 0.5
    q, key = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    neg = torch.randn(k, d, generator=g, dtype=torch.float64) if k else None
    bias = torch.randn(n + k, generator=g, dtype=torch.float64)
    anchor = torch.arange(n) % 2  # every key and queue row has id 0: rows of id 0 keep none, of id 1 all
    cand = torch.zeros(n + k, dtype=torch.int64)
    temperature = torch.tensor(t, dtype=torch.float64)
    terms = (bias, anchor, cand, False)
    check_masked_remote_block(
        lambda a, b, c: torch.ops.sslkernels.info_nce_forward(a, b, c, temperature, False, False, True, k > 0,
                                                              *terms)[1],
        lambda g, lse: torch.ops.sslkernels.info_nce_backward(g, q, key, neg, temperature, lse, False, False, True,
                                                              k > 0, *terms)[:3],
        q, key, neg, t, bias, anchor, cand)
    assert torch.isinf(torch.ops.sslkernels.info_nce_forward(q, key, neg, temperature, False, False, True, k > 0,
                                                             *terms)[1][anchor == 0]).all()


# N = 1, 2; several 64-row tiles (N < 1024) not a multiple, D across the 128 boundary; the
# one sweep's 48-row strips and two 512-column tiles (N = 600); a queue of 1 and of N.
EDGE_SIZES = [(2, 8, 1), (257, 8, 0), (257, 130, 1), (600, 8, 600), (600, 130, 5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("n,d,k", EDGE_SIZES)
@pytest.mark.parametrize("mode", ["one_direction", "symmetric", "moco"])
def test_edge_sizes_match_float64_reference(dtype, n, d, k, mode):
    q, key, neg, bias, ids, queue_ids = _case(n, d, k, dtype, seed=n + d + k)
    t = torch.tensor(0.2, dtype=torch.float64)
    kw = dict(symmetric=mode == "symmetric", in_batch_negatives=mode != "moco")
    _compare(dtype, (q, key, t) + ((neg,) if k else ()), dict(logit_bias=bias, key_ids=ids, queue_ids=queue_ids), **kw)


@pytest.mark.parametrize("n,d,k", [(1, 8, 0), (2, 8, 1), (600, 130, 600)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_distinct_ids_and_a_zero_bias_change_nothing(n, d, k, symmetric):
    """Ids that are all different mask nothing and a zero bias adds nothing: loss and
    gradients bitwise those of the call without terms (same tiles, same sums)."""
    q, key, neg, _, _, _ = _case(n, d, k, torch.float32, seed=17)
    args = (q, key, torch.tensor(0.2)) + ((neg,) if k else ())

    def run(**terms):
        return loss_and_grads(lambda a, b, tt, *c: sslkernels.info_nce(a, b, tt, c[0] if c else None,
                                                                         symmetric=symmetric, **terms), *args)

    base = run()
    distinct = run(key_ids=torch.arange(n), queue_ids=torch.arange(n, n + k) if k else None)
    zero_bias = run(logit_bias=torch.zeros(n + k))
    for got in (distinct, zero_bias):
        assert all(torch.equal(x, y) for x, y in zip(got, base))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_huge_bias(dtype, symmetric, sign):
    """|bias| ~ 80 (exp overflows float32 past 88, float16 long before): the tiles are
    shifted by their max, so nothing overflows; a bias that makes one negative dominate
    its row gives a large loss, within the rule."""
    q, key, neg, bias, ids, queue_ids = _case(70, 16, 9, dtype, seed=19)
    bias = sign * 80.0 * torch.sign(bias) + bias  # some candidates far above, some far below
    t = torch.tensor(0.2, dtype=torch.float64)
    neg = None if symmetric else neg
    terms = dict(logit_bias=bias[:70] if symmetric else bias, key_ids=ids, queue_ids=None if symmetric else queue_ids)
    fused, _ = _compare(dtype, (q, key, t) + (() if symmetric else (neg,)), terms, symmetric=symmetric)
    assert float(fused[0]) > 10.0  # the bias does dominate


def test_no_grad_route_matches_the_one_sweep():
    """Under no_grad the one-direction loss goes through info_nce_forward, with a gradient
    wanted through the one-sweep op: the same value within the rule."""
    q, key, neg, bias, ids, queue_ids = _case(257, 40, 33, torch.float32, seed=23)
    terms = dict(logit_bias=bias, key_ids=ids, queue_ids=queue_ids)
    with torch.no_grad():
        forward_only = sslkernels.info_nce(q, key, 0.1, neg, **terms)
    swept = sslkernels.info_nce(q.clone().requires_grad_(), key, 0.1, neg, **terms).detach()
    eager = info_nce_reference(q, key, 0.1, neg, **terms)
    ref = info_nce_reference(q.double(), key.double(), 0.1, neg.double(), **dict(terms, logit_bias=bias.double()))
    bound = logit_bound(temperature=0.1) + float(bias.abs().max())
    assert_within_eager_error(forward_only, eager, ref, torch.float32, "loss (forward op)", bound)
    assert_within_eager_error(swept, eager, ref, torch.float32, "loss (one sweep)", bound)


_ids = lambda length: torch.zeros(length, dtype=torch.int64)  # noqa: E731


@pytest.mark.parametrize("op", ["forward", "backward", "one_sweep"])
@pytest.mark.parametrize("terms,exc,match", [
    ((torch.zeros(1, dtype=torch.float64), None, None), ValueError, r"logit_bias.*\[8\]"),
    ((None, _ids(1), _ids(N + K)), ValueError, r"anchor_ids.*\[5\]"),
    ((None, _ids(N), _ids(N)), ValueError, r"candidate_ids.*\[8\]"),
    ((None, _ids(N), None), ValueError, "both or neither"),
])
def test_ops_refuse_terms_of_the_wrong_length(op, terms, exc, match):
    """Called directly (torch.ops.sslkernels), the CPU ops check the terms' lengths: the C++
    core reads N + K entries through each pointer, past the end of a short tensor (a short
    id tensor gave a silently wrong loss)."""
    t = torch.tensor(0.1)
    with pytest.raises(exc, match=match):
        if op == "forward":
            torch.ops.sslkernels.info_nce_forward(_q, _q + 0.1, _queue, t, True, False, True, False, *terms)
        elif op == "backward":
            lse = torch.zeros(N, dtype=torch.float64)
            torch.ops.sslkernels.info_nce_backward(torch.tensor(1.0), _q, _q + 0.1, _queue, t, lse, True, False,
                                                   True, False, *terms)
        else:
            torch.ops.sslkernels.info_nce_loss_and_grads(_q, _q + 0.1, _queue, t, True, False, *terms)


def test_ops_refuse_terms_with_per_query_negatives_on_the_cpu():
    with pytest.raises(NotImplementedError, match="per-query negatives"):
        torch.ops.sslkernels.info_nce_forward(_q, _q, torch.randn(N, 2, 4), torch.tensor(0.1), True, False, True,
                                              False, torch.zeros(N, dtype=torch.float64))


@pytest.mark.parametrize("symmetric", [False, True])
def test_terms_updated_in_place_before_backward(symmetric):
    """A caller that updates its bias (a running -log q_j estimate) and ids in place after
    the loss, before backward: the gradient is that of the values the forward saw, as
    eager's is (the forward / backward ops used to read the changed tensors)."""
    q, key, neg, bias, ids, queue_ids = _case(33, 8, 0 if symmetric else 6, torch.float64, seed=29)
    kw = dict(symmetric=symmetric, logit_bias=bias.double(), key_ids=ids, queue_ids=queue_ids)
    want = loss_and_grads(lambda a, b: sslkernels.info_nce(a, b, 0.2, neg, **kw), q, key)
    leaves = [x.clone().requires_grad_() for x in (q, key)]
    loss = sslkernels.info_nce(*leaves, 0.2, neg, **kw)
    kw["logit_bias"].add_(3.0)
    kw["key_ids"].fill_(0)
    loss.backward()
    for got, expected in zip([x.grad for x in leaves], want[1:]):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("symmetric", [False, True])
def test_strided_expanded_and_int32_terms(symmetric):
    """A strided bias, expanded (stride 0) int32 key ids, strided queue ids that match only
    in the queue: taken as the values they hold, loss and gradients within the rule."""
    q, key, neg, bias, _, _ = _case(41, 12, 0 if symmetric else 13, torch.float32, seed=37)
    k = 0 if symmetric else 13
    strided_bias = torch.stack([bias, -bias], dim=1)[:, 0]  # stride 2
    assert strided_bias.stride() == (2,)
    for key_ids in (torch.tensor(3, dtype=torch.int32).expand(41), torch.arange(41, dtype=torch.int32)):
        queue_ids = torch.tensor([3, 7, 40, 100] * 8)[::2][:k] if k else None  # stride 2
        terms = dict(logit_bias=strided_bias, key_ids=key_ids, queue_ids=queue_ids)
        _compare(torch.float32, (q, key, torch.tensor(0.2, dtype=torch.float64)) + ((neg,) if k else ()), terms,
                 symmetric=symmetric)


def test_thread_count_independent_moco_and_forward_only():
    """The MoCo mode (own key + queue) and the no-grad forward with the terms: bitwise the
    same loss and gradients for 1 and 2 threads."""
    q, key, neg, bias, ids, queue_ids = _case(700, 32, 300, torch.float32, seed=41)
    terms = dict(logit_bias=bias, key_ids=ids, queue_ids=queue_ids)
    out = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.no_grad():
                forward_only = sslkernels.info_nce(q, key, 0.1, neg, **terms)
            leaves = [x.clone().requires_grad_() for x in (q, key, neg)]
            t = torch.tensor(0.1, requires_grad=True)
            loss = sslkernels.info_nce(*leaves[:2], t, leaves[2], in_batch_negatives=False, **terms)
            loss.backward()
            out.append([forward_only, loss.detach(), t.grad] + [x.grad for x in leaves])
    finally:
        torch.set_num_threads(previous)
    for x, y in zip(*out):
        assert torch.equal(x, y)


def test_an_empty_queue_takes_empty_queue_ids():
    """MoCo's warm-up: the queue [0, D] is still empty (taken as no queue) and so are its ids
    [0]; the loss is the one without a queue. Ids of the wrong kind still raise."""
    q, key, _, bias, ids, _ = _case(9, 6, 0, torch.float32, seed=43)
    empty, no_ids = torch.empty(0, 6), torch.empty(0, dtype=torch.int64)
    got = sslkernels.info_nce(q, key, 0.2, empty, logit_bias=bias, key_ids=ids, queue_ids=no_ids)
    assert torch.equal(got, sslkernels.info_nce(q, key, 0.2, logit_bias=bias, key_ids=ids))
    with pytest.raises(TypeError, match="queue_ids"):
        sslkernels.info_nce(q, key, 0.2, empty, key_ids=ids, queue_ids=torch.empty(0))


def test_torch_compile_fullgraph_cpu_symmetric_backward():
    """The forward / backward ops' autograd (which keeps copies of the terms) under
    torch.compile: loss and gradient bitwise those of the eager call."""
    q, key, _, bias, ids, _ = _case(19, 8, 0, torch.float32, seed=9)
    fn = torch.compile(lambda a, b: sslkernels.info_nce(a, b, 0.1, symmetric=True, logit_bias=bias[:19], key_ids=ids),
                       fullgraph=True)
    compiled = loss_and_grads(fn, q, key)
    eager = loss_and_grads(lambda a, b: sslkernels.info_nce(a, b, 0.1, symmetric=True, logit_bias=bias[:19],
                                                            key_ids=ids), q, key)
    assert all(torch.equal(x, y) for x, y in zip(compiled, eager))
