"""SupCon: the fused CPU path against the float64 eager oracle, the NT-Xent identity,
pytorch-metric-learning parity, autograd, compile, memory and errors."""
import pytest
import torch

import sslkernels
from sslkernels.reference import nt_xent_reference, sup_con_reference
from tests._utils import assert_within_eager_error, loss_and_grads

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d,classes", [(2, 3, 1), (7, 65, 3), (257, 130, 10), (1000, 128, 100)])
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_float64_reference(dtype, n, d, classes, normalize, poisoned_outputs):
    scale = 1.0 if normalize else 0.3
    x = (torch.randn(n, d) * scale).to(dtype)
    labels = torch.randint(0, classes, (n,)) * 7 - 3  # arbitrary, non-compact ids
    kw = dict(temperature=0.1 if normalize else 0.5, normalize=normalize)
    fused = loss_and_grads(sslkernels.sup_con, x, labels, **kw)
    eager = loss_and_grads(sup_con_reference, x, labels, **kw)
    ref = loss_and_grads(sup_con_reference, x.double(), labels, **kw)
    assert fused[0].dtype == dtype and fused[0].dim() == 0
    for what, f, e, r in zip(("loss", "grad"), fused, eager, ref):
        assert_within_eager_error(f, e, r, dtype, what)


def test_equals_nt_xent_with_instance_labels():
    z1, z2 = torch.randn(50, 16, dtype=torch.float64), torch.randn(50, 16, dtype=torch.float64)
    labels = torch.arange(50).repeat(2)
    sup = loss_and_grads(lambda a, b: sslkernels.sup_con(torch.cat([a, b]), labels, temperature=0.3), z1, z2)
    nt = loss_and_grads(lambda a, b: sslkernels.nt_xent(a, b, temperature=0.3), z1, z2)
    ref = loss_and_grads(lambda a, b: nt_xent_reference(a, b, temperature=0.3), z1, z2)
    for s, n, r in zip(sup, nt, ref):
        torch.testing.assert_close(s, n)
        torch.testing.assert_close(s, r)


def test_no_anchor_gives_zero_loss_and_zero_grad():
    x = torch.randn(9, 4, requires_grad=True)
    loss = sslkernels.sup_con(x, torch.arange(9))  # every label unique: no positives
    loss.backward()
    assert float(loss) == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_anchors_without_positives_are_left_out():
    x = torch.randn(12, 5, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 3, 4, 5, 6, 6, 7])
    for f, r in zip(loss_and_grads(sslkernels.sup_con, x, labels), loss_and_grads(sup_con_reference, x, labels)):
        torch.testing.assert_close(f, r)


def test_matches_pytorch_metric_learning():
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    x = torch.randn(200, 32)
    labels = torch.randint(0, 12, (200,))
    ours = loss_and_grads(sslkernels.nn.SupConLoss(temperature=0.07), x, labels)
    theirs = loss_and_grads(losses.SupConLoss(temperature=0.07), x, labels)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_gradcheck_float64():
    x = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 3, 0])
    for normalize in (True, False):
        assert torch.autograd.gradcheck(lambda a: sslkernels.sup_con(a, labels, 0.4, normalize), (x,))


def test_opcheck():
    x = torch.randn(13, 6, requires_grad=True)
    labels = torch.randint(0, 4, (13,))
    torch.library.opcheck(torch.ops.sslkernels.sup_con_forward.default, (x, labels, 0.2, True))
    _, lse = torch.ops.sslkernels.sup_con_forward(x.detach(), labels, 0.2, True)
    torch.library.opcheck(
        torch.ops.sslkernels.sup_con_backward.default, (torch.tensor(1.0), x.detach(), labels, lse, 0.2, True)
    )


@pytest.mark.slow
def test_torch_compile_fullgraph_cpu():
    compiled = torch.compile(lambda a, y: sslkernels.sup_con(a, y, temperature=0.2), fullgraph=True)
    x = torch.randn(40, 8, requires_grad=True)
    labels = torch.randint(0, 5, (40,))
    out = compiled(x, labels)
    out.backward()
    torch.testing.assert_close(out.detach(), sslkernels.sup_con(x.detach(), labels, temperature=0.2))


def test_saves_nothing_quadratic_for_backward():
    n, d = 300, 8
    x = torch.randn(n, d, requires_grad=True)
    labels = torch.randint(0, 10, (n,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = sslkernels.sup_con(x, labels)
    loss.backward()
    assert saved and max(saved) <= n * d


def test_deterministic_and_thread_count_independent():
    x = torch.randn(600, 32)
    labels = torch.randint(0, 20, (600,))
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(loss_and_grads(sslkernels.sup_con, x, labels))
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_module_is_drop_in():
    module = sslkernels.nn.SupConLoss(temperature=0.2)
    assert module.temperature == 0.2 and dict(module.state_dict()) == {}
    with pytest.raises(NotImplementedError, match="distance"):
        sslkernels.nn.SupConLoss(distance=object())
    with pytest.raises(NotImplementedError, match="ref_emb"):
        module(torch.randn(4, 3), torch.arange(4), ref_emb=torch.randn(4, 3))
    with pytest.raises(ValueError, match="labels"):
        module(torch.randn(4, 3))


@pytest.mark.parametrize(
    "features,labels,kw,exc,match",
    [
        (torch.randn(4, 3), torch.arange(5), {}, ValueError, "`labels` must have shape"),
        (torch.randn(4, 3), torch.zeros(4, dtype=torch.complex64), {}, TypeError, "`labels` must hold integer"),
        (torch.randn(4, 3), torch.tensor([0.0, float("nan"), 1.0, 0.0]), {}, ValueError, "`labels` contains NaN"),
        (torch.randn(4, 3), [0, 1, 2, 3], {}, TypeError, "`labels` must be a torch.Tensor"),
        (torch.randn(4), torch.arange(4), {}, ValueError, "`features` must be 2-D"),
        (torch.randint(0, 3, (4, 3)), torch.arange(4), {}, TypeError, "`features` must be float"),
        (torch.randn(0, 3), torch.arange(0), {}, ValueError, "empty batch"),
        (torch.randn(4, 3), torch.arange(4), {"temperature": 0.0}, ValueError, "temperature"),
        (torch.randn(4, 3), torch.arange(4), {"temperature": float("nan")}, ValueError, "temperature"),
        (torch.randn(4, 3), torch.arange(4, device="meta"), {}, ValueError, "`labels` is on meta"),
    ],
)
def test_bad_input_raises(features, labels, kw, exc, match):
    with pytest.raises(exc, match=match):
        sslkernels.sup_con(features, labels, **kw)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_features_raise(bad):
    x = torch.randn(6, 4)
    x[3, 1] = bad
    with pytest.raises(ValueError, match="`features` contains NaN or Inf"):
        sslkernels.sup_con(x, torch.tensor([0, 0, 1, 1, 2, 2]))
