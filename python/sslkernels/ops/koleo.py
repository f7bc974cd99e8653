"""KoLeo ops.

sslkernels::koleo_neighbors(x, query_offset, query_count, group_size, topk, eps) -> indices
sslkernels::koleo_loss_forward(x, indices, query_offset, group_size, eps) -> loss
sslkernels::koleo_loss_backward(grad_loss, x, indices, query_offset, group_size, eps) -> dx

The queries are rows query_offset .. query_offset + query_count - 1 of x (all of x in one
process; one rank's slice of the gathered batch with gather_distributed). The search is
the fused part: rows L2-normalised, similarity tiles through OpenBLAS (CPU, symmetric
tiles multiplied once) or tl.dot (CUDA: symmetric tiles and a merge when every row is a
query, `search_route`), a running top-k per row, never an N x N matrix.
Its int64 [query_count, topk] result is not differentiable. The loss on the pairs is
O(query_count * topk * D): the C++ core on the CPU (float64 accumulation, a deterministic
scatter of the neighbour gradients), torch ops on CUDA. Autograd saves x and the indices.
"""
from __future__ import annotations

import torch
from torch import Tensor

from sslkernels import _ext
from sslkernels._config import debug_enabled
from sslkernels._validation import check_finite
from sslkernels.ops._triton import launchers


def _no_kernel(op: str, device: torch.device):
    return NotImplementedError(f"sslkernels::{op} has no kernel for device '{device.type}' (cpu and cuda only)")


def _problem(x: Tensor, query_offset: int, query_count: int, group_size: int, topk: int, eps: float) -> dict:
    rows, cols = x.shape
    return dict(x=x.data_ptr(), dtype=_ext.DTYPE_CODES[x.dtype], rows=rows, cols=cols, row_stride=x.stride(0),
                col_stride=x.stride(1), query_offset=int(query_offset), query_count=int(query_count),
                group_size=int(group_size), topk=int(topk), eps=float(eps))


def _status(status: int, op: str) -> None:
    if status == _ext.STATUS_NONFINITE_FIRST:
        raise ValueError(f"{op}: `x` contains NaN or Inf")
    if status != _ext.STATUS_OK:
        raise ValueError(f"{op}: the C++ core rejected its arguments (status {status}): group_size must divide "
                         "the rows and exceed topk, indices must be rows of x")


# ---------------------------------------------------------------- search


@torch.library.custom_op("sslkernels::koleo_neighbors", mutates_args=())
def koleo_neighbors(x: Tensor, query_offset: int, query_count: int, group_size: int, topk: int,
                    eps: float) -> Tensor:
    raise _no_kernel("koleo_neighbors", x.device)


@koleo_neighbors.register_fake
def _(x, query_offset, query_count, group_size, topk, eps):
    return x.new_empty((query_count, topk), dtype=torch.int64)


@koleo_neighbors.register_kernel("cpu")
def _(x, query_offset, query_count, group_size, topk, eps):
    indices = torch.empty((query_count, topk), dtype=torch.int64)
    status = _ext._C.koleo_neighbors(**_problem(x, query_offset, query_count, group_size, topk, eps),
                                     indices=indices.data_ptr(), num_threads=_ext.num_threads())
    _status(status, "koleo")
    return indices


# The symmetric search's partial buffer grows as N^2 / BLOCK (no groups); past this the
# whole batch takes the row-block kernel (no buffer) rather than risk running out of memory.
MAX_PARTIAL_BYTES = 1 << 30


def search_route(x: Tensor, query_offset: int, query_count: int, group_size: int, topk: int) -> str:
    """The CUDA search kernel for these queries. "symmetric" when every row of x is a query
    (each similarity tile multiplied once for both of its row blocks, then a merge of the
    per-tile bests) and its partial buffer stays within MAX_PARTIAL_BYTES (N up to ~130k
    rows without groups); "row_blocks" otherwise, and for a slice of the rows (one rank's
    queries of a gathered batch: the symmetric tiles would also rank the rows that are
    not queries). Both give the same top-k under the same strict order (larger
    similarity, then smaller index), up to the rounding of the similarities."""
    rows, cols = x.shape
    if query_offset != 0 or query_count != rows or rows >= 2**31:
        return "row_blocks"
    if launchers("koleo").partial_bytes(rows, cols, group_size, topk, x.dtype) > MAX_PARTIAL_BYTES:
        return "row_blocks"
    return "symmetric"


def search_cuda(x, query_offset, query_count, group_size, topk, eps):
    """The CUDA kernel of koleo_neighbors (the route of `search_route`; the interpreter
    tests run it on CPU tensors)."""
    if debug_enabled():
        check_finite(x, "x")
    kernels = launchers("koleo")
    if search_route(x, query_offset, query_count, group_size, topk) == "symmetric":
        return kernels.koleo_neighbors_symmetric(x, group_size, topk, eps)
    return kernels.koleo_neighbors(x, query_offset, query_count, group_size, topk, eps)


koleo_neighbors.register_kernel("cuda")(search_cuda)


# ---------------------------------------------------------------- loss on the pairs


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pairs(x: Tensor, indices: Tensor, query_offset: int, eps: float):
    """Torch-op form (the CUDA kernels): normalised rows, u = q - n + eps, its norms."""
    xf = x.to(_loss_dtype(x.dtype))
    norm = xf.norm(dim=1)
    xn = xf / norm.clamp_min(eps).unsqueeze(1)
    q = xn[query_offset:query_offset + indices.shape[0]]
    u = q.unsqueeze(1) - xn[indices] + eps
    return norm, xn, u, u.norm(dim=-1)


@torch.library.custom_op("sslkernels::koleo_loss_forward", mutates_args=())
def koleo_loss_forward(x: Tensor, indices: Tensor, query_offset: int, group_size: int, eps: float) -> Tensor:
    raise _no_kernel("koleo_loss_forward", x.device)


@koleo_loss_forward.register_fake
def _(x, indices, query_offset, group_size, eps):
    return x.new_empty(())


@koleo_loss_forward.register_kernel("cpu")
def _(x, indices, query_offset, group_size, eps):
    indices = indices.contiguous()
    loss64 = torch.empty((), dtype=torch.float64)
    status = _ext._C.koleo_loss_forward(
        **_problem(x, query_offset, indices.shape[0], group_size, indices.shape[1], eps),
        indices=indices.data_ptr(), loss=loss64.data_ptr(), num_threads=_ext.num_threads())
    _status(status, "koleo")
    return loss64.to(x.dtype)


def loss_forward_torch(x, indices, query_offset, group_size, eps):
    """The CUDA kernel of koleo_loss_forward (torch ops; also tested on CPU tensors)."""
    _, _, _, dist = _pairs(x, indices, query_offset, eps)
    return (-(dist + eps).log().mean()).to(x.dtype)


koleo_loss_forward.register_kernel("cuda")(loss_forward_torch)


@torch.library.custom_op("sslkernels::koleo_loss_backward", mutates_args=())
def koleo_loss_backward(grad_loss: Tensor, x: Tensor, indices: Tensor, query_offset: int, group_size: int,
                        eps: float) -> Tensor:
    raise _no_kernel("koleo_loss_backward", x.device)


@koleo_loss_backward.register_fake
def _(grad_loss, x, indices, query_offset, group_size, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@koleo_loss_backward.register_kernel("cpu")
def _(grad_loss, x, indices, query_offset, group_size, eps):
    indices = indices.contiguous()
    dx = torch.empty(x.shape, dtype=x.dtype)
    status = _ext._C.koleo_loss_backward(
        **_problem(x, query_offset, indices.shape[0], group_size, indices.shape[1], eps),
        indices=indices.data_ptr(), grad_loss=float(grad_loss), dx=dx.data_ptr(), num_threads=_ext.num_threads())
    _status(status, "koleo backward")
    return dx


def loss_backward_torch(grad_loss, x, indices, query_offset, group_size, eps):
    """The CUDA kernel of koleo_loss_backward (torch ops; also tested on CPU tensors)."""
    norm, xn, u, dist = _pairs(x, indices, query_offset, eps)
    pairs = indices.numel()
    # d loss / d dist = -g / (pairs (dist + eps)); d dist / d u = u / dist (0 at dist = 0).
    weight = torch.where(dist > 0, -grad_loss.to(dist.dtype) / (pairs * (dist + eps) * dist), 0.0)
    gu = weight.unsqueeze(-1) * u
    gn = torch.zeros_like(xn)
    gn[query_offset:query_offset + indices.shape[0]] += gu.sum(dim=1)
    gn.index_add_(0, indices.reshape(-1), -gu.reshape(-1, gu.shape[-1]))
    n = norm.unsqueeze(1)
    dx = torch.where(n >= eps, (gn - xn * (xn * gn).sum(dim=1, keepdim=True)) / n.clamp_min(eps), gn / eps)
    return dx.to(x.dtype).contiguous()


koleo_loss_backward.register_kernel("cuda")(loss_backward_torch)


def _setup_context(ctx, inputs, output):
    x, indices, query_offset, group_size, eps = inputs
    ctx.save_for_backward(x, indices)
    ctx.koleo_args = (query_offset, group_size, eps)


def _backward(ctx, grad_loss):
    x, indices = ctx.saved_tensors
    dx = torch.ops.sslkernels.koleo_loss_backward(grad_loss, x, indices, *ctx.koleo_args)
    return dx, None, None, None, None


koleo_loss_forward.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- the route


def koleo_loss(x: Tensor, eps: float, topk: int, group_size: int, query_offset: int = 0,
               query_count: int = None) -> Tensor:
    """The search (no gradient), then the loss of its pairs (gradient to every row of x).
    With query_offset / query_count, only those rows of x are queries (a rank's slice of
    the gathered batch); group_size is then counted in rows of the whole x."""
    if query_count is None:
        query_count = x.shape[0]
    indices = torch.ops.sslkernels.koleo_neighbors(x.detach(), query_offset, query_count, group_size, topk, eps)
    return torch.ops.sslkernels.koleo_loss_forward(x, indices, query_offset, group_size, eps)
