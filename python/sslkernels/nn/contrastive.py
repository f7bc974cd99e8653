"""Drop-in contrastive loss modules."""
from __future__ import annotations

import torch
from torch import nn

from sslkernels import _validation as v
from sslkernels import functional


class MemoryBank(nn.Module):
    """The FIFO bank of lightly's ``MemoryBankModule``, with the same buffers
    (``bank`` [K, D], unit-norm Gaussian at start; ``bank_ptr``), non-persistent as
    lightly's are (the state_dict stays empty, as theirs). ``enqueue`` writes a batch at the pointer; a batch that would run
    past the end fills the tail and wraps the pointer to 0 (dropping its rest), as
    lightly does."""

    def __init__(self, size):
        super().__init__()
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
        batch = batch.detach().to(self.bank.dtype)
        if ptr + batch.shape[0] >= num:
            self.bank[ptr:] = batch[: num - ptr]
            self.bank_ptr.zero_()
        else:
            self.bank[ptr : ptr + batch.shape[0]] = batch
            self.bank_ptr[0] = ptr + batch.shape[0]


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

    Not built yet: ``gather_distributed=True`` (raises NotImplementedError).
    """

    def __init__(self, temperature: float = 0.5, memory_bank_size=0, gather_distributed: bool = False):
        super().__init__()
        self.temperature = v.check_temperature(temperature)
        if gather_distributed:
            raise NotImplementedError(
                "sslkernels.nn.NTXentLoss: gather_distributed=True is not built yet"
            )
        self.gather_distributed = False
        self.memory_bank = None if memory_bank_size in (0, None, (0,)) else MemoryBank(memory_bank_size)

    def forward(self, out0: torch.Tensor, out1: torch.Tensor) -> torch.Tensor:
        if self.memory_bank is None:
            return functional.nt_xent(out0, out1, temperature=self.temperature, normalize=True)
        bank = self.memory_bank.bank.clone()  # the loss keeps it for backward; enqueue edits the buffer
        loss = functional.info_nce(
            out0, out1, self.temperature, negatives=bank.to(out0.dtype), normalize=True, in_batch_negatives=False
        )
        if out0.requires_grad:
            self.memory_bank.enqueue(_unit_rows(out1))
        return loss

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class SupConLoss(nn.Module):
    """Drop-in for ``pytorch_metric_learning.losses.SupConLoss(temperature)``.

    ``forward(embeddings, labels)`` returns the supervised contrastive loss with
    cosine similarity (rows L2-normalised), averaged over the anchors that have a
    positive, fused and never holding the (N x N) similarity matrix.

    One difference on a degenerate batch: when every row shares one label (no
    negative anywhere) pytorch-metric-learning returns 0, while this module (like
    the paper's L_out, whose denominator is every other row) returns the loss over
    the positives. Not built yet (they raise NotImplementedError): ``indices_tuple``,
    ``ref_emb`` / ``ref_labels``, and custom ``distance`` / ``reducer`` /
    ``embedding_regularizer`` arguments.
    """

    def __init__(self, temperature: float = 0.1, **kwargs):
        super().__init__()
        self.temperature = v.check_temperature(temperature)
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
        return functional.sup_con(embeddings, labels, temperature=self.temperature, normalize=True)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class InfoNCELoss(nn.Module):
    """InfoNCE (MoCo / CPC) as a module: ``forward(query, key, negatives=None)``.

    Row ``i`` of ``key`` is the positive of row ``i`` of ``query``; the other keys and
    the optional shared ``negatives`` (a queue) are its negatives. ``temperature`` is
    a float, or pass ``learnable_temperature=True`` to train it (stored as the
    parameter ``log_temperature``). See :func:`sslkernels.info_nce`.
    """

    def __init__(self, temperature: float = 0.07, symmetric: bool = False, normalize: bool = True,
                 learnable_temperature: bool = False):
        super().__init__()
        temperature = v.check_temperature(temperature)
        self.symmetric = bool(symmetric)
        self.normalize = bool(normalize)
        if learnable_temperature:
            self.log_temperature = nn.Parameter(torch.tensor(temperature).log())
        else:
            self.register_parameter("log_temperature", None)
            self.temperature = temperature

    def forward(self, query, key, negatives=None):
        t = self.log_temperature.exp() if self.log_temperature is not None else self.temperature
        return functional.info_nce(query, key, t, negatives, self.symmetric, self.normalize)


class ClipLoss(nn.Module):
    """Drop-in for ``open_clip.loss.ClipLoss`` on one process.

    ``forward(image_features, text_features, logit_scale)`` with features already
    normalised (as open_clip's models return them) and ``logit_scale`` the
    exponentiated scale (a tensor that may require grad): the mean of the
    image -> text and text -> image cross-entropies of ``logit_scale * I T^T``,
    fused in one pass and never holding the (N x N) logits. As CLIP does, the scale
    is clamped at 100 (``logit_scale.clamp(max=100)``, no gradient above it); open_clip
    clamps the log-scale parameter in its training loop instead, so the two agree
    whenever ``logit_scale <= 100``.

    Not built yet (they raise NotImplementedError): ``world_size > 1`` (cross-device
    negatives, with ``local_loss`` / ``gather_with_grad``) and ``logit_bias``.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False):
        super().__init__()
        if world_size != 1 or use_horovod:
            raise NotImplementedError(
                "sslkernels.nn.ClipLoss: world_size > 1 (cross-device negatives) is not built yet"
            )
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels  # no labels tensor exists on the fused path
        self.rank = rank
        self.world_size = world_size

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict: bool = False):
        if logit_bias is not None:
            raise NotImplementedError("sslkernels.nn.ClipLoss: logit_bias (SigLIP-style) is not built yet")
        if not isinstance(logit_scale, torch.Tensor):
            logit_scale = torch.tensor(float(logit_scale), dtype=torch.float64)
        temperature = 1.0 / logit_scale.clamp(max=100.0)
        loss = functional.info_nce(
            image_features, text_features, temperature, symmetric=True, normalize=False
        )
        return {"contrastive_loss": loss} if output_dict else loss
