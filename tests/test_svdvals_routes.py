"""The route choice of `sslkernels::svdvals_ex` (CPU and CUDA alike, from the shape, device
type and dtype), and the CUDA routes' plain-torch parts run on CPU tensors: the float64 Gram
+ eigvalsh, the QR reduction and the float64 cuSOLVER-style route. The Jacobi launcher
parts run under the Triton interpreter in tests/interpret/test_svdvals_routes_triton.py."""
from __future__ import annotations

import pytest
import torch

from sslkernels.ops import spectral as S

CUDA = torch.device("cuda")  # a device object only: no GPU is touched


@pytest.mark.parametrize("shape,dtype,route", [
    ((4096, 32, 32), torch.float32, "jacobi"),
    ((1, 128, 128), torch.float32, "jacobi"),
    ((1, 128, 128), torch.float16, "jacobi"),
    ((3, 7, 1), torch.float64, "jacobi"),
    ((1, 129, 128), torch.float32, "qr_jacobi"),
    ((1, 25600, 64), torch.bfloat16, "qr_jacobi"),
    ((2, 64, 300), torch.float32, "qr_jacobi"),  # wide: its transpose is tall
    ((1, 129, 129), torch.float32, "gram_eigvalsh"),
    ((1, 25600, 2048), torch.float32, "gram_eigvalsh"),
    ((1, 2048, 25600), torch.bfloat16, "gram_eigvalsh"),
    ((1, 25600, 2048), torch.float64, "linalg_svdvals"),
    ((8, 200, 300), torch.float64, "linalg_svdvals"),
])
def test_cuda_route(shape, dtype, route):
    assert S.svdvals_route(shape, CUDA, dtype) == route
    assert S.svdvals_route(shape, "cuda", dtype) == route


@pytest.mark.parametrize("shape,dtype,route", [
    ((4096, 32, 32), torch.float32, "jacobi"),
    ((1, 300, 32), torch.float32, "gram"),  # taller than JACOBI_MAX_ASPECT x its width
    ((1, 300, 32), torch.float64, "jacobi"),
    ((8, 256, 256), torch.float32, "gram"),
    ((1, 25600, 2048), torch.float32, "gram_eigvalsh"),
])
def test_cpu_route(shape, dtype, route):
    assert S.svdvals_route(shape, "cpu", dtype) == route


def test_route_refuses_other_devices():
    with pytest.raises(NotImplementedError, match="meta"):
        S.svdvals_route((1, 4, 4), "meta", torch.float32)


def _graded(m, n, smallest, dtype, seed=0):
    """A [1, m, n] with singular values spaced log-uniformly from 1 down to `smallest`."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]
    s = torch.logspace(0, torch.log10(torch.tensor(smallest)).item(), k, dtype=torch.float64)
    return ((u * s) @ v.T).to(dtype)[None]


@pytest.mark.parametrize("m,n", [(3000, 200), (257, 130)])
def test_gram_eigvalsh_keeps_values_down_to_1e6(m, n, monkeypatch):
    """float32 input: every value within 1e-5 sigma_max (the promise), and the values down
    to 1e-6 sigma_max kept to a few digits (absolute error ~1e-8 sigma_max). A small row
    block makes the blocked float64 sum cross several block edges, one of them partial."""
    monkeypatch.setattr(S, "GRAM_ROW_BLOCK", 97)
    A = _graded(m, n, 1e-6, torch.float32)
    ref = torch.linalg.svdvals(A.double())
    got = S.gram_eigvalsh_svdvals(A)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    err = (got.double() - ref).abs()
    assert float(err.max()) <= 1e-5 * float(ref.max())
    kept = ref >= 1e-6 * ref.max()
    assert bool(kept.all())
    assert float((err[kept] / ref[kept]).max()) <= 5e-2, float((err[kept] / ref[kept]).max())
    assert float(err.max()) <= 1e-7 * float(ref.max())
    assert torch.equal(got, S.gram_eigvalsh_svdvals(A)), "the blocked sum must not change between runs"


def test_gram_blocks_equal_one_block(monkeypatch):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 500, 140, generator=g)
    whole = S.gram_float64(x)
    monkeypatch.setattr(S, "GRAM_ROW_BLOCK", 64)
    torch.testing.assert_close(S.gram_float64(x), whole, rtol=1e-13, atol=1e-11)
    torch.testing.assert_close(whole, x.double().mT @ x.double(), rtol=1e-13, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_qr_r_keeps_the_singular_values(dtype):
    A = _graded(400, 60, 1e-4, dtype, seed=1)[0].expand(3, -1, -1).contiguous()
    R = S.qr_r(A)
    assert R.shape == (3, 60, 60)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(torch.linalg.svdvals(R.double()), torch.linalg.svdvals(A.double()),
                               rtol=0, atol=tol)


@pytest.mark.parametrize("shape", [(1, 300, 140), (2, 140, 300)])
def test_device_linalg_route_float64(shape):
    g = torch.Generator().manual_seed(5)
    A = torch.randn(*shape, generator=g, dtype=torch.float64)
    S_, info = S.svdvals_device(A, 30, "linalg_svdvals")
    ref = torch.linalg.svdvals(A)
    assert S_.dtype == torch.float64 and info.dtype == torch.int32 and not info.any()
    assert float((S_ - ref).abs().max()) <= 1e-12 * float(ref.max())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_device_gram_route_half(dtype):
    g = torch.Generator().manual_seed(6)
    A = torch.randn(1, 160, 400, generator=g).to(dtype)  # wide: transposed, then the Gram
    S_, info = S.svdvals_device(A, 30, "gram_eigvalsh")
    ref = torch.linalg.svdvals(A.double())
    assert S_.dtype == torch.float32 and S_.shape == (1, 160) and not info.any()
    assert float((S_.double() - ref).abs().max()) <= 1e-5 * float(ref.max())


def test_device_route_unknown():
    with pytest.raises(ValueError, match="no device route"):
        S.svdvals_device(torch.randn(1, 4, 4), 30, "magic")
