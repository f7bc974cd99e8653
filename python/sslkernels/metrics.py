"""Label-free representation-quality metrics built on :func:`sslkernels.svdvals`.

Thin by design: validation, one ``svdvals`` call, a few torch ops on the
singular values (computed in float64: they are few). Every function accepts
float16 / bfloat16 / float32 / float64 embeddings on cpu or cuda, returns a
float32 tensor (float64 for float64 input), 0-dim for ``[N, D]`` input and ``[B]``
for ``[B, N, D]`` where batching is supported, and never returns NaN for a
finite input: a collapsed (all-zero) embedding gives 0.

Variants in circulation (see the research notes): RankMe's paper (Garrido et al.
2023) uses raw singular values of the *uncentred* embeddings, eps = 1e-7 and
exp(entropy); reptrix uses squared singular values of centred data (PCA
explained variance); sirbastiano's ``rankme`` package returns entropy / log(D);
stable-ssl uses eps = 1e-5. ``rankme``'s keyword options name each of these.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence, Tuple

import torch

from sslkernels._common import stats_dtype
from sslkernels._config import debug_enabled
from sslkernels._validation import check_finite, check_fit_range, check_matrices, check_nonnegative, check_views
from sslkernels.functional import svdvals

__all__ = ["rankme", "effective_rank", "lidar", "alpha_req", "nesum"]

#: The metrics of one ``[N, D]`` matrix (what :class:`sslkernels.RankMeMonitor` evaluates).
MONITOR_METRICS = ("rankme", "effective_rank", "nesum", "alpha_req")


def _svdvals(x: torch.Tensor, name: str) -> torch.Tensor:
    """svdvals in float64, with a NaN/Inf error that names the metric's argument."""
    try:
        return svdvals(x).double()
    except ValueError as exc:
        if "contains NaN or Inf" in str(exc):
            raise ValueError(f"`{name}` contains NaN or Inf") from exc
        raise


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    return stats_dtype(x.dtype)


def _centred(Z: torch.Tensor) -> torch.Tensor:
    x = Z.to(_out_dtype(Z))
    return x - x.mean(dim=-2, keepdim=True)


def _entropy_of(weights: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(H, total): H = -sum p log p with p = w / sum(w) + eps (0 log 0 = 0)."""
    total = weights.sum(dim=-1, keepdim=True)
    p = torch.where(total > 0, weights / torch.where(total > 0, total, torch.ones_like(total)),
                    torch.zeros_like(weights)) + eps
    plogp = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))
    return -plogp.sum(dim=-1), total.squeeze(-1)


def rankme(Z: torch.Tensor, eps: float = 1e-7, *, center: bool = False, squared: bool = False,
           normalized: bool = False) -> torch.Tensor:
    """RankMe (Garrido, Balestriero, Najman, LeCun, ICML 2023) of ``Z [N, D]`` or ``[B, N, D]``.

    Default, the paper's definition: ``sigma`` = singular values of the uncentred
    ``Z``, ``p_k = sigma_k / sum(sigma) + eps``, result ``exp(-sum_k p_k log p_k)``
    over the ``min(N, D)`` values (the paper uses 25600 embeddings). Between 1 and
    min(N, D) up to eps; an all-zero ``Z`` gives 0.

    Options for the variants in circulation:
        center: subtract the column means first (reptrix, PCA-style).
        squared: use ``sigma**2``, the PCA explained variances (reptrix).
        normalized: return the entropy divided by ``log(min(N, D))``, in [0, 1]
            (sirbastiano's ``rankme`` package; 0 when min(N, D) == 1).
    stable-ssl's callback is the default with ``eps=1e-5``.
    """
    check_matrices(Z, "Z", 2, 3)
    eps = check_nonnegative(eps, "eps")
    x = _centred(Z) if center else Z
    s = _svdvals(x, "Z")
    w = s * s if squared else s
    H, total = _entropy_of(w, eps)
    k = min(Z.shape[-2], Z.shape[-1])
    if normalized:
        value = H / math.log(k) if k > 1 else torch.zeros_like(H)
    else:
        value = torch.exp(H)
    return torch.where(total > 0, value, torch.zeros_like(value)).to(_out_dtype(Z))


def effective_rank(Z: torch.Tensor) -> torch.Tensor:
    """Effective rank (Roy & Vetterli, EUSIPCO 2007) of ``Z [N, D]`` or ``[B, N, D]``:
    ``exp(-sum p_k log p_k)``, ``p = sigma / sum(sigma)`` (no eps, 0 log 0 = 0).
    All-zero ``Z`` gives 0."""
    check_matrices(Z, "Z", 2, 3)
    s = _svdvals(Z, "Z")
    H, total = _entropy_of(s, 0.0)
    value = torch.exp(H)
    return torch.where(total > 0, value, torch.zeros_like(value)).to(_out_dtype(Z))


def _covariance_eigenvalues(Z: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of the (N-1)-normalised feature covariance, descending (float64):
    squared singular values of the centred Z."""
    n = Z.shape[-2]
    s = _svdvals(_centred(Z), "Z")
    return s * s / max(n - 1, 1)


def nesum(Z: torch.Tensor) -> torch.Tensor:
    """NESum (He & Ozay, ICML 2022): ``sum_i lambda_i / lambda_1`` over the
    eigenvalues of the feature covariance of ``Z [N, D]`` or ``[B, N, D]``
    (TF-GNN's ``numerical_rank``). A constant (zero-covariance) ``Z`` gives 0."""
    check_matrices(Z, "Z", 2, 3)
    lam = _covariance_eigenvalues(Z)
    top = lam[..., 0]
    value = lam.sum(dim=-1) / torch.where(top > 0, top, torch.ones_like(top))
    return torch.where(top > 0, value, torch.zeros_like(value)).to(_out_dtype(Z))


def alpha_req(Z: torch.Tensor, fit_range: Tuple[int, int] = (10, 100)) -> torch.Tensor:
    """alpha-ReQ (Agrawal et al., NeurIPS 2022): the power-law decay ``lambda_i ~ i^-alpha``
    of the feature-covariance eigenvalues of ``Z [N, D]`` or ``[B, N, D]``.

    Weighted least squares (weights 1/i, as reptrix) of ``log lambda_i`` against
    ``log i`` over the 1-based ranks ``fit_range[0] <= i < fit_range[1]`` (clipped to
    min(N, D)); returns ``alpha = -slope``. Eigenvalues are floored at 1e-30 before
    the log (a collapsed spectrum gives a large alpha rather than NaN).
    """
    check_matrices(Z, "Z", 2, 3)
    lo, hi = check_fit_range(fit_range, min(Z.shape[-2], Z.shape[-1]))
    lam = _covariance_eigenvalues(Z)[..., lo - 1:hi - 1]
    i = torch.arange(lo, hi, dtype=torch.float64, device=lam.device)
    x = torch.log(i)
    y = torch.log(lam.clamp_min(1e-30))
    w = 1.0 / i
    w = w / w.sum()
    xm = (w * x).sum()
    ym = (w * y).sum(dim=-1, keepdim=True)
    slope = (w * (x - xm) * (y - ym)).sum(dim=-1) / (w * (x - xm) ** 2).sum()
    return (-slope).to(_out_dtype(Z))


def lidar(views: torch.Tensor, delta: float = 1e-4, eps: float = 1e-7) -> torch.Tensor:
    """LiDAR (Thilak et al., ICLR 2024) of ``views [N, Q, D]``: N samples, Q views each.

    ``mu_i`` = mean of sample i's Q views, ``mu`` = mean of the ``mu_i``;
    ``Sigma_b = sum_i (mu_i - mu)(mu_i - mu)^T / (N - 1)`` (between samples),
    ``Sigma_w = sum_{i,j} (x_ij - mu_i)(x_ij - mu_i)^T / (N (Q - 1)) + delta I`` (within);
    with ``Sigma_w = L L^T`` (Cholesky) the eigenvalues ``lambda`` of
    ``L^-1 Sigma_b L^-T`` (those of ``Sigma_w^-1/2 Sigma_b Sigma_w^-1/2``; symmetric
    PSD, so they are its singular values) give ``p = (lambda + eps) / sum(lambda + eps)``
    and LiDAR = ``exp(-sum p log p)``. Computed in float64. Needs N >= 2, Q >= 2.

    The normalisers (N - 1, N (Q - 1)), ``delta I`` on Sigma_w and ``eps`` inside p are
    those of the paper and of stable-ssl's ``LiDAR`` callback (read 2026-11-28; it whitens
    through ``eigh`` rather than Cholesky, which gives the same eigenvalues; the test
    builds it that way). Some re-implementations put ``eps`` after the division
    (``p = lambda / sum(lambda) + eps``) or use ``delta = 1e-6``: pass ``delta`` to match.
    """
    check_views(views)
    n, q, d = views.shape
    delta = check_nonnegative(delta, "delta")
    if delta <= 0:
        raise ValueError(f"`delta` must be > 0 (it makes Sigma_w positive definite), got {delta}")
    eps = check_nonnegative(eps, "eps")
    if views.device.type == "cpu" or debug_enabled():  # before Cholesky turns NaN into a LinAlgError
        check_finite(views, "views")
    x = views.double()
    mu_i = x.mean(dim=1)                                   # [N, D]
    between = mu_i - mu_i.mean(dim=0, keepdim=True)
    sigma_b = between.T @ between / (n - 1)
    within = (x - mu_i[:, None, :]).reshape(n * q, d)
    sigma_w = within.T @ within / (n * (q - 1))
    sigma_w = sigma_w + delta * torch.eye(d, dtype=torch.float64, device=x.device)
    L = torch.linalg.cholesky(sigma_w)
    tmp = torch.linalg.solve_triangular(L, sigma_b, upper=False)          # L^-1 Sigma_b
    m = torch.linalg.solve_triangular(L, tmp.T, upper=False)              # L^-1 Sigma_b L^-T
    m = 0.5 * (m + m.T)
    lam = _svdvals(m, "views")
    p = (lam + eps) / (lam + eps).sum()
    # 0 log 0 = 0: with eps = 0 a rank-deficient Sigma_b (N - 1 < D) has zero eigenvalues
    H = -torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p)).sum()
    return torch.exp(H).to(_out_dtype(views))


def evaluate(Z: torch.Tensor, names: Sequence[str], options: Mapping[str, Mapping] = None) -> torch.Tensor:
    """The metrics ``names`` of ``Z [N, D]`` (options ``{name: {keyword: value}}``) as one
    float64 vector on Z's device: no host transfer, so a caller can copy it (and anything
    stacked with it) to the host once."""
    options = options or {}
    values = [globals()[name](Z, **options.get(name, {})).to(torch.float64).reshape(()) for name in names]
    return torch.stack(values)
