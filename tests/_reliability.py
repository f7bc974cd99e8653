"""One table of the public functions for the reliability tests (properties, hostile
input, threads, determinism, leaks, environment).

A new public function joins every one of those tests with one `OpSpec` entry in
`OPS`: how to build valid inputs of given sizes, an eager reference (run in the
inputs' dtype it is the "eager" baseline, on float64 copies the oracle), a
hypothesis strategy of sizes and options, and what each tensor argument accepts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

import sslkernels
from sslkernels.reference import koleo_reference
from sslkernels.reference import (info_nce_reference, masked_patch_attention_reference, nt_xent_reference,
                                  sup_con_reference, varlen_attention_reference)
from tests._utils import logit_bound

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class Arg:
    """A tensor argument, as the hostile-input table sees it."""

    ranks: Tuple[int, ...]      # ranks the function accepts
    kind: str = "float"         # "float" (any of FLOATS) or "int" (integer ids)
    empty_dims: Tuple[int, ...] = ()  # dims that may be 0 (an empty queue, no kept patch)
    values_checked: bool = True  # NaN / Inf in it raise ValueError naming it
    more_dims_ok: bool = False   # any rank above max(ranks) is accepted too (batch dims)
    expand_ok: bool = True       # its rows may all be one row (stride 0): a valid value
    bad_dtypes: Optional[Tuple[torch.dtype, ...]] = None  # refused dtypes (None: by kind)


@dataclass(frozen=True)
class OpSpec:
    name: str
    call: Callable[..., torch.Tensor]                  # the public function, keyword arguments
    build: Callable[[dict, torch.dtype, float, int], dict]  # (sizes, dtype, scale, seed) -> tensors
    reference: Callable[..., torch.Tensor]             # eager formula, same keyword arguments
    sizes: st.SearchStrategy                           # dict of sizes for build
    options: st.SearchStrategy                         # dict of non-tensor keyword arguments
    small: dict                                        # sizes for the table-driven tests
    large: dict                                        # sizes that span several tiles / threads
    args: Dict[str, Arg]
    grads: Tuple[str, ...] = ()                        # float tensors that get a gradient
    # (label, argument, transform of its valid value) -> ValueError naming the argument
    mismatches: Tuple[Tuple[str, str, Callable], ...] = ()
    # (keyword overrides, exception type, argument the message names) for non-tensor arguments
    bad_scalars: Tuple[Tuple[dict, type, str], ...] = ()
    defaults: dict = field(default_factory=dict)       # options of the table-driven tests
    thread_bitwise: bool = False  # documented: bitwise identical for any thread count
    empty_batch_ok: bool = False  # zero rows in every tensor give an empty result, not an error
    dtypes: Tuple[torch.dtype, ...] = FLOATS
    # Size of the terms a scalar output is a difference of, (float64 tensors, options,
    # "output") -> float: the rounding floor of the tolerance rule scales with it (a loss
    # that cancels to ~0 still carries the rounding of logits of this size). Gradients and
    # other tensors get a floor relative to their own scale only.
    magnitude: Optional[Callable[[dict, dict, str], float]] = None
    # Accuracy that replaces the floor when larger, (output dtype, float64 reference, float64
    # tensors, options) -> float: where float64 eager is the oracle itself, what the function
    # documents (svdvals' float64 Gram route: 1e-8 * sigma_max) or its conditioning allows.
    promised: Optional[Callable[[torch.dtype, torch.Tensor, dict, dict], float]] = None

    def inputs(self, dtype=torch.float32, seed=0, scale=1.0, sizes=None) -> dict:
        return self.build(dict(self.small if sizes is None else sizes), dtype, scale, seed)

    def run(self, tensors: dict, options: Optional[dict] = None):
        return self.call(**tensors, **(self.defaults if options is None else options))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen, *shape, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


# Row counts at and just above the C++ tile heights (64 / 128 / 256) and 1; odd widths.
ROWS = st.one_of(st.sampled_from([1, 2, 3, 63, 64, 65, 129, 257]), st.integers(1, 40))
COLS = st.one_of(st.sampled_from([1, 3, 65, 130]), st.integers(1, 24))
TEMPERATURE = st.floats(0.05, 2.0)


# ---------------------------------------------------------------- contrastive losses


def _build_nt_xent(s, dtype, scale, seed):
    g = _gen(seed)
    z1 = _randn(g, s["n"], s["d"], scale=scale, dtype=torch.float64)
    z2 = 0.6 * z1 + 0.8 * _randn(g, s["n"], s["d"], scale=scale, dtype=torch.float64)
    return {"z1": z1.to(dtype), "z2": z2.to(dtype)}


def _build_sup_con(s, dtype, scale, seed):
    g = _gen(seed)
    labels = torch.randint(0, s["classes"], (s["n"],), generator=g)
    return {"features": _randn(g, s["n"], s["d"], scale=scale, dtype=dtype), "labels": labels}


def _build_info_nce(s, dtype, scale, seed):
    g = _gen(seed)
    q = _randn(g, s["n"], s["d"], scale=scale, dtype=torch.float64)
    out = {"query": q.to(dtype), "key": (0.6 * q + 0.8 * _randn(g, s["n"], s["d"], scale=scale,
                                                              dtype=torch.float64)).to(dtype)}
    if s.get("per_query"):
        out["negatives"] = _randn(g, s["n"], s["per_query"], s["d"], scale=scale, dtype=dtype)
    elif s.get("k"):
        out["negatives"] = _randn(g, s["k"], s["d"], scale=scale, dtype=dtype)
    return out


def _logit_bound(tensors, options, what="output"):
    """Size of the logits a contrastive loss is a difference of (tests/_utils.py)."""
    return logit_bound(*tensors.values(), temperature=options.get("temperature", 1.0),
                       normalize=options.get("normalize", True))


def _contrastive_options(extra=None):
    base = {"temperature": TEMPERATURE, "normalize": st.booleans()}
    base.update(extra or {})
    return st.fixed_dictionaries(base)


def _info_nce_options():
    def fix(o):  # symmetric needs the in-batch negatives
        if o["symmetric"]:
            o["in_batch_negatives"] = True
        return o
    return _contrastive_options({"symmetric": st.booleans(), "in_batch_negatives": st.booleans()}).map(fix)


def _bad(name, *cases):
    """Bad values of one keyword argument: ((value, exception type), ...) -> table rows."""
    return tuple(({name: value}, exc, name) for value, exc in cases)


_TEMPERATURE_CASES = _bad(
    "temperature", (0.0, ValueError), (-0.5, ValueError), (float("nan"), ValueError),
    (float("inf"), ValueError), ("0.5", TypeError), (None, TypeError), (True, TypeError))


def _extra_row(x):
    return torch.cat([x, x[:1]])


def _extra_col(x):
    return torch.cat([x, x[..., :1]], dim=-1)


NT_XENT = OpSpec(
    name="nt_xent", call=sslkernels.nt_xent, build=_build_nt_xent, reference=nt_xent_reference,
    sizes=st.fixed_dictionaries({"n": ROWS, "d": COLS}), options=_contrastive_options(),
    small={"n": 7, "d": 5}, large={"n": 300, "d": 33}, defaults={"temperature": 0.5},
    args={"z1": Arg((2,)), "z2": Arg((2,))}, grads=("z1", "z2"),
    mismatches=(("one more row", "z2", _extra_row), ("one more column", "z2", _extra_col)),
    bad_scalars=_TEMPERATURE_CASES, thread_bitwise=True, magnitude=_logit_bound,
)

SUP_CON = OpSpec(
    name="sup_con", call=sslkernels.sup_con, build=_build_sup_con, reference=sup_con_reference,
    sizes=st.fixed_dictionaries({"n": ROWS, "d": COLS, "classes": st.integers(1, 9)}),
    options=_contrastive_options(), small={"n": 9, "d": 5, "classes": 3},
    large={"n": 301, "d": 20, "classes": 12}, defaults={"temperature": 0.1},
    args={"features": Arg((2,)), "labels": Arg((1,), kind="int", values_checked=False,
                                                            bad_dtypes=(torch.complex64,))},  # float / bool: labels by value (pml)
    grads=("features",),
    mismatches=(("one more label", "labels", _extra_row),),
    bad_scalars=_TEMPERATURE_CASES, thread_bitwise=True, magnitude=_logit_bound,
)

INFO_NCE = OpSpec(
    name="info_nce", call=sslkernels.info_nce, build=_build_info_nce, reference=info_nce_reference,
    sizes=st.fixed_dictionaries({"n": ROWS, "d": COLS, "k": st.sampled_from([0, 1, 5, 65]),
                                 "per_query": st.sampled_from([0, 0, 1, 3])}),
    options=_info_nce_options(), small={"n": 6, "d": 5, "k": 4},
    large={"n": 290, "d": 24, "k": 129}, defaults={"temperature": 0.1},
    args={"query": Arg((2,)), "key": Arg((2,)), "negatives": Arg((2, 3), empty_dims=(0,))},
    grads=("query", "key", "negatives"),
    mismatches=(("one more row", "key", _extra_row), ("one more column", "negatives", _extra_col),
                ("per-query negatives of another batch", "negatives", lambda x: x.expand(2, *x.shape))),
    bad_scalars=_TEMPERATURE_CASES + _bad(
        "temperature", (torch.tensor([0.1]), ValueError), (torch.tensor(1), TypeError),
        (torch.tensor(float("nan")), ValueError), (torch.tensor(-1.0), ValueError),
        (torch.tensor(0.1, device="meta"), ValueError)) + (
        ({"symmetric": True, "in_batch_negatives": False}, ValueError, "symmetric"),),
    thread_bitwise=True, magnitude=_logit_bound,
)



def _build_info_nce_terms(s, dtype, scale, seed):
    """info_nce's inputs plus its retrieval terms: a bias per candidate (keys, then the
    queue) in the inputs' dtype, and few distinct ids, so that duplicates are common."""
    out = _build_info_nce({**s, "per_query": 0}, dtype, scale, seed)
    g = _gen(seed + 1)
    n, k = s["n"], s["k"]
    out["logit_bias"] = (2 * torch.randn(n + k, generator=g, dtype=torch.float64)).to(dtype)
    out["key_ids"] = torch.randint(0, s["ids"], (n,), generator=g)
    if k:
        out["queue_ids"] = torch.randint(0, s["ids"], (k,), generator=g)
    return out


def _terms_logit_bound(tensors, options, what="output"):
    """The logits' size: the embeddings' (as info_nce's) plus the largest bias."""
    embeddings = {k: v for k, v in tensors.items() if k in ("query", "key", "negatives")}
    bias = tensors.get("logit_bias")
    return _logit_bound(embeddings, options, what) + (float(bias.double().abs().max()) if bias is not None else 0.0)


_IDS = dict(kind="int", values_checked=False, bad_dtypes=(torch.float32, torch.bool, torch.complex64))

INFO_NCE_TERMS = OpSpec(
    name="info_nce_terms", call=sslkernels.info_nce, build=_build_info_nce_terms, reference=info_nce_reference,
    sizes=st.fixed_dictionaries({"n": ROWS, "d": COLS, "k": st.sampled_from([0, 1, 5, 65]),
                                 "ids": st.integers(1, 6)}),
    options=_info_nce_options(), small={"n": 6, "d": 5, "k": 4, "ids": 3},
    large={"n": 290, "d": 24, "k": 129, "ids": 20}, defaults={"temperature": 0.1},
    # an empty queue would leave the bias K entries too long: no empty dims here
    args={"query": Arg((2,)), "key": Arg((2,)), "negatives": Arg((2,)), "logit_bias": Arg((1,)),
          "key_ids": Arg((1,), **_IDS), "queue_ids": Arg((1,), **_IDS)},
    grads=("query", "key", "negatives"),
    mismatches=(("one more bias", "logit_bias", _extra_row), ("one more id", "key_ids", _extra_row),
                ("one more queue id", "queue_ids", _extra_row)),
    bad_scalars=_TEMPERATURE_CASES, thread_bitwise=True, magnitude=_terms_logit_bound,
)


# ---------------------------------------------------------------- singular values and metrics


def _build_matrix(name):
    def build(s, dtype, scale, seed):
        g = _gen(seed)
        shape = ((s["b"],) if s.get("b") else ()) + (s["m"], s["n"])
        # singular values spread over two decades, so small ones matter
        decay = torch.logspace(0, -2, s["n"], dtype=torch.float64)
        return {name: (_randn(g, *shape, scale=scale, dtype=torch.float64) * decay).to(dtype)}
    return build


def _eager_dtype(x):  # torch.linalg has no float16 / bfloat16 kernels on the CPU
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _svdvals_eager(A):
    return torch.linalg.svdvals(A.to(_eager_dtype(A)))


def _svdvals_ex_eager(A, max_sweeps=30):
    return _svdvals_eager(A)


def _entropy_exp(w, eps):
    total = w.sum(dim=-1, keepdim=True)
    p = torch.where(total > 0, w / total.clamp_min(1e-300), torch.zeros_like(w)) + eps
    h = -torch.where(p > 0, p * torch.log(p.clamp_min(1e-300)), torch.zeros_like(p)).sum(dim=-1)
    return h, total.squeeze(-1)


def _rankme_eager(Z, eps=1e-7, center=False, squared=False, normalized=False):
    x = Z.to(_eager_dtype(Z))
    if center:
        x = x - x.mean(dim=-2, keepdim=True)
    s = torch.linalg.svdvals(x)
    h, total = _entropy_exp(s * s if squared else s, eps)
    k = min(Z.shape[-2:])
    value = (h / math.log(k) if k > 1 else torch.zeros_like(h)) if normalized else torch.exp(h)
    return torch.where(total > 0, value, torch.zeros_like(value))


def _effective_rank_eager(Z):
    h, total = _entropy_exp(torch.linalg.svdvals(Z.to(_eager_dtype(Z))), 0.0)
    return torch.where(total > 0, torch.exp(h), torch.zeros_like(h))


def _cov_eigs(Z):
    x = Z.to(_eager_dtype(Z))
    x = x - x.mean(dim=-2, keepdim=True)
    s = torch.linalg.svdvals(x)
    return s * s / max(Z.shape[-2] - 1, 1)


def _nesum_eager(Z):
    lam = _cov_eigs(Z)
    top = lam[..., 0]
    return torch.where(top > 0, lam.sum(-1) / torch.where(top > 0, top, torch.ones_like(top)), torch.zeros_like(top))


def _alpha_req_eager(Z, fit_range=(10, 100)):
    lo, hi = fit_range
    hi = min(hi, min(Z.shape[-2:]) + 1)
    lam = _cov_eigs(Z)[..., lo - 1:hi - 1]
    i = torch.arange(lo, hi, dtype=lam.dtype)
    w = (1.0 / i) / (1.0 / i).sum()
    x, y = torch.log(i), torch.log(lam.clamp_min(1e-30))
    xm, ym = (w * x).sum(), (w * y).sum(-1, keepdim=True)
    return -(w * (x - xm) * (y - ym)).sum(-1) / (w * (x - xm) ** 2).sum()


def _lidar_eager(views, delta=1e-4, eps=1e-7):
    # Whitening through eigh (as stable-ssl's callback), not the Cholesky of the fused path;
    # in float64 whatever the input, as sslkernels.lidar documents for itself.
    x = views.double()
    n, q, d = x.shape
    mu_i = x.mean(1)
    b = mu_i - mu_i.mean(0, keepdim=True)
    sigma_b = b.T @ b / (n - 1)
    w = (x - mu_i[:, None]).reshape(n * q, d)
    sigma_w = w.T @ w / (n * (q - 1)) + delta * torch.eye(d, dtype=x.dtype)
    evals, evecs = torch.linalg.eigh(sigma_w)
    inv_sqrt = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    lam = torch.linalg.eigvalsh(inv_sqrt @ sigma_b @ inv_sqrt).clamp_min(0)
    p = (lam + eps) / (lam + eps).sum()
    return torch.exp(-torch.where(p > 0, p * torch.log(p.clamp_min(1e-300)), torch.zeros_like(p)).sum())


def _lidar_promise(dtype, ref, tensors, options):
    """Both paths whiten by Sigma_w: float64 rounding times its condition number."""
    x = tensors["views"].double()
    n, q, d = x.shape
    w = (x - x.mean(1, keepdim=True)).reshape(n * q, d)
    lam = torch.linalg.eigvalsh(w.T @ w / (n * (q - 1))) + options.get("delta", 1e-4)
    return 8 * 2.0**-52 * float(lam.max() / lam.min()) * max(1.0, float(ref.abs().max()))


def _build_views(s, dtype, scale, seed):
    g = _gen(seed)
    centres = _randn(g, s["n"], 1, s["d"], scale=scale, dtype=torch.float64)
    views = centres + 0.5 * _randn(g, s["n"], s["q"], s["d"], scale=scale, dtype=torch.float64)
    return {"views": views.to(dtype)}


MATRIX_SIZES = st.fixed_dictionaries({
    "b": st.sampled_from([0, 0, 1, 3, 17]),
    # widths at the Jacobi / Gram route limits (48 float32, 128 float64) and 1
    "m": st.one_of(st.sampled_from([1, 2, 48, 49, 129, 200]), st.integers(1, 30)),
    "n": st.one_of(st.sampled_from([1, 2, 47, 48, 49, 128, 129]), st.integers(1, 30)),
})
EMBEDDING_SIZES = st.fixed_dictionaries({
    "b": st.sampled_from([0, 0, 2]),
    "m": st.one_of(st.sampled_from([1, 2, 49, 257]), st.integers(1, 60)),
    "n": st.one_of(st.sampled_from([1, 3, 48, 49]), st.integers(1, 30)),
})
# alpha-ReQ fits ranks 10..min(N, D): at least 11 columns, and N >= D + 2 so the
# centred embedding keeps full rank (log of a zero eigenvalue is noise in any dtype).
ALPHA_SIZES = st.integers(11, 40).flatmap(lambda d: st.fixed_dictionaries({
    "b": st.sampled_from([0, 2]), "n": st.just(d), "m": st.integers(d + 2, d + 120)}))

_MATRIX_ARG = {"A": Arg((2, 3, 4), more_dims_ok=True)}  # [..., m, n]
_Z_ARG = {"Z": Arg((2, 3))}

def _svdvals_promise(dtype, ref, tensors, options):
    # ops/spectral.py: the float64 Gram route (wide or tall float64 matrices) is good to
    # about 1e-8 * sigma_max; float64 LAPACK, the eager baseline, is the oracle itself.
    return 1e-8 * float(ref.abs().max()) if dtype == torch.float64 and ref.numel() else 0.0


SVDVALS = OpSpec(
    name="svdvals", call=sslkernels.svdvals, build=_build_matrix("A"), reference=_svdvals_eager,
    sizes=MATRIX_SIZES, options=st.just({}), small={"b": 3, "m": 9, "n": 5}, args=_MATRIX_ARG,
    large={"b": 37, "m": 20, "n": 17}, promised=_svdvals_promise,
    thread_bitwise=True,
)
SVDVALS_EX = OpSpec(
    name="svdvals_ex", call=lambda **kw: sslkernels.svdvals_ex(**kw)[0], build=_build_matrix("A"),
    reference=_svdvals_ex_eager, sizes=MATRIX_SIZES, options=st.fixed_dictionaries({"max_sweeps": st.just(30)}),
    small={"b": 2, "m": 6, "n": 7}, large={"b": 2, "m": 500, "n": 200}, args=_MATRIX_ARG,
    thread_bitwise=True, promised=_svdvals_promise,
    bad_scalars=_bad("max_sweeps", (0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError),
                     (2 ** 70, ValueError)),
)
_EPS_CASES = _bad("eps", (-1e-3, ValueError), (float("nan"), ValueError), ("1e-7", TypeError))
RANKME = OpSpec(
    name="rankme", call=sslkernels.rankme, build=_build_matrix("Z"), reference=_rankme_eager,
    sizes=EMBEDDING_SIZES,
    options=st.fixed_dictionaries({"eps": st.sampled_from([1e-7, 0.0, 1e-5]), "center": st.booleans(),
                                   "squared": st.booleans(), "normalized": st.booleans()}),
    small={"b": 2, "m": 20, "n": 6}, large={"b": 0, "m": 700, "n": 64}, args=_Z_ARG,
    bad_scalars=_EPS_CASES,
)
EFFECTIVE_RANK = OpSpec(
    name="effective_rank", call=sslkernels.effective_rank, build=_build_matrix("Z"),
    reference=_effective_rank_eager, sizes=EMBEDDING_SIZES, options=st.just({}),
    small={"b": 0, "m": 20, "n": 6}, large={"b": 9, "m": 100, "n": 60}, args=_Z_ARG,
)
NESUM = OpSpec(
    name="nesum", call=sslkernels.nesum, build=_build_matrix("Z"), reference=_nesum_eager,
    sizes=EMBEDDING_SIZES, options=st.just({}), small={"b": 2, "m": 20, "n": 6}, large={"b": 0, "m": 600, "n": 130},
    args=_Z_ARG,
)
ALPHA_REQ = OpSpec(
    name="alpha_req", call=sslkernels.alpha_req, build=_build_matrix("Z"), reference=_alpha_req_eager,
    sizes=ALPHA_SIZES, options=st.just({}), small={"b": 0, "m": 40, "n": 16}, large={"b": 0, "m": 800, "n": 200},
    args=_Z_ARG,
    bad_scalars=_bad("fit_range", ((0, 5), ValueError), ((-5, 100), ValueError), ((1,), TypeError),
                     ((1.5, 9), TypeError), ((12, 13), ValueError), ("10:100", TypeError)),
)
LIDAR = OpSpec(
    name="lidar", call=sslkernels.lidar, build=_build_views, reference=_lidar_eager,
    sizes=st.fixed_dictionaries({"n": st.integers(2, 30), "q": st.integers(2, 5), "d": st.integers(1, 12)}),
    options=st.fixed_dictionaries({"delta": st.sampled_from([1e-4, 1e-2]), "eps": st.sampled_from([1e-7, 0.0])}),
    small={"n": 8, "q": 3, "d": 4}, large={"n": 60, "q": 4, "d": 40}, args={"views": Arg((3,))},
    promised=_lidar_promise,
    mismatches=(("one sample", "views", lambda x: x[:1]), ("one view each", "views", lambda x: x[:, :1])),
    bad_scalars=_bad("delta", (0.0, ValueError), (-1.0, ValueError), ("x", TypeError)) + _EPS_CASES,
)

# ---------------------------------------------------------------- attention


def _build_masked(s, dtype, scale, seed):
    g = _gen(seed)
    b, length, heads, dh, kept = s["b"], s["l"], s["h"], s["dh"], s["k"]
    index = torch.full((b, kept), -1, dtype=torch.int64)
    for i in range(b):  # each sample keeps its own count (0..kept) of unique positions
        count = int(torch.randint(0, kept + 1, (1,), generator=g)) if i else kept
        index[i, :count] = torch.randperm(length, generator=g)[:count]
    qkv = {n: _randn(g, b, length, heads, dh, scale=scale, dtype=dtype) for n in ("q", "k", "v")}
    return {**qkv, "index": index}


def _build_varlen(s, dtype, scale, seed):
    g = _gen(seed)
    lengths = torch.randint(0, s["max_len"] + 1, (s["b"],), generator=g)
    lengths[0] = max(int(lengths[0]), 1)  # at least one token
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(s.get("cu_dtype", torch.int32))
    t = int(cu[-1])
    qkv = {n: _randn(g, t, s["h"], s["dh"], scale=scale, dtype=dtype) for n in ("q", "k", "v")}
    return {**qkv, "cu_seqlens": cu}


def _varlen_call(fn):
    def call(q, k, v, cu_seqlens, max_seqlen=None, **options):
        if max_seqlen is None and isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.dim() == 1 \
                and cu_seqlens.numel() > 1 and cu_seqlens.device.type == "cpu" \
                and cu_seqlens.dtype in (torch.int32, torch.int64):
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        return fn(q, k, v, cu_seqlens, 0 if max_seqlen is None else max_seqlen, **options)
    return call


def _attention_terms(tensors, options, what="output"):
    """Size of the terms attention's gradients are differences of, the floor where a
    gradient is zero up to float64 rounding (a one-token sequence: p = 1, dq = dk = 0):
    dS = p (dO.v - dO.o) times scale |k| (dq) or scale |q| (dk), dO's rows 0.75 sqrt(Dh)."""
    scale = abs(options.get("scale") or tensors["q"].shape[-1] ** -0.5)
    norm = {n: float(tensors[n].double().norm(dim=-1).max()) if tensors[n].numel() else 0.0 for n in ("q", "k", "v")}
    grad_out = 0.75 * tensors["q"].shape[-1] ** 0.5
    return grad_out * norm["v"] * scale * max(norm["q"], norm["k"])


_ATTN_OPTIONS = st.fixed_dictionaries({"scale": st.one_of(st.none(), st.floats(0.05, 2.0))})
_SCALE_CASES = _bad("scale", (float("nan"), ValueError), (float("inf"), ValueError), ("0.1", TypeError))
# NaN/Inf are checked in the rows a sample reads only (documented): the table's single
# poked element may sit in a dropped patch, so every element is poked instead (mismatches).
_QKV = {n: Arg((4,), values_checked=False) for n in ("q", "k", "v")}


def _fill(value):
    return lambda x: torch.full_like(x, value)

MASKED_PATCH_ATTENTION = OpSpec(
    name="masked_patch_attention", call=sslkernels.masked_patch_attention, build=_build_masked,
    reference=masked_patch_attention_reference,
    sizes=st.fixed_dictionaries({"b": st.integers(1, 4), "l": st.integers(1, 70), "h": st.integers(1, 3),
                                 "dh": st.sampled_from([1, 3, 16, 65])}).flatmap(
        lambda s: st.integers(1, s["l"]).map(lambda k: {**s, "k": k})),
    options=_ATTN_OPTIONS, small={"b": 3, "l": 9, "h": 2, "dh": 5, "k": 6},
    large={"b": 4, "l": 196, "h": 3, "dh": 32, "k": 150},
    args={**_QKV, "index": Arg((2,), kind="int", values_checked=False, empty_dims=(1,))}, grads=("q", "k", "v"),
    mismatches=(("other head dim", "k", _extra_col), ("one more sample", "index", _extra_row),
                ("all nan", "q", _fill(float("nan"))), ("all inf", "k", _fill(float("inf"))),
                ("all -inf", "v", _fill(-float("inf")))),
    bad_scalars=_SCALE_CASES, thread_bitwise=True, empty_batch_ok=True, magnitude=_attention_terms,
)
VARLEN_ATTENTION = OpSpec(
    name="varlen_attention", call=_varlen_call(sslkernels.varlen_attention), build=_build_varlen,
    reference=_varlen_call(varlen_attention_reference),
    sizes=st.fixed_dictionaries({"b": st.integers(1, 5), "max_len": st.sampled_from([1, 7, 64, 65, 130]),
                                 "h": st.integers(1, 3), "dh": st.sampled_from([1, 3, 16, 65]),
                                 "cu_dtype": st.sampled_from([torch.int32, torch.int64])}),
    options=_ATTN_OPTIONS, small={"b": 3, "max_len": 7, "h": 2, "dh": 5},
    large={"b": 6, "max_len": 200, "h": 2, "dh": 32},
    args={"q": Arg((3,)), "k": Arg((3,)), "v": Arg((3,)),
          "cu_seqlens": Arg((1,), kind="int", values_checked=False, expand_ok=False)},
    grads=("q", "k", "v"),
    mismatches=(("one more token", "k", _extra_row), ("other head dim", "v", _extra_col)),
    bad_scalars=_SCALE_CASES + _bad("max_seqlen", (-1, ValueError), (1, ValueError), ("7", TypeError), (2.5, TypeError)),
    thread_bitwise=True, magnitude=_attention_terms,
)

# ---------------------------------------------------------------- sigreg


def _build_sigreg(s, dtype, scale, seed):
    g = _gen(seed)
    lead = (s["b"],) if s.get("b") else ()
    directions = _randn(g, s["d"], s["s"], dtype=torch.float64)
    return {"proj": _randn(g, *lead, s["n"], s["d"], scale=scale, dtype=dtype),
            "directions": (directions / directions.norm(dim=0)).to(dtype)}


def _sigreg_reference(proj, directions, knots=17, t_max=3.0):
    from sslkernels.reference import sigreg_reference

    return sigreg_reference(proj, directions, knots, t_max)


SIGREG = OpSpec(
    name="sigreg", call=sslkernels.sigreg, build=_build_sigreg, reference=_sigreg_reference,
    sizes=st.fixed_dictionaries({"b": st.sampled_from([0, 0, 1, 3]), "n": ROWS, "d": COLS,
                                 "s": st.one_of(st.sampled_from([1, 7, 33, 257]), st.integers(1, 40))}),
    options=st.fixed_dictionaries({"knots": st.sampled_from([2, 5, 17]), "t_max": st.floats(0.5, 5.0)}),
    small={"b": 0, "n": 9, "d": 5, "s": 7}, large={"b": 2, "n": 300, "d": 33, "s": 257},
    args={"proj": Arg((2,), more_dims_ok=True), "directions": Arg((2,))}, grads=("proj", "directions"),
    mismatches=(("one more feature", "directions", _extra_row),),
    bad_scalars=_bad("knots", (1, ValueError), (0, ValueError), (2.5, TypeError), ("17", TypeError),
                     (True, TypeError)) + _bad("t_max", (0.0, ValueError), (-1.0, ValueError),
                                               (float("nan"), ValueError), (float("inf"), ValueError),
                                               ("3", TypeError)),
    thread_bitwise=True,
)

# ---------------------------------------------------------------- koleo


def _build_koleo(s, dtype, scale, seed):
    return {"x": _randn(_gen(seed), s["n"], s["d"], scale=scale, dtype=dtype)}


def _koleo_call(fn):
    """`group_parts` (tests only) cuts the batch into that many groups."""
    def call(x, eps=1e-8, topk=1, group_size=None, group_parts=None):
        if group_parts is not None and group_parts > 1:
            group_size = x.shape[0] // group_parts
        return fn(x, eps=eps, topk=topk, group_size=group_size)
    return call


KOLEO = OpSpec(
    name="koleo", call=_koleo_call(sslkernels.koleo), build=_build_koleo,
    reference=_koleo_call(koleo_reference),
    # n = 12 m: every group of 1, 2 or 3 holds at least 4 rows (> topk); 132 and 264 span tiles
    sizes=st.fixed_dictionaries({"n": st.one_of(st.sampled_from([12, 132, 264]), st.integers(1, 12).map(lambda m: 12 * m)),
                                 "d": COLS}),
    options=st.fixed_dictionaries({"topk": st.integers(1, 3), "group_parts": st.integers(1, 3),
                                   "eps": st.sampled_from([1e-8, 1e-6])}),
    small={"n": 7, "d": 5}, large={"n": 300, "d": 33}, defaults={},
    args={"x": Arg((2,))}, grads=("x",),
    bad_scalars=_bad("eps", (0.0, ValueError), (-1e-8, ValueError), (float("nan"), ValueError),
                     ("1e-8", TypeError), (True, TypeError))
    + _bad("topk", (0, ValueError), (7, ValueError), (1.5, TypeError), (True, TypeError))
    + _bad("group_size", (3, ValueError), (1, ValueError), ("7", TypeError), (7.0, TypeError)),
    thread_bitwise=True,
)


# Every public function of sslkernels that the reliability tests cover.
# ---------------------------------------------------------------- siglip (issue 13)


def _build_siglip(s, dtype, scale, seed):
    g = _gen(seed)
    image = _randn(g, s["n"], s["d"], scale=scale, dtype=torch.float64)
    text = 0.6 * image + 0.8 * _randn(g, s["n"], s["d"], scale=scale, dtype=torch.float64)
    return {"image_features": image.to(dtype), "text_features": text.to(dtype)}


def _siglip_bound(tensors, options, what="output"):
    """Size of SigLIP's intermediates: L = |scale| max|x| max|y| + |bias| bounds every logit;
    the loss sums M terms of up to L per image, a gradient row M terms of |scale| max|x| (L
    rounding of the logit behind each sigmoid) over N."""
    x, y = tensors["image_features"].double(), tensors["text_features"].double()
    nx, ny = float(x.norm(dim=1).max()), float(y.norm(dim=1).max())
    scale = abs(float(options.get("logit_scale", 1.0)))
    bias = options.get("logit_bias")
    logit = scale * nx * ny + (abs(float(bias)) if bias is not None else 0.0)
    rows = x.shape[0]
    if what == "output":
        return rows * max(1.0, logit)
    return scale * max(nx, ny) * max(1.0, logit)


SIGLIP = OpSpec(
    name="siglip_loss", call=sslkernels.siglip_loss, build=_build_siglip,
    reference=lambda image_features, text_features, logit_scale, logit_bias=None: sslkernels.reference.siglip_reference(
        image_features, text_features, logit_scale, logit_bias),
    sizes=st.fixed_dictionaries({"n": ROWS, "d": COLS}),
    options=st.fixed_dictionaries({"logit_scale": st.floats(0.5, 20.0),
                                   "logit_bias": st.one_of(st.none(), st.floats(-10.0, 5.0))}),
    small={"n": 7, "d": 5}, large={"n": 300, "d": 33}, defaults={"logit_scale": 10.0, "logit_bias": -10.0},
    args={"image_features": Arg((2,)), "text_features": Arg((2,))}, grads=("image_features", "text_features"),
    mismatches=(("one more row", "text_features", _extra_row), ("one more column", "text_features", _extra_col)),
    bad_scalars=_bad("logit_scale", (float("nan"), ValueError), (float("inf"), ValueError), ("10", TypeError),
                     (None, TypeError), (True, TypeError), (torch.ones(2), ValueError),
                     (torch.tensor(3), TypeError), (torch.tensor(float("nan")), ValueError),
                     (torch.tensor(1.0, device="meta"), ValueError))
    + _bad("logit_bias", (float("-inf"), ValueError), (True, TypeError), ("0", TypeError),
           (torch.zeros(3), ValueError), (torch.tensor(float("nan")), ValueError)),
    thread_bitwise=True, magnitude=_siglip_bound,
)


OPS = [NT_XENT, SUP_CON, INFO_NCE, INFO_NCE_TERMS, SVDVALS, SVDVALS_EX, RANKME, EFFECTIVE_RANK, NESUM, ALPHA_REQ, LIDAR,
       MASKED_PATCH_ATTENTION, VARLEN_ATTENTION, SIGREG, SIGLIP, KOLEO]
BY_NAME = {spec.name: spec for spec in OPS}
