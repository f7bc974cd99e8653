"""Label-free metrics (sslkernels.metrics) against straightforward float64 torch formulas."""
from __future__ import annotations

import math

import pytest
import torch

import sslkernels
from sslkernels.reference import rankme_reference


def _entropy_exp(w, eps):
    p = w / w.sum() + eps
    return math.exp(float(-(p * p.log()).sum()))


def _cov_eigs(Z):
    Z = Z.double()
    C = torch.cov(Z.T) if Z.shape[1] > 1 else torch.var(Z, dim=0, keepdim=True)[None]
    return torch.linalg.eigvalsh(C.reshape(Z.shape[1], Z.shape[1])).flip(0).clamp_min(0)


@pytest.mark.parametrize("shape", [(257, 65), (40, 130), (1000, 32), (7, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_rankme_matches_paper_formula(shape, dtype):
    Z = torch.randn(*shape, dtype=torch.float64) * torch.logspace(0, -2, shape[1], dtype=torch.float64)
    s = torch.linalg.svdvals(Z)
    expected = _entropy_exp(s, 1e-7)
    got = sslkernels.rankme(Z.to(dtype))
    assert got.dtype == dtype and got.dim() == 0
    assert float(got) == pytest.approx(expected, rel=1e-5 if dtype == torch.float32 else 1e-10)
    assert float(rankme_reference(Z)) == pytest.approx(expected, rel=1e-10)


def test_rankme_variants():
    Z = torch.randn(300, 50, dtype=torch.float64) @ torch.randn(50, 50, dtype=torch.float64)
    Zc = Z - Z.mean(0)
    s, sc = torch.linalg.svdvals(Z), torch.linalg.svdvals(Zc)
    assert float(sslkernels.rankme(Z, center=True)) == pytest.approx(_entropy_exp(sc, 1e-7), rel=1e-10)
    assert float(sslkernels.rankme(Z, squared=True)) == pytest.approx(_entropy_exp(s**2, 1e-7), rel=1e-10)
    # reptrix: sigma^2 of centred data (PCA explained-variance ratios)
    assert float(sslkernels.rankme(Z, center=True, squared=True)) == pytest.approx(_entropy_exp(sc**2, 1e-7), rel=1e-10)
    H = math.log(_entropy_exp(s, 1e-12))
    assert float(sslkernels.rankme(Z, 1e-12, normalized=True)) == pytest.approx(H / math.log(50), rel=1e-10)
    assert float(sslkernels.rankme(Z, eps=1e-5)) == pytest.approx(_entropy_exp(s, 1e-5), rel=1e-10)


def test_rankme_batched():
    Z = torch.randn(4, 100, 20)
    got = sslkernels.rankme(Z)
    assert got.shape == (4,)
    for b in range(4):
        assert float(got[b]) == pytest.approx(_entropy_exp(torch.linalg.svdvals(Z[b].double()), 1e-7), rel=1e-5)


def test_all_zero_and_identity_like():
    for fn in (sslkernels.rankme, sslkernels.effective_rank, sslkernels.nesum):
        for shape in [(10, 4), (3, 10, 4), (5000, 300)]:
            out = fn(torch.zeros(*shape))
            assert not torch.isnan(out).any() and torch.equal(out, torch.zeros_like(out)), fn.__name__
    assert float(sslkernels.rankme(torch.zeros(10, 4), normalized=True)) == 0.0
    for n, d in [(8, 8), (20, 8), (8, 20)]:
        Z = torch.eye(n, d) * 3.0
        assert float(sslkernels.rankme(Z)) == pytest.approx(min(n, d), rel=1e-4)
        assert float(sslkernels.effective_rank(Z)) == pytest.approx(min(n, d), rel=1e-6)


def test_rankme_of_a_collapsed_embedding():
    # Rank 10 in 300 dims: the float64 Gram keeps the tail at zero, so RankMe stays ~<= 10.
    g = torch.Generator().manual_seed(3)
    Z = torch.randn(5000, 10, generator=g) @ torch.randn(10, 300, generator=g)
    got = float(sslkernels.rankme(Z))
    ref = float(rankme_reference(Z.double()))
    assert got == pytest.approx(ref, rel=1e-4)
    assert got <= 10.01


def test_effective_rank():
    Z = torch.randn(200, 30, dtype=torch.float64)
    s = torch.linalg.svdvals(Z)
    assert float(sslkernels.effective_rank(Z)) == pytest.approx(_entropy_exp(s, 0.0), rel=1e-10)
    assert float(sslkernels.effective_rank(Z.float())) == pytest.approx(_entropy_exp(s, 0.0), rel=1e-5)


def test_nesum():
    Z = torch.randn(500, 40, dtype=torch.float64) * torch.linspace(1, 0.1, 40, dtype=torch.float64)
    lam = _cov_eigs(Z)
    assert float(sslkernels.nesum(Z)) == pytest.approx(float(lam.sum() / lam[0]), rel=1e-10)
    assert float(sslkernels.nesum(Z.bfloat16())) == pytest.approx(float(lam.sum() / lam[0]), rel=3e-2)


def test_alpha_req():
    n, d = 2000, 200
    i = torch.arange(1, d + 1, dtype=torch.float64)
    Z = torch.randn(n, d, dtype=torch.float64) * i ** -0.6   # variances ~ i^-1.2
    lam = _cov_eigs(Z)
    ranks = torch.arange(10, 100, dtype=torch.float64)
    x, y, w = ranks.log(), lam[9:99].log(), 1.0 / ranks
    W = torch.diag(w)
    X = torch.stack([torch.ones_like(x), x], 1)
    coef = torch.linalg.solve(X.T @ W @ X, X.T @ W @ y)
    expected = -float(coef[1])
    assert float(sslkernels.alpha_req(Z)) == pytest.approx(expected, rel=1e-9)
    assert float(sslkernels.alpha_req(Z.float())) == pytest.approx(expected, rel=1e-4)
    assert 0.9 < expected < 1.5
    with pytest.raises(ValueError, match="fit_range"):
        sslkernels.alpha_req(torch.randn(50, 8))
    with pytest.raises(TypeError, match="fit_range"):
        sslkernels.alpha_req(Z, fit_range=10)


def test_lidar():
    n, q, d = 60, 4, 12
    views = torch.randn(n, 1, d, dtype=torch.float64) + 0.3 * torch.randn(n, q, d, dtype=torch.float64)
    delta, eps = 1e-4, 1e-7
    mu_i = views.mean(1)
    mu = mu_i.mean(0)
    Sb = sum(torch.outer(m - mu, m - mu) for m in mu_i) / (n - 1)
    Sw = sum(torch.outer(views[i, j] - mu_i[i], views[i, j] - mu_i[i]) for i in range(n) for j in range(q)) / (n * (q - 1))
    Sw = Sw + delta * torch.eye(d, dtype=torch.float64)
    ev, V = torch.linalg.eigh(Sw)
    inv_sqrt = V @ torch.diag(ev.rsqrt()) @ V.T
    lam = torch.linalg.eigvalsh(inv_sqrt @ Sb @ inv_sqrt).clamp_min(0)
    p = (lam + eps) / (lam + eps).sum()
    expected = math.exp(float(-(p * p.log()).sum()))
    assert float(sslkernels.lidar(views, delta, eps)) == pytest.approx(expected, rel=1e-8)
    assert float(sslkernels.lidar(views.float())) == pytest.approx(expected, rel=1e-4)
    assert float(sslkernels.lidar(views.half())) == pytest.approx(expected, rel=5e-2)


@pytest.mark.slow
def test_torch_compile_fullgraph_rankme_cpu():
    def monitor(z):
        return sslkernels.rankme(z) * 1.0 + sslkernels.effective_rank(z) + sslkernels.nesum(z)

    compiled = torch.compile(monitor, fullgraph=True, backend="inductor")
    Z = torch.randn(300, 40)
    torch.testing.assert_close(compiled(Z), monitor(Z))


@pytest.mark.parametrize(
    "fn,args,exc,match",
    [
        (sslkernels.rankme, (torch.randn(5),), ValueError, "`Z` must be 2-D or 3-D"),
        (sslkernels.rankme, (torch.randn(2, 2, 5, 3),), ValueError, "`Z` must be 2-D or 3-D"),
        (sslkernels.rankme, (torch.randint(0, 3, (5, 3)),), TypeError, "`Z` must be float"),
        (sslkernels.rankme, (torch.randn(0, 3),), ValueError, "`Z`"),
        (sslkernels.rankme, (torch.randn(5, 3), -1.0), ValueError, "`eps`"),
        (sslkernels.effective_rank, (torch.randn(5, 0),), ValueError, "`Z`"),
        (sslkernels.nesum, ("x",), TypeError, "`Z` must be a torch.Tensor"),
        (sslkernels.lidar, (torch.randn(5, 3),), ValueError, "`views` must be 3-D"),
        (sslkernels.lidar, (torch.randn(5, 1, 3),), ValueError, "`views` needs"),
        (sslkernels.lidar, (torch.randn(5, 2, 3), 0.0), ValueError, "`delta`"),
    ],
)
def test_bad_input_raises(fn, args, exc, match):
    with pytest.raises(exc, match=match):
        fn(*args)


def test_non_finite_embedding_raises():
    Z = torch.randn(50, 8)
    Z[3, 3] = float("nan")
    for fn in (sslkernels.rankme, sslkernels.effective_rank, sslkernels.nesum, sslkernels.alpha_req):
        with pytest.raises(ValueError, match="`Z` contains NaN or Inf"):
            fn(Z) if fn is not sslkernels.alpha_req else fn(Z, fit_range=(1, 5))
