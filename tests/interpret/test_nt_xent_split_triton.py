"""The column split of the Triton NT-Xent sweeps (too few row blocks to fill the GPU: S
programs per row block share its column tiles). Backward: each split writes its fp32 share
of dZhat to a [S, M, D] scratch that `_grad_finish_kernel` sums in split order. Forward:
each writes its rows' (max, rest, positive's logit) to [3, S, M], merged in split order by
`_nt_xent_lse_merge_kernel`, which also folds the loss. Forced on in the interpreter, where
`_nt_xent_splits` never chooses it: the value tests of test_nt_xent_triton.py again with 2
and 3 splits (the interpreter's tiles are 32 wide: N = 1 and 7 leave splits without a tile,
N = 70 gives 6 tiles, D = 130 three BLOCK_DO slices), a direct comparison with the unsplit
kernels, run-to-run determinism, and the plan: which shapes split how many ways on a 132-SM
device (benchmarks/GPU_MODEL.md, lead 2 for NT-Xent)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton interpreter tests need triton")

from tests.interpret import test_nt_xent_triton as plain_tests  # noqa: E402

pytestmark = pytest.mark.interpret

SHAPES = plain_tests.SHAPES  # (1, 3), (7, 65), (33, 130), (70, 16)


@pytest.mark.parametrize("passes", ["bwd", "fwd+bwd"])
@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("n,d", SHAPES, ids=[f"{n}x{d}" for n, d in SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_split_matches_float64_reference(contrastive_kernels, poisoned_outputs, monkeypatch, dtype, n, d,
                                         normalize, splits, passes):
    monkeypatch.setattr(contrastive_kernels, "NT_XENT_BWD_SPLITS", splits)
    if passes == "fwd+bwd":
        monkeypatch.setattr(contrastive_kernels, "NT_XENT_FWD_SPLITS", splits)
    plain_tests.test_matches_float64_reference(contrastive_kernels, poisoned_outputs, dtype, n, d, normalize, 0.1)


def _grads(k, z1, z2, normalize, grad=0.7):
    loss, lse, norms = k.nt_xent_forward(z1, z2, 0.2, normalize)
    return k.nt_xent_backward(torch.tensor(grad, dtype=z1.dtype), z1, z2, lse, 0.2, normalize, norms)


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("n,d", [(70, 16), (33, 130), (1, 3)], ids=["70x16", "33x130", "1x3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_split_forward_agrees_with_the_unsplit_kernel(contrastive_kernels, poisoned_outputs, monkeypatch, dtype, n,
                                                      d, normalize):
    """The same loss and lse up to the order of the (max, sum) merges (S = 2, 4, 7), the same
    layout, and the ticket back at 0 after the merge's fold."""
    from sslkernels.kernels import _launch

    k = contrastive_kernels
    z1, z2 = plain_tests._inputs(n, d, dtype, normalize, seed=7)
    monkeypatch.setattr(k, "NT_XENT_FWD_SPLITS", 1)
    base = k.nt_xent_forward(z1, z2, 0.2, normalize)
    tol = 1e-13 if dtype == torch.float64 else 4e-6
    for splits in (2, 4, 7):
        monkeypatch.setattr(k, "NT_XENT_FWD_SPLITS", splits)
        got = k.nt_xent_forward(z1, z2, 0.2, normalize)
        assert int(_launch.ticket(z1.device)) == 0
        for name, a, b in zip(("loss", "lse", "norms"), got, base):
            assert a.shape == b.shape and a.dtype == b.dtype, name
            if b.numel():  # (no norms without normalisation)
                torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()), msg=f"{name}, S = {splits}")


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("n,d", [(70, 16), (33, 130), (1, 3)], ids=["70x16", "33x130", "1x3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_split_agrees_with_the_unsplit_kernel(contrastive_kernels, poisoned_outputs, monkeypatch, dtype, n, d,
                                              normalize):
    """The same gradients up to the order of the tile sums (S = 2, 4, 7: splits that do and
    do not divide the 2 cdiv(N, 32) column tiles, and more splits than tiles)."""
    z1, z2 = plain_tests._inputs(n, d, dtype, normalize, seed=5)
    monkeypatch.setattr(contrastive_kernels, "NT_XENT_BWD_SPLITS", 1)
    base = _grads(contrastive_kernels, z1, z2, normalize)
    tol = 1e-13 if dtype == torch.float64 else 4e-6
    for splits in (2, 4, 7):
        monkeypatch.setattr(contrastive_kernels, "NT_XENT_BWD_SPLITS", splits)
        for name, a, b in zip(("dz1", "dz2"), _grads(contrastive_kernels, z1, z2, normalize), base):
            assert a.shape == b.shape and a.dtype == b.dtype and a.is_contiguous(), name
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()), msg=f"{name}, S = {splits}")


@pytest.mark.parametrize("d", [16, 130], ids=["whole-rows", "slices"])
def test_split_passes_are_bitwise_repeatable(contrastive_kernels, poisoned_outputs, monkeypatch, d):
    """No atomics, the splits merged in a fixed order: every run gives the same bits (loss,
    lse, both gradients)."""
    k = contrastive_kernels
    monkeypatch.setattr(k, "NT_XENT_BWD_SPLITS", 3)
    monkeypatch.setattr(k, "NT_XENT_FWD_SPLITS", 3)
    z1, z2 = plain_tests._inputs(70, d, torch.float32, True, seed=2)

    def step():
        loss, lse, norms = k.nt_xent_forward(z1, z2, 0.2, True)
        return [loss, lse, *k.nt_xent_backward(torch.tensor(0.7), z1, z2, lse, 0.2, True, norms)]

    first = step()
    for _ in range(2):
        for a, b in zip(step(), first):
            assert torch.equal(a, b)


def _plan(k, which, n, d=128, device=torch.device("cuda", 0)):
    """The splits nt_xent_forward / nt_xent_backward would take for bf16 [n, d]."""
    if which == "bwd":
        return k._nt_xent_splits(k.NT_XENT_BWD_SPLITS, k._BWD_FAMILIES, n, d, torch.bfloat16, "ieee", 1,
                                 2 * n * d * 4, device)
    return k._nt_xent_splits(k.NT_XENT_FWD_SPLITS, k._FWD_FAMILIES, n, d, torch.bfloat16, "ieee", 1, 3 * 2 * n * 4,
                             device)


@pytest.mark.parametrize("which", ["fwd", "bwd"])
def test_the_split_plan_on_a_132_sm_device(contrastive_kernels, monkeypatch, which):
    """Which calls split, and how many ways, as a device with 132 SMs would plan them (the
    pinned bf16 D = 128 configs: 128 x 64 forward and backward, BLOCK_DO 128): up to one
    program per SM (what the pinned configs' registers hold), each split >= 4 column tiles,
    none where the row blocks already fill the SMs; the scratch cap lowers or turns off the
    split; forcing wins; the interpreter and CPU tensors never ask a device."""
    k = contrastive_kernels
    assert _plan(k, which, 1024) == 1  # interpreter: never
    monkeypatch.setattr(k, "INTERPRET", False)
    monkeypatch.setattr(k, "_sm_count", lambda device: 132)
    # N = 1024: 16 programs, 32 tiles -> 8 splits (4 tiles each, 128 programs); N = 4096:
    # 64 programs -> 2 (128); N = 8192: 128 programs already fill the SMs
    assert {n: _plan(k, which, n) for n in (1, 64, 1024, 4096, 8192, 32768)} == {
        1: 1, 64: 1, 1024: 8, 4096: 2, 8192: 1, 32768: 1}
    assert _plan(k, which, 1024, device=torch.device("cpu")) == 1
    one_slice = 2 * 1024 * 128 * 4 if which == "bwd" else 3 * 2 * 1024 * 4
    monkeypatch.setattr(k, "_SPLIT_SCRATCH_MAX_BYTES", 3 * one_slice)
    assert _plan(k, which, 1024) == 3
    monkeypatch.setattr(k, "_SPLIT_SCRATCH_MAX_BYTES", one_slice)  # no room for two: no split
    assert _plan(k, which, 1024) == 1
    monkeypatch.setattr(k, "NT_XENT_BWD_SPLITS" if which == "bwd" else "NT_XENT_FWD_SPLITS", 5)
    assert _plan(k, which, 1024) == 5
