"""The Triton KoLeo search (the CUDA path of `sslkernels::koleo_neighbors`) run by the
Triton interpreter on CPU tensors, through its launcher `koleo_neighbors`.

Both variants of the kernel run: the row tile loaded once (HOIST, the default for fp16 /
bf16 with D <= 256 on a GPU) and in BLOCK_K chunks per column tile.

Oracle: the float64 eager search (`koleo_neighbors_reference`), judged as in
tests/test_koleo.py: a valid top-k (in the group, never itself, distinct) whose float64
similarities match the oracle's within rounding, and the oracle's very choice wherever
that choice is clear. Interpreter tiles are 16 x 16 x 16, so the cases cross row, column
and feature tiles with tails; bfloat16 runs on a GPU only (triton issue 11584).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton interpreter tests need triton")

from tests.interpret.conftest import interpreted_kernels  # noqa: E402
from tests.test_koleo import _check_search  # noqa: E402

pytestmark = pytest.mark.interpret


@pytest.fixture(scope="module")
def koleo_kernels():
    return interpreted_kernels("koleo")


# (N, D, topk, group, query_offset, query_count)
CASES = [(2, 3, 1, 2, 0, 2), (37, 20, 1, 37, 0, 37), (40, 33, 3, 20, 0, 40), (48, 16, 2, 12, 0, 48),
         (50, 7, 4, 50, 0, 50), (60, 9, 1, 30, 30, 30), (64, 17, 2, 32, 16, 16)]


@pytest.mark.parametrize("hoist", [True, False], ids=["hoisted-rows", "row-chunks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("n,d,topk,group,offset,count", CASES)
def test_search_matches_float64_reference(koleo_kernels, dtype, n, d, topk, group, offset, count, hoist):
    assert koleo_kernels.plan(d, topk, dtype, hoist)["HOIST"] == hoist
    x = torch.randn(n, d).to(dtype)
    idx = koleo_kernels.koleo_neighbors(x, offset, count, group, topk, 1e-8, hoist=hoist)
    _check_search(x, idx, topk, group, query_offset=offset)


def test_ties_go_to_the_smaller_index(koleo_kernels):
    x = torch.randn(40, 6)
    x[10] = x[3]
    x[20] = x[3]
    x[31] = x[3]  # (a scaled copy ties only up to rounding: (x_i . x_j) / |x_j| here)
    idx = koleo_kernels.koleo_neighbors(x, 0, 40, 40, 1, 1e-8)[:, 0]
    assert idx[3] == 10 and idx[10] == 3 and idx[20] == 3 and idx[31] == 3
    idx3 = koleo_kernels.koleo_neighbors(x, 0, 40, 40, 3, 1e-8)
    assert idx3[3].tolist() == [10, 20, 31] and idx3[31].tolist() == [3, 10, 20]


def test_strided_input_reads_like_its_copy(koleo_kernels):
    x = torch.randn(9, 33).T  # column-major [33, 9]
    assert torch.equal(koleo_kernels.koleo_neighbors(x, 0, 33, 33, 2, 1e-8),
                       koleo_kernels.koleo_neighbors(x.contiguous(), 0, 33, 33, 2, 1e-8))


def test_matches_the_cpu_core_on_clear_cases(koleo_kernels):
    x = torch.randn(45, 12)
    ours = koleo_kernels.koleo_neighbors(x, 0, 45, 15, 2, 1e-8)
    core = torch.ops.sslkernels.koleo_neighbors(x, 0, 45, 15, 2, 1e-8)
    assert torch.equal(ours, core)


@pytest.mark.parametrize("topk", [1, 3])
def test_nan_rows_give_indices_in_bounds(koleo_kernels, topk):
    """Outside debug mode the CUDA search does not check NaN: a NaN row must still get
    indices inside x (an index past the end crashes the gather on a GPU), and the loss is NaN."""
    from sslkernels.ops import koleo as koleo_ops

    x = torch.randn(20, 5)
    x[4, 2] = float("nan")
    idx = koleo_kernels.koleo_neighbors(x, 0, 20, 20, topk, 1e-8)
    assert bool(((idx >= 0) & (idx < 20)).all()), idx[4]
    assert torch.isnan(koleo_ops.loss_forward_torch(x, idx, 0, 20, 1e-8))
