"""InfoNCE / CLIP with a shared queue: the fused CPU path against the float64 eager
oracle, autograd, compile, memory and errors."""
import pytest
import torch

import sslkernels
from sslkernels.reference import info_nce_reference, nt_xent_reference
from tests._utils import assert_within_eager_error, logit_bound, loss_and_grads

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _inputs(n, d, k, dtype, scale=1.0):
    q = (torch.randn(n, d) * scale).to(dtype)
    key = (q.float() + 0.8 * torch.randn(n, d) * scale).to(dtype)
    neg = (torch.randn(k, d) * scale).to(dtype) if k else None
    return q, key, neg


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d,k", [(1, 3, 0), (7, 65, 0), (7, 65, 5), (257, 130, 300), (600, 128, 0)])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_float64_reference(dtype, n, d, k, symmetric, normalize, poisoned_outputs):
    # unnormalised rows of norm ~1, logits ~2: at 0.3 (logits ~25 for D = 128) eager's own
    # bfloat16 error exceeded the gradient, and the rule then rejected nothing
    q, key, neg = _inputs(n, d, k, dtype, scale=1.0 if normalize else d ** -0.5)
    # half types at t = 0.2: at 0.07 their eager error is ~5% of the gradient, and the rule
    # (2x eager's) let a gradient 8-10% off pass (tests/test_tolerance_helpers.py)
    half = dtype in (torch.float16, torch.bfloat16)
    kw = dict(temperature=(0.2 if half else 0.07) if normalize else 0.5, symmetric=symmetric, normalize=normalize)
    args = (q, key) if neg is None else (q, key, neg)

    def run(fn, *t):
        return lambda a, b, *c: fn(a, b, negatives=c[0] if c else None, **kw)

    fused = loss_and_grads(run(sslkernels.info_nce), *args)
    eager = loss_and_grads(run(info_nce_reference), *args)
    ref = loss_and_grads(run(info_nce_reference), *[a.double() for a in args])
    assert fused[0].dtype == dtype and fused[0].dim() == 0
    terms = logit_bound(*args, temperature=kw["temperature"], normalize=normalize)
    for what, f, e, r in zip(("loss", "grad query", "grad key", "grad negatives"), fused, eager, ref):
        assert_within_eager_error(f, e, r, dtype, what, terms)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k", [(1, 0), (1, 4), (65, 0), (257, 300)])
def test_moco_mode_without_in_batch_negatives(dtype, n, k):
    q, key, neg = _inputs(n, 33, k, dtype)
    t = torch.tensor(0.2, dtype=torch.float64)
    args = (q, key, t) if neg is None else (q, key, t, neg)

    def run(fn):
        return lambda a, b, tt, *c: fn(a, b, tt, c[0] if c else None, in_batch_negatives=False)

    fused = loss_and_grads(run(sslkernels.info_nce), *args)
    eager = loss_and_grads(run(info_nce_reference), *args)
    ref = loss_and_grads(run(info_nce_reference), *[a.double() for a in args])
    for what, f, e, r in zip(("loss", "grad query", "grad key", "grad t", "grad negatives"), fused, eager, ref):
        assert_within_eager_error(f, e, r, dtype, what, logit_bound(temperature=0.2))
    with pytest.raises(ValueError, match="in_batch_negatives"):
        sslkernels.info_nce(q, key, symmetric=True, in_batch_negatives=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,m", [(1, 1), (7, 5), (130, 17)])
@pytest.mark.parametrize("in_batch", [True, False])
def test_per_query_hard_negatives(dtype, n, m, in_batch):
    q, key, _ = _inputs(n, 40, 0, dtype)
    hard = (q.float()[:, None, :] + 1.2 * torch.randn(n, m, 40)).to(dtype)  # near-duplicates: hard
    t = torch.tensor(0.1, dtype=torch.float64)

    def run(fn):
        return lambda a, b, tt, c: fn(a, b, tt, c, in_batch_negatives=in_batch)

    fused = loss_and_grads(run(sslkernels.info_nce), q, key, t, hard)
    eager = loss_and_grads(run(info_nce_reference), q, key, t, hard)
    ref = loss_and_grads(run(info_nce_reference), q.double(), key.double(), t, hard.double())
    assert fused[-1].shape == hard.shape
    for what, f, e, r in zip(("loss", "grad query", "grad key", "grad t", "grad negatives"), fused, eager, ref):
        assert_within_eager_error(f, e, r, dtype, what, logit_bound(temperature=0.1))


def test_per_query_negatives_non_contiguous_and_gradcheck():
    q = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    hard = torch.randn(3, 4, 3, dtype=torch.float64).transpose(0, 1).requires_grad_()  # not viewable as rows
    assert torch.autograd.gradcheck(lambda a, b, c: sslkernels.info_nce(a, b, 0.4, c), (q, k, hard))


def test_queue_without_grad_gets_none_and_matches():
    q, key, neg = _inputs(50, 16, 70, torch.float64)
    qq, kk = q.clone().requires_grad_(), key.clone().requires_grad_()
    loss = sslkernels.info_nce(qq, kk, temperature=0.1, negatives=neg)
    loss.backward()
    assert neg.grad is None
    ref = loss_and_grads(lambda a, b: info_nce_reference(a, b, 0.1, neg), q, key)
    torch.testing.assert_close(loss.detach(), ref[0])
    torch.testing.assert_close(qq.grad, ref[1])
    torch.testing.assert_close(kk.grad, ref[2])


def test_symmetric_matches_open_clip_formula():
    """open_clip's ClipLoss (world size 1): logit_scale * normalised features, labels arange,
    (CE(image @ text.T) + CE(text @ image.T)) / 2."""
    img, txt = torch.randn(40, 24, dtype=torch.float64), torch.randn(40, 24, dtype=torch.float64)
    img_n = torch.nn.functional.normalize(img, dim=1)
    txt_n = torch.nn.functional.normalize(txt, dim=1)
    scale = 14.0
    logits = scale * img_n @ txt_n.T
    labels = torch.arange(40)
    expected = 0.5 * (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels))
    ours = sslkernels.info_nce(img, txt, temperature=1.0 / scale, symmetric=True)
    torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("symmetric", [False, True])
def test_learnable_temperature_gradient(symmetric):
    q, key, neg = _inputs(200, 24, 150, torch.float64)
    t = torch.tensor(0.07, dtype=torch.float64)
    kw = dict(symmetric=symmetric)
    fused = loss_and_grads(lambda a, b, c, tt: sslkernels.info_nce(a, b, tt, c, **kw), q, key, neg, t)
    ref = loss_and_grads(lambda a, b, c, tt: info_nce_reference(a, b, tt, c, **kw), q, key, neg, t)
    for f, r in zip(fused, ref):
        torch.testing.assert_close(f, r)
    # float32 inputs with a float32 learnable temperature, as CLIP trains it
    t32 = torch.tensor(0.05, requires_grad=True)
    sslkernels.info_nce(q.float(), key.float(), t32, neg.float(), **kw).backward()
    ref_t = loss_and_grads(lambda tt: info_nce_reference(q, key, tt, neg, **kw), t.new_tensor(0.05))[-1]
    assert t32.grad.dtype == torch.float32
    torch.testing.assert_close(t32.grad.double(), ref_t, rtol=1e-4, atol=1e-5)


def test_gradcheck_learnable_temperature():
    q = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    neg = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    for symmetric in (False, True):
        assert torch.autograd.gradcheck(lambda a, b, c, tt: sslkernels.info_nce(a, b, tt, c, symmetric), (q, k, neg, t))
    # the one-sweep route (one direction) without a queue and without normalisation too
    for normalize in (True, False):
        assert torch.autograd.gradcheck(lambda a, b, tt: sslkernels.info_nce(a, b, tt, normalize=normalize), (q, k, t))


def test_gradcheck_float64():
    q = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    neg = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    for symmetric in (False, True):
        for normalize in (True, False):
            assert torch.autograd.gradcheck(
                lambda a, b, c: sslkernels.info_nce(a, b, 0.5, c, symmetric, normalize), (q, k, neg)
            )


def test_opcheck():
    q, k, neg = (torch.randn(9, 5, requires_grad=True) for _ in range(3))
    t = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    for negatives, grad in ((None, False), (neg, True), (neg.detach(), False)):
        torch.library.opcheck(
            torch.ops.sslkernels.info_nce_forward.default, (q, k, negatives, t, True, True, True, grad)
        )
    _, lse = torch.ops.sslkernels.info_nce_forward(
        q.detach(), k.detach(), neg.detach(), t.detach(), True, True, True, True
    )
    torch.library.opcheck(
        torch.ops.sslkernels.info_nce_backward.default,
        (torch.tensor(1.0), q.detach(), k.detach(), neg.detach(), t.detach(), lse, True, True, True, True),
    )


@pytest.mark.slow
def test_torch_compile_fullgraph_cpu():
    fn = torch.compile(lambda a, b, c: sslkernels.info_nce(a, b, 0.1, c, symmetric=True), fullgraph=True)
    q, k = torch.randn(30, 8, requires_grad=True), torch.randn(30, 8, requires_grad=True)
    neg = torch.randn(20, 8)
    out = fn(q, k, neg)
    out.backward()
    torch.testing.assert_close(out.detach(), sslkernels.info_nce(q.detach(), k.detach(), 0.1, neg, symmetric=True))


def test_saves_nothing_quadratic_for_backward():
    n, d, k = 300, 8, 400
    q, key = torch.randn(n, d, requires_grad=True), torch.randn(n, d, requires_grad=True)
    neg = torch.randn(k, d)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = sslkernels.info_nce(q, key, negatives=neg, symmetric=True)
    loss.backward()
    assert saved and max(saved) <= k * d


def test_deterministic_and_thread_count_independent():
    q, key, neg = _inputs(700, 40, 900, torch.float32)
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(loss_and_grads(lambda a, b, c: sslkernels.info_nce(a, b, 0.1, c, True), q, key, neg))
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_two_views_without_queue_is_not_nt_xent():
    # InfoNCE contrasts query rows against keys only; NT-Xent also against the other queries.
    z1, z2 = torch.randn(20, 8, dtype=torch.float64), torch.randn(20, 8, dtype=torch.float64)
    assert not torch.allclose(sslkernels.info_nce(z1, z2, 0.5, symmetric=True), nt_xent_reference(z1, z2, 0.5))


@pytest.mark.parametrize(
    "q,k,kw,exc,match",
    [
        (torch.randn(4, 3), torch.randn(5, 3), {}, ValueError, "same shape"),
        (torch.randn(4, 3), torch.randn(4, 3), {"negatives": torch.randn(6, 2)}, ValueError, "`negatives` must have D = 3"),
        (torch.randn(4, 3), torch.randn(4, 3), {"negatives": torch.randn(6, 3, dtype=torch.float64)}, TypeError, "`negatives` must share"),
        (torch.randn(4, 3), torch.randn(4, 3), {"negatives": torch.randn(6, 3, device="meta")}, ValueError, "`negatives` is on meta"),
        (torch.randn(4, 3), torch.randn(4, 3), {"negatives": torch.randn(6)}, ValueError, "`negatives` must be 2-D"),
        (torch.randn(4, 3), torch.randn(4, 3), {"temperature": -0.1}, ValueError, "temperature"),
        (torch.randn(0, 3), torch.randn(0, 3), {}, ValueError, "empty batch"),
        (torch.randn(4, 3), torch.randn(4, 3), {"negatives": torch.randn(5, 2, 3)}, ValueError, "per-query"),
        (torch.randn(4, 3), torch.randn(4, 3), {"negatives": torch.randn(4, 2, 2)}, ValueError, "D = 3"),
        (torch.randn(4, 3), torch.randn(4, 3), {"negatives": torch.randn(4, 2, 3, 1)}, ValueError, "must be 2-D"),
        (torch.randn(4, 3), torch.randn(4, 3), {"temperature": torch.tensor([0.1])}, ValueError, "0-dim"),
        (torch.randn(4, 3), torch.randn(4, 3), {"temperature": torch.tensor(1)}, TypeError, "floating-point"),
        (torch.randn(4, 3), torch.randn(4, 3), {"temperature": torch.tensor(-0.1)}, ValueError, "temperature"),
        (torch.randn(4, 3), torch.randn(4, 3), {"temperature": torch.tensor(float("inf"))}, ValueError, "temperature"),
    ],
)
def test_bad_input_raises(q, k, kw, exc, match):
    with pytest.raises(exc, match=match):
        sslkernels.info_nce(q, k, **kw)


@pytest.mark.parametrize("which", ["query", "key", "negatives"])
def test_non_finite_input_raises(which):
    t = {"query": torch.randn(6, 4), "key": torch.randn(6, 4), "negatives": torch.randn(5, 4)}
    t[which][2, 1] = float("nan")
    with pytest.raises(ValueError, match=f"`{which}` contains NaN or Inf"):
        sslkernels.info_nce(t["query"], t["key"], negatives=t["negatives"])


# ---------------------------------------------------------------- one sweep (training steps)
# With a gradient wanted, the one-direction loss (in-batch keys, a shared queue or none)
# takes sslkernels::info_nce_loss_and_grads: loss and gradients in one sweep over the
# logit tiles (strips of 256 queries, column tiles of 512). It must agree with the
# forward + recomputing backward it replaces, at every strip / tile boundary.


def _forward_then_backward(q, key, neg, t, normalize, negatives_grad):
    loss, lse = torch.ops.sslkernels.info_nce_forward(q, key, neg, t, normalize, False, True, negatives_grad)
    grads = torch.ops.sslkernels.info_nce_backward(
        torch.ones((), dtype=loss.dtype), q, key, neg, t, lse, normalize, False, True, negatives_grad
    )
    return (loss, *grads)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
# (500, 17000): with the queue's gradient the kept strip of 256 rows would pass 16 MiB,
# so strips shrink to 224 rows (112 in float64)
@pytest.mark.parametrize("n,k", [(1, 0), (3, 1), (255, 0), (256, 511), (257, 513), (600, 1100), (500, 17000)])
@pytest.mark.parametrize("negatives_grad", [False, True])
def test_one_sweep_matches_forward_then_backward(dtype, n, k, negatives_grad):
    q, key, neg = _inputs(n, 19, k, dtype)
    t = torch.tensor(0.07, dtype=torch.float64)
    swept = torch.ops.sslkernels.info_nce_loss_and_grads(q, key, neg, t, True, negatives_grad)
    split = _forward_then_backward(q, key, neg, t, True, negatives_grad)
    ref = _forward_then_backward(*(x.double() if x is not None else None for x in (q, key, neg)), t, True, negatives_grad)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    for what, a, b, r in zip(("loss", "dquery", "dkey", "dnegatives", "dtemperature"), swept, split, ref):
        # the gradients stay float32 for half inputs (autograd scales, then rounds them)
        assert a.shape == b.shape, what
        if b.numel():  # (dnegatives is empty when no queue gradient is asked for)
            assert a.dtype == (wide if what[1:] in ("query", "key", "negatives") else b.dtype), what
            assert_within_eager_error(a.to(b.dtype), b, r, dtype, what, logit_bound(temperature=0.07))


def test_one_sweep_rescales_tiles_whose_max_came_late():
    # Each row's largest logit sits in the last queue tile, so every earlier kept tile
    # (the keys, and with a queue gradient the first queue tiles) was exponentiated
    # against a smaller max; at t = 0.02 the fix-up factors reach exp(-100).
    torch.manual_seed(0)
    n, d, k = 300, 16, 1200
    q = torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64), dim=1)
    key = torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64), dim=1)
    neg = torch.randn(k, d, dtype=torch.float64)
    neg[-n:] = q + 1e-3 * torch.randn(n, d, dtype=torch.float64)  # the best candidates come last
    for negatives_grad in (False, True):
        fused = loss_and_grads(lambda a, b, c: sslkernels.info_nce(a, b, 0.02, c), q, key, neg.requires_grad_(negatives_grad))
        ref = loss_and_grads(lambda a, b, c: info_nce_reference(a, b, 0.02, c), q, key, neg.requires_grad_(negatives_grad))
        for a, b in zip(fused, ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_one_sweep_only_when_a_gradient_is_wanted():
    q, key, neg = _inputs(40, 8, 30, torch.float32)
    q.requires_grad_(True)
    loss = sslkernels.info_nce(q, key, 0.1, neg)
    assert "info_nce_loss_and_grads" in loss.grad_fn.name()
    with torch.no_grad():
        assert torch.equal(sslkernels.info_nce(q, key, 0.1, neg), loss.detach())
    # Symmetric and per-query negatives keep the forward + backward ops.
    assert "info_nce_forward" in sslkernels.info_nce(q, key, 0.1, neg, symmetric=True).grad_fn.name()
    hard = torch.randn(40, 3, 8)
    assert "info_nce_forward" in sslkernels.info_nce(q, key, 0.1, hard).grad_fn.name()
    # The CUDA path keeps its forward / backward ops (checked on the meta device: the
    # route is chosen before any kernel runs).
    qm, km = q.detach().to("meta").requires_grad_(True), key.to("meta")
    assert "info_nce_forward" in sslkernels.info_nce(qm, km, 0.1).grad_fn.name()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_one_sweep_half_gradients_are_scaled_before_rounding(dtype):
    # Under AMP the loss is scaled (2^16 at first; 2^15 here, float16's loss holds no
    # more) so that small half gradients survive: the one sweep must round (scale x
    # gradient) once, as the forward + backward ops do, not round the unscaled gradient
    # first (entries of ~1e-8 would flush in float16).
    q, key, neg = _inputs(300, 16, 500, dtype)
    neg.requires_grad_(True)
    scale = 32768.0
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, key, neg)]
    (scale * sslkernels.info_nce(*leaves[:2], 0.07, leaves[2])).backward()
    t = torch.tensor(0.07, dtype=torch.float64)
    _, lse = torch.ops.sslkernels.info_nce_forward(q, key, neg, t, True, False, True, True)
    expected = torch.ops.sslkernels.info_nce_backward(
        torch.tensor(scale), q, key, neg, t, lse, True, False, True, True)
    for leaf, e in zip(leaves, (expected[0], expected[1], expected[2])):
        assert leaf.grad.dtype == dtype
        # A power-of-two scale commutes with rounding except below float16's normal
        # range (6.1e-5 unscaled, 2.0 here), where rounding first costs up to
        # 3e-8 x 2^15 = 1e-3: the absolute tolerance sits well under that.
        torch.testing.assert_close(leaf.grad, e, rtol=2e-2 if dtype == torch.bfloat16 else 4e-3, atol=1e-4)


def test_one_sweep_gradient_scales_with_the_upstream_gradient():
    q, key, neg = _inputs(70, 12, 90, torch.float64)
    t = torch.tensor(0.3, dtype=torch.float64)
    leaves = [x.clone().requires_grad_(True) for x in (q, key, neg, t)]
    (3.5 * sslkernels.info_nce(leaves[0], leaves[1], leaves[3], leaves[2]) - sslkernels.info_nce(leaves[0], leaves[1], leaves[3], leaves[2])).backward()
    ref = [x.clone().requires_grad_(True) for x in (q, key, neg, t)]
    (2.5 * info_nce_reference(ref[0], ref[1], ref[3], ref[2])).backward()
    for a, b in zip(leaves, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_one_sweep_opcheck():
    q, k, neg = (torch.randn(9, 5, requires_grad=True) for _ in range(3))
    t = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    for negatives, grad in ((None, False), (neg, True), (neg.detach(), False)):
        torch.library.opcheck(torch.ops.sslkernels.info_nce_loss_and_grads.default, (q, k, negatives, t, True, grad))
    # transposed (non-contiguous) inputs: the fake kernels must give the real strides
    qt = torch.randn(5, 9).t().requires_grad_(True)
    negt = torch.randn(5, 7).t()
    torch.library.opcheck(torch.ops.sslkernels.info_nce_loss_and_grads.default, (qt, k, negt, t, True, False))
    _, lse = torch.ops.sslkernels.info_nce_forward(qt.detach(), k.detach(), negt, t.detach(), True, True, True, True)
    torch.library.opcheck(
        torch.ops.sslkernels.info_nce_backward.default,
        (torch.tensor(1.0), qt.detach(), k.detach(), negt, t.detach(), lse, True, True, True, True),
    )


@pytest.mark.slow
def test_one_sweep_torch_compile_fullgraph_cpu():
    fn = torch.compile(lambda a, b, c: sslkernels.info_nce(a, b, 0.1, c), fullgraph=True)
    q, k = torch.randn(300, 8, requires_grad=True), torch.randn(300, 8, requires_grad=True)
    neg = torch.randn(600, 8)
    out = fn(q, k, neg)
    out.backward()
    expected = loss_and_grads(lambda a, b: sslkernels.info_nce(a, b, 0.1, neg), q.detach(), k.detach())
    torch.testing.assert_close(out.detach(), expected[0])
    torch.testing.assert_close(q.grad, expected[1])
    torch.testing.assert_close(k.grad, expected[2])


@pytest.mark.parametrize("negatives_grad", [False, True])
@pytest.mark.parametrize("n,k", [(700, 2100), (500, 17000)])
def test_one_sweep_thread_count_independent(negatives_grad, n, k):
    # 3 strips of 256 rows and 5 queue tiles: waves of 1, 2 and 3 strips; with
    # 17000 queue rows and their gradient, strips of 224 rows.
    q, key, neg = _inputs(n, 40, k, torch.float32)
    neg.requires_grad_(negatives_grad)
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(loss_and_grads(lambda a, b, c: sslkernels.info_nce(a, b, 0.1, c), q, key, neg))
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("which", ["query", "key", "negatives"])
def test_one_sweep_non_finite_input_raises(which):
    t = {"query": torch.randn(6, 4), "key": torch.randn(6, 4), "negatives": torch.randn(5, 4)}
    t[which][2, 1] = float("inf")
    t["query"].requires_grad_(True)
    with pytest.raises(ValueError, match=f"`{which}` contains NaN or Inf"):
        sslkernels.info_nce(t["query"], t["key"], negatives=t["negatives"])


def test_one_sweep_overflowing_logits_raise():
    q = torch.full((4, 3), 1e30, requires_grad=True)
    with pytest.raises(ValueError, match="overflow"):
        sslkernels.info_nce(q, torch.full((4, 3), 1e30), 0.1, normalize=False)


def test_one_sweep_overflowing_gradient_raises_not_nan():
    # Finite loss, but the unnormalised sum exp(s) * key of the query gradient overflows
    # (keys of +-1e37, normalize=False): an error, never NaN gradients.
    q = torch.zeros(1024, 1, requires_grad=True)
    key = torch.cat([torch.full((512, 1), 1e37), torch.full((512, 1), -1e37)])
    with pytest.raises(ValueError, match="overflow"):
        sslkernels.info_nce(q, key, 0.07, normalize=False)


def test_one_sweep_row_whose_first_tiles_are_all_minus_inf():
    # Row 599's logits against keys 0..511 (the first key tile) overflow to -inf; the
    # loss stays finite (its later keys are fine), as without a gradient.
    q = torch.zeros(600, 2)
    q[:, 1] = 1
    q[599] = torch.tensor([1e20, 0.0])
    key = torch.zeros(600, 2)
    key[:512, 0] = -1e20
    key[512:, 1] = 1
    q.requires_grad_(True)
    loss = sslkernels.info_nce(q, key, 0.1, normalize=False)
    with torch.no_grad():
        plain = sslkernels.info_nce(q, key, 0.1, normalize=False)
    ref = info_nce_reference(q.double(), key.double(), 0.1, normalize=False)
    torch.testing.assert_close(loss.detach().double(), ref.detach(), rtol=1e-5, atol=0)
    assert torch.equal(loss.detach(), plain)
    (grad,) = torch.autograd.grad(loss, q)
    assert torch.isfinite(grad).all()


def test_one_sweep_double_backward_raises():
    # The saved gradients are constants to autograd: a graph through them (a gradient
    # penalty) would silently miss every second-order term, so create_graph=True fails.
    q, key = torch.randn(8, 4, dtype=torch.float64, requires_grad=True), torch.randn(8, 4, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(sslkernels.info_nce(q, key, 0.2), q, create_graph=True)
    (gq,) = torch.autograd.grad(sslkernels.info_nce(q, key, 0.2), q)
    torch.testing.assert_close(gq, torch.autograd.grad(info_nce_reference(q, key, 0.2), q)[0])
