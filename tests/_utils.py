"""Tolerance rule of the design: a fused result passes when its error against the
float64 reference is at most twice the error of eager PyTorch in the same dtype, plus a
floor for the rounding of the result itself that is relative to the result's own scale
(RESOLUTION[dtype] * max|ref64|), never absolute: a gradient of size 1e-3 must not pass
as zero. Every value-judging test (tests/, tests/interpret/, tests/test_properties.py)
uses `assert_within_eager_error`; tests/test_tolerance_helpers.py proves it can fail."""
from __future__ import annotations

import math

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


def max_abs_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).abs().max()) if ref.numel() else 0.0


def rounding_floor(ref64: torch.Tensor, dtype, terms: float = 0.0) -> float:
    """RESOLUTION[dtype] * max|ref64|. `terms` is the size of what the quantity is a
    difference of, used only where its own scale says nothing: for a scalar (a loss near
    0 is lse - s_pos, logits of size `terms`, and carries their rounding) and for a
    reference that is zero up to float64's rounding of its terms (a gradient that cancels
    exactly, as with one candidate per row or through the normalisation of 1-wide rows: a
    zero result is then right). Other tensors get their own scale, so a zero or a wrong
    gradient fails."""
    scale = float(ref64.double().abs().max()) if ref64.numel() else 0.0
    if ref64.dim() == 0 or scale <= RESOLUTION[torch.float64] * terms:
        scale = max(scale, terms)
    floor = RESOLUTION[dtype] * scale
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
    norms = [float(x.double().reshape(-1, x.shape[-1]).norm(dim=1).max()) for x in tensors
             if x is not None and x.is_floating_point() and x.numel()]
    return max(norms, default=0.0) ** 2 / float(temperature)


def assert_within_eager_error(fused, eager, ref64, dtype, what: str, terms: float = 0.0) -> None:
    """|fused - ref64| <= 2 |eager - ref64| + rounding_floor(ref64, dtype, terms)."""
    assert fused.shape == ref64.shape, f"{what}: shape {tuple(fused.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(fused.double()).all(), f"{what}: fused result has NaN/Inf (an element left unwritten?)"
    err_fused = max_abs_error(fused, ref64)
    err_eager = max_abs_error(eager, ref64)
    if not math.isfinite(err_eager):  # eager overflowed (float16): no bound but finiteness
        err_eager = math.inf
    floor = rounding_floor(ref64, dtype, terms)
    bound = 2 * err_eager + floor
    assert err_fused <= bound, (
        f"{what} ({dtype}): fused error {err_fused:.3e} > bound {bound:.3e} "
        f"(eager error {err_eager:.3e}, floor {floor:.3e})"
    )


def loss_and_grads(fn, *args, **kwargs):
    """(loss, grad of each floating-point tensor argument), on fresh leaf copies."""
    leaves = [
        a.detach().clone().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
        for a in args
    ]
    loss = fn(*leaves, **kwargs)
    grads = torch.autograd.grad(loss, [a for a in leaves if isinstance(a, torch.Tensor) and a.requires_grad])
    return (loss.detach(), *grads)


def import_bypassing_init(dotted: str, extra_packages=(), stub_modules=()):
    """Import `dotted` (e.g. "lightly.loss.ntx_ent_loss") from an installed package
    without running the __init__ of its parent packages or of `extra_packages`
    (they may need torchvision, not installable beside the CPU torch build).
    Modules in `stub_modules` are replaced by empty ones. sys.modules is restored
    afterwards; skips if the package is not installed."""
    import importlib
    import importlib.util
    import pathlib
    import sys
    import types

    import pytest

    top = dotted.split(".")[0]
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{top} is not installed (scripts/setup.sh installs it with --no-deps)")
    root = pathlib.Path(list(spec.submodule_search_locations)[0])
    owned = lambda k: k == top or k.startswith(top + ".")  # noqa: E731
    saved = {k: v for k, v in sys.modules.items() if owned(k)}
    try:
        parts = dotted.split(".")
        packages = [".".join(parts[:depth]) for depth in range(1, len(parts))] + list(extra_packages)
        for name in packages:
            module = types.ModuleType(name)
            module.__path__ = [str(root.joinpath(*name.split(".")[1:]))]
            sys.modules[name] = module
        for name in stub_modules:
            sys.modules[name] = types.ModuleType(name)
        return importlib.import_module(dotted)
    finally:
        for k in [k for k in sys.modules if owned(k)]:
            del sys.modules[k]
        sys.modules.update(saved)


def run_gloo_ranks(worker, world: int, out_dir: str, module: str, timeout_s: float) -> list:
    """Runs worker(rank, world, port, out_dir) in `world` processes and returns the dict each
    rank saved as out_dir/rank{r}.pt, asserting that none hung and none saved an "error".

    forkserver: `import sslkernels` (seconds) runs once in the server (with `module`, the
    test module holding `worker`), not in every rank, and the ranks are forked from a
    process that has run no OpenMP region."""
    import os
    import socket

    ctx = torch.multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "sslkernels", module])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=worker, args=(r, world, port, out_dir)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout_s)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    assert not hung, f"{len(hung)} of {world} ranks still running after {timeout_s} s (hang)"
    results = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r} failed:\n{res['error']}"
    return results
