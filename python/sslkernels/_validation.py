"""Checks shared by every public function; each error names the argument."""
from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_float_tensor(x, name: str, ndim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"`{name}` must be float32, float16, bfloat16 or float64, got {x.dtype}"
        )
    if x.dim() != ndim:
        raise ValueError(f"`{name}` must be {ndim}-D, got shape {tuple(x.shape)}")
    if x.device.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"`{name}` is on {x.device}; sslkernels supports cpu and cuda tensors")
    check_dims(x, name)


# The CPU core hands tile sizes to OpenBLAS as 32-bit ints: no dimension may reach 2**31.
MAX_CPU_DIM = 2**31 - 1


def check_dims(x: torch.Tensor, name: str) -> None:
    """Every dimension of a CPU tensor below 2**31 (an expanded, stride-0 tensor can claim
    more without the memory): a ValueError naming the argument, not a bad_alloc or a hang."""
    if x.device.type == "cpu" and any(size > MAX_CPU_DIM for size in x.shape):
        raise ValueError(
            f"`{name}` has shape {tuple(x.shape)}: the CPU kernels take dimensions up to 2**31 - 1"
        )


def check_same(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"`{name_a}` and `{name_b}` must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.dtype != b.dtype:
        raise TypeError(f"`{name_a}` and `{name_b}` must share a dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"`{name_a}` and `{name_b}` must be on the same device, got {a.device} and {b.device}")


def check_nonempty_rows(x: torch.Tensor, name: str) -> None:
    if x.shape[0] < 1:
        raise ValueError(f"`{name}` is an empty batch (shape {tuple(x.shape)}); need at least one row")
    if x.shape[-1] < 1:
        raise ValueError(f"`{name}` has zero features (shape {tuple(x.shape)}); need D >= 1")


def check_temperature(temperature, name: str = "temperature") -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"`{name}` must be a real number, got {type(temperature).__name__}")
    value = float(temperature)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"`{name}` must be finite and > 0, got {value}")
    return value


def check_finite(x: torch.Tensor, name: str) -> None:
    """Value check (a pass over the data; a host sync on CUDA)."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"`{name}` contains NaN or Inf")


def check_labels(labels, name: str, length: int, device: torch.device) -> torch.Tensor:
    """Integer class labels [length] on `device`, returned as int64."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"`{name}` must hold integer class ids (int64), got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != length:
        raise ValueError(f"`{name}` must have shape [{length}], got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"`{name}` is on {labels.device} but the features are on {device}")
    return labels.to(torch.int64)


def temperature_tensor(temperature, device: torch.device, name: str = "temperature") -> torch.Tensor:
    """A float or a 0-dim floating tensor (learnable when it requires grad), as a 0-dim tensor.

    A Python float becomes a float64 scalar on `device` (filled by a kernel: no host
    sync, and its gradient, if computed, stays there). A tensor must be 0-dim, on the CPU
    or on `device`; its value (finite, > 0) is checked on the CPU always and on CUDA
    in debug mode only (the check is a host sync).
    """
    if not isinstance(temperature, torch.Tensor):
        return torch.full((), check_temperature(temperature, name), dtype=torch.float64, device=device)
    if not temperature.is_floating_point():
        raise TypeError(f"`{name}` must be a floating-point tensor, got {temperature.dtype}")
    if temperature.dim() != 0:
        raise ValueError(f"`{name}` must be a 0-dim tensor, got shape {tuple(temperature.shape)}")
    if temperature.device.type != "cpu" and temperature.device != device:
        raise ValueError(f"`{name}` is on {temperature.device}; put it on the CPU or on {device}")
    from sslkernels._config import debug_enabled

    if temperature.device.type == "cpu" or debug_enabled():
        value = float(temperature.detach())
        if not math.isfinite(value) or value <= 0.0:
            raise ValueError(f"`{name}` must be finite and > 0, got {value}")
    return temperature


def check_negatives(negatives, query: torch.Tensor):
    """Extra negatives of info_nce: None, a shared [K, D] queue or per-query [N, M, D].

    Returns (negatives or None when empty, whether they need a gradient).
    """
    if negatives is None:
        return None, False
    if not isinstance(negatives, torch.Tensor) or negatives.dim() != 3:
        check_float_tensor(negatives, "negatives", 2)
    else:
        check_float_tensor(negatives, "negatives", 3)
        if negatives.shape[0] != query.shape[0]:
            raise ValueError(
                f"per-query `negatives` must be [N, M, D] with N = {query.shape[0]}, got {tuple(negatives.shape)}"
            )
    if negatives.shape[-1] != query.shape[1]:
        raise ValueError(
            f"`negatives` must have D = {query.shape[1]} features like `query`, got shape {tuple(negatives.shape)}"
        )
    if negatives.dtype != query.dtype:
        raise TypeError(f"`negatives` must share the dtype of `query` ({query.dtype}), got {negatives.dtype}")
    if negatives.device != query.device:
        raise ValueError(f"`negatives` is on {negatives.device} but `query` is on {query.device}")
    if negatives.numel() == 0:
        return None, False
    if negatives.dim() == 3:
        check_per_query_negatives_limit(negatives.device, negatives.shape[1], negatives.shape[2])
    return negatives, negatives.requires_grad


# ---------------------------------------------------------------- CUDA limits
# What the Triton kernels cannot take, refused before any launch with the limit named (the
# CPU core has none of these). The second and third launch-grid axes of a CUDA kernel hold at
# most 65535 programs; per-query negatives keep their in-tile offsets in int32.
CUDA_GRID_YZ_MAX = 65535
CUDA_PER_QUERY_SPAN_MAX = 2**22  # M * D of per-query negatives (kernels/contrastive.py _MAX_PER_QUERY_SPAN)


def check_per_query_negatives_limit(device, m: int, d: int) -> None:
    """Per-query negatives [N, M, D] on CUDA: M <= 65535 (a grid axis) and M * D < 2^22."""
    if torch.device(device).type != "cuda":
        return
    if m > CUDA_GRID_YZ_MAX or m * d >= CUDA_PER_QUERY_SPAN_MAX:
        raise NotImplementedError(
            f"info_nce on CUDA: per-query `negatives` [N, M, D] need M <= {CUDA_GRID_YZ_MAX} and "
            f"M * D < {CUDA_PER_QUERY_SPAN_MAX} (the Triton kernel's limits), got M = {m}, D = {d}; "
            "split the negatives, or run on the CPU")


def check_attention_grid(device, batch: int, heads: int) -> None:
    """Attention on CUDA launches batch * heads programs along a grid axis: at most 65535."""
    if torch.device(device).type != "cuda":
        return
    if batch * heads > CUDA_GRID_YZ_MAX:
        raise NotImplementedError(
            f"attention on CUDA: batch * heads = {batch} * {heads} = {batch * heads} is over the Triton "
            f"kernels' limit of {CUDA_GRID_YZ_MAX} (one launch-grid axis); split the batch")


# ---------------------------------------------------------------- attention
# Head dims the kernels take: any 1..256 on the CPU core, 16..128 on the Triton path.
HEAD_DIM_RANGE = {"cpu": (1, 256), "cuda": (16, 128), "meta": (1, 256)}


def check_attention_qkv(q, k, v, ndim: int) -> None:
    """q, k, v: float tensors of `ndim` dims ([B, L, H, Dh] or packed [T, H, Dh]) with
    one dtype and device; k and v alike; H and Dh (and B) shared with q."""
    for x, name in ((q, "q"), (k, "k"), (v, "v")):
        check_float_tensor(x, name, ndim)
    check_same(k, v, "k", "v")
    if q.dtype != k.dtype:
        raise TypeError(f"`q` and `k` must share a dtype, got {q.dtype} and {k.dtype}")
    if q.device != k.device:
        raise ValueError(f"`q` and `k` must be on the same device, got {q.device} and {k.device}")
    shared = (0, -2, -1) if ndim == 4 else (-2, -1)
    if any(q.shape[d] != k.shape[d] for d in shared):
        what = "batch size, heads and head dim" if ndim == 4 else "heads and head dim"
        raise ValueError(
            f"`q` and `k` must agree in {what}, got shapes {tuple(q.shape)} and {tuple(k.shape)}"
        )
    low, high = HEAD_DIM_RANGE.get(q.device.type, (1, 256))
    if not low <= q.shape[-1] <= high:
        raise ValueError(
            f"`q` head dim {q.shape[-1]} is out of range: {q.device.type} kernels take {low}..{high}"
        )
    if q.shape[-2] < 1:
        raise ValueError(f"`q` has no heads (shape {tuple(q.shape)})")
    if ndim == 4:
        check_attention_grid(q.device, q.shape[0], q.shape[2])


def attention_scale(scale, head_dim: int) -> float:
    """Softmax scale: head_dim ** -0.5 by default, else a finite real number."""
    if scale is None:
        return float(head_dim) ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"`scale` must be a real number or None, got {type(scale).__name__}")
    value = float(scale)
    if not math.isfinite(value):
        raise ValueError(f"`scale` must be finite, got {value}")
    return value


def check_patch_index(index, name: str, batch: int, device: torch.device) -> None:
    """Structure of kept-patch positions: int64 [B, K] on `device`."""
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(index).__name__}")
    if index.dtype != torch.int64:
        raise TypeError(f"`{name}` must be int64 patch positions, got {index.dtype}")
    if index.dim() != 2 or index.shape[0] != batch:
        raise ValueError(f"`{name}` must have shape [B={batch}, K], got {tuple(index.shape)}")
    if index.device != device:
        raise ValueError(f"`{name}` is on {index.device} but `q` is on {device}")


def check_patch_index_values(index: torch.Tensor, name: str, length: int) -> None:
    """Values (a pass over the index; a host sync on CUDA): every entry in [0, length)
    or -1, the -1 entries only after a row's own positions, no position twice in a row."""
    if index.numel() == 0:
        return
    if bool(((index < -1) | (index >= length)).any()):
        bad = index[(index < -1) | (index >= length)][0].item()
        raise ValueError(f"`{name}` holds {bad}, out of range: positions must be in [0, {length}) or -1 (padding)")
    kept = index >= 0
    if bool((kept[:, 1:] & ~kept[:, :-1]).any()):
        raise ValueError(f"`{name}`: -1 may only pad the end of a row (found a position after a -1)")
    ordered = index.sort(dim=1).values
    if bool(((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any()):
        raise ValueError(f"`{name}` holds a position twice in one row; positions must be unique per sample")


def check_cu_seqlens(cu_seqlens, total: int, device: torch.device, max_seqlen, heads: int = 1) -> int:
    """Structure of packed-sequence offsets: int32/int64 [B + 1] on `device` (B * heads
    within the CUDA grid limit); returns max_seqlen as an int (>= 0)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"`cu_seqlens` must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"`cu_seqlens` must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"`cu_seqlens` must have shape [B + 1] with B >= 1, got {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"`cu_seqlens` is on {cu_seqlens.device} but `q` is on {device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, (int, torch.SymInt)):
        raise TypeError(f"`max_seqlen` must be an int, got {type(max_seqlen).__name__}")
    if max_seqlen < 0:
        raise ValueError(f"`max_seqlen` must be >= 0, got {max_seqlen}")
    check_attention_grid(device, cu_seqlens.shape[0] - 1, heads)
    return max_seqlen


def check_cu_seqlens_values(cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> None:
    """Values (a host sync on CUDA): starts at 0, never decreases, ends at T, and no
    sequence is longer than max_seqlen."""
    first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
    if first != 0:
        raise ValueError(f"`cu_seqlens` must start at 0, got {first}")
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    if bool((lengths < 0).any()):
        raise ValueError("`cu_seqlens` must be non-decreasing (sequence offsets)")
    if last != total:
        raise ValueError(f"`cu_seqlens` must end at the number of tokens T = {total}, got {last}")
    longest = int(lengths.max())
    if longest > max_seqlen:
        raise ValueError(f"`max_seqlen` = {max_seqlen} is shorter than the longest sequence ({longest})")
