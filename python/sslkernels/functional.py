"""The documented functions: validation, then one op call. No math here."""
from __future__ import annotations

import torch

from sslkernels import _validation as v
from sslkernels.ops import attention as _attention_ops  # noqa: F401  (registers the attention ops)
from sslkernels.ops import contrastive as _contrastive_ops
from sslkernels.ops import koleo as _koleo_ops
from sslkernels.ops import siglip as _siglip_ops
from sslkernels.ops import sigreg as _sigreg_ops
from sslkernels.ops import spectral as _spectral_ops  # noqa: F401  (registers the svdvals op)
from sslkernels import _validation as _checks  # attention arguments shadow `v`


def _distributed():
    """sslkernels.distributed, imported only for a call with a process group."""
    from sslkernels import distributed

    return distributed


def nt_xent(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, normalize: bool = True,
    process_group=None, mode: str = "all_gather",
) -> torch.Tensor:
    """SimCLR NT-Xent loss over the 2N rows of ``cat(z1, z2)``, fused.

    ``s_ij = z_i . z_j / temperature`` for all ``j != i``; the positive of row ``i``
    is its other view; the loss is the mean over the 2N rows of
    ``-log softmax(s_i)[positive(i)]``, accumulated in float32 (float64 for float64
    inputs) and returned as a 0-dim tensor of the inputs' dtype. With ``normalize``
    each row is L2-normalised first (eps 1e-12, as ``F.normalize``).

    Never allocates the (2N x 2N) logits, forward or backward: autograd keeps the
    inputs and 2N log-sum-exp values.

    Args:
        z1, z2: ``[N, D]`` embeddings of the two views; same shape, dtype (float32,
            float16, bfloat16 or float64) and device (cpu or cuda). N, D >= 1.
        temperature: finite, > 0.
        normalize: L2-normalise the rows first.
        process_group: a ``torch.distributed.ProcessGroup`` (e.g. ``dist.group.WORLD``):
            the loss is NT-Xent over the rows of every rank (each rank passes its own
            ``[N, D]``, N equal on all ranks), and every rank returns that global
            loss. The DDP average of the ranks' gradients is the single-process
            gradient. See :mod:`sslkernels.distributed`.
        mode: ``"all_gather"`` (default): all-gathers the rows with gradient and runs
            the fused op on all of them (W times redundant work, O(W N D) memory);
            ``"ring"``: the other ranks' rows pass round the ring one block at a time
            and each rank computes its own anchors only (O(N D) memory, no
            redundant work); same value and gradients.
    """
    v.check_embedding_pair(z1, z2, "z1", "z2")
    temperature = v.check_temperature(temperature)
    v.check_distributed_mode(mode)
    if process_group is not None:
        return _distributed().nt_xent(z1, z2, temperature, bool(normalize), v.check_process_group(process_group),
                                      mode)
    return _contrastive_ops.nt_xent_loss(z1, z2, temperature, normalize=normalize)


def sup_con(
    features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1, normalize: bool = True,
    process_group=None, mode: str = "all_gather", reduction: str = "mean",
) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, the "L_out" form), fused.

    For anchor ``i`` with positives ``P(i) = {p != i : labels[p] == labels[i]}``:
    ``loss_i = -(1/|P(i)|) sum_{p in P(i)} log( exp(s_ip) / sum_{a != i} exp(s_ia) )``,
    ``s = z z^T / temperature`` (rows L2-normalised first when ``normalize``). The
    result is the mean over anchors with at least one positive; anchors without
    one are left out, and if none has one the loss is 0 with zero gradients.
    With one label per instance and its two views stacked this equals ``nt_xent``.

    Never allocates the (N x N) logits: autograd keeps the inputs and N floats.

    Args:
        features: ``[N, D]`` (all views stacked), float32/float16/bfloat16/float64.
        labels: ``[N]`` class labels, same device: integer, bool or floating-point, compared
            by value as pytorch-metric-learning does (NaN and complex refused).
        temperature: finite, > 0.
        process_group: a ``torch.distributed.ProcessGroup``: the loss over the rows and
            labels of every rank (same N on all ranks; positives found across ranks),
            returned by every rank. DDP-averaged gradients are the single-process
            ones. See :mod:`sslkernels.distributed`.
        mode: ``"all_gather"`` (default): the fused op on the all-gathered batch (W
            times redundant work); ``"ring"``: rows and labels pass round the ring
            one block at a time, each rank computing its own anchors (O(N D)
            memory); same value and gradients.
        reduction: ``"mean"`` (default): the mean over the anchors with a positive;
            ``"nonzero"``: pytorch-metric-learning's default (``AvgNonZeroReducer``), the
            mean over the anchors whose loss is non-zero, i.e. above the rounding level
            of the computation (a few ulps of ``1 / temperature``: an anchor whose only
            positive nearly duplicates it), 0 when none is or when the batch has no
            negative pair. Never negative. Still fused (one more O(N D) pass); the
            anchors left out keep their gradient, which is below that rounding level.
            Single process only (NotImplementedError with ``process_group``).
    """
    v.check_float_tensor(features, "features", 2)
    v.check_nonempty_rows(features, "features")
    labels = v.check_labels(labels, "labels", features.shape[0], features.device)
    temperature = v.check_temperature(temperature)
    v.check_distributed_mode(mode)
    reduction = v.check_choice(reduction, "reduction", _contrastive_ops.SUP_CON_REDUCTIONS)
    if process_group is not None:
        if reduction != "mean":
            raise NotImplementedError("sslkernels.sup_con: reduction='nonzero' is not built with a process_group "
                                      "(use reduction='mean')")
        return _distributed().sup_con(features, labels, temperature, bool(normalize),
                                      v.check_process_group(process_group), mode)
    return _contrastive_ops.sup_con_loss(features, labels, temperature, normalize=normalize, reduction=reduction)


def info_nce(
    query: torch.Tensor,
    key: torch.Tensor,
    temperature: float = 0.07,
    negatives: torch.Tensor = None,
    symmetric: bool = False,
    normalize: bool = True,
    in_batch_negatives: bool = True,
    process_group=None,
    mode: str = "all_gather",
    logit_bias: torch.Tensor = None,
    key_ids: torch.Tensor = None,
    queue_ids: torch.Tensor = None,
) -> torch.Tensor:
    """InfoNCE (MoCo / CPC) and, with ``symmetric=True``, the CLIP loss, fused.

    Row ``i`` of ``key`` is the positive of row ``i`` of ``query``; the other keys are
    its negatives, and ``negatives`` (a shared ``[K, D]`` MoCo queue, or per-query
    ``[N, M, D]`` hard negatives) join them:
    ``loss_i = -log( exp(q_i.k_i/t) / (sum_j exp(q_i.k_j/t) + sum_n exp(q_i.n/t)) )``,
    mean over the N queries, inputs L2-normalised first when ``normalize``.
    ``symmetric=True`` averages that with the key -> query loss, whose candidates are
    the queries only; one pass over the logit tiles serves both directions.
    ``in_batch_negatives=False`` leaves the other keys out of each query's
    candidates (its own key plus ``negatives`` only), as MoCo and lightly's memory
    bank do; it cannot be combined with ``symmetric``.
    ``temperature`` is a float or a 0-dim tensor; a tensor that requires grad (a
    learnable temperature, e.g. CLIP's ``1 / logit_scale.exp()``) gets its exact
    gradient.

    Never allocates the (N x (N + K)) logits: autograd keeps the inputs and N (2N)
    floats. The queue gets a gradient only if it requires one. The one-direction
    loss with in-batch keys (queue or not) computes its gradients during the
    forward when one is wanted (grad mode on and an input requiring grad), and
    autograd keeps them (N x D, float32) instead of the inputs: on the CPU every
    logit tile is then multiplied once instead of again in the backward (CUDA keeps
    its forward and backward kernels). Under ``torch.no_grad()`` only the loss is
    computed.

    ``negatives`` may instead be per-query hard negatives ``[N, M, D]``: row ``i``'s
    ``M`` negatives join query ``i``'s candidates only.

    ``process_group`` (a ``torch.distributed.ProcessGroup``): every rank's keys join
    the candidates of this rank's queries (and, symmetric, every rank's queries
    those of its keys); same N on all ranks. Each rank returns the mean over its
    own queries (open_clip's ``local_loss``), computed by one fused call per
    direction with the other ranks' keys (all-gathered with gradient) as extra
    negatives; the DDP average of the ranks' gradients (temperature included) is
    the single-process gradient on the concatenated batch. A shared queue must be
    the same on every rank. Per-query hard negatives take the global path instead
    (every rank computes and returns the loss on the whole gathered batch).
    ``in_batch_negatives=False`` has no cross-rank term (local loss). ``mode``:
    ``"all_gather"`` (default, as above) or ``"ring"``: the other ranks' keys (and
    queries) pass round the ring one block at a time instead of being all-gathered
    (O(N D) memory per rank), with the same values and gradients. See
    :mod:`sslkernels.distributed`.

    Retrieval and recommendation terms (in-batch softmax with a sampling-bias correction):

    - ``logit_bias`` ``[N + K]``, float: added to every query's logit of candidate ``j``
      (the ``N`` keys, then the ``K`` queue rows), the positive included: the
      ``-log q_j`` correction for a candidate sampled with probability ``q_j``. The key ->
      query direction of ``symmetric=True`` has no bias. A constant: one that requires grad
      raises ``NotImplementedError``.
    - ``key_ids`` ``[N]`` (and ``queue_ids`` ``[K]`` with a queue), integer: a candidate whose
      id equals the query's own key id, other than that key, is left out (a duplicate of
      the positive is not a negative). With ``symmetric=True`` a pair's id serves its query
      and its key, so the key -> query direction leaves out the same pairs.

    Both work with ``process_group`` in either mode: each rank passes the bias of its own
    keys (then the queue's, the same on every rank) and its keys' ids; they travel with the
    keys. Per-query negatives ``[N, M, D]`` take neither (``NotImplementedError``).
    """
    v.check_embedding_pair(query, key, "query", "key")
    temperature = v.temperature_tensor(temperature, query.device)
    negatives, negatives_grad = v.check_negatives(negatives, query)
    logit_bias, key_ids, queue_ids = v.check_retrieval_terms(logit_bias, key_ids, queue_ids, query, negatives)
    terms = dict(logit_bias=logit_bias, key_ids=key_ids, queue_ids=queue_ids)
    if symmetric and not in_batch_negatives:
        raise ValueError("`symmetric=True` needs `in_batch_negatives=True` (the key -> query candidates are the queries)")
    v.check_distributed_mode(mode)
    if process_group is not None:
        return _distributed().info_nce(
            query, key, temperature, negatives, bool(symmetric), bool(normalize), bool(in_batch_negatives),
            v.check_process_group(process_group), mode, **terms,
        )
    return _contrastive_ops.info_nce_loss(
        query, key, negatives, temperature, normalize=normalize, symmetric=symmetric,
        in_batch_negatives=in_batch_negatives, negatives_grad=negatives_grad, **terms,
    )


# ---------------------------------------------------------------- singular values


def svdvals_ex(A: torch.Tensor, max_sweeps: int = 30):
    """Singular values of ``A [..., m, n]`` and a convergence flag: ``(S, info)``.

    ``S [..., min(m, n)]`` holds the singular values in descending order, like
    ``torch.linalg.svdvals``; it is float64 for float64 input and float32
    otherwise (float16 / bfloat16 are computed in float32). ``info [...]`` is int32,
    0 where the matrix converged and 1 where the Jacobi sweep budget
    ``max_sweeps`` ran out first (S is then the best estimate so far). Both stay on
    A's device: on CUDA nothing is copied to the host (check ``info`` when you
    need to). Singular values only: no backward.

    CPU routes (see ``sslkernels.ops.spectral``): one-sided Jacobi, vectorised
    across matrices, for small matrices; float64 Gram + eigenvalues for tall or
    large ones (absolute error about 1e-8 * sigma_max). Every route is within
    1e-5 * sigma_max of float64 LAPACK for float32 input.

    Raises ValueError naming ``A`` for NaN/Inf entries (always on CPU; on CUDA
    under ``sslkernels.set_debug(True)``), zero-size dims or an empty batch, and
    TypeError for non-float dtypes.
    """
    v.check_matrices(A, "A")
    max_sweeps = v.check_max_sweeps(max_sweeps)
    batch_shape = A.shape[:-2]
    m, n = A.shape[-2:]
    S, info = torch.ops.sslkernels.svdvals_ex(A.reshape(-1, m, n), max_sweeps)
    return S.reshape(*batch_shape, min(m, n)), info.reshape(batch_shape)


def svdvals(A: torch.Tensor) -> torch.Tensor:
    """Singular values of ``A [..., m, n]``, descending, shape ``[..., min(m, n)]``.

    ``torch.linalg.svdvals`` for batches of small matrices and tall embeddings, on
    the CPU core (see :func:`svdvals_ex`, which also returns the convergence flag).
    float64 in -> float64 out; float32 / float16 / bfloat16 in -> float32 out.
    """
    return svdvals_ex(A)[0]


# ---------------------------------------------------------------- attention


def masked_patch_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: torch.Tensor,
    kv_index: torch.Tensor = None,
    scale: float = None,
) -> torch.Tensor:
    """Attention among each sample's own kept patches, gathered inside the kernel.

    ``out[b, i] = sum_j softmax_j(scale * q[b, index[b, i]] . k[b, kv_index[b, j]]) v[b, kv_index[b, j]]``
    over the valid ``j``, per head; rows where ``index`` is -1 are zero, and so are
    the rows of a sample without keys. No gathered or padded copy of q, k, v is made,
    and each sample costs work proportional to its own counts. The backward
    scatter-adds into ``[B, L, H, Dh]`` gradients (zero at patches nobody keeps),
    deterministically.

    Args:
        q, k, v: ``[B, L, H, Dh]`` (k and v may have another L), float32 / float16 /
            bfloat16 / float64, one device. Dh: 1..256 on the CPU, 16..128 on CUDA.
        index: int64 ``[B, K]`` kept positions of each sample, unique within a row,
            in ``[0, L)``, padded with -1 after the sample's own count.
        kv_index: int64 ``[B, Kv]`` likewise for keys / values; default ``index``.
        scale: softmax scale, default ``Dh ** -0.5``.

    Returns ``[B, K, H, Dh]`` in q's dtype.

    Under ``torch.compile`` mark the kept count dynamic so new counts do not
    recompile: ``torch._dynamo.mark_dynamic(index, 1)`` (and ``kv_index``).
    Value checks (ValueError naming the argument): index ranges, duplicates and
    -1 only as trailing padding; NaN/Inf in the rows of q, k, v that are read (the
    kept patches). Always on the CPU; on CUDA under ``sslkernels.set_debug(True)``
    (there over the whole tensors).
    """
    _checks.check_attention_qkv(q, k, v, 4)
    _checks.check_patch_index(index, "index", q.shape[0], q.device)
    if kv_index is None:
        kv_index = index
    else:
        _checks.check_patch_index(kv_index, "kv_index", q.shape[0], q.device)
    scale = _checks.attention_scale(scale, q.shape[-1])
    out, _ = torch.ops.sslkernels.masked_patch_attention_forward(q, k, v, index, kv_index, scale)
    return out


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float = None,
) -> torch.Tensor:
    """Attention within each of several sequences packed into one ``[T, H, Dh]`` tensor
    (the FlashAttention varlen contract, one ``cu_seqlens`` for queries and keys).

    Sequence ``b`` is tokens ``cu_seqlens[b]:cu_seqlens[b + 1]``; each token attends to
    the tokens of its own sequence only. Runs on the CPU (any head dim 1..256) and on
    CUDA (16..128); forward and backward, deterministic.

    Args:
        q, k, v: ``[T, H, Dh]``, float32 / float16 / bfloat16 / float64, one device.
        cu_seqlens: int32 or int64 ``[B + 1]``: 0, then non-decreasing, ending at T.
        max_seqlen: an int >= the longest sequence (the CPU kernel does not need it;
            the CUDA grid does).
        scale: softmax scale, default ``Dh ** -0.5``.

    Returns ``[T, H, Dh]`` in q's dtype. Under ``torch.compile`` mark T dynamic
    (``torch._dynamo.mark_dynamic(x, 0)`` on q, k, v and on ``cu_seqlens`` for a
    changing batch size) and pass a fixed upper bound as ``max_seqlen`` (e.g. the
    patch count): one compile serves every batch. A ``max_seqlen`` that changes per
    batch costs one recompile, after which dynamo treats it as a symbolic int.

    Value checks (ValueError naming the argument): ``cu_seqlens`` starts at 0, never
    decreases, ends at T; no sequence longer than ``max_seqlen``; NaN/Inf in q, k, v.
    Always on the CPU; on CUDA under ``sslkernels.set_debug(True)``.
    """
    _checks.check_attention_qkv(q, k, v, 3)
    if q.shape != k.shape:
        raise ValueError(f"`q` and `k` must have the same shape [T, H, Dh], got {tuple(q.shape)} and {tuple(k.shape)}")
    max_seqlen = _checks.check_cu_seqlens(cu_seqlens, q.shape[0], q.device, max_seqlen, heads=q.shape[1])
    scale = _checks.attention_scale(scale, q.shape[-1])
    out, _ = torch.ops.sslkernels.varlen_attention_forward(q, k, v, cu_seqlens, max_seqlen, scale)
    return out


# ================================================================ sigreg (issue 13)


def sigreg(
    proj: torch.Tensor, directions: torch.Tensor, knots: int = 17, t_max: float = 3.0, process_group=None,
) -> torch.Tensor:
    """LeJEPA's SIGReg along the given directions, as lightly's ``SIGReg`` computes it.

    ``x = proj @ directions``; ``t = linspace(0, t_max, knots)``;
    ``err[..., s, k] = (mean_n cos(t_k x_ns) - phi_k)^2 + (mean_n sin(t_k x_ns))^2`` with
    ``phi = exp(-t^2 / 2)``; the loss is the mean over ``(..., s)`` of
    ``N * sum_k err[..., s, k] * w_k * phi_k``, ``w`` the trapezoid weights ``2 dt``
    (``dt`` at both ends). Fused: never holds the ``N x S x knots`` tensor (x is formed
    tile by tile; one sin and one cos per element, the other knots by angle addition).

    Args:
        proj: ``[..., N, D]`` float32 / float16 / bfloat16 / float64, cpu or cuda.
        directions: ``[D, S]``, same dtype and device, used as given (not normalised).
        knots: int >= 2. t_max: finite, > 0.
        process_group: a ``torch.distributed.ProcessGroup``: the cos / sin statistics
            (and N) are summed over its ranks (exact gradients; every rank returns the
            global loss). Each rank must pass the same ``directions``.

    Returns a 0-dim tensor of proj's dtype; gradients flow to ``proj`` and to
    ``directions`` when it requires grad. NaN/Inf (ValueError): always on the CPU, on
    CUDA under ``sslkernels.set_debug(True)``.
    """
    knots, t_max = v.check_sigreg(proj, directions, knots, t_max)
    proj3 = proj.reshape(-1, proj.shape[-2], proj.shape[-1])
    if process_group is not None:
        return _distributed().sigreg(proj3, directions, knots, t_max, v.check_process_group(process_group))
    return _sigreg_ops.sigreg(proj3, directions, knots, t_max)
# ================================================================ end sigreg
# ---------------------------------------------------------------- siglip (issue 13)


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    logit_bias=None,
    process_group=None,
) -> torch.Tensor:
    """SigLIP's sigmoid loss, as open_clip's ``SigLipLoss`` computes it, fused.

    ``logits_ij = logit_scale * image_i . text_j + logit_bias``, ``labels_ij`` = +1 where
    i == j and -1 elsewhere, ``loss = -sum_ij log sigmoid(labels_ij logits_ij) / N``
    (a 0-dim tensor of the features' dtype; accumulated in float32, float64 for float64
    inputs). Nothing is normalised here (open_clip's model does that) and
    ``logit_scale`` multiplies as given (open_clip passes it already exponentiated).

    The (N x N) logits are never held: on the CPU one sweep over their tiles computes
    the loss and, when a gradient is wanted (grad mode on and an input requiring
    grad), every gradient, which autograd keeps (2 N x D floats) for the backward; on
    CUDA a row pass and a column pass of Triton kernels do the same.

    Args:
        image_features, text_features: ``[N, D]``, same shape, dtype (float32, float16,
            bfloat16 or float64) and device (cpu or cuda).
        logit_scale, logit_bias: real numbers or 0-dim tensors (on the CPU or the
            features' device); a tensor that requires grad gets its exact gradient.
            ``logit_bias=None`` adds nothing.
        process_group: a ``torch.distributed.ProcessGroup``: this rank's images meet
            every rank's texts, which travel round a ring one block at a time (O(N D)
            memory per rank); each rank returns the loss of its own images (open_clip's
            SigLipLoss with ``world_size > 1``), and each rank's features get the
            gradient of the sum of every rank's loss (see :mod:`sslkernels._ring_siglip`).
            Same N on all ranks.
    """
    v.check_siglip_features(image_features, text_features)
    device = image_features.device
    logit_scale = v.logit_scalar(logit_scale, "logit_scale", device)
    if logit_bias is not None:
        logit_bias = v.logit_scalar(logit_bias, "logit_bias", device)
    if process_group is not None:
        from sslkernels import _ring_siglip

        return _ring_siglip.siglip_loss(image_features, text_features, logit_scale, logit_bias,
                                        v.check_process_group(process_group))
    return _siglip_ops.siglip_loss(image_features, text_features, logit_scale, logit_bias)
# ============================================================================ koleo


def koleo(x: torch.Tensor, eps: float = 1e-8, topk: int = 1, group_size: int = None) -> torch.Tensor:
    """The KoLeo regulariser as lightly's ``KoLeoLoss`` (DINOv2) and DINOv3 compute it, fused.

    Rows are L2-normalised (``F.normalize(x, eps=eps)``). Each row's nearest neighbour
    (its ``topk`` nearest) by cosine similarity within its group of ``group_size``
    consecutive rows is found, never the row itself; ties go to the smaller index. With
    ``dist = PairwiseDistance(p=2, eps=eps)(row, neighbour)`` (which adds eps to the
    difference), ``loss = -mean(log(dist + eps))`` over the rows and their neighbours.
    Duplicate rows are each other's neighbours at distance ``eps * sqrt(D)``, as in
    lightly. Gradients flow through the distances (to both rows of a pair); the search
    is not differentiable.

    The search never holds the N x N similarities: tiles through OpenBLAS (CPU, each
    symmetric tile multiplied once) or ``tl.dot`` (CUDA) and a running top-k per row.

    Args:
        x: ``[N, D]`` float32 / float16 / bfloat16 / float64, cpu or cuda, N, D >= 1.
        eps: finite, > 0.
        topk: neighbours per row, >= 1, smaller than the group.
        group_size: None (the whole batch) or a divisor of N larger than ``topk``.

    Returns a 0-dim tensor of x's dtype (accumulated in float64 on the CPU, float32 on
    CUDA).
    """
    eps, topk, group = v.check_koleo(x, eps, topk, group_size)
    return _koleo_ops.koleo_loss(x, eps, topk, group)
# ======================================================================== end koleo
