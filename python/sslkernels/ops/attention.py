"""Attention ops over gathered rows: masked-patch attention and packed varlen attention.

sslkernels::masked_patch_attention_forward(q, k, v, index, kv_index, scale) -> (out, lse)
    q, k, v [B, L, H, Dh]; index [B, K], kv_index [B, Kv] int64 positions padded with -1;
    out [B, K, H, Dh] (zero rows where index is -1), lse [B, H, K].
sslkernels::masked_patch_attention_backward(grad_out, q, k, v, index, kv_index, out, lse, scale)
    -> (dq, dk, dv), each [B, L, H, Dh], zero at positions no row reads.
sslkernels::varlen_attention_forward(q, k, v, cu_seqlens, max_seqlen, scale) -> (out, lse)
    q, k, v [T, H, Dh]; cu_seqlens [B + 1]; out [T, H, Dh], lse [H, T].
sslkernels::varlen_attention_backward(grad_out, q, k, v, cu_seqlens, max_seqlen, out, lse, scale)
    -> (dq, dk, dv)

lse is float32 (float64 for float64 inputs), -inf for rows that attend to nothing,
with the same layout on every backend so the fake kernels serve both. Autograd saves
the inputs, the output and lse: nothing of size [B, K, Kv].

Both CPU kernels call one C++ core (`_C.attention_forward/backward`): a sequence's rows
are token base + position, the position read from the index (masked) or the row
number (packed). The CUDA kernels call the Triton launchers of
`sslkernels.kernels.attention`, with the per-row counts computed on the device (no
host sync unless `sslkernels.set_debug(True)` asks for the value checks).
"""
from __future__ import annotations

import torch
from torch import Tensor

from sslkernels import _ext
from sslkernels._common import no_kernel as _no_kernel
from sslkernels._common import stats_dtype as _stats_dtype
from sslkernels._config import debug_enabled
from sslkernels._validation import check_cu_seqlens_values, check_finite, check_patch_index_values
from sslkernels.ops._triton import launchers


def _operand(name: str, x: Tensor, packed: bool) -> dict:
    """The C++ core's keyword arguments `name`, `name_seq_stride`, `name_token_stride`,
    `name_head_stride` of a [B, L, H, Dh] or packed [T, H, Dh] tensor (the core needs
    a unit stride over Dh only)."""
    seq, token, head = (0, x.stride(0), x.stride(1)) if packed else (x.stride(0), x.stride(1), x.stride(2))
    return {name: x.data_ptr(), f"{name}_seq_stride": seq, f"{name}_token_stride": token,
            f"{name}_head_stride": head}


def _unit_last(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _row_counts(index: Tensor, dtype: torch.dtype) -> Tensor:
    return (index >= 0).sum(dim=1, dtype=dtype)


class _Problem:
    """Row maps of one call for the C++ core (keeps the int64 tensors alive)."""

    def __init__(self, q, k, v, packed: bool, query_rows, key_rows, out_base, lse_base, lse_head_stride, scale):
        self.q, self.k, self.v = _unit_last(q), _unit_last(k), _unit_last(v)
        self.packed = packed
        self.query_rows, self.key_rows = query_rows, key_rows
        self.out_base, self.lse_base, self.lse_head_stride = out_base, lse_base, lse_head_stride
        self.scale = float(scale)

    @staticmethod
    def _rows(name: str, base, count, index) -> dict:
        ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
        return {f"{name}_base": ptr(base), f"{name}_count": ptr(count), f"{name}_index": ptr(index),
                f"{name}_index_stride": 0 if index is None else index.stride(0)}

    def args(self) -> dict:
        """The C++ core's keyword arguments of the problem (bindings_attention.cpp)."""
        q = self.q
        return dict(
            dtype=_ext.DTYPE_CODES[q.dtype], num_seq=self.out_base.shape[0], heads=q.shape[-2],
            head_dim=q.shape[-1], **_operand("q", q, self.packed), **_operand("k", self.k, self.packed),
            **_operand("v", self.v, self.packed), **self._rows("query", *self.query_rows),
            **self._rows("key", *self.key_rows), out_base=self.out_base.data_ptr(),
            lse_base=self.lse_base.data_ptr(), lse_head_stride=self.lse_head_stride, scale=self.scale,
        )

    def forward(self, out: Tensor, lse: Tensor, op: str) -> None:
        status = _ext._C.attention_forward(**self.args(), out=out.data_ptr(), lse=lse.data_ptr(),
                                           num_threads=_ext.num_threads())
        _ext.raise_for_status(status, op, "q", "k", "v")

    def backward(self, grad_out: Tensor, out: Tensor, lse: Tensor, alloc, op: str):
        """(dq, dk, dv) in buffers from `alloc` (zeros where some tokens are never read)."""
        grad_out, out, lse = grad_out.contiguous(), out.contiguous(), lse.contiguous()
        dq, dk, dv = _grads_like(self.q, self.k, self.v, alloc)
        status = _ext._C.attention_backward(
            **self.args(), grad_out=grad_out.data_ptr(), out=out.data_ptr(), lse=lse.data_ptr(),
            **_operand("dq", dq, self.packed), **_operand("dk", dk, self.packed), **_operand("dv", dv, self.packed),
            num_threads=_ext.num_threads(),
        )
        _ext.raise_for_status(status, op, "q", "k", "v")
        return dq, dk, dv


def _masked_problem(q, k, v, index, kv_index, scale) -> _Problem:
    # The index is checked on every call (forward, and backward called directly): the
    # core trusts it. A [B, K] pass, nothing next to the attention itself.
    check_patch_index_values(index, "index", q.shape[1])
    if kv_index is not index:
        check_patch_index_values(kv_index, "kv_index", k.shape[1])
    b, kq, h = index.shape[0], index.shape[1], q.shape[2]
    index, kv_index = index.contiguous(), kv_index.contiguous()
    count = _row_counts(index, torch.int64)
    kv_count = count if kv_index is index else _row_counts(kv_index, torch.int64)
    rows = torch.arange(b, dtype=torch.int64)
    return _Problem(
        q, k, v, False, (None, count, index), (None, kv_count, kv_index),
        out_base=rows * kq, lse_base=rows * (h * kq), lse_head_stride=kq, scale=scale,
    )


def _varlen_problem(q, k, v, cu_seqlens, max_seqlen, scale) -> _Problem:
    check_cu_seqlens_values(cu_seqlens, q.shape[0], max_seqlen)
    cu = cu_seqlens.to(torch.int64)
    base = cu[:-1].contiguous()
    count = (cu[1:] - cu[:-1]).contiguous()
    return _Problem(
        q, k, v, True, (base, count, None), (base, count, None),
        out_base=base, lse_base=base, lse_head_stride=q.shape[0], scale=scale,
    )


def _grads_like(q: Tensor, k: Tensor, v: Tensor, alloc=torch.empty):
    """Contiguous gradient buffers shaped like q, k, v (the fake kernels' answer too).
    Masked attention asks for zeros: positions no row reads keep a zero gradient."""
    return tuple(alloc(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))


# ---------------------------------------------------------------- masked-patch attention


@torch.library.custom_op("sslkernels::masked_patch_attention_forward", mutates_args=())
def masked_patch_attention_forward(
    q: Tensor, k: Tensor, v: Tensor, index: Tensor, kv_index: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    raise _no_kernel("masked_patch_attention_forward", q.device)


@masked_patch_attention_forward.register_fake
def _(q, k, v, index, kv_index, scale):
    b, kq = index.shape
    h, dh = q.shape[2], q.shape[3]
    return q.new_empty((b, kq, h, dh)), q.new_empty((b, h, kq), dtype=_stats_dtype(q.dtype))


@masked_patch_attention_forward.register_kernel("cpu")
def _(q, k, v, index, kv_index, scale):
    same = kv_index is index or (kv_index.data_ptr() == index.data_ptr() and kv_index.shape == index.shape
                                 and kv_index.stride() == index.stride())
    problem = _masked_problem(q, k, v, index, index if same else kv_index, scale)
    b, kq = index.shape
    h, dh = q.shape[2], q.shape[3]
    out = torch.zeros((b, kq, h, dh), dtype=q.dtype)  # padding rows stay zero
    lse = torch.full((b, h, kq), float("-inf"), dtype=_stats_dtype(q.dtype))
    problem.forward(out, lse, "masked_patch_attention")
    return out, lse


@masked_patch_attention_forward.register_kernel("cuda")
def _(q, k, v, index, kv_index, scale):
    if debug_enabled():
        check_patch_index_values(index, "index", q.shape[1])
        check_patch_index_values(kv_index, "kv_index", k.shape[1])
        for x, name in ((q, "q"), (k, "k"), (v, "v")):
            check_finite(x, name)
    index, kv_index = index.contiguous(), kv_index.contiguous()
    count = _row_counts(index, torch.int32)
    kv_count = _row_counts(kv_index, torch.int32)
    return launchers("attention").masked_patch_attention_forward(
        q, k, v, index, count, kv_index, kv_count, scale
    )


@torch.library.custom_op("sslkernels::masked_patch_attention_backward", mutates_args=())
def masked_patch_attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, index: Tensor, kv_index: Tensor, out: Tensor,
    lse: Tensor, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    raise _no_kernel("masked_patch_attention_backward", q.device)


@masked_patch_attention_backward.register_fake
def _(grad_out, q, k, v, index, kv_index, out, lse, scale):
    return _grads_like(q, k, v)


@masked_patch_attention_backward.register_kernel("cpu")
def _(grad_out, q, k, v, index, kv_index, out, lse, scale):
    problem = _masked_problem(q, k, v, index, kv_index, scale)
    return problem.backward(grad_out, out, lse, torch.zeros, "masked_patch_attention backward")


@masked_patch_attention_backward.register_kernel("cuda")
def _(grad_out, q, k, v, index, kv_index, out, lse, scale):
    index, kv_index = index.contiguous(), kv_index.contiguous()
    count = _row_counts(index, torch.int32)
    kv_count = _row_counts(kv_index, torch.int32)
    return launchers("attention").masked_patch_attention_backward(
        grad_out.contiguous(), q, k, v, index, count, kv_index, kv_count, out, lse, scale
    )


# ---------------------------------------------------------------- varlen attention


@torch.library.custom_op("sslkernels::varlen_attention_forward", mutates_args=())
def varlen_attention_forward(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale: float
) -> tuple[Tensor, Tensor]:
    raise _no_kernel("varlen_attention_forward", q.device)


@varlen_attention_forward.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale):
    t, h, dh = q.shape
    return q.new_empty((t, h, dh)), q.new_empty((h, t), dtype=_stats_dtype(q.dtype))


@varlen_attention_forward.register_kernel("cpu")
def _(q, k, v, cu_seqlens, max_seqlen, scale):
    problem = _varlen_problem(q, k, v, cu_seqlens, max_seqlen, scale)
    t, h, dh = q.shape
    out = torch.empty((t, h, dh), dtype=q.dtype)  # every token belongs to a sequence
    lse = torch.empty((h, t), dtype=_stats_dtype(q.dtype))
    problem.forward(out, lse, "varlen_attention")
    return out, lse


@varlen_attention_forward.register_kernel("cuda")
def _(q, k, v, cu_seqlens, max_seqlen, scale):
    if debug_enabled():
        check_cu_seqlens_values(cu_seqlens, q.shape[0], max_seqlen)
        for x, name in ((q, "q"), (k, "k"), (v, "v")):
            check_finite(x, name)
    return launchers("attention").varlen_attention_forward(
        q, k, v, cu_seqlens.to(torch.int32), max_seqlen, scale
    )


@torch.library.custom_op("sslkernels::varlen_attention_backward", mutates_args=())
def varlen_attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, out: Tensor,
    lse: Tensor, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    raise _no_kernel("varlen_attention_backward", q.device)


@varlen_attention_backward.register_fake
def _(grad_out, q, k, v, cu_seqlens, max_seqlen, out, lse, scale):
    return _grads_like(q, k, v)


@varlen_attention_backward.register_kernel("cpu")
def _(grad_out, q, k, v, cu_seqlens, max_seqlen, out, lse, scale):
    problem = _varlen_problem(q, k, v, cu_seqlens, max_seqlen, scale)
    # Every token is read by its sequence, so every gradient row is written.
    return problem.backward(grad_out, out, lse, torch.empty, "varlen_attention backward")


@varlen_attention_backward.register_kernel("cuda")
def _(grad_out, q, k, v, cu_seqlens, max_seqlen, out, lse, scale):
    return launchers("attention").varlen_attention_backward(
        grad_out.contiguous(), q, k, v, cu_seqlens.to(torch.int32), max_seqlen, out, lse, scale
    )


# ---------------------------------------------------------------- autograd


def _register_attention_autograd(forward_op, backward_op, num_tensors: int):
    """forward(q, k, v, *rows, *scalars) -> (out, lse); backward(grad_out, q, k, v, *rows,
    *scalars-before-scale, out, lse, scale) -> (dq, dk, dv). Saves inputs, out and lse."""

    def setup_context(ctx, inputs, output):
        out, lse = output
        ctx.save_for_backward(*inputs[:num_tensors], out, lse)
        ctx.scalars = inputs[num_tensors:]
        ctx.mark_non_differentiable(lse)

    def backward(ctx, grad_out, grad_lse):
        *tensors, out, lse = ctx.saved_tensors
        *extra, scale = ctx.scalars
        dq, dk, dv = backward_op(grad_out, *tensors, *extra, out, lse, scale)
        needs = ctx.needs_input_grad
        grads = (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None)
        return grads + (None,) * (len(needs) - 3)

    forward_op.register_autograd(backward, setup_context=setup_context)


_register_attention_autograd(
    masked_patch_attention_forward, torch.ops.sslkernels.masked_patch_attention_backward, num_tensors=5
)
_register_attention_autograd(
    varlen_attention_forward, torch.ops.sslkernels.varlen_attention_backward, num_tensors=4
)
