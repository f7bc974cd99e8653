"""Test helpers. The tolerance rule of the design lives in `sslkernels._tolerance` (one
implementation, shared with the device run in benchmarks/gpu/_core.py): every
value-judging test (tests/, tests/interpret/, tests/test_properties.py) uses
`assert_within_eager_error`; tests/test_tolerance_helpers.py proves it can fail."""
from __future__ import annotations

import torch

from sslkernels._tolerance import RESOLUTION, logit_bound, max_abs_error, rounding_floor, within_eager_error

__all__ = ["RESOLUTION", "assert_within_eager_error", "import_bypassing_init", "logit_bound", "loss_and_grads",
           "max_abs_error", "rounding_floor", "run_gloo_ranks"]


def assert_within_eager_error(fused, eager, ref64, dtype, what: str, terms: float = 0.0) -> None:
    """|fused - ref64| <= 2 |eager - ref64| + rounding_floor(ref64, dtype, terms)."""
    verdict = within_eager_error(fused, eager, ref64, dtype, terms)
    assert verdict.ok, verdict.describe(what, dtype)


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


def check_masked_remote_block(forward, backward, q, key, neg, t: float, bias, anchor, cand) -> None:
    """The ring's remote-block call (positive_on_diagonal=False, normalize=False), float64,
    on one op's path: ``forward(q, key, neg) -> lse`` and ``backward(grad, merged_lse) ->
    (dq, dk, dneg)``. Rows whose every candidate shares their id get lse = -inf; given the
    merged (finite) lse, the backward weighs the block by W = p - [j == i], p = 0 on every
    masked pair, nothing non-finite leaking from the -inf."""
    n = q.shape[0]
    cands = key if neg is None else torch.cat([key, neg])
    logits = q @ cands.T / t + bias[None, :]
    drop = anchor[:, None] == cand[None, :]
    lse_block = torch.logsumexp(logits.masked_fill(drop, float("-inf")), dim=1)
    lse = forward(q, key, neg)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_block))
    kept = ~torch.isinf(lse_block)
    torch.testing.assert_close(lse[kept], lse_block[kept], rtol=1e-12, atol=1e-12)

    merged = torch.logaddexp(lse_block, (q * key).sum(1) / t + 0.3)  # as the ring merges the local lse
    dq, dk, dneg = backward(torch.tensor(0.7, dtype=torch.float64), merged)
    w = torch.exp(logits - merged[:, None]).masked_fill(drop, 0.0)
    w[:, :n] -= torch.eye(n, dtype=torch.float64)
    c = 0.7 / (n * t)
    torch.testing.assert_close(dq, c * (w @ cands), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(dk, c * (w[:, :n].T @ q), rtol=1e-10, atol=1e-13)
    if neg is not None:
        torch.testing.assert_close(dneg, c * (w[:, n:].T @ q), rtol=1e-10, atol=1e-13)
