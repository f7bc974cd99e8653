"""Drop-in contrastive loss modules."""
from __future__ import annotations

import torch
from torch import nn

from sslkernels import _validation as v
from sslkernels import distributed as _distributed
from sslkernels import functional


class MemoryBank(nn.Module):
    """The FIFO bank of lightly's ``MemoryBankModule``, with the same buffers
    (``bank`` [K, D], unit-norm Gaussian at start; ``bank_ptr``), non-persistent as
    lightly's are (the state_dict stays empty, as theirs). ``enqueue`` writes a batch at the pointer; a batch that would run
    past the end fills the tail and wraps the pointer to 0 (dropping its rest), as
    lightly does."""

    def __init__(self, size, gather_distributed: bool = False):
        super().__init__()
        self.gather_distributed = bool(gather_distributed)
        if isinstance(size, int) or len(tuple(size)) != 2 or any(int(x) <= 0 for x in size):
            raise ValueError(
                f"`memory_bank_size` must be 0 or a (num_features, dim) tuple of positive ints, got {size!r}"
            )
        num, dim = (int(x) for x in size)
        self.size = (num, dim)
        self.register_buffer("bank", _unit_rows(torch.randn(num, dim)), persistent=False)
        self.register_buffer("bank_ptr", torch.zeros(1, dtype=torch.long), persistent=False)

    @torch.no_grad()
    def enqueue(self, batch: torch.Tensor) -> None:
        num = self.size[0]
        ptr = int(self.bank_ptr)
        group = _distributed.default_group() if self.gather_distributed else None
        if group is not None:  # every rank enqueues the whole gathered batch (lightly's concat_all_gather)
            _distributed.check_same_batch_size(batch.shape[0], group, batch.device, "out1")
            batch = torch.cat(_distributed.gather_no_grad(batch.detach(), group))
        batch = batch.detach().to(self.bank.dtype)
        if ptr + batch.shape[0] >= num:
            self.bank[ptr:] = batch[: num - ptr]
            self.bank_ptr.zero_()
        else:
            self.bank[ptr : ptr + batch.shape[0]] = batch
            self.bank_ptr[0] = ptr + batch.shape[0]


def _bank_disabled(size) -> bool:
    """lightly's rule: 0 (or a size whose first entry, the number of rows, is 0) means
    no memory bank."""
    if size is None or (isinstance(size, int) and not isinstance(size, bool) and size == 0):
        return True
    try:
        entries = tuple(size)
    except TypeError:
        return False  # MemoryBank names the argument
    return len(entries) in (1, 2) and all(isinstance(x, int) and x >= 0 for x in entries) and entries[0] == 0


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


class NTXentLoss(nn.Module):
    """Drop-in for ``lightly.loss.NTXentLoss(temperature, memory_bank_size)``.

    ``forward(out0, out1)`` L2-normalises both views inside the loss, as lightly does.
    Without a memory bank it is the SimCLR loss over both views (every other row of
    both views a negative). With ``memory_bank_size=(K, D)`` it is lightly's MoCo-style
    loss: only ``out0`` rows are anchors, their candidates are their own ``out1`` row
    and the bank, and (when ``out0`` requires grad) the normalised ``out1`` is enqueued
    afterwards. Fused either way, never holding a similarity matrix; the bank lives in
    the non-persistent buffers ``memory_bank.bank`` / ``memory_bank.bank_ptr``, as in
    lightly (both state_dicts are empty).

    ``gather_distributed=True`` (when torch.distributed is initialised with more than
    one rank): without a bank, the negatives are every rank's rows, with exact
    gradients (the DDP average of the ranks' gradients is the single-process
    gradient on the concatenated batch). Each rank returns the **global** loss (the
    mean of lightly's per-rank values; lightly returns the mean over the rank's own
    anchors). ``distributed_mode="all_gather"`` (default) does the whole batch's
    fused work on every rank (W times redundant); ``"ring"`` passes the other ranks'
    rows round the ring, one block at a time (O(b D) memory per rank, each rank
    only its own anchors' work), with the same value and gradients (see
    :mod:`sslkernels.distributed`). With a bank, the loss stays local and every
    rank enqueues the all-gathered ``out1``, as lightly.
    """

    def __init__(self, temperature: float = 0.5, memory_bank_size=0, gather_distributed: bool = False,
                 distributed_mode: str = "all_gather"):
        super().__init__()
        self.temperature = v.check_temperature(temperature)
        self.gather_distributed = bool(gather_distributed)
        if self.gather_distributed and not torch.distributed.is_available():
            raise ValueError("`gather_distributed=True` but torch.distributed is not available in this torch build")
        self.distributed_mode = _distributed.check_mode(distributed_mode)
        self.memory_bank = None if _bank_disabled(memory_bank_size) else MemoryBank(
            memory_bank_size, gather_distributed=self.gather_distributed)

    def forward(self, out0: torch.Tensor, out1: torch.Tensor) -> torch.Tensor:
        if self.memory_bank is None:
            group = _distributed.default_group() if self.gather_distributed else None
            return functional.nt_xent(out0, out1, temperature=self.temperature, normalize=True,
                                      process_group=group, mode=self.distributed_mode)
        # Normalised once here (autograd through F.normalize keeps the gradients exact), so
        # the positive the loss sees and the row the bank stores are the very same vector,
        # as in lightly: a bank row equal to the positive ties with it exactly.
        v.check_float_tensor(out0, "out0", 2)
        v.check_float_tensor(out1, "out1", 2)
        v.check_same(out0, out1, "out0", "out1")
        v.check_nonempty_rows(out0, "out0")
        out0, out1 = _unit_rows(out0), _unit_rows(out1)
        bank = self.memory_bank.bank.clone()  # the loss keeps it for backward; enqueue edits the buffer
        loss = functional.info_nce(
            out0, out1, self.temperature, negatives=bank.to(out0.dtype), normalize=False, in_batch_negatives=False
        )
        if out0.requires_grad:
            self.memory_bank.enqueue(out1)
        return loss

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class SupConLoss(nn.Module):
    """Drop-in for ``pytorch_metric_learning.losses.SupConLoss(temperature)``.

    ``forward(embeddings, labels)`` returns the supervised contrastive loss with
    cosine similarity (rows L2-normalised), fused and never holding the (N x N)
    similarity matrix. ``labels`` are compared by value, as pml does: integer, bool
    or floating-point (NaN and complex labels raise).

    ``reduction="nonzero"`` (default) averages as pml's default reducer
    (``AvgNonZeroReducer``): over the anchors whose loss is non-zero, 0 when the
    batch has no negative pair; see ``reduction`` in :func:`sslkernels.sup_con` for
    how "non-zero" is read. ``reduction="mean"`` averages over every anchor with a
    positive (the paper's L_out). Not built yet (they raise NotImplementedError):
    ``indices_tuple``, ``ref_emb`` / ``ref_labels``, and custom ``distance`` /
    ``reducer`` / ``embedding_regularizer`` arguments.

    ``gather_distributed=True`` (torch.distributed initialised, more than one rank):
    the loss over every rank's rows and labels, exact gradients, with
    ``reduction="mean"`` only; ``distributed_mode`` ``"all_gather"`` (default) or
    ``"ring"`` (O(b D) memory per rank), as in :class:`NTXentLoss`.
    """

    def __init__(self, temperature: float = 0.1, gather_distributed: bool = False,
                 distributed_mode: str = "all_gather", reduction: str = "nonzero", **kwargs):
        super().__init__()
        self.temperature = v.check_temperature(temperature)
        self.gather_distributed = bool(gather_distributed)
        self.distributed_mode = _distributed.check_mode(distributed_mode)
        self.reduction = v.check_choice(reduction, "reduction", ("mean", "nonzero"))
        if self.gather_distributed and self.reduction != "mean":
            raise NotImplementedError("sslkernels.nn.SupConLoss: gather_distributed=True is built for "
                                      "reduction='mean' only (pass it explicitly)")
        if kwargs:
            raise NotImplementedError(
                f"sslkernels.nn.SupConLoss: options {sorted(kwargs)} are not built yet "
                "(cosine similarity and the mean over anchors with positives are fixed)"
            )

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        if indices_tuple is not None or ref_emb is not None or ref_labels is not None:
            raise NotImplementedError(
                "sslkernels.nn.SupConLoss: indices_tuple / ref_emb / ref_labels are not built yet"
            )
        if labels is None:
            raise ValueError("sslkernels.nn.SupConLoss: `labels` is required")
        group = _distributed.default_group() if self.gather_distributed else None
        return functional.sup_con(embeddings, labels, temperature=self.temperature, normalize=True,
                                  process_group=group, mode=self.distributed_mode, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class InfoNCELoss(nn.Module):
    """InfoNCE (MoCo / CPC) as a module: ``forward(query, key, negatives=None)``.

    Row ``i`` of ``key`` is the positive of row ``i`` of ``query``; the other keys and
    the optional shared ``negatives`` (a queue) are its negatives. ``temperature`` is
    a float, or pass ``learnable_temperature=True`` to train it (stored as the
    parameter ``log_temperature``). See :func:`sslkernels.info_nce`.
    ``gather_distributed=True`` adds every rank's keys (and, symmetric, queries) to the
    candidates, each rank returning the mean over its own queries (see
    ``process_group`` in :func:`sslkernels.info_nce`); ``distributed_mode``
    ``"all_gather"`` (default) or ``"ring"`` (O(b D) memory per rank, same value and
    gradients).
    """

    def __init__(self, temperature: float = 0.07, symmetric: bool = False, normalize: bool = True,
                 learnable_temperature: bool = False, gather_distributed: bool = False,
                 distributed_mode: str = "all_gather"):
        super().__init__()
        self.gather_distributed = bool(gather_distributed)
        self.distributed_mode = _distributed.check_mode(distributed_mode)
        temperature = v.check_temperature(temperature)
        self.symmetric = bool(symmetric)
        self.normalize = bool(normalize)
        if learnable_temperature:
            self.log_temperature = nn.Parameter(torch.tensor(temperature).log())
        else:
            self.register_parameter("log_temperature", None)
            self.temperature = temperature

    def forward(self, query, key, negatives=None, *, logit_bias=None, key_ids=None, queue_ids=None):
        """``logit_bias``, ``key_ids``, ``queue_ids``: the retrieval terms of
        :func:`sslkernels.info_nce` (sampling-bias correction, duplicate masks)."""
        t = self.log_temperature.exp() if self.log_temperature is not None else self.temperature
        group = _distributed.default_group() if self.gather_distributed else None
        return functional.info_nce(query, key, t, negatives, self.symmetric, self.normalize, process_group=group,
                                   mode=self.distributed_mode, logit_bias=logit_bias, key_ids=key_ids,
                                   queue_ids=queue_ids)


class ClipLoss(nn.Module):
    """Drop-in for ``open_clip.loss.ClipLoss``.

    ``forward(image_features, text_features, logit_scale, logit_bias=None,
    output_dict=False)`` with features already normalised (as open_clip's models
    return them) and ``logit_scale`` the exponentiated scale (a number, or a 0-dim or
    ``[1]`` tensor that may require grad; its gradient comes back in its own shape):
    the mean of the image -> text and text -> image cross-entropies of
    ``logit_scale * I T^T + logit_bias``, fused in one pass and never holding the
    (N x N) logits. As in open_clip the loss does not clamp the scale (open_clip's
    training loop clamps the log-scale parameter). ``logit_bias`` (a number, 0-dim or
    ``[1]`` tensor) shifts every logit alike, which cross-entropy ignores: the loss is
    the same as without it and its gradient is exactly 0 (open_clip's is 0 up to
    rounding). ``output_dict=True`` returns ``{"contrastive_loss": loss}``.

    ``world_size > 1`` (torch.distributed initialised, default group) follows open_clip:
    ``local_loss=True`` returns the mean over this rank's pairs against every rank's
    candidates (one fused call per direction, the other ranks' features as extra
    negatives); ``local_loss=False`` returns the global loss, computed on every rank
    on the gathered batch. ``gather_with_grad=True`` gives exact gradients (the DDP
    average is the single-process gradient on the concatenated batch); ``False``
    detaches the other ranks' features, as open_clip does. ``distributed_mode``
    (not an open_clip argument): ``"all_gather"`` (default) or ``"ring"`` (other
    ranks' features pass round the ring one block at a time, O(b D) memory per
    rank, same value and gradients; built for ``gather_with_grad=True`` only, else
    NotImplementedError). See :mod:`sslkernels.distributed`.

    Not built (they raise NotImplementedError): ``use_horovod``, a ``logit_scale`` /
    ``logit_bias`` with more than one element.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False,
                 distributed_mode: str = "all_gather"):
        super().__init__()
        self.distributed_mode = _distributed.check_mode(distributed_mode)
        if self.distributed_mode == "ring" and not gather_with_grad:
            raise NotImplementedError(_distributed.RING_DETACHED_CLIP)
        if use_horovod:
            raise NotImplementedError("sslkernels.nn.ClipLoss: use_horovod is not built (use torch.distributed)")
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"`world_size` must be an int >= 1, got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"`rank` must be an int in [0, world_size={world_size}), got {rank!r}")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels  # no labels tensor exists on the fused path
        self.rank = rank
        self.world_size = world_size

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict: bool = False):
        device = image_features.device if isinstance(image_features, torch.Tensor) else torch.device("cpu")
        temperature = 1.0 / v.clip_logit_scale(logit_scale, device)
        bias = v.clip_logit_bias(logit_bias, device)
        if self.world_size > 1:
            loss = self._distributed_loss(image_features, text_features, temperature)
        else:
            loss = functional.info_nce(
                image_features, text_features, temperature, symmetric=True, normalize=False
            )
        if bias is not None:  # a shift of every logit: no change, a zero gradient in the graph
            loss = loss + (bias * 0).to(loss.dtype)
        return {"contrastive_loss": loss} if output_dict else loss

    def _distributed_loss(self, image_features, text_features, temperature):
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(f"`world_size={self.world_size}` but torch.distributed is not initialised")
        if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise ValueError(
                f"`rank={self.rank}, world_size={self.world_size}` disagree with torch.distributed "
                f"(rank {dist.get_rank()} of {dist.get_world_size()})"
            )
        # Same checks as the one-process path (sslkernels.info_nce), before any collective.
        v.check_embedding_pair(image_features, text_features, "image_features", "text_features")
        temperature = v.temperature_tensor(temperature, image_features.device)
        return _distributed.clip(image_features, text_features, temperature, dist.group.WORLD,
                                 local_loss=bool(self.local_loss), gather_with_grad_=bool(self.gather_with_grad),
                                 mode=self.distributed_mode)
