"""Eager KoLeo, written the way lightly (topk = 1) and DINOv3 (topk, groups) write it:
the full (group x group) similarity matrix, then the distances to the neighbours found."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def koleo_neighbors_reference(x: torch.Tensor, eps: float = 1e-8, topk: int = 1, group_size=None) -> torch.Tensor:
    """int64 [N, topk]: each row's `topk` most cosine-similar rows of its group, itself
    excluded, best first, ties to the smaller index (argmax for topk = 1, as lightly; a
    stable sort otherwise). Holds [N / group, group, group] similarities."""
    n, d = x.shape
    g = n if group_size is None else int(group_size)
    with torch.no_grad():
        xn = F.normalize(x, p=2, dim=-1, eps=eps).view(n // g, g, d)
        sims = xn @ xn.transpose(1, 2)
        sims.diagonal(dim1=1, dim2=2).fill_(float("-inf"))
        if topk == 1:
            local = sims.argmax(dim=-1, keepdim=True)
        else:
            local = torch.sort(sims, dim=-1, descending=True, stable=True).indices[..., :topk]
        offsets = torch.arange(0, n, g, device=x.device).view(-1, 1, 1)
        return (local + offsets).reshape(n, topk)


def koleo_reference(x: torch.Tensor, eps: float = 1e-8, topk: int = 1, group_size=None,
                    indices: torch.Tensor = None) -> torch.Tensor:
    """-mean log(PairwiseDistance(p=2, eps)(x_i, x_nn(i)) + eps) over the rows and their
    `topk` neighbours, rows L2-normalised (F.normalize with the same eps). Gradients flow
    through the distances (to both rows of a pair); the search is not differentiable.
    `indices` (optional) gives the neighbours instead of searching."""
    xn = F.normalize(x, p=2, dim=-1, eps=eps)
    if indices is None:
        indices = koleo_neighbors_reference(x, eps, topk, group_size)
    k = indices.shape[1]
    rows = xn.unsqueeze(1).expand(-1, k, -1)
    dist = F.pairwise_distance(rows, xn[indices], p=2, eps=eps)
    return -(dist + eps).log().mean()
