"""Measuring code shared by the ``sslkernels bench`` CLI and ``benchmarks/``.

Three pieces, used the same way by both front ends:

* ``OPS``: the registry of benchmarked ops. Each :class:`BenchOp` names its size
  parameters, builds inputs, and gives an eager and a fused callable. A new op
  plugs in with one :func:`register_op`, and its headline case (what a plain
  ``sslkernels bench`` runs) with one line in ``HEADLINE_CASES``.
* :func:`make_pass`: turns (callable, inputs, pass) into a ``(setup, target)``
  pair. ``setup`` is never timed (it clears gradients and, for ``bwd``, runs a
  fresh forward); ``target`` is the timed region and synchronises CUDA before
  returning. ``pytest-benchmark`` gets it through ``benchmark.pedantic``, the
  CLI through :func:`time_pair`.
* :func:`measure_peak`: peak memory of one (op, sizes, impl, pass) above its
  inputs. On CUDA, ``torch.cuda.max_memory_allocated`` in this process. On CPU,
  a fresh subprocess (``python -m sslkernels._benchmark --worker SPEC``) that
  warms the op up on tiny inputs, resets the peak RSS through
  ``/proc/self/clear_refs``, runs the pass once and reads ``VmHWM``.

Nothing here imports matplotlib or tqdm: the worker subprocess stays lean.
"""
from __future__ import annotations

import gc
import hashlib
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

PASSES: Tuple[str, ...] = ("fwd", "bwd", "fwdbwd")
IMPLS: Tuple[str, ...] = ("eager", "fused")
DTYPES: Dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
MIB = float(1 << 20)


# ---------------------------------------------------------------- op registry

Sizes = Dict[str, int]


@dataclass(frozen=True)
class BenchOp:
    """One benchmarked op: how to build its inputs and its two implementations.

    ``make_inputs(sizes, dtype, device)`` returns the tensors (leaves with
    ``requires_grad=True`` where a gradient flows); ``eager(*inputs)`` and
    ``fused(*inputs)`` return a scalar loss (or any tensor: the backward pass
    calls ``out.sum().backward()`` on a non-scalar).
    """

    name: str
    params: Tuple[str, ...]                      # size parameter names, e.g. ("n", "d")
    default_sizes: Dict[str, Tuple[int, ...]]     # the whole grid: `sslkernels bench --full`, pytest benchmarks/
    quick_sizes: Dict[str, Tuple[int, ...]]       # --quick / SSLK_BENCH_QUICK grid
    make_inputs: Callable[[Sizes, torch.dtype, torch.device], Tuple[torch.Tensor, ...]]
    eager: Callable[..., torch.Tensor]
    fused: Callable[..., torch.Tensor]
    warmup_sizes: Callable[[Sizes], Sizes]        # tiny case run first in the memory worker
    shape_label: Callable[[Sizes], str]           # "N=1024 D=128"
    description: str = ""
    passes: Tuple[str, ...] = PASSES              # forward-only ops (svdvals, rankme): ("fwd",)

    def impl(self, which: str) -> Callable[..., torch.Tensor]:
        if which == "eager":
            return self.eager
        if which == "fused":
            return self.fused
        raise ValueError(f"impl must be 'eager' or 'fused', got {which!r}")

    def grid(self, overrides: Optional[Dict[str, Sequence[int]]] = None, suite: str = "full") -> List[Sizes]:
        """Cartesian product of one suite's sizes, with per-parameter overrides.

        ``suite``: "full" (``default_sizes``), "quick" (``quick_sizes``) or "headline"
        (the one case in ``HEADLINE_CASES``; an op without an entry there falls back to
        its first quick case)."""
        if suite == "headline":
            one = HEADLINE_CASES.get(self.name) or {p: self.quick_sizes[p][0] for p in self.params}
            base = {p: (one[p],) for p in self.params}
        elif suite in ("full", "quick"):
            base = self.default_sizes if suite == "full" else self.quick_sizes
        else:
            raise ValueError(f"suite must be 'full', 'quick' or 'headline', got {suite!r}")
        overrides = overrides or {}
        axes = [tuple(overrides.get(p) or base[p]) for p in self.params]
        return [dict(zip(self.params, combo)) for combo in itertools.product(*axes)]

    @property
    def headline_passes(self) -> Tuple[str, ...]:
        """The pass a headline row reports: a training step where the op has a backward."""
        return ("fwdbwd",) if "fwdbwd" in self.passes else ("fwd",)


OPS: Dict[str, BenchOp] = {}


def register_op(op: BenchOp) -> BenchOp:
    if op.name in OPS:
        raise ValueError(f"benchmark op {op.name!r} is already registered")
    OPS[op.name] = op
    return op


def get_op(name: str) -> BenchOp:
    try:
        return OPS[name]
    except KeyError:
        raise ValueError(f"unknown benchmark op {name!r}; known: {', '.join(sorted(OPS))}") from None


def _two_views(sizes: Sizes, dtype: torch.dtype, device: torch.device) -> Tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cpu").manual_seed(0)
    n, d = sizes["n"], sizes["d"]
    z1 = torch.randn(n, d, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
    z2 = (z1.float() + 0.5 * torch.randn(n, d, generator=g)).to(device=device, dtype=dtype)
    return z1.requires_grad_(True), z2.requires_grad_(True)


def _nt_xent_eager(z1, z2):
    from sslkernels.reference import nt_xent_reference

    return nt_xent_reference(z1, z2, 0.5, True)


def _nt_xent_fused(z1, z2):
    import sslkernels

    return sslkernels.nt_xent(z1, z2, temperature=0.5, normalize=True)


register_op(
    BenchOp(
        name="nt_xent",
        params=("n", "d"),
        default_sizes={"n": (1024, 4096, 8192), "d": (128, 256)},
        quick_sizes={"n": (1024,), "d": (128,)},
        make_inputs=_two_views,
        eager=_nt_xent_eager,
        fused=_nt_xent_fused,
        warmup_sizes=lambda s: {"n": 8, "d": s["d"]},
        shape_label=lambda s: f"N={s['n']} D={s['d']}",
        description="SimCLR NT-Xent, temperature 0.5, normalize=True; N rows per view",
    )
)


def _labelled_rows(sizes: Sizes, dtype: torch.dtype, device: torch.device) -> Tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cpu").manual_seed(0)
    n, d, classes = sizes["n"], sizes["d"], sizes["classes"]
    labels = torch.randint(0, classes, (n,), generator=g)
    centers = torch.randn(classes, d, generator=g)
    x = (centers[labels] + torch.randn(n, d, generator=g)).to(device=device, dtype=dtype)
    return x.requires_grad_(True), labels.to(device)


def _sup_con_eager(features, labels):
    from sslkernels.reference import sup_con_reference

    return sup_con_reference(features, labels, 0.1, True)


def _sup_con_fused(features, labels):
    import sslkernels

    return sslkernels.sup_con(features, labels, temperature=0.1, normalize=True)


register_op(
    BenchOp(
        name="sup_con",
        params=("n", "d", "classes"),
        default_sizes={"n": (4096, 8192), "d": (128,), "classes": (100,)},
        quick_sizes={"n": (1024,), "d": (128,), "classes": (100,)},
        make_inputs=_labelled_rows,
        eager=_sup_con_eager,
        fused=_sup_con_fused,
        warmup_sizes=lambda s: {"n": 8, "d": s["d"], "classes": 2},
        shape_label=lambda s: f"N={s['n']} D={s['d']} C={s['classes']}",
        description="SupCon (L_out), temperature 0.1, normalize=True; N rows, C classes",
    )
)


def _query_key_queue(sizes: Sizes, dtype: torch.dtype, device: torch.device) -> Tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cpu").manual_seed(0)
    n, d, k = sizes["n"], sizes["d"], sizes["k"]
    q = torch.randn(n, d, generator=g)
    key = q + 0.5 * torch.randn(n, d, generator=g)
    queue = torch.randn(k, d, generator=g).to(device=device, dtype=dtype)  # detached, as MoCo's
    return (q.to(device=device, dtype=dtype).requires_grad_(True),
            key.to(device=device, dtype=dtype).requires_grad_(True), queue)


def _info_nce_eager(query, key, queue):
    from sslkernels.reference import info_nce_reference

    return info_nce_reference(query, key, 0.07, queue)


def _info_nce_fused(query, key, queue):
    import sslkernels

    return sslkernels.info_nce(query, key, temperature=0.07, negatives=queue)


register_op(
    BenchOp(
        name="info_nce",
        params=("n", "d", "k"),
        default_sizes={"n": (8192,), "d": (256,), "k": (16384,)},
        quick_sizes={"n": (1024,), "d": (128,), "k": (2048,)},
        make_inputs=_query_key_queue,
        eager=_info_nce_eager,
        fused=_info_nce_fused,
        warmup_sizes=lambda s: {"n": 8, "d": s["d"], "k": 8},
        shape_label=lambda s: f"N={s['n']} D={s['d']} K={s['k']}",
        description="InfoNCE with a shared (detached) queue of K keys, temperature 0.07",
    )
)


# ---- InfoNCE for retrieval (issue 13): in-batch softmax with the -log q_j correction


def _items_with_duplicates(sizes: Sizes, dtype: torch.dtype, device: torch.device) -> Tuple[torch.Tensor, ...]:
    """Query / item embeddings of a recommender batch: item ids drawn from 4N (so about
    one in eight items repeats within the batch) and a sampling-bias correction -log q_j
    from a Zipf-like popularity."""
    g = torch.Generator(device="cpu").manual_seed(0)
    n, d = sizes["n"], sizes["d"]
    q = torch.randn(n, d, generator=g)
    item = q + 0.5 * torch.randn(n, d, generator=g)
    ids = torch.randint(0, 4 * n, (n,), generator=g)
    popularity = 1.0 / (1.0 + ids.double())
    bias = -torch.log(popularity / popularity.sum()).to(torch.float32)
    return (q.to(device=device, dtype=dtype).requires_grad_(True),
            item.to(device=device, dtype=dtype).requires_grad_(True), bias.to(device), ids.to(device))


def _info_nce_retrieval_eager(query, item, bias, ids):
    from sslkernels.reference import info_nce_reference

    return info_nce_reference(query, item, 0.05, logit_bias=bias, key_ids=ids)


def _info_nce_retrieval_fused(query, item, bias, ids):
    import sslkernels

    return sslkernels.info_nce(query, item, temperature=0.05, logit_bias=bias, key_ids=ids)


register_op(
    BenchOp(
        name="info_nce_retrieval",
        params=("n", "d"),
        default_sizes={"n": (4096, 8192), "d": (128,)},
        quick_sizes={"n": (1024,), "d": (64,)},
        make_inputs=_items_with_duplicates,
        eager=_info_nce_retrieval_eager,
        fused=_info_nce_retrieval_fused,
        warmup_sizes=lambda s: {"n": 8, "d": s["d"]},
        shape_label=lambda s: f"N={s['n']} D={s['d']}",
        description="InfoNCE with logit_bias (-log q_j) and duplicate-id masks, in-batch items, temperature 0.05",
    )
)


# ---- SigLIP's sigmoid loss (issue 13)


def _image_text_pairs(sizes: Sizes, dtype: torch.dtype, device: torch.device) -> Tuple[torch.Tensor, ...]:
    """Unit image / text rows (as open_clip's models return them), correlated pairs, and a
    learnable scale and bias at SigLIP's initialisation (scale 10, bias -10)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    n, d = sizes["n"], sizes["d"]
    image = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    text = torch.nn.functional.normalize(image + 0.8 * torch.randn(n, d, generator=g), dim=1)
    scale = torch.tensor(10.0, device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True)
    return (image.to(device=device, dtype=dtype).requires_grad_(True),
            text.to(device=device, dtype=dtype).requires_grad_(True), scale, bias)


def _siglip_eager(image, text, scale, bias):
    from sslkernels.reference import siglip_reference

    return siglip_reference(image, text, scale, bias)


def _siglip_fused(image, text, scale, bias):
    import sslkernels

    return sslkernels.siglip_loss(image, text, scale, bias)


register_op(
    BenchOp(
        name="siglip",
        params=("n", "d"),
        default_sizes={"n": (8192,), "d": (256,)},
        quick_sizes={"n": (1024,), "d": (128,)},
        make_inputs=_image_text_pairs,
        eager=_siglip_eager,
        fused=_siglip_fused,
        warmup_sizes=lambda s: {"n": 8, "d": s["d"]},
        shape_label=lambda s: f"N={s['n']} D={s['d']}",
        description="SigLIP sigmoid loss (open_clip SigLipLoss), learnable scale 10 and bias -10",
    )
)



# ---- attention over kept patches / packed sequences


def _kept_patches(sizes: Sizes, dtype: torch.dtype, device: torch.device) -> Tuple[torch.Tensor, ...]:
    """q, k, v [B, L, H, Dh] and each sample's kept positions, in raster order as the
    I-JEPA collator's nonzero() gives them, padded with -1 to the longest: counts drawn
    uniformly from [lo, hi] with a fixed seed."""
    g = torch.Generator(device="cpu").manual_seed(0)
    b, length, h, dh = sizes["b"], sizes["l"], sizes["h"], sizes["dh"]
    lo, hi = min(sizes["lo"], length), min(sizes["hi"], length)
    counts = torch.randint(lo, hi + 1, (b,), generator=g).tolist()
    index = torch.full((b, max(counts)), -1, dtype=torch.int64)
    for i, c in enumerate(counts):
        index[i, :c] = torch.randperm(length, generator=g)[:c].sort().values
    q, k, v = (torch.randn(b, length, h, dh, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
               for _ in range(3))
    return q, k, v, index.to(device)


def _masked_patch_attention_eager(q, k, v, index):
    from sslkernels.reference import masked_patch_attention_reference

    return masked_patch_attention_reference(q, k, v, index)


def _masked_patch_attention_fused(q, k, v, index):
    import sslkernels

    return sslkernels.masked_patch_attention(q, k, v, index)


register_op(
    BenchOp(
        name="masked_patch_attention",
        params=("b", "l", "h", "dh", "lo", "hi"),
        default_sizes={"b": (32,), "l": (196,), "h": (12,), "dh": (64,), "lo": (78,), "hi": (196,)},
        quick_sizes={"b": (8,), "l": (196,), "h": (12,), "dh": (64,), "lo": (78,), "hi": (196,)},
        make_inputs=_kept_patches,
        eager=_masked_patch_attention_eager,
        fused=_masked_patch_attention_fused,
        warmup_sizes=lambda s: {**s, "b": 2, "l": 8, "lo": 3, "hi": 8},
        shape_label=lambda s: f"B={s['b']} L={s['l']} H={s['h']} Dh={s['dh']} kept~U[{s['lo']},{s['hi']}]",
        description="attention among each sample's kept patches (I-JEPA context: ViT-B/16 heads, "
                    "kept counts uniform in [lo, hi]); eager = gather, pad to the longest, bool key "
                    "mask, F.scaled_dot_product_attention",
    )
)


def _packed_equal(sizes: Sizes, dtype: torch.dtype, device: torch.device) -> Tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cpu").manual_seed(0)
    b, n, h, dh = sizes["b"], sizes["tokens"], sizes["h"], sizes["dh"]
    q, k, v = (torch.randn(b * n, h, dh, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
               for _ in range(3))
    cu_seqlens = torch.arange(0, (b + 1) * n, n, dtype=torch.int32, device=device)
    return q, k, v, cu_seqlens


def _varlen_attention_eager(q, k, v, cu_seqlens):
    from sslkernels.reference import dense_attention_reference

    return dense_attention_reference(q, k, v, cu_seqlens.shape[0] - 1)


def _varlen_attention_fused(q, k, v, cu_seqlens):
    import sslkernels

    return sslkernels.varlen_attention(q, k, v, cu_seqlens, q.shape[0] // (cu_seqlens.shape[0] - 1))


register_op(
    BenchOp(
        name="varlen_attention",
        params=("b", "tokens", "h", "dh"),   # not "n": --n means rows per view of the losses
        default_sizes={"b": (32,), "tokens": (147,), "h": (12,), "dh": (64,)},
        quick_sizes={"b": (8,), "tokens": (147,), "h": (12,), "dh": (64,)},
        make_inputs=_packed_equal,
        eager=_varlen_attention_eager,
        fused=_varlen_attention_fused,
        warmup_sizes=lambda s: {**s, "b": 2, "tokens": 5},
        shape_label=lambda s: f"B={s['b']} n={s['tokens']} H={s['h']} Dh={s['dh']}",
        description="packed equal-length sequences; eager = F.scaled_dot_product_attention on the "
                    "dense [B, H, n, Dh] views of the same tensors",
    )
)


# ---- singular values (forward only: sslkernels.svdvals has no backward)


def _small_matrices(sizes: Sizes, dtype: torch.dtype, device: torch.device) -> Tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(sizes["b"], sizes["n"], sizes["n"], generator=g)
    return (a.to(device=device, dtype=dtype),)


def _svdvals_eager(a):
    # torch.linalg.svdvals takes float32/float64 only: half inputs are upcast, as users do.
    return torch.linalg.svdvals(a if a.dtype in (torch.float32, torch.float64) else a.float())


def _svdvals_fused(a):
    import sslkernels

    return sslkernels.svdvals(a)


register_op(
    BenchOp(
        name="svdvals",
        params=("b", "n"),
        default_sizes={"b": (512, 4096), "n": (32, 128)},
        quick_sizes={"b": (512,), "n": (32,)},
        make_inputs=_small_matrices,
        eager=_svdvals_eager,
        fused=_svdvals_fused,
        warmup_sizes=lambda s: {"b": 2, "n": s["n"]},
        shape_label=lambda s: f"B={s['b']} {s['n']}x{s['n']}",
        description="singular values of B square Gaussian matrices (forward only)",
        passes=("fwd",),
    )
)


def _embeddings_of_rank(sizes: Sizes, dtype: torch.dtype, device: torch.device) -> Tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cpu").manual_seed(0)
    n, d, r = sizes["n"], sizes["d"], sizes["rank"]
    if r >= min(n, d):
        z = torch.randn(n, d, generator=g)                       # full rank
    else:                                                        # a collapsed embedding
        z = torch.randn(n, r, generator=g) @ torch.randn(r, d, generator=g) / r ** 0.5
    return (z.to(device=device, dtype=dtype),)


def _rankme_eager(z):
    from sslkernels.reference import rankme_reference

    return rankme_reference(z if z.dtype in (torch.float32, torch.float64) else z.float())


def _rankme_fused(z):
    import sslkernels

    return sslkernels.rankme(z)


register_op(
    BenchOp(
        name="rankme",
        params=("n", "d", "rank"),
        default_sizes={"n": (25600,), "d": (2048,), "rank": (2048, 10)},
        quick_sizes={"n": (4096,), "d": (256,), "rank": (256,)},
        make_inputs=_embeddings_of_rank,
        eager=_rankme_eager,
        fused=_rankme_fused,
        warmup_sizes=lambda s: {"n": 64, "d": 16, "rank": 16},
        shape_label=lambda s: f"N={s['n']} D={s['d']} rank={min(s['rank'], s['n'], s['d'])}",
        description="RankMe (paper's definition) of an N x D embedding of the given rank (forward only)",
        passes=("fwd",),
    )
)

def _projections_and_directions(sizes: Sizes, dtype: torch.dtype, device: torch.device) -> Tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cpu").manual_seed(0)
    n, d, s = sizes["n"], sizes["d"], sizes["s"]
    proj = torch.randn(n, d, generator=g).to(device=device, dtype=dtype)
    directions = torch.randn(d, s, generator=g)
    directions = (directions / directions.norm(dim=0)).to(device=device, dtype=dtype)
    return proj.requires_grad_(True), directions  # nn.SIGReg samples the directions: no gradient


def _sigreg_eager(proj, directions):
    from sslkernels.reference import sigreg_reference

    return sigreg_reference(proj, directions, 17, 3.0)


def _sigreg_fused(proj, directions):
    import sslkernels

    return sslkernels.sigreg(proj, directions, knots=17, t_max=3.0)

def _koleo_rows(sizes: Sizes, dtype: torch.dtype, device: torch.device) -> Tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(sizes["n"], sizes["d"], generator=g, dtype=torch.float32)
    return (x.to(device=device, dtype=dtype).requires_grad_(True),)


def _koleo_eager(x):
    from sslkernels.reference import koleo_reference

    return koleo_reference(x)  # lightly's: normalize, x @ x.T, diagonal out, argmax, PairwiseDistance


def _koleo_fused(x):
    import sslkernels

    return sslkernels.koleo(x)


register_op(
    BenchOp(
        name="sigreg",
        params=("n", "d", "s"),
        default_sizes={"n": (4096,), "d": (512,), "s": (1024,)},
        quick_sizes={"n": (1024,), "d": (128,), "s": (256,)},
        make_inputs=_projections_and_directions,
        eager=_sigreg_eager,
        fused=_sigreg_fused,
        warmup_sizes=lambda s: {"n": 8, "d": s["d"], "s": 8},
        shape_label=lambda s: f"N={s['n']} D={s['d']} S={s['s']}",
        description="LeJEPA SIGReg, 17 knots, t_max 3 (lightly's formulas); S unit directions, gradient to proj",
    )
)


register_op(
    BenchOp(
        name="koleo",
        params=("n", "d"),
        default_sizes={"n": (4096, 16384), "d": (256,)},
        quick_sizes={"n": (2048,), "d": (128,)},
        make_inputs=_koleo_rows,
        eager=_koleo_eager,
        fused=_koleo_fused,
        warmup_sizes=lambda s: {"n": 8, "d": s["d"]},
        shape_label=lambda s: f"N={s['n']} D={s['d']}",
        description="KoLeo (lightly / DINOv2), eps 1e-8, topk 1, whole batch",
    )
)

# ---------------------------------------------------------------- the default suite

# What a plain `sslkernels bench` (and scripts/bench.sh) runs: one headline case per op,
# the shapes benchmarks/RESULTS.md quotes, at the op's headline pass (fwd+bwd where it has
# a backward). A new op adds one line; an op without a line runs its first --quick case.
# Budget: the whole default suite in about 2-3 minutes on 2 idle cores, memory included.
HEADLINE_CASES: Dict[str, Sizes] = {
    "nt_xent": {"n": 8192, "d": 128},
    "sup_con": {"n": 8192, "d": 128, "classes": 100},
    "info_nce": {"n": 8192, "d": 256, "k": 16384},
    "info_nce_retrieval": {"n": 8192, "d": 128},
    "masked_patch_attention": {"b": 32, "l": 196, "h": 12, "dh": 64, "lo": 78, "hi": 196},
    "varlen_attention": {"b": 32, "tokens": 147, "h": 12, "dh": 64},
    "svdvals": {"b": 512, "n": 128},
    "rankme": {"n": 25600, "d": 2048, "rank": 2048},
}


# ---------------------------------------------------------------- passes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _backward(out: torch.Tensor) -> None:
    (out if out.dim() == 0 else out.sum()).backward()


def make_pass(
    fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], pass_: str
) -> Tuple[Callable[[], tuple], Callable[..., Optional[torch.Tensor]]]:
    """``(setup, target)`` for one pass: ``target(*setup())`` is the timed region.

    fwd:    target = forward with autograd recording; returns the detached output.
    bwd:    setup runs a fresh forward (untimed); target = ``backward()`` alone.
    fwdbwd: target = forward then backward; returns the detached output.

    ``setup`` clears the inputs' ``.grad`` (so each backward allocates its
    gradients, as a training step does) and ends synchronised; ``target`` ends
    with a CUDA synchronise, so host timers around it are exact.
    """
    if pass_ not in PASSES:
        raise ValueError(f"pass must be one of {PASSES}, got {pass_!r}")
    inputs = tuple(inputs)
    device = inputs[0].device

    def clear_grads() -> None:
        for t in inputs:
            t.grad = None

    if pass_ == "bwd":

        def setup() -> tuple:
            clear_grads()
            out = fn(*inputs)
            _sync(device)
            return (out,)

        def target(out: torch.Tensor) -> None:
            _backward(out)
            _sync(device)
            return None

    else:

        def setup() -> tuple:
            clear_grads()
            _sync(device)
            return ()

        if pass_ == "fwd":

            def target() -> torch.Tensor:
                out = fn(*inputs).detach()
                _sync(device)
                return out

        else:

            def target() -> torch.Tensor:
                out = fn(*inputs)
                _backward(out)
                _sync(device)
                return out.detach()

    return setup, target


@dataclass
class Timing:
    eager_ms: List[float] = field(default_factory=list)
    fused_ms: List[float] = field(default_factory=list)
    rel_diff: Optional[float] = None   # |fused - eager| / |eager| of the output, where the pass returns one

    @staticmethod
    def _median(xs: List[float]) -> float:
        return statistics.median(xs) if xs else float("nan")

    @property
    def eager_median(self) -> float:
        return self._median(self.eager_ms)

    @property
    def fused_median(self) -> float:
        return self._median(self.fused_ms)

    @property
    def speedup(self) -> float:
        f = self.fused_median
        return self.eager_median / f if f > 0 else float("nan")


def time_pair(op: BenchOp, inputs: Sequence[torch.Tensor], pass_: str, repeat: int, warmup: int) -> Timing:
    """Eager and fused on the same inputs: ``warmup`` untimed calls each, then
    ``repeat`` timed calls each, interleaved (order alternating per repetition)."""
    if repeat < 1:
        raise ValueError("repeat must be >= 1")
    pairs = {impl: make_pass(op.impl(impl), inputs, pass_) for impl in IMPLS}
    res = Timing()
    outs: Dict[str, Optional[torch.Tensor]] = {}

    def one(impl: str) -> float:
        setup, target = pairs[impl]
        args = setup()
        t0 = time.perf_counter()
        out = target(*args)
        t1 = time.perf_counter()
        del args
        if out is not None and impl not in outs:
            outs[impl] = out
        return (t1 - t0) * 1e3

    for _ in range(warmup):
        for impl in IMPLS:
            one(impl)
    for r in range(repeat):
        order = IMPLS if r % 2 == 0 else IMPLS[::-1]
        for impl in order:
            getattr(res, f"{impl}_ms").append(one(impl))
    for t in inputs:
        t.grad = None
    if "eager" in outs and "fused" in outs:
        e = outs["eager"].double()
        f = outs["fused"].double()
        res.rel_diff = float((f - e).abs().max() / e.abs().max().clamp_min(1e-30))
    return res


# ---------------------------------------------------------------- peak memory


@dataclass
class Peak:
    mib: Optional[float]   # peak above the inputs, MiB; None when it could not be measured
    method: str


def _proc_status_kb() -> Dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, val = line.split(":", 1)
                out[key] = int(val.split()[0])
    return out


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). True when it took effect."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    s = _proc_status_kb()
    return s["VmHWM"] - s["VmRSS"] <= 256   # kB of slack for the read itself


def _run_worker(spec: dict) -> dict:
    """Body of the memory subprocess (also callable in-process for CUDA)."""
    op = get_op(spec["op"])
    dtype = DTYPES[spec["dtype"]]
    device = torch.device(spec["device"])
    pass_ = spec["pass"]
    fn = op.impl(spec["impl"])
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))

    # Warm up on tiny inputs: library loading, thread pools and BLAS buffers
    # are not the op's memory.
    tiny = op.make_inputs(op.warmup_sizes(spec["sizes"]), dtype, device)
    for p in (q for q in ("fwdbwd", "fwd") if q in op.passes):
        setup, target = make_pass(fn, tiny, p)
        target(*setup())
    del tiny, setup, target

    inputs = op.make_inputs(spec["sizes"], dtype, device)
    setup, target = make_pass(fn, inputs, pass_)
    gc.collect()

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        args = setup()
        torch.cuda.reset_peak_memory_stats(device)
        target(*args)
        peak = torch.cuda.max_memory_allocated(device)
        return {"mib": (peak - base) / MIB, "method": "torch.cuda.max_memory_allocated"}

    if not os.path.exists("/proc/self/status"):
        args = setup()
        target(*args)
        return {"mib": None, "method": "unavailable: no /proc/self/status"}

    base = _proc_status_kb()
    args = setup()   # bwd: the untimed forward happens here, above the baseline
    reset = False if spec.get("no_reset") else _reset_peak_rss()
    hwm_before = _proc_status_kb()["VmHWM"]
    target(*args)
    hwm_after = _proc_status_kb()["VmHWM"]
    if reset:
        return {"mib": (hwm_after - base["VmRSS"]) / 1024.0, "method": "VmHWM-after-clear_refs"}
    # No reset: VmHWM = max(earlier peak, peak of this pass). Only when it rose
    # during the pass is it this pass's peak; otherwise we report nothing.
    if hwm_after > hwm_before:
        return {"mib": (hwm_after - base["VmRSS"]) / 1024.0, "method": "VmHWM-no-reset"}
    return {"mib": None, "method": "unavailable: clear_refs not writable and VmHWM did not rise"}


def measure_peak(
    op: BenchOp,
    sizes: Sizes,
    dtype: str,
    impl: str,
    pass_: str,
    device: str = "cpu",
    threads: Optional[int] = None,
    timeout: float = 900.0,
    no_reset: bool = False,
) -> Peak:
    """Peak memory of one pass above its inputs. CPU: a fresh subprocess; CUDA: in process."""
    spec = {
        "op": op.name, "sizes": dict(sizes), "dtype": dtype, "impl": impl, "pass": pass_,
        "device": device, "threads": threads or torch.get_num_threads(), "no_reset": bool(no_reset),
    }
    if torch.device(device).type == "cuda":
        r = _run_worker(spec)
        torch.cuda.empty_cache()
        return Peak(r["mib"], r["method"])
    cmd = [sys.executable, "-m", "sslkernels._benchmark", "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Peak(None, f"error: worker timed out after {timeout:.0f} s")
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return Peak(None, f"error: worker exit {proc.returncode}: {tail[:200]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return Peak(None, "error: worker printed no result")
    r = json.loads(lines[-1])
    return Peak(r["mib"], r["method"])


def memory_ratio(eager: Peak, fused: Peak) -> Optional[float]:
    if eager.mib is None or fused.mib is None or fused.mib <= 0:
        return None
    return eager.mib / fused.mib


# ---------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info(device: str = "cpu") -> Dict[str, str]:
    """What produced the numbers: CPU, threads, library versions, GPU."""
    try:
        import triton  # noqa: F401

        triton_version = triton.__version__
    except Exception:
        triton_version = ""
    dev = torch.device(device)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else ""
    try:
        import sslkernels

        ssl_version = sslkernels.__version__
    except Exception:
        ssl_version = ""
    info = {
        "cpu_model": _cpu_model(),
        "logical_cpus": str(os.cpu_count() or ""),
        "threads": str(torch.get_num_threads()),
        "torch_version": torch.__version__,
        "triton_version": triton_version,
        "gpu_name": gpu,
        "python_version": platform.python_version(),
        "sslkernels_version": ssl_version,
        "platform": platform.platform(),
    }
    info["machine_id"] = "m-" + hashlib.sha1(json.dumps(info, sort_keys=True).encode()).hexdigest()[:8]
    return info


def source_revision() -> str:
    """``git describe``-style revision of the sslkernels source tree, "" outside a git checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "-C", here, "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return ""
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def load_average() -> Optional[float]:
    """1-minute load average (None where the OS has none): other work competing for the CPUs."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


class CpuContention:
    """CPU time that other processes used while we ran, in cores (Linux ``/proc/stat``).

    ``start()`` then ``stop()``: ``others_cores`` = (all CPUs' busy time minus this
    process's and its waited-for children's CPU time) / wall time. On an idle
    machine it is ~0; a value near 1 on a 2-core machine means half the CPUs
    were busy with other work and the timings are not to be trusted.
    """

    def __init__(self) -> None:
        self.others_cores: Optional[float] = None
        self._t0 = None

    @staticmethod
    def _busy_s() -> Optional[float]:
        try:
            with open("/proc/stat") as f:
                vals = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        busy = sum(vals[:8]) - idle   # user nice system idle iowait irq softirq steal
        return busy / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_s() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def start(self) -> "CpuContention":
        self._t0 = (time.perf_counter(), self._busy_s(), self._own_s())
        return self

    def stop(self) -> Optional[float]:
        wall0, busy0, own0 = self._t0
        busy1 = self._busy_s()
        if busy0 is None or busy1 is None:
            return None
        wall = time.perf_counter() - wall0
        others = (busy1 - busy0) - (self._own_s() - own0)
        self.others_cores = max(0.0, others / wall) if wall > 0 else None
        return self.others_cores


def describe_machine(info: Dict[str, str]) -> str:
    parts = [
        f"{info['cpu_model']} ({info['logical_cpus']} logical CPUs)",
        f"{info['threads']} torch threads",
        f"torch {info['torch_version']}",
        f"triton {info['triton_version'] or 'not installed'}",
        f"GPU {info['gpu_name'] or 'none'}",
        f"Python {info['python_version']}",
    ]
    return f"machine {info['machine_id']}: " + ", ".join(parts)


# ---------------------------------------------------------------- worker entry


def _worker_main(argv: List[str]) -> int:
    if len(argv) != 2 or argv[0] != "--worker":
        print("usage: python -m sslkernels._benchmark --worker SPEC_JSON", file=sys.stderr)
        return 2
    result = _run_worker(json.loads(argv[1]))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
