"""The Triton SIGReg kernels (statistics, and dX for the backward) run by the Triton
interpreter on CPU tensors, against the float64 CPU core and eager PyTorch under the
design's rule (fused error <= 2x eager's + RESOLUTION * max|ref|), at odd sizes that
cross several 16-wide tiles and row splits. bf16 tl.dot is garbage in the interpreter:
bf16 is checked on a GPU only."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton interpreter tests need triton")

from sslkernels.ops import sigreg as sigreg_ops  # noqa: E402
from tests._utils import assert_within_eager_error  # noqa: E402

pytestmark = pytest.mark.interpret

SHAPES = [(1, 1, 3, 5), (2, 37, 20, 33), (1, 70, 17, 16)]  # (B, N, D, S)


@pytest.fixture(scope="module")
def K(sigreg_kernels):
    return sigreg_kernels


def _inputs(b, n, d, s):
    proj = torch.randn(b, n, d, dtype=torch.float64)
    dirs = torch.randn(d, s, dtype=torch.float64)
    return proj, dirs / dirs.norm(dim=0)


def _eager_stats(proj, dirs, knots, t_max):
    t = torch.linspace(0, t_max, knots, dtype=proj.dtype)
    angles = (proj @ dirs).unsqueeze(-1) * t
    return angles.cos().sum(-3), angles.sin().sum(-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("knots", [17, 4])
def test_stats_match_float64(K, shape, dtype, knots):
    proj64, dirs64 = _inputs(*shape)
    proj, dirs = proj64.to(dtype), dirs64.to(dtype)
    ref = sigreg_ops.sigreg_stats(proj.double(), dirs.double(), knots, 3.0)
    eager = _eager_stats(proj, dirs, knots, 3.0)
    fused = K.sigreg_stats(proj, dirs, knots, 3.0)
    for what, f, e, r in zip(("cos_sum", "sin_sum"), fused, eager, ref):
        assert f.dtype == torch.float64 and f.shape == r.shape
        assert_within_eager_error(f, e, r, dtype, f"triton sigreg {what} {shape}")


def _grads_through_loss(stats_fn, proj, dirs, knots, t_max):
    cos_sum, sin_sum = (x.detach().requires_grad_() for x in stats_fn(proj, dirs))
    loss = sigreg_ops.loss_from_stats(cos_sum, sin_sum, proj.shape[1], knots, t_max)
    return torch.autograd.grad(loss, (cos_sum, sin_sum))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backward_matches_float64(K, shape, dtype):
    knots, t_max = 17, 3.0
    proj64, dirs64 = _inputs(*shape)
    proj, dirs = proj64.to(dtype), dirs64.to(dtype)
    # the same upstream statistics gradient for every path (from the float64 statistics)
    g_cos, g_sin = _grads_through_loss(lambda p, a: sigreg_ops.sigreg_stats(p, a, knots, t_max), proj.double(),
                                       dirs.double(), knots, t_max)
    ref = sigreg_ops.sigreg_stats_backward(proj.double(), dirs.double(), g_cos, g_sin, knots, t_max, True)

    def eager_backward(p, a):
        p, a = p.clone().requires_grad_(), a.clone().requires_grad_()
        c, s = _eager_stats(p, a, knots, t_max)
        return torch.autograd.grad((c * g_cos.to(p.dtype)).sum() + (s * g_sin.to(p.dtype)).sum(), (p, a))

    eager = eager_backward(proj, dirs)
    dproj, ddirs = K.sigreg_stats_backward(proj, dirs, g_cos, g_sin, knots, t_max, True)
    assert dproj.dtype == dtype and dproj.shape == proj.shape
    assert ddirs.dtype == dtype and ddirs.shape == dirs.shape
    assert_within_eager_error(dproj, eager[0], ref[0], dtype, f"triton sigreg dproj {shape}")
    assert_within_eager_error(ddirs, eager[1], ref[1], dtype, f"triton sigreg ddirections {shape}")
    _, none = K.sigreg_stats_backward(proj, dirs, g_cos, g_sin, knots, t_max, False)
    assert none.numel() == 0


def test_strided_inputs(K):
    proj = torch.randn(2, 20, 37, dtype=torch.float32).transpose(1, 2)  # [2, 37, 20], strided
    dirs = torch.randn(33, 20, dtype=torch.float32).t()  # [20, 33], strided
    fused = K.sigreg_stats(proj, dirs, 17, 3.0)
    ref = sigreg_ops.sigreg_stats(proj.double().contiguous(), dirs.double().contiguous(), 17, 3.0)
    eager = _eager_stats(proj, dirs, 17, 3.0)
    for f, e, r in zip(fused, eager, ref):
        assert_within_eager_error(f, e, r, torch.float32, "triton sigreg strided")
