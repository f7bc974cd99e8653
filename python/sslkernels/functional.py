"""The documented functions: validation, then one op call. No math here."""
from __future__ import annotations

import torch

from sslkernels import _validation as v
from sslkernels import distributed as _distributed
from sslkernels import ops  # noqa: F401  (registers torch.ops.sslkernels.*)
from sslkernels.ops import attention as _attention_ops  # noqa: F401  (registers the attention ops)
from sslkernels import _validation as _checks  # attention arguments shadow `v`


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
    v.check_float_tensor(z1, "z1", 2)
    v.check_float_tensor(z2, "z2", 2)
    v.check_same(z1, z2, "z1", "z2")
    v.check_nonempty_rows(z1, "z1")
    temperature = v.check_temperature(temperature)
    _distributed.check_mode(mode)
    if process_group is not None:
        return _distributed.nt_xent(z1, z2, temperature, bool(normalize),
                                    _distributed.resolve_group(process_group), mode)
    loss, _ = torch.ops.sslkernels.nt_xent_forward(z1, z2, temperature, bool(normalize))
    return loss


def sup_con(
    features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1, normalize: bool = True,
    process_group=None, mode: str = "all_gather",
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
        labels: integer ``[N]`` class ids (any values), same device.
        temperature: finite, > 0.
        process_group: a ``torch.distributed.ProcessGroup``: the loss over the rows and
            labels of every rank (same N on all ranks; positives found across ranks),
            returned by every rank. DDP-averaged gradients are the single-process
            ones. See :mod:`sslkernels.distributed`.
        mode: ``"all_gather"`` (default): the fused op on the all-gathered batch (W
            times redundant work); ``"ring"``: rows and labels pass round the ring
            one block at a time, each rank computing its own anchors (O(N D)
            memory); same value and gradients.
    """
    v.check_float_tensor(features, "features", 2)
    v.check_nonempty_rows(features, "features")
    labels = v.check_labels(labels, "labels", features.shape[0], features.device)
    temperature = v.check_temperature(temperature)
    _distributed.check_mode(mode)
    if process_group is not None:
        return _distributed.sup_con(features, labels, temperature, bool(normalize),
                                    _distributed.resolve_group(process_group), mode)
    loss, _ = torch.ops.sslkernels.sup_con_forward(features, labels, temperature, bool(normalize))
    return loss


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
    """
    v.check_float_tensor(query, "query", 2)
    v.check_float_tensor(key, "key", 2)
    v.check_same(query, key, "query", "key")
    v.check_nonempty_rows(query, "query")
    temperature = v.temperature_tensor(temperature, query.device)
    negatives, negatives_grad = v.check_negatives(negatives, query)
    if symmetric and not in_batch_negatives:
        raise ValueError("`symmetric=True` needs `in_batch_negatives=True` (the key -> query candidates are the queries)")
    _distributed.check_mode(mode)
    if process_group is not None:
        return _distributed.info_nce(
            query, key, temperature, negatives, bool(symmetric), bool(normalize), bool(in_batch_negatives),
            _distributed.resolve_group(process_group), mode,
        )
    one_sweep = (query.device.type == "cpu" and not symmetric and in_batch_negatives
                 and (negatives is None or negatives.dim() == 2))
    if one_sweep and _grad_wanted(query, key, negatives, temperature):
        # A training step on the C++ path: loss and gradients in one sweep (each logit
        # tile multiplied once) instead of a forward and a backward that recomputes the
        # tiles. (The Triton kernels have no such variant: on CUDA the op would only run
        # the same two kernels earlier, so CUDA keeps the forward / backward ops.)
        loss, *_ = torch.ops.sslkernels.info_nce_loss_and_grads(
            query, key, negatives, temperature, bool(normalize), negatives_grad
        )
        return loss
    loss, _ = torch.ops.sslkernels.info_nce_forward(
        query, key, negatives, temperature, bool(normalize), bool(symmetric), bool(in_batch_negatives),
        negatives_grad,
    )
    return loss


def _grad_wanted(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ---------------------------------------------------------------- singular values


def _check_matrices(A, name: str, min_dim: int = 2, max_dim: int = None) -> None:
    """Structural checks of a batch of matrices ``[..., m, n]``; errors name the argument."""
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(A).__name__}")
    if A.dtype not in v.FLOAT_DTYPES:
        raise TypeError(f"`{name}` must be float32, float16, bfloat16 or float64, got {A.dtype}")
    if A.dim() < min_dim or (max_dim is not None and A.dim() > max_dim):
        want = f"{min_dim}-D" if max_dim == min_dim else (
            f"{min_dim}-D or {max_dim}-D" if max_dim == min_dim + 1 else f"at least {min_dim}-D")
        raise ValueError(f"`{name}` must be {want}, got shape {tuple(A.shape)}")
    if A.device.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"`{name}` is on {A.device}; sslkernels supports cpu and cuda tensors")
    v.check_dims(A, name)
    if A.shape[-2] < 1 or A.shape[-1] < 1:
        raise ValueError(f"`{name}` has a zero-size matrix dimension (shape {tuple(A.shape)})")
    if A.numel() == 0:
        raise ValueError(f"`{name}` is an empty batch (shape {tuple(A.shape)})")


def _check_max_sweeps(max_sweeps) -> int:
    if isinstance(max_sweeps, bool) or not isinstance(max_sweeps, int):
        raise TypeError(f"`max_sweeps` must be an int, got {type(max_sweeps).__name__}")
    if not 1 <= max_sweeps <= v.MAX_CPU_DIM:
        raise ValueError(f"`max_sweeps` must be in [1, 2**31 - 1], got {max_sweeps}")
    return max_sweeps


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
    _check_matrices(A, "A")
    max_sweeps = _check_max_sweeps(max_sweeps)
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
