"""The Triton SupCon kernels (the CUDA path of `sslkernels::sup_con_*`) run by the
Triton interpreter on CPU tensors, through their launchers `sup_con_forward` /
`sup_con_backward`.

Oracle: `sup_con_reference` in float64 with autograd. A result passes when its error
against the oracle is at most twice eager PyTorch's own error in the same dtype plus a
floor relative to max |oracle| (tests/_utils.py).
bfloat16 is checked on a GPU only (`benchmarks/gpu_contrastive.py`): the interpreter's
bf16 `tl.dot` is wrong (triton issue 11584).
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton", reason="the Triton interpreter tests need triton")

from sslkernels.reference import nt_xent_reference, sup_con_reference  # noqa: E402
from tests._utils import assert_within_eager_error, logit_bound  # noqa: E402

pytestmark = pytest.mark.interpret

# (N, D, classes): N = 1 (no anchor at all), one masked tile, several tiles with a tail
# (interpreter tiles are 32 x 32); D = 3 / 16 hoisted rows, 65 the chunked path and, with
# normalize, the dZhat scratch + normalisation-backward kernel.
CASES = [(1, 3, 1), (7, 65, 3), (33, 16, 4), (33, 65, 12)]


def _inputs(n, d, classes, dtype, normalize, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g) * 5 - 2  # arbitrary, non-compact ids
    # rows of a class share a direction, so positives are neither random nor trivial
    centers = torch.randn(classes, d, generator=g, dtype=torch.float64)
    x = centers[(labels + 2) // 5] + 0.9 * torch.randn(n, d, generator=g, dtype=torch.float64)
    scale = 3.0 if normalize else 1.0 / math.sqrt(d)
    return (x * scale).to(dtype), labels


def _reference(x, labels, temperature, normalize, grad=1.0):
    a = x.detach().clone().requires_grad_(True)
    loss = sup_con_reference(a, labels, temperature=temperature, normalize=normalize)
    (ga,) = torch.autograd.grad(loss * grad, (a,))
    return loss.detach(), ga


def _fused(k, x, labels, temperature, normalize, grad=1.0):
    loss, lse = k.sup_con_forward(x, labels, temperature, normalize)
    dx = k.sup_con_backward(torch.tensor(grad, dtype=x.dtype), x, labels, lse, temperature, normalize)
    return loss, dx, lse


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("n,d,classes", CASES, ids=[f"{n}x{d}c{c}" for n, d, c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_matches_float64_reference(contrastive_kernels, poisoned_outputs, dtype, n, d, classes, normalize):
    temperature = 0.1 if normalize else 0.5
    x, labels = _inputs(n, d, classes, dtype, normalize)
    loss, dx, lse = _fused(contrastive_kernels, x, labels, temperature, normalize)
    assert loss.dtype == dtype and loss.dim() == 0
    assert lse.shape == (n,) and lse.dtype == torch.float64
    assert dx.dtype == dtype and dx.shape == (n, d) and dx.is_contiguous()
    eager = _reference(x, labels, temperature, normalize)
    ref = _reference(x.double(), labels, temperature, normalize)
    terms = logit_bound(x, temperature=temperature, normalize=normalize)
    assert_within_eager_error(loss, eager[0], ref[0], dtype, "loss", terms)
    assert_within_eager_error(dx, eager[1], ref[1], dtype, "dx", terms)


def test_float64_is_exact_and_lse_is_the_full_log_sum_exp(contrastive_kernels, poisoned_outputs):
    x, labels = _inputs(33, 65, 5, torch.float64, True)
    labels[3] = 1000  # a class of one: not an anchor, but still a candidate of the others
    loss, dx, lse = _fused(contrastive_kernels, x, labels, 0.2, True)
    ref = _reference(x, labels, 0.2, True)
    torch.testing.assert_close(loss, ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx, ref[1], rtol=1e-10, atol=1e-13)
    z = torch.nn.functional.normalize(x, dim=1)
    logits = z @ z.T / 0.2
    logits.fill_diagonal_(float("-inf"))
    assert lse.dtype == torch.float64
    torch.testing.assert_close(lse, torch.logsumexp(logits, dim=1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_all_unique_labels_give_zero_loss_and_zero_grad(contrastive_kernels, poisoned_outputs, dtype):
    x, _ = _inputs(33, 16, 3, dtype, True)
    labels = torch.arange(33) * 3
    loss, dx, lse = _fused(contrastive_kernels, x, labels, 0.1, True)
    assert float(loss) == 0.0 and loss.dtype == dtype
    assert torch.equal(dx, torch.zeros_like(dx))
    assert torch.isfinite(lse).all()  # the log-sum-exp is still every row's


def test_singletons_are_left_out(contrastive_kernels, poisoned_outputs):
    x = torch.randn(12, 5, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 3, 4, 5, 6, 6, 7])
    got = _fused(contrastive_kernels, x, labels, 0.3, True)
    ref = _reference(x, labels, 0.3, True)
    for what, f, r in zip(("loss", "dx"), got, ref):
        torch.testing.assert_close(f, r, rtol=1e-10, atol=1e-13, msg=lambda m: f"{what}: {m}")


def test_instance_labels_equal_nt_xent(contrastive_kernels, poisoned_outputs):
    """Two views with one label per instance: SupCon is NT-Xent (and the launchers agree)."""
    z1, z2 = torch.randn(20, 16, dtype=torch.float64), torch.randn(20, 16, dtype=torch.float64)
    labels = torch.arange(20).repeat(2)
    loss, dx, _ = _fused(contrastive_kernels, torch.cat([z1, z2]), labels, 0.3, True)
    nt_loss, *_ = contrastive_kernels.nt_xent_forward(z1, z2, 0.3, True)
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    ref = nt_xent_reference(a, b, 0.3)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(nt_loss, loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx, torch.cat([a.grad, b.grad]), rtol=1e-10, atol=1e-14)


def test_upstream_gradient_and_strided_input(contrastive_kernels, poisoned_outputs):
    base = torch.randn(33, 80, dtype=torch.float64)
    x = base[:, 5:70]  # row stride 80, read in place
    labels = torch.randint(0, 4, (33,), generator=torch.Generator().manual_seed(1))
    assert not x.is_contiguous()
    _, dx1, _ = _fused(contrastive_kernels, x, labels, 0.5, True, grad=1.0)
    loss, dx2, _ = _fused(contrastive_kernels, x, labels, 0.5, True, grad=0.37)
    ref = _reference(x.contiguous(), labels, 0.5, True, grad=0.37)
    torch.testing.assert_close(dx2, 0.37 * dx1, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(loss, ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx2, ref[1], rtol=1e-10, atol=1e-14)
    xt = torch.randn(65, 33, dtype=torch.float64).T  # feature stride 33: copied by the launcher
    got = _fused(contrastive_kernels, xt, labels, 0.5, False)
    ref = _reference(xt.contiguous(), labels, 0.5, False)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-10, atol=1e-14)


def test_the_rule_rejects_a_wrong_result(contrastive_kernels):
    """The tolerance is tight enough to see a temperature off by 2%."""
    x, labels = _inputs(33, 65, 4, torch.float32, True)
    wrong = _fused(contrastive_kernels, x, labels, 0.102, True)
    eager = _reference(x, labels, 0.1, True)
    ref = _reference(x.double(), labels, 0.1, True)
    for what, f, e, r in zip(("loss", "dx"), wrong, eager, ref):
        with pytest.raises(AssertionError):
            assert_within_eager_error(f, e, r, torch.float32, what)


def test_gpu_config_pruning_of_the_generic_kernels(monkeypatch):
    """The GPU-only plumbing the interpreter never runs: the generic kernels' autotune
    pruning (first two configs of the family, the fp32 table where there is one, only the
    first without autotuning), on a copy of the module imported without the interpreter."""
    import importlib.util

    import triton

    import sslkernels.kernels.contrastive as interp

    monkeypatch.delenv("TRITON_INTERPRET")
    spec = importlib.util.spec_from_file_location("_sslk_contrastive_gpu2", interp.__file__)
    k = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(k)
    assert isinstance(k._lse_bwd_kernel, triton.runtime.autotuner.Autotuner)
    cases = [  # (D, dtype, precision, kernel, families key)
        (128, torch.bfloat16, "ieee", k._lse_fwd_kernel, k._LSE_FWD_FAMILIES, "mma128"),
        (256, torch.bfloat16, "ieee", k._lse_bwd_kernel, k._LSE_BWD_FAMILIES, "mma256"),
        (256, torch.float32, "tf32x3", k._lse_bwd_kernel, k._LSE_BWD_FAMILIES, "mma256_f32"),
        (130, torch.float32, "tf32", k._lse_fwd_kernel, k._LSE_FWD_FAMILIES, "mma256_f32"),
        (130, torch.float16, "ieee", k._lse_fwd_kernel, k._LSE_FWD_FAMILIES, "mma256"),
        (64, torch.float32, "tf32x3", k._lse_bwd_kernel, k._LSE_BWD_FAMILIES, "mma128"),
        (128, torch.float64, "ieee", k._lse_bwd_kernel, k._LSE_BWD_FAMILIES, "fma"),
    ]
    for d, dtype, prec, kernel, families, key in cases:
        prune = kernel.early_config_prune
        args = {"a_ptr": torch.empty(2, d, dtype=dtype), "D": d}
        assert prune(kernel.configs, args, PRECISION=prec) == families[key][:2], (d, dtype, prec)
        monkeypatch.setattr(k, "AUTOTUNE", False)
        assert prune(kernel.configs, args, PRECISION=prec) == families[key][:1]
        monkeypatch.setattr(k, "AUTOTUNE", True)
