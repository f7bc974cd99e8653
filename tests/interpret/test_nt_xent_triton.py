"""The Triton NT-Xent kernels (the CUDA path) run by the Triton interpreter on CPU
tensors, through their launchers `nt_xent_forward` / `nt_xent_backward`.

Oracle: `nt_xent_reference` in float64 with autograd. A result passes when its
error against the oracle is at most twice eager PyTorch's own error in the same
dtype plus a floor relative to the oracle's magnitude (tests/_utils.py). bfloat16 is checked
on a GPU only (`benchmarks/gpu_check.py`): the interpreter's bf16 `tl.dot` is
wrong (triton issue 11584).
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton", reason="the Triton interpreter tests need triton")

from sslkernels.reference import nt_xent_reference  # noqa: E402
from tests._utils import assert_within_eager_error, logit_bound  # noqa: E402

pytestmark = pytest.mark.interpret

DTYPES = [torch.float32, torch.float16, torch.float64]
# (N, D): N = 1 (only the positive), one masked tile, several tiles with a tail;
# D = 3 and 16 take the hoisted path (whole row in one chunk, output written in the
# kernel), 65 and 130 the chunked path and, with normalize, the dZhat scratch + the
# normalisation-backward kernel (the interpreter's tiles are 32 x 32, BLOCK_K 32,
# BLOCK_DO 64).
SHAPES = [(1, 3), (7, 65), (33, 130), (70, 16)]


def _inputs(n, d, dtype, normalize, seed=0):
    g = torch.Generator().manual_seed(seed)
    # correlated views, so the positive is neither random nor trivially dominant;
    # unnormalised rows are scaled to norm ~1 to keep the logits in range
    scale = 3.0 if normalize else 1.0 / math.sqrt(d)
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64)
    z2 = z1 + 0.8 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return (z1 * scale).to(dtype), (z2 * scale).to(dtype)


def _reference(z1, z2, temperature, normalize, grad=1.0):
    a = z1.detach().clone().requires_grad_(True)
    b = z2.detach().clone().requires_grad_(True)
    loss = nt_xent_reference(a, b, temperature=temperature, normalize=normalize)
    ga, gb = torch.autograd.grad(loss * grad, (a, b))
    return loss.detach(), ga, gb


def _fused(k, z1, z2, temperature, normalize, grad=1.0):
    """A training step as autograd runs it: the backward reads the forward's saved norms."""
    loss, lse, norms = k.nt_xent_forward(z1, z2, temperature, normalize)
    g = torch.tensor(grad, dtype=z1.dtype)
    dz1, dz2 = k.nt_xent_backward(g, z1, z2, lse, temperature, normalize, norms)
    return loss, dz1, dz2, lse


@pytest.mark.parametrize("temperature", [0.1, 0.5])
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("n,d", SHAPES, ids=[f"{n}x{d}" for n, d in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64_reference(contrastive_kernels, poisoned_outputs, dtype, n, d, normalize, temperature):
    z1, z2 = _inputs(n, d, dtype, normalize)
    loss, dz1, dz2, lse = _fused(contrastive_kernels, z1, z2, temperature, normalize)
    assert loss.dtype == dtype and loss.dim() == 0
    assert lse.shape == (2 * n,) and lse.dtype == torch.float64
    for g in (dz1, dz2):
        assert g.dtype == dtype and g.shape == (n, d) and g.is_contiguous()
    eager = _reference(z1, z2, temperature, normalize)
    ref = _reference(z1.double(), z2.double(), temperature, normalize)
    terms = logit_bound(z1, z2, temperature=temperature, normalize=normalize)
    for what, f, e, r in zip(("loss", "dz1", "dz2"), (loss, dz1, dz2), eager, ref):
        assert_within_eager_error(f, e, r, dtype, what, terms)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_lse_is_the_log_sum_exp_without_the_diagonal(contrastive_kernels, poisoned_outputs, dtype):
    z1, z2 = _inputs(33, 65, dtype, True)
    _, lse, _ = contrastive_kernels.nt_xent_forward(z1, z2, 0.2, True)
    z = torch.nn.functional.normalize(torch.cat([z1, z2]).double(), dim=1)
    logits = z @ z.T / 0.2
    logits.fill_diagonal_(float("-inf"))
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(lse.double(), torch.logsumexp(logits, dim=1), rtol=tol, atol=tol)


@pytest.mark.parametrize("d", [16, 65], ids=["hoisted", "scratch"])
def test_saved_norms_are_the_norms_and_equal_recomputing(contrastive_kernels, poisoned_outputs, d):
    """The forward's norms buffer holds ||x|| and 1 / max(||x||, eps) of the 2N rows, and a
    backward that reads it is bit-identical to one that launches the row norms again."""
    z1, z2 = _inputs(33, d, torch.float32, True)
    z1[3] = 0.0  # clamped at eps
    _, lse, norms = contrastive_kernels.nt_xent_forward(z1, z2, 0.3, True)
    ref = torch.cat([z1, z2]).double().norm(dim=1)
    assert norms.shape == (4 * 33,) and norms.dtype == torch.float32
    torch.testing.assert_close(norms[:66].double(), ref, rtol=2e-6, atol=0)
    torch.testing.assert_close(norms[66:].double(), 1.0 / ref.clamp(min=1e-12), rtol=2e-6, atol=0)
    g = torch.tensor(0.7)
    saved = contrastive_kernels.nt_xent_backward(g, z1, z2, lse, 0.3, True, norms)
    again = contrastive_kernels.nt_xent_backward(g, z1, z2, lse, 0.3, True)
    for a, b in zip(saved, again):
        assert torch.equal(a, b)
    _, _, none = contrastive_kernels.nt_xent_forward(z1, z2, 0.3, False)
    assert none.numel() == 0  # nothing to save without normalisation


def test_upstream_gradient_scales_the_gradients(contrastive_kernels, poisoned_outputs):
    z1, z2 = _inputs(33, 65, torch.float64, True)  # D = 65: the scratch + epilogue path
    _, a1, a2, _ = _fused(contrastive_kernels, z1, z2, 0.5, True, grad=1.0)
    _, b1, b2, _ = _fused(contrastive_kernels, z1, z2, 0.5, True, grad=0.37)
    _, r1, r2 = _reference(z1, z2, 0.5, True, grad=0.37)
    for b, a in ((b1, a1), (b2, a2)):
        torch.testing.assert_close(b, 0.37 * a, rtol=1e-12, atol=1e-12 * float(a.abs().max()))
    torch.testing.assert_close(b1, r1, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(b2, r2, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
def test_strided_inputs(contrastive_kernels, poisoned_outputs, normalize):
    n, d = 33, 65
    base = torch.randn(2 * n + 3, d + 7, dtype=torch.float64)
    cases = {
        # row stride d + 7, read in place; z2 starts inside the same storage
        "row-strided": (base[:n, :d], base[n + 3 :, 2 : d + 2]),
        # feature stride 2: copied by the launcher
        "column slice": (torch.randn(n, 2 * d, dtype=torch.float64)[:, ::2], base[:n, :d]),
        # transposed-contiguous (stride (1, n))
        "transposed": (torch.randn(d, n, dtype=torch.float64).T, torch.randn(d, n, dtype=torch.float64).T),
    }
    for name, (z1, z2) in cases.items():
        assert not z1.is_contiguous(), name
        got = _fused(contrastive_kernels, z1, z2, 0.3, normalize)
        ref = _reference(z1.contiguous(), z2.contiguous(), 0.3, normalize)
        for what, f, r in zip(("loss", "dz1", "dz2"), got, ref):
            torch.testing.assert_close(f, r, rtol=1e-10, atol=1e-13, msg=lambda m: f"{name} {what}: {m}")


@pytest.mark.parametrize("d", [16, 65], ids=["hoisted", "scratch"])
def test_zero_and_tiny_rows_match_f_normalize(contrastive_kernels, poisoned_outputs, d):
    z1, z2 = _inputs(7, d, torch.float64, True)
    z1[2] = 0.0
    z2[4] = 1e-14  # norm below eps = 1e-12: clamped, as F.normalize
    got = _fused(contrastive_kernels, z1, z2, 0.5, True)
    ref = _reference(z1, z2, 0.5, True)
    for what, f, r in zip(("loss", "dz1", "dz2"), got, ref):
        torch.testing.assert_close(f, r, rtol=1e-9, atol=0, msg=lambda m: f"{what}: {m}")


def test_the_rule_rejects_a_wrong_result(contrastive_kernels):
    """The tolerance is tight enough to see a temperature off by 2%."""
    z1, z2 = _inputs(33, 130, torch.float32, True)
    wrong = _fused(contrastive_kernels, z1, z2, 0.51, True)
    eager = _reference(z1, z2, 0.5, True)
    ref = _reference(z1.double(), z2.double(), 0.5, True)
    for what, f, e, r in zip(("loss", "dz1", "dz2"), wrong, eager, ref):
        with pytest.raises(AssertionError):
            assert_within_eager_error(f, e, r, torch.float32, what)


def test_gpu_launch_plan_and_config_pruning(monkeypatch):
    """The GPU-only plumbing (tile plan, autotune pruning), on a copy of the module
    imported without the interpreter: the interpreter itself never runs it."""
    import importlib.util

    import triton

    import sslkernels.kernels.contrastive as interp

    monkeypatch.delenv("TRITON_INTERPRET")
    spec = importlib.util.spec_from_file_location("_sslk_contrastive_gpu", interp.__file__)
    k = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(k)
    assert not k.INTERPRET and isinstance(k._nt_xent_fwd_kernel, triton.runtime.autotuner.Autotuner)
    assert type(k._nt_xent_fwd_kernel.fn) is triton.runtime.jit.JITFunction  # compiled, not interpreted

    cases = [  # (D, dtype, precision) -> family, HOIST, SAME_TILE, FUSED_OUT (normalize), BLOCK_DO
        (128, torch.bfloat16, "ieee", "mma128", True, True, True, 128),
        (130, torch.float16, "ieee", "mma256", True, True, True, 256),
        (256, torch.float32, "tf32", "mma256", True, True, True, 256),
        (512, torch.bfloat16, "ieee", "mmawide", False, False, False, 128),
        (128, torch.float32, "ieee", "fma", False, False, True, 128),
        (130, torch.float64, "ieee", "fma", False, False, False, 64),
        (1, torch.bfloat16, "ieee", "mma128", True, True, True, 16),
    ]
    for d, dtype, prec, family, hoist, same, fused, bdo in cases:
        fam, fwd, bwd = k._plan(d, dtype, True, prec)
        assert (fam, fwd["HOIST"], bwd["SAME_TILE"], bwd["FUSED_OUT"], bwd["BLOCK_DO"]) == (
            family, hoist, same, fused, bdo), (d, dtype, prec)
        assert fwd["BLOCK_K"] >= 16 and bwd["BLOCK_K"] == fwd["BLOCK_K"]
        assert k._plan(d, dtype, False, prec)[2]["FUSED_OUT"]  # no normalisation: never the scratch
        z = torch.empty(2, d, dtype=dtype)
        for kernel, families in ((k._nt_xent_fwd_kernel, k._FWD_FAMILIES), (k._nt_xent_bwd_kernel, k._BWD_FAMILIES)):
            prune = kernel.early_config_prune
            expected = k._family_configs(families, d, dtype, prec)  # fp32: the "_f32" table if any
            assert expected[0].kwargs["BLOCK_M"] <= (64 if dtype == torch.float32 else 128)
            assert prune(kernel.configs, {"z1_ptr": z, "D": d}, PRECISION=prec) == expected
            assert set(map(str, expected)) <= set(map(str, kernel.configs))
    assert k._tune_m(2) == 1024 and k._tune_m(8192) == 8192 and k._tune_m(1 << 20) == 16384
