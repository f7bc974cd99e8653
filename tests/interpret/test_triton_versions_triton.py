"""What differs between the Triton releases the kernels meet: the device image's 3.6.0 and
the newer one the tests run (`bash scripts/check_triton36.sh` runs this file under 3.6).

- The interpreter itself: a loop bounded by a runtime integer argument (koleo's column
  range, the Jacobi tournament's rounds). 3.6's interpreter turns the bound into a Python
  int with int() of a one-element array, which NumPy >= 2.4 refuses ("only 0-dimensional
  arrays can be converted"); newer Triton squeezes it first. This fails here, with the
  remedy, rather than as a dozen kernel failures.
- The frontend (the GPU compile too): 3.6's tl.maximum turns a Python float into a float32
  constant before promoting it, so F.normalize's eps = 1e-12 clamped float64 norms at
  float32(1e-12) = 9.99999996e-13; the row-norm kernel passes eps as an ACC constant.
"""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="the Triton interpreter tests need triton")
import triton.language as tl  # noqa: E402

pytestmark = pytest.mark.interpret


@triton.jit
def _count_kernel(out_ptr, start, stop):
    total = 0
    for _ in range(0, stop):  # bound: a kernel argument
        total += 1
    first = tl.program_id(0) + start
    for _ in range(first, stop):  # bounds computed in the kernel
        total += 1
    tl.store(out_ptr, total)


@pytest.mark.parametrize("start,stop", [(0, 3), (2, 5)])
def test_loop_bounds_from_runtime_integers(start, stop):
    import numpy as np

    out = torch.zeros(1, dtype=torch.int32)
    try:
        _count_kernel[(1,)](out, start, stop)
    except Exception as exc:  # noqa: BLE001  (re-raised with the cause named)
        pytest.fail(f"Triton {triton.__version__}'s interpreter cannot take a runtime integer as a loop bound "
                    f"with NumPy {np.__version__} ({type(exc).__name__}: {exc}); with Triton 3.6 install "
                    "'numpy<2.4' (scripts/check_triton36.sh does)")
    assert int(out) == stop + (stop - start)


def test_float64_row_norms_clamp_at_float64_eps(contrastive_kernels):
    """1 / max(||x||, 1e-12) to the last bit in float64, as F.normalize: a zero row, rows just
    below and above eps (the first between float32(1e-12) and 1e-12), an ordinary row."""
    K = contrastive_kernels
    eps = 1e-12
    scales = torch.tensor([0.0, 0.9999999985e-12, 1.0000001e-12, 3.0], dtype=torch.float64)
    assert float(torch.tensor(eps, dtype=torch.float32)) < float(scales[1]) < eps  # the window 3.6 missed
    z1 = torch.zeros(len(scales), 5, dtype=torch.float64)
    z1[:, 2] = scales  # one non-zero entry: the norm is exact
    z2 = z1.flip(0).contiguous()
    norms = K._row_norms(z1, z2, torch.float64).view(2, 2, -1)  # [norm | 1 / max(norm, eps)] x [z1, z2]
    for view, z in enumerate((z1, z2)):
        ref = z.norm(dim=1)
        assert torch.equal(norms[0, view], ref)
        want = 1.0 / ref.clamp_min(eps)
        assert torch.equal(norms[1, view], want), (norms[1, view].tolist(), want.tolist())
