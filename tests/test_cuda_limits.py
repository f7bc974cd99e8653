"""The CUDA path's limits are refused up front, in _validation.py, with the limit named:
the check logic runs here on torch.device("cuda") objects (no GPU is touched), and the CPU,
which has none of these limits, is never refused."""
from __future__ import annotations

import pytest
import torch

from sslkernels import _validation as V

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.mark.parametrize("m,d,ok", [(7, 128, True), (65535, 64, True), (65536, 1, False),
                                    (1024, 4095, True), (1024, 4096, False), (4096, 1024, False)])
def test_per_query_negatives_limit(m, d, ok):
    V.check_per_query_negatives_limit(CPU, m, d)  # the CPU core has no such limit
    if ok:
        V.check_per_query_negatives_limit(CUDA, m, d)
    else:
        with pytest.raises(NotImplementedError, match=r"M <= 65535 and M \* D < 4194304.*M = %d, D = %d" % (m, d)):
            V.check_per_query_negatives_limit(CUDA, m, d)


@pytest.mark.parametrize("batch,heads,ok", [(32, 12, True), (5461, 12, True), (5462, 12, False), (65536, 1, False)])
def test_attention_grid_limit(batch, heads, ok):
    V.check_attention_grid(CPU, batch, heads)
    V.check_attention_grid("cpu", batch, heads)
    if ok:
        V.check_attention_grid(CUDA, batch, heads)
    else:
        with pytest.raises(NotImplementedError, match=f"batch \\* heads = {batch} \\* {heads}.*65535"):
            V.check_attention_grid("cuda", batch, heads)


def test_public_validation_applies_the_limits_on_cpu_shapes_freely():
    """The same shapes pass validation on the CPU: only the CUDA device is limited."""
    q = torch.empty(6000, 2, 12, 16, device="meta")
    V.check_attention_qkv(q, q, q, 4)  # meta: as the CPU
    neg = torch.empty(2, 70000, 8)
    query = torch.empty(2, 8)
    assert V.check_negatives(neg, query)[0] is neg
    cu = torch.tensor([0] + [1] * 70000).cumsum(0)
    assert V.check_cu_seqlens(cu, 70000, CPU, 1, heads=1) == 1
