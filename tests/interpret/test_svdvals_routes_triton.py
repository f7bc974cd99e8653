"""The CUDA kernel body of `sslkernels::svdvals_ex` (ops.spectral.svdvals_device) on CPU
tensors, its Jacobi launcher under the Triton interpreter: every route the CUDA kernel can
take, at the shapes that pick it, against float64 LAPACK."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton interpreter tests need triton")

from sslkernels.ops import spectral as S  # noqa: E402

pytestmark = pytest.mark.interpret


def test_jacobi_limit_matches_the_kernel(spectral_kernels):
    assert S.CUDA_JACOBI_MAX_DIM == spectral_kernels.MAX_DIM


@pytest.mark.parametrize("shape,dtype", [
    ((2, 7, 5), torch.float32),     # jacobi
    ((1, 5, 9), torch.float64),     # jacobi, wide
    ((1, 150, 6), torch.float32),   # qr_jacobi: taller than the kernel's tile
    ((1, 6, 150), torch.float16),   # qr_jacobi, wide, half in
    ((1, 140, 130), torch.float32),  # gram_eigvalsh
    ((1, 130, 140), torch.float64),  # linalg_svdvals
])
def test_every_cuda_route_on_cpu_tensors(shape, dtype, spectral_kernels):
    route = S.svdvals_route(shape, "cuda", dtype)
    g = torch.Generator().manual_seed(sum(shape))
    A = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    got, info = S.svdvals_device(A, 30, route)
    ref = torch.linalg.svdvals(A.double())
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert got.shape == ref.shape and got.dtype == S.compute_dtype(dtype)
    assert not info.any(), route
    assert float((got.double() - ref).abs().max()) <= tol * float(ref.max()), route



def test_cuda_limits_match_the_kernels(spectral_kernels, contrastive_kernels):
    """What validation promises on CUDA is what the Triton launchers take."""
    import importlib

    from sslkernels import _validation as V

    A = importlib.import_module("sslkernels.kernels.attention")
    assert V.HEAD_DIM_RANGE["cuda"][1] == A.MAX_HEAD_DIM
    assert V.CUDA_PER_QUERY_SPAN_MAX == contrastive_kernels._MAX_PER_QUERY_SPAN
