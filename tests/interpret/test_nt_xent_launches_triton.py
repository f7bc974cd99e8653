"""The host cost of one NT-Xent training step on the Triton path, counted (not timed) under
the interpreter: the launches a step issues (Triton kernels and torch compute ops), that
the loss mean is folded into the forward kernel deterministically, and that the tuned
kernels skip the Autotuner once their config is chosen (benchmarks/GPU_MODEL.md, "Lead 1
built"). Numerics against the float64 reference: test_nt_xent_triton.py.
"""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="the Triton interpreter tests need triton")

import triton.language as tl  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from sslkernels.kernels import contrastive as _contrastive  # noqa: E402
from sslkernels.reference import nt_xent_reference  # noqa: E402
from tests._utils import RESOLUTION, assert_within_eager_error, logit_bound  # noqa: E402

pytestmark = pytest.mark.interpret

# aten ops that launch nothing on a GPU (allocations, views, metadata)
_NO_LAUNCH = {"empty", "empty_strided", "new_empty", "new_empty_strided", "view", "_unsafe_view", "alias",
              "as_strided", "detach", "slice", "select", "lift_fresh", "t", "expand"}


class _Launches(TorchDispatchMode):
    """Counts what one step sends to the device: Triton launches (each InterpretedFunction
    run, by kernel name), Autotuner.run calls, and torch ops that would launch a kernel.
    The interpreter's own copies of the kernel arguments are not counted."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.triton, self.torch, self.autotuner = [], [], 0
        self.grids = []  # (kernel name, grid) per Triton launch
        self._inside = False
        run, tuned = InterpretedFunction.run, Autotuner.run

        def counted_run(fn, *args, **kwargs):
            self.triton.append(fn.fn.__name__)
            self.grids.append((fn.fn.__name__, kwargs["grid"]))  # a tuple, or the Autotuner's callable
            self._inside, was = True, self._inside
            try:
                return run(fn, *args, **kwargs)
            finally:
                self._inside = was

        def counted_tuned(at, *args, **kwargs):
            self.autotuner += 1
            return tuned(at, *args, **kwargs)

        monkeypatch.setattr(InterpretedFunction, "run", counted_run)
        monkeypatch.setattr(Autotuner, "run", counted_tuned)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self._inside and name not in _NO_LAUNCH:
            self.torch.append(name)
        return func(*args, **(kwargs or {}))


def _inputs(n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64)
    z2 = z1 + 0.8 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return z1.to(dtype), z2.to(dtype)


def _step(k, z1, z2, normalize, grad=1.0):
    """One training step as autograd runs it: forward, then backward on its saved stats."""
    loss, lse, norms = k.nt_xent_forward(z1, z2, 0.3, normalize)
    dz1, dz2 = k.nt_xent_backward(torch.tensor(grad, dtype=z1.dtype), z1, z2, lse, 0.3, normalize, norms)
    return loss, dz1, dz2


@pytest.mark.parametrize("normalize,d,splits,expected", [
    (True, 16, 1, ["_row_norm_kernel", "_nt_xent_fwd_kernel", "_nt_xent_bwd_kernel"]),
    # D > BLOCK_DO (64 here): dZhat through the scratch, then the normalisation backward
    (True, 65, 1, ["_row_norm_kernel", "_nt_xent_fwd_kernel", "_nt_xent_bwd_kernel", "_grad_finish_kernel"]),
    (False, 16, 1, ["_nt_xent_fwd_kernel", "_nt_xent_bwd_kernel"]),
    # the backward's column sweep split: the splits' shares always go through the scratch,
    # summed by the finishing kernel (one launch more where the unsplit kernel writes dx)
    (True, 16, 2, ["_row_norm_kernel", "_nt_xent_fwd_kernel", "_nt_xent_bwd_kernel", "_grad_finish_kernel"]),
    (True, 65, 3, ["_row_norm_kernel", "_nt_xent_fwd_kernel", "_nt_xent_bwd_kernel", "_grad_finish_kernel"]),
    (False, 16, 2, ["_nt_xent_fwd_kernel", "_nt_xent_bwd_kernel", "_grad_finish_kernel"]),
], ids=["norm-fused-out", "norm-scratch", "raw", "split2-norm", "split3-norm-scratch", "split2-raw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_launches_per_step(contrastive_kernels, monkeypatch, dtype, normalize, d, splits, expected):
    """Normalised, whole rows per program: row norms, forward, backward (3; 7 in bf16 before
    the norms were saved and the loss folded), no torch compute op, no Autotuner call once
    the key has been seen. Split S ways, the backward's grid has S programs per row block
    and output slice (its third axis)."""
    monkeypatch.setattr(contrastive_kernels, "NT_XENT_BWD_SPLITS", splits)
    z1, z2 = _inputs(9, d, dtype)
    _step(contrastive_kernels, z1, z2, normalize)  # the key's first call: through the Autotuner
    launches = _Launches(monkeypatch)
    with launches:
        _step(contrastive_kernels, z1, z2, normalize)
    assert launches.triton == expected
    assert launches.torch == []
    assert launches.autotuner == 0
    (bwd_grid,) = [g for name, g in launches.grids if name == "_nt_xent_bwd_kernel"]
    assert tuple(bwd_grid) == (2, 2 if d > 64 else 1, splits)  # 2 views x cdiv(9, 32) row blocks


@pytest.mark.parametrize("splits", [2, 3])
def test_launches_of_a_split_forward(contrastive_kernels, monkeypatch, splits):
    """The forward split S ways: its grid has S programs per row block, then one merge
    launch (lse and the folded loss); still no torch compute op."""
    monkeypatch.setattr(contrastive_kernels, "NT_XENT_FWD_SPLITS", splits)
    z1, z2 = _inputs(9, 16, torch.float32)
    _step(contrastive_kernels, z1, z2, True)
    launches = _Launches(monkeypatch)
    with launches:
        _step(contrastive_kernels, z1, z2, True)
    assert launches.triton == ["_row_norm_kernel", "_nt_xent_fwd_kernel", "_nt_xent_lse_merge_kernel",
                               "_nt_xent_bwd_kernel"]
    assert launches.torch == [] and launches.autotuner == 0
    (fwd_grid,) = [g for name, g in launches.grids if name == "_nt_xent_fwd_kernel"]
    assert tuple(fwd_grid) == (2, splits)


def test_first_call_of_a_key_goes_through_the_autotuner(contrastive_kernels, monkeypatch):
    """A key the launchers have not seen goes through the Autotuner once (forward and
    backward); the config kept is the one it chose (the interpreter's pinned config)."""
    k = contrastive_kernels
    monkeypatch.setattr(k._nt_xent_fwd, "chosen", {})
    monkeypatch.setattr(k._nt_xent_bwd, "chosen", {})
    z1, z2 = _inputs(5, 3, torch.float32)
    counts = []
    for _ in range(2):
        with monkeypatch.context() as patch:
            launches = _Launches(patch)
            with launches:
                _step(k, z1, z2, False)
        counts.append(launches.autotuner)
    assert counts == [2, 0]
    for launcher in (k._nt_xent_fwd, k._nt_xent_bwd):
        ((kwargs, launch_kwargs),) = launcher.chosen.values()
        assert kwargs == k._INTERPRET_CONFIG.kwargs
        assert launch_kwargs["num_warps"] == k._INTERPRET_CONFIG.num_warps


@pytest.mark.parametrize("n", [1, 70, 257], ids=["N1", "N70", "N257"])
def test_folded_loss_is_the_mean_and_repeatable(contrastive_kernels, poisoned_outputs, n):
    """The loss written by the forward's last program is the mean of the row losses
    (float64 reference) and bit-for-bit the same on every call; 2 cdiv(N, 32) programs
    (2 to 18 here) sum their partials 4 at a time, and the ticket is back at 0 after each."""
    from sslkernels.kernels import _launch

    k = contrastive_kernels
    z1, z2 = _inputs(n, 16, torch.float32, seed=n)
    losses = [k.nt_xent_forward(z1, z2, 0.3, True)[0] for _ in range(3)]
    assert int(_launch.ticket(z1.device)) == 0
    ref = nt_xent_reference(z1.double(), z2.double(), temperature=0.3)
    eager = nt_xent_reference(z1, z2, temperature=0.3)
    assert losses[0].dtype == torch.float32 and losses[0].dim() == 0
    assert_within_eager_error(losses[0], eager, ref, torch.float32, "loss",
                              logit_bound(z1, z2, temperature=0.3, normalize=True))
    for other in losses[1:]:
        assert torch.equal(other, losses[0])


@triton.jit
def _fold_probe(values_ptr, partial_ptr, ticket_ptr, out_ptr, count, RED_BLOCK: tl.constexpr):
    """Program p contributes values[p] to _fold_mean."""
    _contrastive._fold_mean(partial_ptr, ticket_ptr, out_ptr, tl.load(values_ptr + tl.program_id(0)), count,
                            RED_BLOCK)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("programs", [1, 4, 11], ids=["P1", "P4", "P11"])
def test_fold_mean_writes_the_mean_of_every_program_in_out_dtype(contrastive_kernels, poisoned_outputs,
                                                                 out_dtype, programs):
    """The reduction alone (no tl.dot, so bf16 runs here too): P programs' float64 partials
    (exact sums, any order gives the same) -> their sum / count in float64, rounded to the
    output's dtype (half dtypes through float32); the ticket is left at 0."""
    from sslkernels.kernels import _launch

    assert _contrastive is contrastive_kernels  # the interpreted module (reloaded in place if need be)
    values = torch.arange(1, programs + 1, dtype=torch.float64) * 0.375 + 1.0
    partials = torch.empty(programs, dtype=torch.float64)
    out = torch.empty((), dtype=out_dtype)
    counter = _launch.ticket(values.device)
    _fold_probe[(programs,)](values, partials, counter, out, 7, RED_BLOCK=contrastive_kernels._RED_BLOCK)
    mean = values.sum() / 7
    expected = (mean if out_dtype == torch.float64 else mean.float()).to(out_dtype)
    if out_dtype == torch.bfloat16:  # the interpreter truncates float32 -> bf16 (the GPU rounds to nearest)
        assert abs(float(out) - float(mean)) <= RESOLUTION[out_dtype] * float(mean)
    else:
        assert torch.equal(out, expected)
    assert int(counter) == 0


class _FakeJit:
    def __init__(self, calls):
        self.calls = calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(("direct", grid, args, kwargs))


class _FakeAutotuner:
    """What TunedLauncher uses of triton's Autotuner: kernel[grid](...), best_config, fn;
    it "chooses" configs[kwargs["KEY"]]."""

    def __init__(self, configs):
        self.configs, self.calls, self.cache = configs, [], {"tuned": "before"}
        self.fn = _FakeJit(self.calls)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.best_config = self.configs[kwargs["KEY"]]
            self.calls.append(("autotuner", grid(self.best_config.kwargs), args, kwargs))
        return launch


def test_tuned_launcher_passes_the_chosen_config_straight_to_the_jit_function():
    """GPU-side behaviour in plain Python: the launch options (num_warps, num_stages) and
    the tile sizes of the config the Autotuner chose reach the JIT function, one choice per
    key; a config with a pre-hook is never cached."""
    from sslkernels.kernels._launch import TunedLauncher

    configs = {
        "a": triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=3),
        "b": triton.Config({"BLOCK_M": 128}, num_warps=8, num_stages=2),
        "hooked": triton.Config({"BLOCK_M": 32}, num_warps=4, num_stages=2, pre_hook=lambda nargs: None),
    }
    fake = _FakeAutotuner(configs)
    launcher = TunedLauncher(fake)

    def grid(cfg):
        return (1000 // cfg["BLOCK_M"],)

    for key in ("a", "a", "b", "a", "hooked", "hooked"):
        launcher(key, grid, "x", KEY=key)
    kinds = [c[0] for c in fake.calls]
    assert kinds == ["autotuner", "direct", "autotuner", "direct", "autotuner", "autotuner"]
    _, grid_a, args, kwargs = fake.calls[1]
    assert grid_a == (15,) and args == ("x",)
    assert kwargs["BLOCK_M"] == 64 and kwargs["num_warps"] == 4 and kwargs["num_stages"] == 3
    _, grid_a2, _, kwargs = fake.calls[3]
    assert grid_a2 == (15,) and kwargs["num_warps"] == 4
    assert set(launcher.chosen) == {"a", "b"}
    assert launcher.chosen["b"][1]["num_warps"] == 8
    launcher.forget()  # e.g. autotuning switched on: both caches dropped, the key tunes again
    assert launcher.chosen == {} and fake.cache == {}
    launcher("a", grid, "x", KEY="a")
    assert fake.calls[-1][0] == "autotuner"

