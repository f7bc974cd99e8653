"""Checks shared by every public function; each error names the argument."""
from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Mapping

import torch

from sslkernels._common import torch_distributed

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


def check_embedding_pair(a, b, name_a: str, name_b: str) -> None:
    """Two [N, D] embeddings of one batch (the views, query and key, image and text):
    float tensors of the same shape, dtype and device, N and D >= 1."""
    check_float_tensor(a, name_a, 2)
    check_float_tensor(b, name_b, 2)
    check_same(a, b, name_a, name_b)
    check_nonempty_rows(a, name_a)


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
    """Class labels [length] on `device`, compared by value as pytorch-metric-learning
    does (``labels[i] == labels[j]``): integer, bool or floating-point. Returned as int64
    ids with the same equalities: integers as they are, bools as 0 / 1, floats as the
    bit pattern of their float64 value (exact for every float dtype; -0.0 taken as 0.0).
    NaN labels (equal to nothing, not even themselves) are refused: always on the CPU,
    on CUDA in debug mode (the check is a host sync). Complex labels are refused."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(labels).__name__}")
    if labels.is_complex():
        raise TypeError(f"`{name}` must hold integer, bool or real floating-point class labels, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != length:
        raise ValueError(f"`{name}` must have shape [{length}], got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"`{name}` is on {labels.device} but the features are on {device}")
    if not labels.is_floating_point():
        return labels.to(torch.int64)
    from sslkernels._config import debug_enabled

    if labels.device.type == "cpu" or debug_enabled():
        if bool(torch.isnan(labels).any()):
            raise ValueError(f"`{name}` contains NaN; a NaN label equals no other label, give it a class id")
    # float64 holds every float16 / bfloat16 / float32 value exactly, so equal bits <=> equal values
    return (labels.to(torch.float64) + 0.0).view(torch.int64)


def check_choice(value, name: str, choices) -> str:
    """One of the strings `choices`."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


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


def single_value(x, name: str, device: torch.device, *, positive: bool = False, shape_error=ValueError,
                 max_dim=None) -> torch.Tensor:
    """A logit scale / bias / shift: a real number or a one-element floating tensor, as a
    0-dim tensor. A number becomes a float64 scalar on `device`; a tensor (on the CPU or on
    `device`) keeps its autograd (the reshape is a view), so a learnable one gets its
    gradient back in its own shape. Several elements raise `shape_error` (as do more than
    `max_dim` dims). Finite (and > 0 with `positive`): checked for numbers and CPU tensors
    always, for CUDA tensors in debug mode only (the check is a host sync), and left to the
    op's CPU kernel under torch.compile (the value is data-dependent there)."""
    if isinstance(x, bool) or not isinstance(x, (numbers.Real, torch.Tensor)):
        raise TypeError(f"`{name}` must be a real number or a floating-point tensor, got {type(x).__name__}")
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise TypeError(f"`{name}` must be a floating-point tensor, got {x.dtype}")
        if x.numel() != 1 or (max_dim is not None and x.dim() > max_dim):
            raise shape_error(f"`{name}` of shape {tuple(x.shape)}: only a single value (shape [] or [1]) is "
                              "built (one value shared by every logit)")
        if x.device.type != "cpu" and x.device != device:
            raise ValueError(f"`{name}` is on {x.device}; put it on the CPU or on {device}")
    from sslkernels._config import debug_enabled

    checked = not isinstance(x, torch.Tensor) or x.device.type == "cpu" or debug_enabled()
    if checked and not (isinstance(x, torch.Tensor) and torch.compiler.is_compiling()):
        value = float(x.detach()) if isinstance(x, torch.Tensor) else float(x)
        if not math.isfinite(value) or (positive and value <= 0.0):
            raise ValueError(f"`{name}` must be finite{' and > 0' if positive else ''}, got {value}")
    if not isinstance(x, torch.Tensor):
        return torch.full((), float(x), dtype=torch.float64, device=device)
    return x.reshape(())


def clip_logit_scale(logit_scale, device: torch.device) -> torch.Tensor:
    """open_clip's exponentiated ``logit_scale`` (number, 0-dim or [1] tensor), finite and > 0;
    several values (open_clip would broadcast them) are not built."""
    return single_value(logit_scale, "logit_scale", device, positive=True, shape_error=NotImplementedError)


def clip_logit_bias(logit_bias, device: torch.device):
    """open_clip's ``logit_bias`` (None, a number, or a 0-dim / [1] tensor), finite."""
    if logit_bias is None:
        return None
    return single_value(logit_bias, "logit_bias", device, shape_error=NotImplementedError)


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


def _check_ids(ids, name: str, length: int, device) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of integer ids, got {type(ids).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"`{name}` must hold integer ids (int64), got {ids.dtype}")
    if ids.dim() != 1 or ids.shape[0] != length:
        raise ValueError(f"`{name}` must have shape [{length}], got {tuple(ids.shape)}")
    if ids.device != device:
        raise ValueError(f"`{name}` is on {ids.device} but `query` is on {device}")
    return ids.to(torch.int64).contiguous()


def check_retrieval_terms(logit_bias, key_ids, queue_ids, query: torch.Tensor, negatives):
    """info_nce's `logit_bias` [N + K] (one float per query -> key candidate: the keys,
    then the shared queue) and `key_ids` [N] / `queue_ids` [K] (integer ids of the
    candidates). `negatives` as check_negatives returned them (None, [K, D] or [N, M, D]).
    Returns (logit_bias, key_ids as int64, queue_ids as int64), each None when not given."""
    if logit_bias is None and key_ids is None and queue_ids is None:
        return None, None, None
    n = query.shape[0]
    if negatives is not None and negatives.dim() == 3:
        raise NotImplementedError(
            "info_nce: `logit_bias` and `key_ids` index the in-batch keys and a shared [K, D] queue; "
            "per-query negatives [N, M, D] have no shared candidate columns")
    k = negatives.shape[0] if negatives is not None else 0
    if logit_bias is not None:
        if not isinstance(logit_bias, torch.Tensor):
            raise TypeError(f"`logit_bias` must be a torch.Tensor, got {type(logit_bias).__name__}")
        if not logit_bias.is_floating_point():
            raise TypeError(f"`logit_bias` must be a floating-point tensor, got {logit_bias.dtype}")
        if logit_bias.dim() != 1 or logit_bias.shape[0] != n + k:
            raise ValueError(f"`logit_bias` must have shape [N + K] = [{n + k}] (one entry per key, then per "
                             f"queue row), got {tuple(logit_bias.shape)}")
        if logit_bias.device != query.device:
            raise ValueError(f"`logit_bias` is on {logit_bias.device} but `query` is on {query.device}")
        if logit_bias.requires_grad and torch.is_grad_enabled():
            raise NotImplementedError(
                "info_nce: a `logit_bias` that requires grad is not supported (it is the sampling "
                "correction -log q_j, a constant); pass logit_bias.detach()")
        from sslkernels._config import debug_enabled

        # (under torch.compile the C++ core still refuses a non-finite bias)
        if (query.device.type == "cpu" or debug_enabled()) and not torch.compiler.is_compiling():
            check_finite(logit_bias, "logit_bias")
    if queue_ids is not None and key_ids is None:
        raise ValueError("`queue_ids` needs `key_ids`: the ids are compared with each query's own key id")
    if key_ids is not None:
        key_ids = _check_ids(key_ids, "key_ids", n, query.device)
        if k > 0 and queue_ids is None:
            raise ValueError("`key_ids` with a queue needs `queue_ids` [K], so that the queue's duplicates "
                             "of a positive are masked too")
        if queue_ids is not None and k == 0:
            # an empty queue [0, D] (check_negatives made it None: MoCo's warm-up) has empty ids
            if not isinstance(queue_ids, torch.Tensor) or queue_ids.numel() != 0:
                raise ValueError("`queue_ids` given without a queue (`negatives` [K, D])")
            _check_ids(queue_ids, "queue_ids", 0, query.device)
            queue_ids = None
        if queue_ids is not None:
            queue_ids = _check_ids(queue_ids, "queue_ids", k, query.device)
    return logit_bias, key_ids, queue_ids


def check_op_terms(query: torch.Tensor, negatives, logit_bias, anchor_ids, candidate_ids) -> None:
    """The InfoNCE ops' retrieval terms as the C++ core reads them (it takes raw pointers and
    would read past a short tensor): `logit_bias` and `candidate_ids` [N + K] over the keys
    and a shared [K, D] queue, `anchor_ids` [N], the ids both or neither. The ops are
    reachable directly (torch.ops.sslkernels) and from the ring, past check_retrieval_terms."""
    if logit_bias is None and anchor_ids is None and candidate_ids is None:
        return
    if negatives is not None and negatives.dim() == 3:
        raise NotImplementedError("info_nce ops (CPU): the retrieval terms index the keys and a shared [K, D] "
                                  "queue; per-query negatives [N, M, D] take none")
    n = query.shape[0]
    candidates = n + (negatives.shape[0] if negatives is not None else 0)
    if (anchor_ids is None) != (candidate_ids is None):
        raise ValueError("info_nce ops: `anchor_ids` and `candidate_ids` go together (both or neither)")
    for x, name, length in ((logit_bias, "logit_bias", candidates), (anchor_ids, "anchor_ids", n),
                            (candidate_ids, "candidate_ids", candidates)):
        if x is not None and tuple(x.shape) != (length,):
            raise ValueError(f"info_nce ops: `{name}` must have shape [{length}], got {tuple(x.shape)}")


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


# ---------------------------------------------------------------- sigreg


def check_sigreg(proj, directions, knots, t_max) -> tuple[int, float]:
    """proj [..., N, D] and directions [D, S]: float tensors of one dtype and device, no
    empty side; knots an int >= 2, t_max finite and > 0. Returns (knots, t_max)."""
    if not isinstance(proj, torch.Tensor) or proj.dim() < 2:
        check_float_tensor(proj, "proj", 2)
    check_float_tensor(proj, "proj", proj.dim())
    check_float_tensor(directions, "directions", 2)
    if directions.dtype != proj.dtype:
        raise TypeError(f"`directions` must share the dtype of `proj` ({proj.dtype}), got {directions.dtype}")
    if directions.device != proj.device:
        raise ValueError(f"`directions` is on {directions.device} but `proj` is on {proj.device}")
    if proj.numel() == 0:
        raise ValueError(f"`proj` is empty (shape {tuple(proj.shape)}); need N >= 1 rows of D >= 1 features")
    if directions.shape[0] != proj.shape[-1]:
        raise ValueError(
            f"`directions` must be [D, S] with D = {proj.shape[-1]} (the features of `proj`), "
            f"got shape {tuple(directions.shape)}"
        )
    if directions.shape[1] < 1:
        raise ValueError(f"`directions` has no directions (shape {tuple(directions.shape)}); need S >= 1")
    if isinstance(knots, bool) or not isinstance(knots, numbers.Integral):
        raise TypeError(f"`knots` must be an int, got {type(knots).__name__}")
    if int(knots) < 2:
        raise ValueError(f"`knots` must be >= 2, got {int(knots)}")
    if isinstance(t_max, bool) or not isinstance(t_max, numbers.Real):
        raise TypeError(f"`t_max` must be a real number, got {type(t_max).__name__}")
    if not math.isfinite(float(t_max)) or float(t_max) <= 0.0:
        raise ValueError(f"`t_max` must be finite and > 0, got {float(t_max)}")
    return int(knots), float(t_max)


def check_num_vectors(num_vectors) -> int:
    if isinstance(num_vectors, bool) or not isinstance(num_vectors, numbers.Integral):
        raise TypeError(f"`num_vectors` must be an int, got {type(num_vectors).__name__}")
    if int(num_vectors) < 1:
        raise ValueError(f"`num_vectors` must be >= 1, got {int(num_vectors)}")
    return int(num_vectors)
# ---------------------------------------------------------------- siglip


def check_siglip_features(image_features, text_features) -> None:
    """image [N, D] and text [N, D]: float tensors of one dtype and device, N, D >= 1."""
    check_float_tensor(image_features, "image_features", 2)
    check_float_tensor(text_features, "text_features", 2)
    check_same(image_features, text_features, "image_features", "text_features")
    check_nonempty_rows(image_features, "image_features")


def logit_scalar(value, name: str, device: torch.device) -> torch.Tensor:
    """SigLIP's logit_scale / logit_bias (open_clip passes the scale already exponentiated:
    it multiplies the logits as given, any sign), as a 0-dim tensor on `device`: a CPU
    tensor is moved there, differentiably."""
    return single_value(value, name, device, max_dim=1).to(device)


# ---------------------------------------------------------------- distributed
DISTRIBUTED_MODES = ("all_gather", "ring")


def check_distributed_mode(mode) -> str:
    if not isinstance(mode, str) or mode not in DISTRIBUTED_MODES:
        raise ValueError(f"`mode` must be one of {DISTRIBUTED_MODES}, got {mode!r}")
    return mode


def check_process_group(process_group, name: str = "process_group"):
    """``process_group`` (a ``torch.distributed.ProcessGroup``, e.g. ``dist.group.WORLD``)
    checked; raises when torch.distributed is unavailable or not initialised."""
    dist = torch_distributed()
    if not dist.is_available():
        raise ValueError(f"`{name}` was given but torch.distributed is not available in this torch build")
    if not dist.is_initialized():
        raise ValueError(f"`{name}` was given but torch.distributed is not initialised (call init_process_group)")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"`{name}` must be a torch.distributed.ProcessGroup (e.g. dist.group.WORLD), "
            f"got {type(process_group).__name__}"
        )
    return process_group


# ---------------------------------------------------------------- singular values and metrics


def check_matrices(A, name: str, min_dim: int = 2, max_dim: int = None) -> None:
    """Structural checks of a batch of matrices ``[..., m, n]``; errors name the argument."""
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(A).__name__}")
    if A.dtype not in FLOAT_DTYPES:
        raise TypeError(f"`{name}` must be float32, float16, bfloat16 or float64, got {A.dtype}")
    if A.dim() < min_dim or (max_dim is not None and A.dim() > max_dim):
        want = f"{min_dim}-D" if max_dim == min_dim else (
            f"{min_dim}-D or {max_dim}-D" if max_dim == min_dim + 1 else f"at least {min_dim}-D")
        raise ValueError(f"`{name}` must be {want}, got shape {tuple(A.shape)}")
    if A.device.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"`{name}` is on {A.device}; sslkernels supports cpu and cuda tensors")
    check_dims(A, name)
    if A.shape[-2] < 1 or A.shape[-1] < 1:
        raise ValueError(f"`{name}` has a zero-size matrix dimension (shape {tuple(A.shape)})")
    if A.numel() == 0:
        raise ValueError(f"`{name}` is an empty batch (shape {tuple(A.shape)})")


def check_max_sweeps(max_sweeps) -> int:
    if isinstance(max_sweeps, bool) or not isinstance(max_sweeps, int):
        raise TypeError(f"`max_sweeps` must be an int, got {type(max_sweeps).__name__}")
    if not 1 <= max_sweeps <= MAX_CPU_DIM:
        raise ValueError(f"`max_sweeps` must be in [1, 2**31 - 1], got {max_sweeps}")
    return max_sweeps


def check_nonnegative(value, name: str) -> float:
    """A finite real number >= 0 (a metric's eps, LiDAR's delta)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"`{name}` must be finite and >= 0, got {value}")
    return value


def check_fit_range(fit_range, rank: int):
    """alpha-ReQ's 1-based ranks ``lo <= i < hi``, clipped to `rank` = min(N, D): (lo, hi)."""
    if (not isinstance(fit_range, (tuple, list)) or len(fit_range) != 2
            or not all(isinstance(r, int) and not isinstance(r, bool) for r in fit_range)):
        raise TypeError(f"`fit_range` must be a pair of ints (lo, hi), got {fit_range!r}")
    lo, hi = fit_range
    hi = min(hi, rank + 1)
    if lo < 1 or hi - lo < 2:
        raise ValueError(
            f"`fit_range` {tuple(fit_range)} leaves fewer than 2 ranks to fit in 1..{rank} "
            f"(min(N, D) = {rank}); need 1 <= lo and at least two ranks lo <= i < hi")
    return lo, hi


def check_views(views) -> None:
    """LiDAR's ``[N, Q, D]`` views: N >= 2 samples of Q >= 2 views each."""
    if not isinstance(views, torch.Tensor):
        raise TypeError(f"`views` must be a torch.Tensor, got {type(views).__name__}")
    if views.dim() != 3:
        raise ValueError(f"`views` must be 3-D [N, Q, D], got shape {tuple(views.shape)}")
    check_matrices(views, "views", 3, 3)
    if views.shape[0] < 2 or views.shape[1] < 2:
        raise ValueError(f"`views` needs N >= 2 samples and Q >= 2 views each, got shape {tuple(views.shape)}")


# ---------------------------------------------------------------- the monitor


class EmbeddingDTypeError(TypeError, ValueError):
    """Non-floating embeddings: a TypeError (wrong type of data) that is also a ValueError."""


def check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
    return value


def check_metric_names(metrics, valid) -> tuple:
    """A metric name or names from `valid`, deduplicated in order."""
    names = (metrics,) if isinstance(metrics, str) else metrics
    try:
        names = tuple(names)
    except TypeError:
        raise TypeError(f"`metrics` must be a str or a sequence of str, got {type(metrics).__name__}") from None
    if not names:
        raise ValueError(f"`metrics` is empty; choose from {list(valid)}")
    out = []
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"`metrics` must hold str names, got {name!r}")
        if name == "lidar":
            raise NotImplementedError(
                "`metrics`: 'lidar' needs several augmented views per sample ([N, Q, D]), which this "
                "monitor does not buffer; call sslkernels.lidar(views) on a held-out batch of views instead")
        if name not in valid:
            raise ValueError(f"`metrics`: unknown metric {name!r}; valid names are {list(valid)}")
        if name not in out:
            out.append(name)
    return tuple(out)


def check_metric_kwargs(metric_kwargs, names, functions) -> dict:
    """``{metric name: {keyword: value}}`` for the monitored `names`, each dict bound
    against the signature of ``getattr(functions, name)`` (the metrics module)."""
    if metric_kwargs is None:
        return {}
    if not isinstance(metric_kwargs, Mapping):
        raise TypeError(f"`metric_kwargs` must be a dict of dicts, got {type(metric_kwargs).__name__}")
    out = {}
    for name, kwargs in metric_kwargs.items():
        if name not in names:
            raise ValueError(
                f"`metric_kwargs` has options for {name!r}, which is not among the monitored "
                f"`metrics` {list(names)}")
        if not isinstance(kwargs, Mapping):
            raise TypeError(f"`metric_kwargs[{name!r}]` must be a dict, got {type(kwargs).__name__}")
        kwargs = dict(kwargs)
        try:
            inspect.signature(getattr(functions, name)).bind(None, **kwargs)
        except TypeError as e:
            raise TypeError(f"`metric_kwargs[{name!r}]` does not fit sslkernels.{name}: {e}") from None
        out[name] = kwargs
    return out


def check_monitor_embeddings(z, dim, device) -> None:
    """A monitor's ``embeddings [B, D]``; `dim` / `device`: those its buffer fixed, or None."""
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"`embeddings` must be a torch.Tensor, got {type(z).__name__}")
    if z.dim() != 2:
        raise ValueError(f"`embeddings` must be 2-D [batch, dim], got shape {tuple(z.shape)}")
    if not z.is_floating_point():
        raise EmbeddingDTypeError(
            f"`embeddings` must be a floating-point tensor (float16/bfloat16/float32/float64), got {z.dtype}")
    if z.shape[1] < 1:
        raise ValueError(f"`embeddings` has zero features (shape {tuple(z.shape)})")
    if dim is not None:
        if z.shape[1] != dim:
            raise ValueError(
                f"`embeddings` has dim {z.shape[1]}, but this monitor buffers dim {dim} "
                f"(fixed by the first call; call reset() to change it)")
        if z.device != device:
            raise ValueError(
                f"`embeddings` is on {z.device}, but this monitor's buffer is on {device} "
                f"(fixed by the first call; call reset() to change it)")
# ---------------------------------------------------------------- koleo
def check_koleo(x, eps, topk, group_size, name: str = "x", batch_rows: int = None) -> tuple:
    """KoLeo arguments: x a float [N, D] tensor with N, D >= 1; eps finite and > 0; topk an
    int >= 1; group_size None (the whole batch) or an int dividing the batch that exceeds
    topk. `batch_rows` is the size of the batch the groups cut (the gathered batch under
    gather_distributed; N by default). Returns (eps, topk, group_size) as float, int, int."""
    check_float_tensor(x, name, 2)
    check_nonempty_rows(x, name)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"`eps` must be a real number, got {type(eps).__name__}")
    eps = float(eps)
    if not math.isfinite(eps) or eps <= 0.0:
        raise ValueError(f"`eps` must be finite and > 0, got {eps}")
    if isinstance(topk, bool) or not isinstance(topk, numbers.Integral):
        raise TypeError(f"`topk` must be an int, got {type(topk).__name__}")
    topk = int(topk)
    if topk < 1:
        raise ValueError(f"`topk` must be >= 1, got {topk}")
    rows = x.shape[0] if batch_rows is None else int(batch_rows)
    if group_size is None:
        if rows <= topk:
            raise ValueError(
                f"`{name}` has {rows} rows: KoLeo needs more rows than `topk` = {topk} (a row is never its own neighbour)")
        group = rows
    else:
        if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral):
            raise TypeError(f"`group_size` must be an int or None, got {type(group_size).__name__}")
        group = int(group_size)
        if group <= topk:
            raise ValueError(f"`group_size` = {group} must be larger than `topk` = {topk}")
        if rows % group != 0:
            raise ValueError(f"`group_size` = {group} must divide the batch of {rows} rows")
    # NaN / Inf: the ops check them (the CPU search always, the CUDA one in debug mode), so
    # no host-side pass here breaks torch.compile's graph.
    return eps, topk, group
