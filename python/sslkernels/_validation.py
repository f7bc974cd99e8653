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

    A Python float becomes a float64 CPU scalar. A tensor must be 0-dim, on the CPU
    or on `device`; its value (finite, > 0) is checked on the CPU always and on CUDA
    in debug mode only (the check is a host sync).
    """
    if not isinstance(temperature, torch.Tensor):
        return torch.tensor(check_temperature(temperature, name), dtype=torch.float64)
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
    return negatives, negatives.requires_grad
