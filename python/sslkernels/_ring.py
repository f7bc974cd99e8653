"""``mode="ring"`` of :mod:`sslkernels.distributed`: the other ranks' rows visit one block at a time.

Every rank keeps its own rows as anchors. The other ranks' blocks travel round the
ring (rank r sends to r + 1 and receives from r - 1, the next block's transfer
overlapping the current block's work), so a rank holds its own rows, the block it
works on and the one in flight: O(b D) memory, never the gathered batch, and each
rank does only its own anchors' share of the (B x B) work.

Forward: the fused op on the local rows gives each anchor's log-sum-exp over the
local candidates; for each remote block, ``info_nce_forward(anchors, block)``'s lse
is the anchors' log-sum-exp over that block's rows (its "positive", block row i, is
one of the rows, so that lse is the plain block lse). The lse values are merged with
``logaddexp`` in float32 (float64 for float64 inputs); the positive logits are
O(b D) dot products.

Backward: each fused backward op, given the FINAL (merged) lse, computes the exact
softmax-weighted gradient of its block; it also adds the gradient of its own
diagonal "positive" logit with weight ``grad / rows``, which is exact for the local
call and, for a remote block, is taken back out by an O(b D) elementwise term
(dq_i += c k_i, dk_i += c q_i with c = grad / (rows t)). The temperature's gradient
comes from the anchors' gradients (``t dL/dt = -sum_i q_i . dL/dq_i``, every logit
being ``q . k / t``), not from the ops' own, which (on the Triton path) assume that
the softmax weights of one call sum to 1.
The block's gradient travels on with the block (a second ring) and arrives back at
its owner, summed over every rank, after W hops. Learnable temperatures and queues
are replicated: each rank returns its own share, which DDP averages.

SupCon's anchors need positives across ranks: the labels travel with the block and
each anchor accumulates the sum of its same-label rows and their count (O(b D) via
per-class sums), so ``loss_i = lse_i - (1 / |P_i|) z_i . sum_{p in P_i} z_p / t`` with
|P_i| counted over every rank. Its local block's "all rows but self" backward runs
through ``nt_xent_backward`` (the rows split in two views, a zero row added when
their number is odd, which adds nothing to any gradient), whose pair-positive term is
taken back out; anchors without a positive anywhere get lse = +inf, so they carry
no weight.

The features are L2-normalised outside (``F.normalize``, plain autograd; in float32
for float16 / bfloat16 input, so no accuracy is lost to rounding the unit rows) and
the ops run with ``normalize=False``. The collectives are ``batch_isend_irecv`` (Gloo and
NCCL; NCCL needs ``torch.cuda.set_device`` first, as for any NCCL p2p) plus one
scalar all-reduce per loss; every rank must call ``backward``.
"""
from __future__ import annotations

import importlib
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from sslkernels._common import stats_dtype as _stats
from sslkernels._common import torch_distributed as _dist

_FEATURES_TAG, _GRADS_TAG = 0, 1


class Ring:
    """This rank's neighbours in `group`: it sends to rank + 1 and receives from rank - 1."""

    def __init__(self, group):
        dist = _dist()
        self.group = group
        self.world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        self.next = dist.get_global_rank(group, (rank + 1) % self.world)
        self.prev = dist.get_global_rank(group, (rank - 1) % self.world)

    def post(self, tensors: Sequence[torch.Tensor], tag: int):
        """Starts sending `tensors` to the next rank and receiving same-shaped ones from the
        previous (one batch, so NCCL cannot deadlock); `wait` returns the received ones."""
        dist = _dist()
        sent = [t.contiguous() for t in tensors]
        received = [torch.empty_like(t) for t in sent]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag) for t in sent]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group, tag) for t in received]
        return dist.batch_isend_irecv(ops), sent, received

    @staticmethod
    def wait(pending) -> List[torch.Tensor]:
        works, _sent, received = pending  # `_sent` stays referenced until the sends are done
        for work in works:
            work.wait()
        return received

    def visit(self, tensors: Sequence[torch.Tensor], work) -> None:
        """Calls ``work(block)`` on the other ranks' `tensors`, one block at a time (owners
        rank - 1, rank - 2, ...); each block is passed on before it is worked on."""
        if self.world == 1:
            return
        pending = self.post(tensors, _FEATURES_TAG)
        for step in range(1, self.world):
            block = self.wait(pending)
            if step < self.world - 1:
                pending = self.post(block, _FEATURES_TAG)
            work(block)

    def visit_with_grads(self, tensors: Sequence[torch.Tensor], work) -> List[torch.Tensor]:
        """As `visit`, where ``work(block)`` returns this rank's gradients of (some of) the
        block's tensors: they travel on with the block, each rank adding its own, and the
        sums over the other ranks of the gradients of this rank's `tensors` are returned."""
        if self.world == 1:
            return None
        pending = self.post(tensors, _FEATURES_TAG)
        grads_pending = None
        for step in range(1, self.world):
            block = self.wait(pending)
            if step < self.world - 1:
                pending = self.post(block, _FEATURES_TAG)
            grads = work(block)
            if grads_pending is not None:
                grads = [a + g for a, g in zip(self.wait(grads_pending), grads)]
            grads_pending = self.post(grads, _GRADS_TAG)
        return self.wait(grads_pending)  # from rank - 1, the last to add to this rank's block


def _ops():
    importlib.import_module("sslkernels.ops.contrastive")  # registers torch.ops.sslkernels.* (once)
    return torch.ops.sslkernels


def _block_lse(anchors, block, temperature, terms=None):
    """Each anchor's log-sum-exp over the rows of `block` (same shape as `anchors`);
    `terms`: the block's retrieval terms (_BlockTerms.of)."""
    return _ops().info_nce_forward(anchors, block, None, temperature, False, False, True, False,
                                   **(terms or {}))[1]


class _BlockTerms:
    """The retrieval terms of info_nce in ring mode: each block of keys travels with its
    bias and ids (queries with their ids, in the key direction); a remote block holds no
    positive, so its diagonal is masked like any other duplicate (positive_on_diagonal
    False), and the target term stays with the local call."""

    def __init__(self, n, logit_bias, key_ids, queue_ids):
        # copies (O(N + K)): the backward reads them as the forward did, even if the
        # caller updates its tensors in place in between (eager's gradient would not change)
        logit_bias, key_ids, queue_ids = (x.clone() if x is not None else None
                                          for x in (logit_bias, key_ids, queue_ids))
        self.key_bias = logit_bias[:n].contiguous() if logit_bias is not None else None
        self.key_ids = key_ids
        self.local = dict(logit_bias=logit_bias, anchor_ids=key_ids,
                          candidate_ids=torch.cat([key_ids, queue_ids]) if queue_ids is not None else key_ids)

    def travelling(self, with_bias: bool) -> List[torch.Tensor]:
        """What travels with a block of keys (with_bias) or of queries."""
        return [t for t in (self.key_bias if with_bias else None, self.key_ids) if t is not None]

    def of(self, received: List[torch.Tensor], with_bias: bool) -> dict:
        """The op's keyword arguments for a remote block, from what travelled with it."""
        it = iter(received)
        bias = next(it) if with_bias and self.key_bias is not None else None
        ids = next(it) if self.key_ids is not None else None
        return dict(logit_bias=bias, anchor_ids=self.key_ids, candidate_ids=ids, positive_on_diagonal=False)


def _block_grads(grad, anchors, block, temperature, lse, terms=None):
    """(d anchors, d block) of ``grad * mean_i lse_i`` over the rows of `block`, given the
    final `lse`, in the statistics dtype: ``info_nce_backward`` minus its diagonal positive
    term (weight grad / rows). Its d temperature is not used: the Triton kernel's assumes
    that the softmax weights of the call sum to 1, which a block's do not (see
    `_logit_sum`)."""
    st = lse.dtype
    da, db, _, _ = _ops().info_nce_backward(grad, anchors, block, None, temperature, lse, False, False, True, False,
                                            **(terms or {}))
    c = grad.to(st) / (anchors.shape[0] * temperature.to(st))
    return da.to(st) + c * block.to(st), db.to(st) + c * anchors.to(st)


def _logit_sum(x, dx):
    """``sum_i x_i . dL/dx_i``, the temperature's gradient times -t from one call: every logit
    is ``x . y / t`` with x an anchor (or a row of the call's candidates: anything counting
    each logit once), so scaling x and t together leaves the loss unchanged and
    ``t dL/dt = -sum_i x_i . dL/dx_i``. Exact, O(b D), whatever the kernel."""
    return (x.to(dx.dtype) * dx).sum()


def _dot_rows(x, y, dtype):
    return (x.to(dtype) * y.to(dtype)).sum(dim=1)


def _same_label_sums(anchor_labels, labels, rows):
    """For each anchor: the sum of `rows` whose label equals the anchor's label, and their count.
    O((a + n) D) through per-class sums, never an (a x n) mask."""
    distinct, classes = torch.unique(torch.cat([anchor_labels, labels]), return_inverse=True)
    mine, theirs = classes[: anchor_labels.shape[0]], classes[anchor_labels.shape[0]:]
    num = distinct.numel()
    sums = rows.new_zeros((num, rows.shape[1])).index_add_(0, theirs, rows)
    return sums[mine], torch.bincount(theirs, minlength=num)[mine]


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Rows L2-normalised (``F.normalize``, plain autograd), in float32 for float16 / bfloat16
    input: rounding the unit rows to 8 bits of mantissa would cost the accuracy that the
    fused ops (which normalise inside, in float32) keep in all_gather mode."""
    return F.normalize(x.to(_stats(x.dtype)), dim=-1)


def _global_value(share: torch.Tensor, group) -> torch.Tensor:
    """`share` (this rank's share of the loss: the ranks' mean is the global loss) with the
    global loss as its value and the share's gradient (DDP's average then sums the shares')."""
    dist = _dist()
    total = share.detach().clone()
    dist.all_reduce(total, group=group)
    return share + (total / dist.get_world_size(group) - share.detach())


# ---------------------------------------------------------------- InfoNCE / CLIP


class _InfoNCE(torch.autograd.Function):
    """This rank's queries (and, symmetric, keys) as anchors; candidates: every rank's keys
    (queries) plus this rank's `negatives` (a shared queue or per-query hard negatives).
    Returns the mean over the local anchors (each direction; symmetric averages the two)."""

    @staticmethod
    def forward(ctx, ring, symmetric, terms, query, key, negatives, temperature):
        ops = _ops()
        neg_grad = negatives is not None and ctx.needs_input_grad[5]
        _, lse = ops.info_nce_forward(query, key, negatives, temperature, False, symmetric, True, neg_grad,
                                      **terms.local)
        n = query.shape[0]
        parts = [lse[:n], lse[n:]] if symmetric else [lse]

        def work(block):
            keys, queries, key_terms, query_terms = _InfoNCE.unpack(block, symmetric, terms)
            parts[0] = torch.logaddexp(parts[0], _block_lse(query, keys, temperature, key_terms))
            if symmetric:
                parts[1] = torch.logaddexp(parts[1], _block_lse(key, queries, temperature, query_terms))

        ring.visit(_InfoNCE.pack(query, key, symmetric, terms), work)
        lse = torch.cat(parts)
        positive = _dot_rows(query, key, lse.dtype) / temperature.to(lse.dtype)
        query_positive = positive + terms.key_bias.to(lse.dtype) if terms.key_bias is not None else positive
        losses = [(parts[0] - query_positive).mean()]
        if symmetric:  # the key direction has no bias
            losses.append((parts[1] - positive).mean())
        loss = sum(losses) / len(losses)
        ctx.ring, ctx.symmetric, ctx.neg_grad, ctx.terms = ring, symmetric, neg_grad, terms
        ctx.save_for_backward(query, key, negatives, temperature, lse)
        return loss.to(query.dtype)

    @staticmethod
    def pack(query, key, symmetric, terms) -> List[torch.Tensor]:
        """What travels round the ring: the keys (and queries), then their terms."""
        return [key] + ([query] if symmetric else []) + terms.travelling(True) + (
            terms.travelling(False) if symmetric else [])

    @staticmethod
    def unpack(block, symmetric, terms):
        """(keys, queries or None, the keys' op terms, the queries' op terms or None) of a block."""
        rest = block[2:] if symmetric else block[1:]
        key_part = len(terms.travelling(True))
        key_terms = terms.of(rest[:key_part], True)
        query_terms = terms.of(rest[key_part:], False) if symmetric else None
        return block[0], block[1] if symmetric else None, key_terms, query_terms

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        query, key, negatives, temperature, lse = ctx.saved_tensors
        symmetric, n, terms = ctx.symmetric, query.shape[0], ctx.terms
        dq, dk, dneg, _ = _ops().info_nce_backward(
            grad, query, key, negatives, temperature, lse, False, symmetric, True, ctx.neg_grad, **terms.local)
        st = lse.dtype
        acc = {"q": dq.to(st), "k": dk.to(st)}
        logit_sum = [_logit_sum(query, acc["q"])]  # each local logit (queue, hard negatives too) holds one query
        g_dir = grad * 0.5 if symmetric else grad  # each direction's weight

        def work(block):
            keys, queries, key_terms, query_terms = _InfoNCE.unpack(block, symmetric, terms)
            da, dkb = _block_grads(g_dir, query, keys, temperature, lse[:n], key_terms)
            acc["q"] += da
            logit_sum.append(_logit_sum(query, da))
            if not symmetric:
                return [dkb]
            da, dqb = _block_grads(g_dir, key, queries, temperature, lse[n:], query_terms)
            acc["k"] += da
            logit_sum.append(_logit_sum(key, da))
            return [dkb, dqb]

        returned = ctx.ring.visit_with_grads(_InfoNCE.pack(query, key, symmetric, terms), work)
        if returned is not None:
            acc["k"] += returned[0]
            if symmetric:
                acc["q"] += returned[1]
        need = ctx.needs_input_grad
        return (None, None, None, acc["q"].to(query.dtype) if need[3] else None,
                acc["k"].to(key.dtype) if need[4] else None,
                dneg if need[5] and ctx.neg_grad else None,
                (-sum(logit_sum) / temperature.to(st)).to(temperature.dtype) if need[6] else None)


def info_nce(query, key, temperature, negatives, symmetric: bool, normalize: bool, group,
             global_value: bool, logit_bias=None, key_ids=None, queue_ids=None) -> torch.Tensor:
    """Local anchors against every rank's candidates, ring mode; `global_value` returns the
    global loss's value (the all_gather mode's per-query hard negatives path does).
    `logit_bias` [b + K] (this rank's keys, then the queue), `key_ids` [b], `queue_ids` [K]:
    the retrieval terms of sslkernels.info_nce."""
    dtype = query.dtype
    if normalize:
        query, key = _unit(query), _unit(key)
        negatives = _unit(negatives) if negatives is not None else None
    terms = _BlockTerms(query.shape[0], logit_bias, key_ids, queue_ids)
    share = _InfoNCE.apply(Ring(group), bool(symmetric), terms, query, key, negatives, temperature).to(dtype)
    return _global_value(share, group) if global_value else share


# ---------------------------------------------------------------- NT-Xent


class _NTXent(torch.autograd.Function):
    """Anchors: this rank's 2b rows; candidates: every rank's rows of both views but the anchor.
    Returns the mean over the local anchors."""

    @staticmethod
    def forward(ctx, ring, z1, z2, temperature: float):
        _, lse, _ = _ops().nt_xent_forward(z1, z2, temperature, False)
        rows = torch.cat([z1, z2])
        t = torch.full((), temperature, dtype=torch.float64, device=z1.device)
        merged = [lse]

        def work(block):
            merged[0] = torch.logaddexp(merged[0], _block_lse(rows, block[0], t))

        ring.visit([rows], work)
        lse = merged[0]
        positive = _dot_rows(z1, z2, lse.dtype) / temperature
        loss = (lse - torch.cat([positive, positive])).mean()
        ctx.ring, ctx.temperature = ring, temperature
        ctx.save_for_backward(z1, z2, rows, t, lse)
        return loss.to(z1.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        z1, z2, rows, t, lse = ctx.saved_tensors
        dz1, dz2 = _ops().nt_xent_backward(grad, z1, z2, lse, lse[:0], ctx.temperature, False)  # no norms
        d = torch.cat([dz1, dz2]).to(lse.dtype)

        def work(block):
            da, db = _block_grads(grad, rows, block[0], t, lse)
            d.add_(da)
            return [db]

        returned = ctx.ring.visit_with_grads([rows], work)
        if returned is not None:
            d.add_(returned[0])
        n = z1.shape[0]
        return None, d[:n].to(z1.dtype), d[n:].to(z2.dtype), None


def nt_xent(z1, z2, temperature: float, normalize: bool, group) -> torch.Tensor:
    """Global NT-Xent (its value on every rank) from local anchors, ring mode."""
    dtype = z1.dtype
    if normalize:
        z1, z2 = _unit(z1), _unit(z2)
    return _global_value(_NTXent.apply(Ring(group), z1, z2, float(temperature)).to(dtype), group)


# ---------------------------------------------------------------- SupCon


class _SupCon(torch.autograd.Function):
    """Anchors: this rank's rows with a positive on some rank; candidates: every rank's rows
    but the anchor. Returns this rank's share: (W / A) times the sum of its anchors' losses,
    A the number of anchors with a positive over all ranks (0 when A = 0)."""

    @staticmethod
    def forward(ctx, ring, features, labels, temperature: float):
        ops = _ops()
        _, lse = ops.sup_con_forward(features, labels, temperature, False)
        st = lse.dtype
        f = features.to(st)
        positives, count = _same_label_sums(labels, labels, f)
        state = {"lse": lse, "pos": positives - f, "count": count - 1}  # all rows of the class but self
        t = torch.full((), temperature, dtype=torch.float64, device=features.device)

        def work(block):
            fb, lb = block
            state["lse"] = torch.logaddexp(state["lse"], _block_lse(features, fb, t))
            sums, num = _same_label_sums(labels, lb, fb.to(st))
            state["pos"] += sums
            state["count"] += num

        ring.visit([features, labels], work)
        lse, pos, count = state["lse"], state["pos"], state["count"]
        valid = count > 0
        anchors = valid.sum()
        _dist().all_reduce(anchors, group=ring.group)
        total = int(anchors)
        per_anchor = lse - (f * pos).sum(dim=1) / (temperature * count.clamp(min=1).to(st))
        share = torch.where(valid, per_anchor, torch.zeros_like(per_anchor)).sum()
        share = share * (ring.world / total) if total else share * 0
        ctx.ring, ctx.temperature, ctx.total = ring, temperature, total
        ctx.save_for_backward(features, labels, t, lse, pos, count)
        return share.to(features.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        features, labels, t, lse, pos, count = ctx.saved_tensors
        if not ctx.total:  # no anchor anywhere: zero gradients (every rank knows it: no ring)
            return None, torch.zeros_like(features), None, None
        st, temperature, n = lse.dtype, ctx.temperature, features.shape[0]
        w = grad.to(st) * (ctx.ring.world / ctx.total)  # each anchor's weight
        valid = count > 0
        lse = torch.where(valid, lse, torch.full_like(lse, float("inf")))  # no weight without positives
        f = features.to(st)
        d = _self_excluded_grads(w, features, lse, temperature)
        # positive terms: -w / |P_i| s_ip for p in P_i, on the anchors and on the positives
        u = torch.where(valid, w / count.clamp(min=1).to(st), torch.zeros_like(lse))[:, None]
        weighted = u * f
        d -= (u * pos + _same_label_sums(labels, labels, weighted)[0] - weighted) / temperature

        def work(block):
            fb, lb = block
            da, db = _block_grads(w * n, features, fb, t, lse)
            d.add_(da)
            return [db - _same_label_sums(lb, labels, weighted)[0] / temperature]

        returned = ctx.ring.visit_with_grads([features, labels], work)
        if returned is not None:
            d.add_(returned[0])
        return None, d.to(features.dtype), None, None


def _self_excluded_grads(w, features, lse, temperature: float):
    """Gradient of ``sum_i w lse_i`` over the local rows but self, given the final `lse`
    (+inf for rows without weight), through ``nt_xent_backward``: the rows split into two
    "views" (a zero row added when their number is odd: its logits are 0 and it adds
    nothing to any gradient); the op's pair-positive term is taken back out."""
    n = features.shape[0]
    rows = features
    if n % 2:
        rows = torch.cat([features, features.new_zeros((1, features.shape[1]))])
        lse = torch.cat([lse, lse.new_full((1,), float("inf"))])
    h = rows.shape[0] // 2
    z1, z2 = rows[:h], rows[h:]
    dz1, dz2 = _ops().nt_xent_backward(w * rows.shape[0], z1, z2, lse, lse[:0], temperature, False)  # no norms
    c = 2 * w / temperature  # each pair's positive logit appears once per view
    st = lse.dtype
    d = torch.cat([dz1.to(st) + c * z2.to(st), dz2.to(st) + c * z1.to(st)])
    return d[:n]


def sup_con(features, labels, temperature: float, normalize: bool, group) -> torch.Tensor:
    """Global SupCon (its value on every rank) from local anchors, ring mode."""
    dtype = features.dtype
    if normalize:
        features = _unit(features)
    return _global_value(_SupCon.apply(Ring(group), features, labels, float(temperature)).to(dtype), group)
