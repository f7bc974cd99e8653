"""sslkernels.svdvals / svdvals_ex: the CPU core (Jacobi and float64-Gram routes)
against float64 LAPACK (torch.linalg.svdvals in float64), errors relative to
sigma_max; shapes, degenerate input, the op, and bad input."""
from __future__ import annotations

import pytest
import torch

import sslkernels
from sslkernels.ops import spectral as spectral_ops

SIDES = [1, 2, 7, 32, 33, 65, 128]
# Float32 promise: max |S - S64| <= 1e-5 * sigma_max; float64 Jacobi: near LAPACK.
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 1e-5, torch.bfloat16: 1e-5}


def _rel_err(S, A64):
    ref = torch.linalg.svdvals(A64)
    assert S.shape == ref.shape, (S.shape, ref.shape)
    scale = ref.amax(dim=-1, keepdim=True).clamp_min(1e-300)
    return float(((S.double() - ref).abs() / scale).max())


def _route(dtype, m, n):
    k, l = min(m, n), max(m, n)
    ct = spectral_ops.compute_dtype(dtype)
    if k <= spectral_ops.JACOBI_MAX_COLS[ct] and (ct == torch.float64 or l <= spectral_ops.JACOBI_MAX_ASPECT * k):
        return "jacobi"
    return "gram"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("m", SIDES)
@pytest.mark.parametrize("n", SIDES)
def test_matches_float64_lapack(m, n, dtype, poisoned_outputs):
    # 17 matrices: full SIMD groups of 16 (float32) / 8 (float64) plus a partial one.
    A = torch.randn(17, m, n, dtype=torch.float64)
    S, info = sslkernels.svdvals_ex(A.to(dtype))
    assert S.dtype == dtype and S.shape == (17, min(m, n))
    assert info.dtype == torch.int32 and info.shape == (17,) and int(info.sum()) == 0
    assert _rel_err(S, A) <= TOL[dtype], _route(dtype, m, n)
    assert bool((S[..., :-1] >= S[..., 1:]).all()), "not descending"


def test_one_matrix_at_a_time_path():
    # Batches below the lane count run one matrix per thread, the row loop vectorised.
    for shape in [(1, 40, 33), (3, 128, 128), (7, 65, 7)]:
        A = torch.randn(*shape, dtype=torch.float64)
        for dtype in (torch.float32, torch.float64):
            assert _rel_err(sslkernels.svdvals(A.to(dtype)), A) <= TOL[dtype], (shape, dtype)


def test_leading_batch_dims_and_both_routes():
    for shape in [(2, 3, 9, 5), (2, 3, 5, 9), (2, 3, 300, 70), (2, 3, 70, 300), (4, 1, 1), (3, 6)]:
        A = torch.randn(*shape, dtype=torch.float64)
        for dtype in (torch.float32, torch.float64):
            S, info = sslkernels.svdvals_ex(A.to(dtype))
            assert S.shape == (*shape[:-2], min(shape[-2:]))
            assert info.shape == shape[:-2]
            assert _rel_err(S, A) <= TOL[dtype], shape


def test_many_small_matrices_use_every_lane():
    # Batches that are not a multiple of the 16 / 8 SIMD lanes, and one that is.
    for b in (15, 16, 17, 33, 40):
        A = torch.randn(b, 12, 10, dtype=torch.float64)
        for dtype in (torch.float32, torch.float64):
            assert _rel_err(sslkernels.svdvals(A.to(dtype)), A) <= TOL[dtype], (b, dtype)


def test_reduced_precision_inputs_compute_in_float32():
    A = torch.randn(20, 24, 17)
    for dtype in (torch.float16, torch.bfloat16):
        x = A.to(dtype)
        S = sslkernels.svdvals(x)
        assert S.dtype == torch.float32
        assert _rel_err(S, x.double()) <= 1e-5


def test_tall_float32_gram_route():
    A = torch.randn(5000, 300, dtype=torch.float64)
    assert _route(torch.float32, 5000, 300) == "gram"
    assert _rel_err(sslkernels.svdvals(A.float()), A) <= 1e-5
    assert _rel_err(sslkernels.svdvals(A.float().T), A.T) <= 1e-5  # wide, strided


def test_tall_rank_deficient_keeps_the_tail_at_zero():
    # Rank 10 in 300 dims: float32 Gram would put the tail at ~2.4e-4 sigma_max;
    # the float64 Gram keeps it below 1e-5.
    g = torch.Generator().manual_seed(1)
    A = (torch.randn(5000, 10, generator=g, dtype=torch.float64) @ torch.randn(10, 300, generator=g, dtype=torch.float64))
    S = sslkernels.svdvals(A.float())
    assert _rel_err(S, A.float().double()) <= 1e-5
    assert float(S[10:].max() / S[0]) <= 1e-5


@pytest.mark.slow
def test_tall_25600_by_2048_full_rank_and_rank_10():
    g = torch.Generator().manual_seed(2)
    full = torch.randn(25600, 2048, generator=g)
    assert _rel_err(sslkernels.svdvals(full), full.double()) <= 1e-5
    low = torch.randn(25600, 10, generator=g) @ torch.randn(10, 2048, generator=g)
    S = sslkernels.svdvals(low)
    assert _rel_err(S, low.double()) <= 1e-5
    assert float(S[10:].max() / S[0]) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_ill_conditioned(dtype):
    # sigma spanning 1e-6 .. 1; float64 Jacobi also keeps the small ones to high relative accuracy.
    n = 40
    U, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    sig = torch.logspace(0, -6, n, dtype=torch.float64)
    A = (U * sig) @ V.T
    S = sslkernels.svdvals(A.to(dtype)[None])[0]
    assert _rel_err(S[None], A.to(dtype).double()[None]) <= TOL[dtype]
    if dtype == torch.float64:
        torch.testing.assert_close(S, sig, rtol=1e-9, atol=0)


@pytest.mark.parametrize("m,n", [(7, 5), (32, 32), (128, 128), (5000, 300)])
def test_zero_matrix_gives_zeros(m, n):
    for dtype in (torch.float32, torch.float64):
        S, info = sslkernels.svdvals_ex(torch.zeros(3, m, n, dtype=dtype))
        assert torch.equal(S, torch.zeros_like(S)) and int(info.sum()) == 0


def test_rank_deficient_and_repeated_rows():
    row = torch.randn(1, 33, dtype=torch.float64)
    A = row.repeat(40, 1)  # rank 1, every row the same
    A2 = torch.randn(40, 5, dtype=torch.float64) @ torch.randn(5, 33, dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        for M in (A, A2):
            S, info = sslkernels.svdvals_ex(M.to(dtype)[None])
            assert int(info.sum()) == 0
            assert _rel_err(S, M.to(dtype).double()[None]) <= TOL[dtype]


def test_extreme_scales_do_not_overflow():
    A = torch.randn(6, 9, 9, dtype=torch.float64)
    for scale in (1e-30, 1e30):
        x = (A * scale).float()
        S = sslkernels.svdvals(x)
        ref = torch.linalg.svdvals(x.double())
        assert torch.isfinite(S).all()
        assert float(((S.double() - ref).abs() / ref[..., :1]).max()) <= 1e-5


def test_sweep_budget_reports_info_without_raising():
    A = torch.randn(20, 32, 32)
    S, info = sslkernels.svdvals_ex(A, max_sweeps=2)
    assert info.dtype == torch.int32 and bool((info == 1).all())
    assert torch.isfinite(S).all()
    S, info = sslkernels.svdvals_ex(A, max_sweeps=30)
    assert bool((info == 0).all())


def _svdvals_with_1_and_2_threads(A):
    previous = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(sslkernels.svdvals(A))
    finally:
        torch.set_num_threads(previous)
    return outs


def test_non_contiguous_and_thread_count_independent():
    base = torch.randn(40, 2 * 12, 10)
    A = base[:, ::2, :]
    assert not A.is_contiguous()
    outs = _svdvals_with_1_and_2_threads(A)
    assert torch.equal(outs[0], outs[1])
    assert _rel_err(outs[0], A.double()) <= 1e-5


@pytest.mark.parametrize("batch", [1, 3])
def test_gram_route_is_thread_count_independent(batch):
    # 300 columns: the float64 Gram route, split over threads in fixed column blocks
    A = torch.randn(batch, 1201, 300)
    outs = _svdvals_with_1_and_2_threads(A)
    assert torch.equal(outs[0], outs[1])
    assert _rel_err(outs[0], A.double()) <= 1e-5


def test_backward_raises_a_clear_error():
    A = torch.randn(3, 5, 4, requires_grad=True)
    S = sslkernels.svdvals(A)
    with pytest.raises(NotImplementedError, match="singular values only"):
        S.sum().backward()


def test_opcheck():
    for shape in [(3, 7, 5), (2, 5, 9), (17, 4, 4), (1, 300, 40)]:
        A = torch.randn(*shape)
        torch.library.opcheck(torch.ops.sslkernels.svdvals_ex.default, (A, 30),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "A,kw,exc,match",
    [
        (torch.randn(5), {}, ValueError, "`A` must be at least 2-D"),
        (torch.randint(0, 5, (4, 3)), {}, TypeError, "`A` must be float"),
        (torch.randn(4, 3, dtype=torch.complex64), {}, TypeError, "`A` must be float"),
        ([[1.0, 2.0]], {}, TypeError, "`A` must be a torch.Tensor"),
        (torch.randn(0, 4, 3), {}, ValueError, "`A` is an empty batch"),
        (torch.randn(4, 0, 3), {}, ValueError, "`A` has a zero-size"),
        (torch.randn(4, 3, 0), {}, ValueError, "`A` has a zero-size"),
        (torch.randn(4, 3), {"max_sweeps": 0}, ValueError, "`max_sweeps`"),
        (torch.randn(4, 3), {"max_sweeps": 2.5}, TypeError, "`max_sweeps`"),
    ],
)
def test_bad_input_raises(A, kw, exc, match):
    with pytest.raises(exc, match=match):
        sslkernels.svdvals_ex(A, **kw)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("shape", [(3, 8, 6), (2, 600, 200), (1, 6, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_non_finite_input_raises(bad, shape, dtype):
    A = torch.randn(*shape).to(dtype)
    A[-1, 3, 2] = bad
    with pytest.raises(ValueError, match="`A` contains NaN or Inf"):
        sslkernels.svdvals(A)


def test_bench_cli_runs_forward_only_spectral_ops(tmp_path, capsys):
    import csv

    from sslkernels.bench import main

    out = tmp_path / "res"
    rc = main(["--ops", "svdvals", "rankme", "--quick", "--repeat", "1", "--no-memory", "--no-plot",
               "--no-progress", "--out", str(out)])
    assert rc == 0
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["op"], r["pass"]) for r in rows) == [("rankme", "fwd"), ("svdvals", "fwd")]
    for r in rows:
        assert float(r["eager_ms"]) > 0 and float(r["fused_ms"]) > 0
        assert float(r["rel_diff"]) < 1e-4     # same answer as torch.linalg.svdvals
