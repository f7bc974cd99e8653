"""Eager contrastive losses, written the way users write them today."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent_reference(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, normalize: bool = True
) -> torch.Tensor:
    """SimCLR NT-Xent, eager: F.normalize, Z @ Z.T, diagonal masked to -inf, F.cross_entropy.

    Holds the full (2N x 2N) logit matrix. Computes in the inputs' dtype (pass
    float64 tensors for the oracle); returns a 0-dim tensor of that dtype.
    """
    n = z1.shape[0]
    z = torch.cat([z1, z2], dim=0)
    if normalize:
        z = F.normalize(z, dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, targets)


def sup_con_reference(
    features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1, normalize: bool = True
) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al., "L_out"), eager, as SupContrast /
    pytorch-metric-learning write it: the full (N x N) logits and a dense positive mask.

    Mean over anchors that have at least one positive; 0 (with zero gradients) when
    no anchor has one.
    """
    z = F.normalize(features, dim=1) if normalize else features
    logits = z @ z.T / temperature
    n = z.shape[0]
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    num_positives = positives.sum(dim=1)
    anchors = num_positives > 0
    pos_log_prob = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    per_anchor = -pos_log_prob[anchors] / num_positives[anchors]
    if per_anchor.numel() == 0:
        return (z * 0).sum()
    return per_anchor.mean()


def info_nce_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    temperature: float = 0.07,
    negatives: torch.Tensor = None,
    symmetric: bool = False,
    normalize: bool = True,
    in_batch_negatives: bool = True,
    logit_bias: torch.Tensor = None,
    key_ids: torch.Tensor = None,
    queue_ids: torch.Tensor = None,
) -> torch.Tensor:
    """InfoNCE / CLIP, eager: the (N x (N + K)) logits and F.cross_entropy, as MoCo and
    open_clip write it. Row i of `key` is the positive of row i of `query`; a shared
    `negatives` [K, D] (a queue) joins the query -> key candidates; `symmetric` adds the
    key -> query direction (candidates: the queries) and averages the two. Without
    `in_batch_negatives` a query's candidates are its own key and the queue (MoCo).

    Retrieval terms, as the in-batch-softmax recommenders write them: `logit_bias`
    [N + K] is added to every query's logit of candidate j (keys, then the queue; the
    query -> key direction only), and a candidate whose id (`key_ids` [N], then
    `queue_ids` [K]) equals the query's own key id, other than that key, is masked to
    -inf (in both directions: a pair's id serves its query and its key)."""
    if normalize:
        query, key = F.normalize(query, dim=1), F.normalize(key, dim=1)
        negatives = F.normalize(negatives, dim=-1) if negatives is not None else None
    n = query.shape[0]
    targets = torch.arange(n, device=query.device)
    bias_keys = logit_bias[:n] if logit_bias is not None else None
    bias_queue = logit_bias[n:] if logit_bias is not None else None
    same_key = None
    if key_ids is not None:  # [N, N]: another key with the query's own id
        same_key = (key_ids[:, None] == key_ids[None, :]) & ~torch.eye(n, dtype=torch.bool, device=query.device)
    if in_batch_negatives:
        logits = query @ key.T / temperature
        if bias_keys is not None:
            logits = logits + bias_keys[None, :]
        if same_key is not None:
            logits = logits.masked_fill(same_key, float("-inf"))
    else:  # MoCo: [own key | queue], positive at column 0
        logits = (query * key).sum(dim=1, keepdim=True) / temperature
        if bias_keys is not None:
            logits = logits + bias_keys[:, None]
        targets = torch.zeros_like(targets)
    if negatives is not None and negatives.dim() == 3:  # per-query hard negatives [N, M, D]
        logits = torch.cat([logits, torch.einsum("nd,nmd->nm", query, negatives) / temperature], dim=1)
    elif negatives is not None:
        queue = query @ negatives.T / temperature
        if bias_queue is not None:
            queue = queue + bias_queue[None, :]
        if key_ids is not None:
            queue = queue.masked_fill(key_ids[:, None] == queue_ids[None, :], float("-inf"))
        logits = torch.cat([logits, queue], dim=1)
    loss = F.cross_entropy(logits, targets)
    if symmetric:
        logits_t = key @ query.T / temperature
        if same_key is not None:
            logits_t = logits_t.masked_fill(same_key, float("-inf"))
        loss = 0.5 * (loss + F.cross_entropy(logits_t, targets))
    return loss
