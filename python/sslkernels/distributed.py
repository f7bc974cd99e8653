"""Negatives from every rank of ``torch.distributed``, with exact gradients.

The contrastive losses take ``process_group=`` (functional) or ``gather_distributed`` /
``world_size`` (modules). The contract, checked by ``tests/test_distributed.py``
on 2 and 3 Gloo ranks: under DDP (which averages the ranks' gradients) the
average of the per-rank gradients equals the single-process gradient of the loss
on the concatenated batch (``cat`` over ranks in rank order, each view / input
concatenated separately).

Two modes compute the same values and the same gradients:

``mode="all_gather"`` (default):

* ``info_nce`` / ``InfoNCELoss`` / ``ClipLoss(local_loss=True, gather_with_grad=True)``
  -- **local anchors against global candidates**, one fused ``info_nce`` call per
  direction: the local queries are the anchors, the local keys stay the in-batch
  keys (positives on the diagonal) and the other ranks' keys, all-gathered with
  gradient, join the shared ``negatives``. Per-rank work O(b B D), memory O(B D).
  Each rank returns the mean over its own anchors (as open_clip's ``local_loss``);
  the ranks' sum is W times the global loss, and ``all_gather``'s backward sums
  the ranks' contributions to each slice, so the DDP average is exact.
* ``nt_xent`` / ``NTXentLoss(gather_distributed=True)``, ``sup_con`` /
  ``SupConLoss(gather_distributed=True)``, per-query hard negatives ``[N, M, D]``
  in ``info_nce`` and ``ClipLoss(local_loss=False)``: **the global loss on every
  rank**. Every rank all-gathers the batch with gradient and runs the fused op on
  all of it, so each rank does the whole (B x B) work (W times redundant; memory
  O(B D): the fused op never holds the logits). Each rank returns the global
  loss; its gradient on a local slice is W x dL/dz (every rank's identical copy
  contributes), which DDP averages back to dL/dz.
* ``info_nce(..., in_batch_negatives=False)`` has no cross-rank term: each rank
  computes its local loss (after the batch-size check).

``mode="ring"`` (Inf-CL style; :mod:`sslkernels._ring` has the details): every
rank keeps its own rows as anchors and the other ranks' blocks pass round the ring
(``batch_isend_irecv`` to rank + 1, from rank - 1, the next transfer overlapping
the current block's work). A rank holds its own rows, the block it works on and
the one in flight -- O(b D) memory, never the gathered batch -- and does only its
own anchors' share of the work, O(b B D), for every loss (no W-fold redundancy).
The forward merges per-block log-sum-exps from the fused ops; the backward calls
the fused backward ops with the final lse, takes each remote block's diagonal
"positive" term back out with an O(b D) correction, and sends the block's
gradient on round the ring, so it reaches its owner summed over every rank.
SupCon's positives are found across ranks from per-class sums of each visiting
block (labels travel with it). Each loss returns the same value as in
``all_gather`` mode (the global loss where that mode returns it, through a
scalar all-reduce; the local mean for InfoNCE / CLIP local loss), with the same
gradients. The price: each rank sends (W - 1) blocks in the forward and 2 (W - 1)
(the blocks again and their gradients) in the backward, against the all-gather's
(W - 1) and the reduce-scatter's (W - 1). Built for ``nt_xent`` / ``NTXentLoss``, ``sup_con`` / ``SupConLoss``,
``info_nce`` / ``InfoNCELoss`` (queue, per-query hard negatives, symmetric,
learnable temperature) and ``ClipLoss(gather_with_grad=True)`` (both
``local_loss`` settings). Not built (NotImplementedError): ``ClipLoss(
gather_with_grad=False, distributed_mode="ring")``, open_clip's non-exact
detached-gradient variant. On NCCL call ``torch.cuda.set_device`` first (as for
any NCCL point-to-point).

Every entry point first all-gathers the ranks' batch sizes (one small collective
on the features' device); unequal sizes raise the same ValueError on every rank
instead of hanging in the all-gather. The collectives in the backward need every
rank to call ``backward`` (as DDP does).
"""
from __future__ import annotations

from typing import List, Optional

import torch

from sslkernels import _ring
from sslkernels._common import torch_distributed as _dist
from sslkernels._validation import DISTRIBUTED_MODES as MODES  # noqa: F401  (re-exported)
from sslkernels._validation import check_distributed_mode as check_mode
from sslkernels._validation import check_process_group as resolve_group  # noqa: F401  (re-exported)
from sslkernels.ops import contrastive as _ops

RING_DETACHED_CLIP = (
    "ClipLoss(gather_with_grad=False) with distributed_mode='ring' is not built (open_clip's "
    "detached-candidates gradient); use gather_with_grad=True (exact) or distributed_mode='all_gather'"
)


def default_group():
    """The world group when torch.distributed is initialised with more than one rank, else None
    (the modules' ``gather_distributed=True`` then computes the single-process loss, as lightly's)."""
    dist = _dist()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def check_same_batch_size(rows: int, group, device: torch.device, name: str) -> None:
    """All-gathers every rank's row count (one int64 per rank, on `device`) and raises the
    same ValueError on every rank when they differ, so no rank waits in a later collective."""
    dist = _dist()
    world = dist.get_world_size(group)
    mine = torch.tensor([rows], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine, group=group)
    sizes = [int(s) for s in sizes]
    if any(s != sizes[0] for s in sizes):
        raise ValueError(
            f"`{name}` must have the same number of rows on every rank of the process group, "
            f"got {sizes} (rank order); pad or drop the last batch (e.g. DataLoader(drop_last=True))"
        )


def gather_with_grad(x: torch.Tensor, group) -> List[torch.Tensor]:
    """Every rank's `x`, in rank order; the backward sums the ranks' gradients of each slice
    back to its owner (``torch.distributed.nn.functional.all_gather``)."""
    import warnings

    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():
        # torch >= 2.13 flags it deprecated in favour of private functional collectives whose
        # names differ between torch releases; it is public, works on Gloo and NCCL, and its
        # backward is the reduce-scatter (sum) this contract needs.
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)
        return list(all_gather(x, group=group))


def gather_no_grad(x: torch.Tensor, group) -> List[torch.Tensor]:
    """Every rank's `x` without gradient, except this rank's own slot, which is `x` itself
    (so its local gradient still flows, as open_clip's ``gather_with_grad=False``)."""
    dist = _dist()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.detach().contiguous(), group=group)
    parts[dist.get_rank(group)] = x
    return parts


def _others(parts: List[torch.Tensor], group) -> List[torch.Tensor]:
    rank = _dist().get_rank(group)
    return [p for i, p in enumerate(parts) if i != rank]


# ---------------------------------------------------------------- losses


def _wide(*tensors):
    """float16 / bfloat16 tensors as float32 (others unchanged) for the all-gather path.

    A cross-rank gradient is a sum of per-rank terms that largely cancel (softmax
    weights against the positive); summed in half precision (the all-gather's
    reduce-scatter, the fused ops' half outputs) they lost ~6 % of float16's result on
    symmetric InfoNCE. In float32 the sum keeps the fused ops' accuracy, and the
    gradient is rounded to half once, at the input. Costs 2x the gathered bytes.
    """
    return [t.float() if t is not None and t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors]


def _cat(x: torch.Tensor, group, with_grad: bool = True) -> torch.Tensor:
    """The concatenated batch: every rank's `x` in rank order."""
    return torch.cat(gather_with_grad(x, group) if with_grad else gather_no_grad(x, group))


def nt_xent(z1, z2, temperature: float, normalize: bool, group, mode: str) -> torch.Tensor:
    """Global NT-Xent over every rank's rows on every rank (see the module docstring).
    The arguments are validated by the caller (`sslkernels.nt_xent`)."""
    check_same_batch_size(z1.shape[0], group, z1.device, "z1")
    if mode == "ring":
        return _ring.nt_xent(z1, z2, temperature, normalize, group)
    dtype = z1.dtype
    z1, z2 = _wide(z1, z2)
    return _ops.nt_xent_loss(_cat(z1, group), _cat(z2, group), temperature, normalize=normalize).to(dtype)


def sup_con(features, labels, temperature: float, normalize: bool, group, mode: str) -> torch.Tensor:
    """Global SupCon over every rank's rows and labels on every rank (see the module docstring).
    The arguments are validated by the caller (`sslkernels.sup_con`)."""
    check_same_batch_size(features.shape[0], group, features.device, "features")
    if mode == "ring":
        return _ring.sup_con(features, labels, temperature, normalize, group)
    dtype = features.dtype
    (features,) = _wide(features)
    return _ops.sup_con_loss(_cat(features, group), _cat(labels, group, with_grad=False), temperature,
                             normalize=normalize).to(dtype)


def _one_direction(query, key, temperature, remote_keys, shared, normalize, terms=None):
    """Local queries against [local keys | remote keys | shared queue], one fused call;
    `terms` (_GatheredTerms.direction) the retrieval terms of those candidates."""
    extra = list(remote_keys) + ([shared] if shared is not None else [])
    negatives = torch.cat(extra) if extra else None
    return _info_nce(query, key, negatives, temperature, normalize=normalize, symmetric=False, **(terms or {}))


def _info_nce(query, key, negatives, temperature, *, normalize, symmetric, in_batch_negatives=True, **terms):
    """The ops layer's InfoNCE; `negatives` get a gradient when they require one; `terms`:
    logit_bias, key_ids, queue_ids."""
    return _ops.info_nce_loss(query, key, negatives, temperature, normalize=normalize, symmetric=symmetric,
                              in_batch_negatives=in_batch_negatives,
                              negatives_grad=negatives is not None and negatives.requires_grad, **terms)


class _GatheredTerms:
    """info_nce's retrieval terms in all_gather mode: the other ranks' keys join as extra
    negatives ahead of the queue, and their biases and ids (gathered, no gradient) join
    the queue's in the same order."""

    def __init__(self, n, logit_bias, key_ids, queue_ids, group):
        self.key_bias = logit_bias[:n] if logit_bias is not None else None
        self.queue_bias = logit_bias[n:] if logit_bias is not None else None
        self.key_ids, self.queue_ids = key_ids, queue_ids
        self.remote_bias = _others(gather_no_grad(self.key_bias.contiguous(), group), group) \
            if logit_bias is not None else []
        self.remote_ids = _others(gather_no_grad(key_ids, group), group) if key_ids is not None else []

    def direction(self, with_bias: bool, with_queue: bool) -> dict:
        """Terms of [local | remote | queue (with_queue)] candidates; the key direction has no bias."""
        bias = None
        if with_bias and self.key_bias is not None:
            bias = torch.cat([self.key_bias, *self.remote_bias] + ([self.queue_bias] if with_queue else []))
        extra_ids = None
        if self.key_ids is not None:
            parts = self.remote_ids + ([self.queue_ids] if with_queue and self.queue_ids is not None else [])
            extra_ids = torch.cat(parts) if parts else None
        return dict(logit_bias=bias, key_ids=self.key_ids, queue_ids=extra_ids)


def info_nce(query, key, temperature, negatives: Optional[torch.Tensor], symmetric: bool, normalize: bool,
             in_batch_negatives: bool, group, mode: str, logit_bias=None, key_ids=None,
             queue_ids=None) -> torch.Tensor:
    """InfoNCE / CLIP with every rank's keys (and, symmetric, queries) as candidates.

    Local anchors (mean over this rank's queries) unless `negatives` are per-query
    hard negatives [N, M, D], which take the global path in all_gather mode (every
    rank computes the loss on the gathered batch and returns the global mean; ring
    mode keeps local anchors and returns the same global value). A shared queue
    [K, D] must be the same on every rank (as MoCo's, filled from gathered keys).
    The arguments are validated by the caller (`sslkernels.info_nce`): `temperature` is
    a 0-dim tensor and empty `negatives` are None. The retrieval terms are this rank's:
    `logit_bias` [b + K] (its keys, then the queue), `key_ids` [b], `queue_ids` [K]
    (never with per-query negatives).
    """
    check_same_batch_size(query.shape[0], group, query.device, "query")
    terms = dict(logit_bias=logit_bias, key_ids=key_ids, queue_ids=queue_ids)
    if not in_batch_negatives:  # own key + queue: nothing crosses ranks
        return _info_nce(query, key, negatives, temperature, normalize=normalize, symmetric=symmetric,
                         in_batch_negatives=False, **terms)
    per_query = negatives is not None and negatives.dim() == 3
    if mode == "ring":
        return _ring.info_nce(query, key, temperature, negatives, symmetric, normalize, group,
                              global_value=per_query, **terms)
    dtype = query.dtype
    gathered = None
    if logit_bias is not None or key_ids is not None:
        gathered = _GatheredTerms(query.shape[0], logit_bias, key_ids, queue_ids, group)
    return _info_nce_all_gather(*_wide(query, key, negatives), temperature, symmetric, normalize,
                                per_query, group, gathered).to(dtype)


def _info_nce_all_gather(query, key, negatives, temperature, symmetric, normalize, per_query, group, terms=None):
    if per_query:
        all_n = _cat(negatives, group, with_grad=negatives.requires_grad)
        return _info_nce(_cat(query, group), _cat(key, group), all_n, temperature, normalize=normalize,
                         symmetric=symmetric)
    remote_k = _others(gather_with_grad(key, group), group)
    loss = _one_direction(query, key, temperature, remote_k, negatives, normalize,
                          terms.direction(True, True) if terms is not None else None)
    if not symmetric:
        return loss
    remote_q = _others(gather_with_grad(query, group), group)
    return 0.5 * (loss + _one_direction(key, query, temperature, remote_q, None, normalize,
                                        terms.direction(False, False) if terms is not None else None))


def clip(image, text, temperature, group, local_loss: bool, gather_with_grad_: bool,
         mode: str = "all_gather") -> torch.Tensor:
    """open_clip's ClipLoss across ranks, all four (local_loss, gather_with_grad) settings.

    ``gather_with_grad=False`` gathers the features without gradient, exactly as
    open_clip does: with ``local_loss=False`` this rank's own slice keeps its
    gradient; with ``local_loss=True`` only the anchors (the queries) get one, the
    candidates (this rank's included) are detached. Either way it is not the
    gradient of the global loss (the cross-rank terms are dropped).
    ``mode="ring"`` is built for ``gather_with_grad=True`` (symmetric ring InfoNCE).
    The features are validated by the caller (`sslkernels.nn.ClipLoss`); `temperature`
    is a 0-dim tensor.
    """
    check_mode(mode)
    if mode == "ring" and not gather_with_grad_:
        raise NotImplementedError(RING_DETACHED_CLIP)
    check_same_batch_size(image.shape[0], group, image.device, "image_features")
    if mode == "ring":
        return _ring.info_nce(image, text, temperature, None, True, False, group, global_value=not local_loss)
    dtype = image.dtype
    return _clip_all_gather(*_wide(image, text), temperature, group, local_loss, gather_with_grad_).to(dtype)


def _clip_all_gather(image, text, temperature, group, local_loss, gather_with_grad_):
    if local_loss:
        if gather_with_grad_:
            remote_txt = _others(gather_with_grad(text, group), group)
            remote_img = _others(gather_with_grad(image, group), group)
            cand_txt, cand_img = text, image
        else:
            remote_txt = _others(gather_no_grad(text.detach(), group), group)
            remote_img = _others(gather_no_grad(image.detach(), group), group)
            cand_txt, cand_img = text.detach(), image.detach()
        i2t = _one_direction(image, cand_txt, temperature, remote_txt, None, False)
        t2i = _one_direction(text, cand_img, temperature, remote_img, None, False)
        return 0.5 * (i2t + t2i)
    return _info_nce(_cat(image, group, gather_with_grad_), _cat(text, group, gather_with_grad_), None,
                     temperature, normalize=False, symmetric=True)


# ---------------------------------------------------------------- sigreg


def all_reduce_with_grad(x: torch.Tensor, group) -> torch.Tensor:
    """Sum of `x` over the ranks; the backward sums the ranks' gradients
    (``torch.distributed.nn.functional.all_reduce``)."""
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(x, group=group)


def sigreg(proj: torch.Tensor, directions: torch.Tensor, knots: int, t_max: float, group) -> torch.Tensor:
    """SIGReg over every rank's rows (lightly's ``gather_distributed``): the per-rank cos /
    sin statistics and row counts are summed across ranks, and every rank returns the
    global loss. Its gradient on a rank's rows is W x dL/dproj (every rank's identical
    loss contributes through the all-reduce's backward), which DDP averages back to
    dL/dproj, as for the other global losses above."""
    from sslkernels.ops import sigreg as ops

    cos_sum, sin_sum = ops.sigreg_stats(proj, directions, knots, t_max)
    cos_sum = all_reduce_with_grad(cos_sum, group)
    sin_sum = all_reduce_with_grad(sin_sum, group)
    num_samples = torch.tensor(float(proj.shape[1]), dtype=cos_sum.dtype, device=cos_sum.device)
    _dist().all_reduce(num_samples, group=group)
    return ops.loss_from_stats(cos_sum, sin_sum, num_samples, knots, t_max).to(proj.dtype)


# ---------------------------------------------------------------- the monitor's rows


class RowGatherer:
    """Gathers the rows that each rank's monitor buffered (:class:`sslkernels.monitor.RowRing`;
    ranks may hold different numbers of rows) for one evaluation.

    Every rank exchanges ``(rows held, D, capacity)`` as host integers over a CPU (gloo)
    group, so the accelerator stream is not touched; then ``all_gather`` (or ``gather``
    to rank 0 under ``rank_zero_only``) sends each rank's first ``max(rows held)`` rows,
    and every receiver trims each rank's block to the rows it really holds. Every check
    sees the same metadata on every rank, so a mismatch raises on all ranks alike
    (before any large transfer: nothing hangs). Without a gloo group for the metadata
    (no gloo in the build, or a custom ``process_group`` on NCCL) it travels on the
    device, at the cost of one more sync.
    """

    def __init__(self, process_group=None) -> None:
        self.process_group = process_group
        self.meta_group = None  # None: not tried yet; False: none can be made

    def exchange_meta(self, d, local: List[int], device: Optional[torch.device]) -> List[List[int]]:
        """All ranks' ``local`` host ints, without touching the accelerator stream when possible."""
        backend = d.get_backend(self.process_group)
        world = d.get_world_size(self.process_group)
        if "gloo" in backend:  # "gloo", or "cpu:gloo,cuda:nccl": CPU tensors travel on this group
            group = self.process_group
        else:
            # A CPU (gloo) twin of the default group carries the metadata. new_group() must be
            # entered by every rank of the default group, so a custom process_group (whose
            # non-members never get here) sends its metadata on the device instead.
            if self.meta_group is None:
                self.meta_group = False
                if self.process_group is None:
                    try:
                        self.meta_group = d.new_group(backend="gloo")
                    except Exception:  # noqa: BLE001  (no gloo in this build)
                        self.meta_group = False
            group = self.meta_group if self.meta_group is not False else None
        if group is None and "gloo" not in backend:  # metadata on the device: one more sync
            device = device or (torch.device("cuda", torch.cuda.current_device())
                                if "nccl" in backend else torch.device("cpu"))
            t = torch.tensor(local, dtype=torch.int64, device=device)
            out = [torch.empty_like(t) for _ in range(world)]
            d.all_gather(out, t, group=self.process_group)
            return torch.stack(out).tolist()
        t = torch.tensor(local, dtype=torch.int64)
        out = [torch.empty_like(t) for _ in range(world)]
        d.all_gather(out, t, group=group)
        return [o.tolist() for o in out]

    def gather(self, d, ring, max_samples: int, rank_zero_only: bool):
        """(every rank's rows [N <= max_samples, D], count of non-finite rows as a device
        tensor), or None off rank 0 under `rank_zero_only`. A rank that has buffered
        nothing yet allocates an empty `ring` and takes part with no rows."""
        group = self.process_group
        meta = self.exchange_meta(d, [ring.count, -1 if ring.dim is None else ring.dim, ring.capacity], ring.device)
        counts = [m[0] for m in meta]
        per_rank = {r: m[1] for r, m in enumerate(meta) if m[0] > 0}
        if len(set(per_rank.values())) > 1:
            raise ValueError(f"`embeddings` have different dims across ranks: {per_rank} (rank: dim)")
        if sum(counts) == 0:
            raise RuntimeError("RankMeMonitor.compute(): no embeddings buffered yet on any rank")
        dim = next(iter(per_rank.values()))
        rows = max(counts)
        capacities = [m[2] if m[2] > 0 else rows for m in meta]
        if rows > min(capacities):
            raise ValueError(
                f"ranks hold up to {rows} rows but the smallest buffer has {min(capacities)}: every rank "
                f"must create its monitor with the same `max_samples`")
        world = d.get_world_size(group)
        if not ring.allocated:  # this rank has seen nothing yet: take part with an empty block
            device = (torch.device("cuda", torch.cuda.current_device())
                      if "nccl" in d.get_backend(group) else torch.device("cpu"))
            ring.allocate(dim, device, max(rows, -(-max_samples // world)), fill=torch.zeros)
        rank = d.get_rank(group)
        send = ring.buf[:rows]
        bad = ring.num_nonfinite().to(torch.float32).reshape(1)
        if rank_zero_only:
            dst = 0 if group is None else d.get_global_rank(group, 0)
            blocks = [torch.empty(rows, dim, dtype=torch.float32, device=ring.device) for _ in range(world)] \
                if rank == 0 else None
            d.gather(send, blocks, dst=dst, group=group)
            d.reduce(bad, dst=dst, group=group)
            if rank != 0:
                return None
        else:
            blocks = [torch.empty(rows, dim, dtype=torch.float32, device=ring.device) for _ in range(world)]
            d.all_gather(blocks, send, group=group)
            d.all_reduce(bad, group=group)
        z = torch.cat([blk[:c] for blk, c in zip(blocks, counts) if c > 0])[:max_samples]
        return z, bad[0]


# ---------------------------------------------------------------- koleo


def koleo(x: torch.Tensor, eps: float, topk: int, group_size, group) -> torch.Tensor:
    """KoLeo with every rank's rows as candidates (DINOv3's KoLeoLossDistributed): the
    batch is all-gathered with gradient, this rank's rows are the queries, and
    ``group_size`` (None: the global batch) cuts the gathered batch into groups, each a
    whole number of ranks. Each rank returns the loss over its own rows; the DDP average
    of the ranks' gradients is the gradient of the mean of the ranks' losses."""
    from sslkernels._validation import check_koleo
    from sslkernels.ops.koleo import koleo_loss

    dist = _dist()
    rows = x.shape[0]
    check_same_batch_size(rows, group, x.device, "x")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    eps, topk, group_rows = check_koleo(x, eps, topk, group_size, batch_rows=world * rows)
    if group_rows % rows != 0:
        raise ValueError(f"`group_size` = {group_rows} must be a multiple of the per-rank batch of {rows} rows")
    (wide,) = _wide(x)
    gathered = _cat(wide, group)
    return koleo_loss(gathered, eps, topk, group_rows, query_offset=rank * rows, query_count=rows).to(x.dtype)
