"""The accuracy rule of the design, one implementation for the tests (tests/_utils.py) and
the device run (benchmarks/gpu/_core.py): a fused result passes when its error against the
float64 reference is at most twice the error of eager PyTorch in the same dtype, plus a
floor for the rounding of the result itself that is relative to the result's own scale
(RESOLUTION[dtype] * max|ref64|), never absolute: a gradient of size 1e-3 must not pass
as zero. Torch only, no test dependencies (the device machine imports it from the wheel)."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

# Rounding floor per dtype, relative to the magnitude of the reference.
# float64: eager is the oracle itself there (no eager term in the bound), so the floor alone
# covers the fused path's own rounding, which a peaked softmax's cancelling gradient
# (p_ii - 1 against its terms) lifts to ~2e-12 of the scale: 1e-11, relative still.
RESOLUTION = {
    torch.float64: 1e-11,
    torch.float32: 2e-6,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}

# fp32 floors by how the fused path's products run, where that is not IEEE fp32 (the GPU):
# "tf32x3" (the Triton kernels' default, kernels/_common.py) drops the lo * lo product and
# the residual of the hi / lo split, ~2^-22 of a product each, against fp32's 2^-24: 8x
# fp32's floor. "tf32" (torch's TF32 switch on) keeps fp16's 10-bit mantissa: fp16's floor.
PRODUCT_RESOLUTION = {
    "ieee": RESOLUTION[torch.float32],
    "tf32x3": 8 * RESOLUTION[torch.float32],
    "tf32": RESOLUTION[torch.float16],
}


def max_abs_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    if not ref.numel():
        return 0.0
    return float((x.detach().double().cpu() - ref.detach().double().cpu()).abs().max())


def rounding_floor(ref64: torch.Tensor, dtype, terms: float = 0.0, resolution: Optional[float] = None) -> float:
    """RESOLUTION[dtype] (or `resolution`) * max|ref64|. `terms` is the size of what the
    quantity is a difference of, used only where its own scale says nothing: for a scalar
    (a loss near 0 is lse - s_pos, logits of size `terms`, and carries their rounding) and
    for a reference that is zero up to float64's rounding of its terms (a gradient that
    cancels exactly, as with one candidate per row or through the normalisation of 1-wide
    rows: a zero result is then right). Other tensors get their own scale, so a zero or a
    wrong gradient fails."""
    scale = float(ref64.detach().double().abs().max()) if ref64.numel() else 0.0
    if ref64.dim() == 0 or scale <= RESOLUTION[torch.float64] * terms:
        scale = max(scale, terms)
    floor = (RESOLUTION[dtype] if resolution is None else resolution) * scale
    if dtype == torch.float64:
        # eager is the oracle there, so nothing measures the problem's conditioning: a
        # gradient (p - 1) q / t of a saturated softmax is a few ulps of its terms off in
        # any float64 evaluation. 8 ulps of the terms, far below any wrong gradient.
        floor = max(floor, 8 * torch.finfo(torch.float64).eps * terms)
    return floor


def logit_bound(*tensors, temperature=1.0, normalize=True) -> float:
    """The largest |logit| a contrastive loss over these rows can form, 1 / t for unit
    rows, else max |x|^2 / t: the `terms` of a loss (lse_i - s_pos is a difference of
    logits of that size, and cancels to 0 when a row's only candidate is its positive)."""
    if normalize:
        return 1.0 / float(temperature)
    norms = [float(x.detach().double().reshape(-1, x.shape[-1]).norm(dim=1).max()) for x in tensors
             if x is not None and x.is_floating_point() and x.numel()]
    return max(norms, default=0.0) ** 2 / float(temperature)


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The rule applied to one quantity. ``problem`` names a failure that has no error
    figure (a shape mismatch, a NaN / Inf); the errors are max-abs against ref64."""

    ok: bool
    err_fused: float = math.nan
    err_eager: float = math.nan
    floor: float = math.nan
    bound: float = math.nan
    problem: str = ""

    def describe(self, what: str, dtype, relative_to: float = 1.0) -> str:
        if self.problem:
            return f"{what}: {self.problem}"
        r = relative_to if relative_to > 0 else 1.0
        return (f"{what} ({dtype}): fused error {self.err_fused / r:.3e} "
                + ("<=" if self.ok else ">") + f" bound {self.bound / r:.3e} "
                f"(eager error {self.err_eager / r:.3e}, floor {self.floor / r:.3e})")


def within_eager_error(fused, eager, ref64, dtype, terms: float = 0.0, resolution: Optional[float] = None) -> Verdict:
    """|fused - ref64| <= 2 |eager - ref64| + rounding_floor(ref64, dtype, terms,
    resolution), fused finite and of ref64's shape."""
    if tuple(fused.shape) != tuple(ref64.shape):
        return Verdict(False, problem=f"shape {tuple(fused.shape)} != {tuple(ref64.shape)}")
    if not torch.isfinite(fused.detach().double()).all():
        return Verdict(False, problem="fused result has NaN/Inf (an element left unwritten?)")
    err_fused = max_abs_error(fused, ref64)
    err_eager = max_abs_error(eager, ref64)
    if not math.isfinite(err_eager):  # eager overflowed (float16): no bound but finiteness
        err_eager = math.inf
    floor = rounding_floor(ref64, dtype, terms, resolution)
    bound = 2 * err_eager + floor
    return Verdict(err_fused <= bound, err_fused, err_eager, floor, bound)
