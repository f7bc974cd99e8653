"""The float32 -> float16 / bfloat16 rounding that every C++ kernel stores its half
results with (csrc/cpu/tile_utils.hpp), bit for bit against torch's own conversion:
every subnormal and normal boundary, the ties between neighbours, overflow, signed
zeros, inf and NaN. (Until this test, every float16 subnormal came out halved.)"""
from __future__ import annotations

import pytest
import torch

from sslkernels import _ext

HALVES = [torch.float16, torch.bfloat16]


def _ours(x: torch.Tensor, dtype) -> torch.Tensor:
    x = x.contiguous()
    out = torch.full(x.shape, float("nan"), dtype=dtype)  # poisoned: every element is written
    _ext._C.convert_from_float32(src=x.data_ptr(), dst=out.data_ptr(), dtype=_ext.DTYPE_CODES[dtype],
                                 count=x.numel())
    return out


def _edge_values(dtype) -> torch.Tensor:
    """Every value of `dtype` below its smallest normal x 4 (all subnormals and the first
    normals), the largest ones, each with its midpoints to both neighbours, one float32
    ulp either side of those midpoints, both signs."""
    bits = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(dtype)
    finite = bits[torch.isfinite(bits.float())].float().abs().unique()
    tiny = torch.finfo(dtype).tiny
    keep = finite[(finite <= 4 * tiny) | (finite >= torch.finfo(dtype).max / 4)]
    mids = (keep[1:].double() + keep[:-1].double()) / 2
    mids32 = mids.float()
    pts = [keep, mids32, torch.nextafter(mids32, torch.tensor(float("inf"))),
           torch.nextafter(mids32, torch.tensor(0.0))]
    x = torch.cat(pts)
    return torch.cat([x, -x])


@pytest.mark.parametrize("dtype", HALVES, ids=str)
def test_matches_torch_on_every_subnormal_and_edge(dtype):
    x = _edge_values(dtype)
    want = x.to(dtype)
    got = _ours(x, dtype)
    diff = (got.view(torch.int16) != want.view(torch.int16)).nonzero().flatten()
    assert diff.numel() == 0, (
        f"{diff.numel()} of {x.numel()} values differ, e.g. {x[diff[:5]].tolist()} -> "
        f"{got[diff[:5]].tolist()} (torch: {want[diff[:5]].tolist()})")


@pytest.mark.parametrize("dtype", HALVES, ids=str)
def test_matches_torch_on_random_floats_and_specials(dtype):
    g = torch.Generator().manual_seed(0)
    # random bit patterns cover every exponent, float32 subnormals included
    bits = torch.randint(-(2**31), 2**31 - 1, (200_000,), generator=g, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    x = x[torch.isfinite(x)]
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 65504.0, 65519.99, 65520.0, -65520.0,
                             3.4e38, -3.4e38, 1e-45, -1e-45])
    x = torch.cat([x, specials])
    want, got = x.to(dtype), _ours(x, dtype)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    nan = _ours(torch.tensor([float("nan"), -float("nan")]), dtype)
    assert torch.isnan(nan.float()).all()
