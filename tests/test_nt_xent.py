"""NT-Xent: the fused CPU path against the float64 eager oracle, autograd, compile,
memory, errors and determinism."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import sslkernels
from sslkernels.reference import nt_xent_reference
from tests._utils import assert_within_eager_error, logit_bound
from tests._utils import import_bypassing_init
from tests._utils import loss_and_grads as _loss_and_grads

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = [(1, 3), (7, 65), (257, 130), (1000, 128)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_float64_reference(dtype, n, d, normalize, poisoned_outputs):
    scale = 1.0 if normalize else 0.3  # unnormalised rows keep logits in a sane range
    z1 = (torch.randn(n, d) * scale).to(dtype)
    z2 = (torch.randn(n, d) * scale).to(dtype)
    kw = dict(temperature=0.5, normalize=normalize)
    fused = _loss_and_grads(sslkernels.nt_xent, z1, z2, **kw)
    eager = _loss_and_grads(nt_xent_reference, z1, z2, **kw)
    ref = _loss_and_grads(nt_xent_reference, z1.double(), z2.double(), **kw)
    assert fused[0].dtype == dtype and fused[0].dim() == 0
    assert fused[1].dtype == dtype and fused[1].shape == z1.shape
    terms = logit_bound(z1, z2, **kw)
    for what, f, e, r in zip(("loss", "grad z1", "grad z2"), fused, eager, ref):
        assert_within_eager_error(f, e, r, dtype, what, terms)


@pytest.mark.parametrize("temperature", [0.01, 0.07, 0.2, 1.0, 5.0])
def test_temperatures_float32(temperature):
    # Views that agree partly, so the positive is not trivially dominant.
    z1 = torch.randn(300, 64)
    z2 = z1 + 0.7 * torch.randn(300, 64)
    fused = _loss_and_grads(sslkernels.nt_xent, z1, z2, temperature=temperature)
    eager = _loss_and_grads(nt_xent_reference, z1, z2, temperature=temperature)
    ref = _loss_and_grads(nt_xent_reference, z1.double(), z2.double(), temperature=temperature)
    for what, f, e, r in zip(("loss", "grad z1", "grad z2"), fused, eager, ref):
        assert_within_eager_error(f, e, r, torch.float32, what, logit_bound(temperature=temperature))


def test_sizes_across_tile_boundaries():
    # Row counts just around the C++ tile heights (64/128/256) and their pairings.
    for n in (32, 63, 64, 65, 127, 128, 129, 255, 256, 257, 600):
        z1, z2 = torch.randn(n, 17, dtype=torch.float64), torch.randn(n, 17, dtype=torch.float64)
        fused = _loss_and_grads(sslkernels.nt_xent, z1, z2, temperature=0.3)
        ref = _loss_and_grads(nt_xent_reference, z1, z2, temperature=0.3)
        for f, r in zip(fused, ref):
            torch.testing.assert_close(f, r, rtol=1e-10, atol=1e-12)


def test_gradcheck_float64():
    for normalize in (True, False):
        z1 = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        z2 = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda a, b: sslkernels.nt_xent(a, b, temperature=0.7, normalize=normalize), (z1, z2)
        )


def test_upstream_gradient_scales():
    z1, z2 = torch.randn(9, 6, dtype=torch.float64), torch.randn(9, 6, dtype=torch.float64)
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    (sslkernels.nt_xent(a, b) * -2.5).backward()
    _, ga, gb = _loss_and_grads(nt_xent_reference, z1, z2)
    torch.testing.assert_close(a.grad, -2.5 * ga)
    torch.testing.assert_close(b.grad, -2.5 * gb)


def test_non_contiguous_inputs():
    base1 = torch.randn(40, 2 * 33, dtype=torch.float64)
    base2 = torch.randn(33, 40, dtype=torch.float64)
    z1, z2 = base1[:, ::2], base2.T  # strided columns, transposed
    assert not z1.is_contiguous() and not z2.is_contiguous()
    fused = _loss_and_grads(sslkernels.nt_xent, z1, z2)
    ref = _loss_and_grads(nt_xent_reference, z1.contiguous(), z2.contiguous())
    for f, r in zip(fused, ref):
        torch.testing.assert_close(f, r)


def test_zero_rows_match_f_normalize():
    z1, z2 = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    z1[2] = 0.0
    z2[4] = 1e-14  # below the 1e-12 eps: clamped norm, as F.normalize
    fused = _loss_and_grads(sslkernels.nt_xent, z1, z2)
    ref = _loss_and_grads(nt_xent_reference, z1, z2)
    for f, r in zip(fused, ref):
        torch.testing.assert_close(f, r)


def test_matches_lightly_formulation():
    """lightly's NTXentLoss builds [out0.out1^T | out0.out0^T minus self] logits per view
    with positives on the diagonal; written out here as the documented formula."""
    out0, out1 = torch.randn(50, 32, dtype=torch.float64), torch.randn(50, 32, dtype=torch.float64)
    t = 0.5
    o0, o1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
    n = o0.shape[0]
    eye = torch.eye(n, dtype=torch.bool)
    l00 = (o0 @ o0.T / t)[~eye].view(n, n - 1)
    l11 = (o1 @ o1.T / t)[~eye].view(n, n - 1)
    logits = torch.cat([torch.cat([o0 @ o1.T / t, l00], 1), torch.cat([o1 @ o0.T / t, l11], 1)], 0)
    labels = torch.arange(n).repeat(2)
    lightly_loss = F.cross_entropy(logits, labels)
    ours = sslkernels.nn.NTXentLoss(temperature=t)(out0, out1)
    torch.testing.assert_close(ours, lightly_loss)


def _real_lightly_ntxent():
    """lightly's own NTXentLoss source; the torchvision-only helpers it imports (used by
    the memory bank) are stubbed, the loss code is theirs."""
    module = import_bypassing_init(
        "lightly.loss.ntx_ent_loss",
        extra_packages=("lightly.models", "lightly.models.modules", "lightly.utils"),
        stub_modules=("lightly.models.utils",),
    )
    return module.NTXentLoss


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_against_real_lightly(temperature):
    LightlyNTXent = _real_lightly_ntxent()
    out0 = torch.randn(37, 16, requires_grad=True)
    out1 = torch.randn(37, 16, requires_grad=True)
    expected = LightlyNTXent(temperature=temperature)(out0, out1)
    g_expected = torch.autograd.grad(expected, (out0, out1))
    ours = sslkernels.nn.NTXentLoss(temperature=temperature)(out0, out1)
    g_ours = torch.autograd.grad(ours, (out0, out1))
    torch.testing.assert_close(ours, expected)
    for a, b in zip(g_ours, g_expected):
        torch.testing.assert_close(a, b)


def test_module_is_drop_in():
    loss = sslkernels.nn.NTXentLoss(temperature=0.2)
    assert loss.temperature == 0.2
    assert dict(loss.state_dict()) == {}
    assert sslkernels.nn.NTXentLoss(gather_distributed=True).gather_distributed  # tests/test_distributed.py
    assert sslkernels.nn.NTXentLoss(gather_distributed=True, distributed_mode="ring").distributed_mode == "ring"
    with pytest.raises(ValueError, match="mode"):
        sslkernels.nn.NTXentLoss(gather_distributed=True, distributed_mode="ring_buffer")
    with pytest.raises(ValueError, match="temperature"):
        sslkernels.nn.NTXentLoss(temperature=0.0)


def test_saves_nothing_quadratic_for_backward():
    n, d = 300, 8  # n*n = 90000 elements, far above the inputs' 2*n*d = 4800
    z1 = torch.randn(n, d, requires_grad=True)
    z2 = torch.randn(n, d, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = sslkernels.nt_xent(z1, z2)
    loss.backward()
    assert saved, "the hook saw nothing: autograd recording is broken"
    assert max(saved) <= n * d, f"saved tensor sizes {saved}: something O(N^2) was kept"
    # The reference, by contrast, keeps the logits (the hook does see N^2 there).
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        nt_xent_reference(z1, z2)
    assert max(saved) >= (2 * n) ** 2


def test_fused_peak_memory_is_linear():
    """Peak RSS of fused forward+backward in a fresh process stays far below one logit matrix."""
    code = r"""
import torch, sslkernels
n, d = 4096, 64
z1 = torch.randn(n, d, requires_grad=True); z2 = torch.randn(n, d, requires_grad=True)
tiny = torch.randn(4, d, requires_grad=True)
sslkernels.nt_xent(tiny, tiny * 1.0).backward()   # load libraries and BLAS buffers first
def rss(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
open('/proc/self/clear_refs', 'w').write('5')
base = rss('VmRSS:')
sslkernels.nt_xent(z1, z2).backward()
print(rss('VmHWM:') - base)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    peak = int(result.stdout.strip().splitlines()[-1])
    logits_bytes = (2 * 4096) ** 2 * 4  # 256 MiB for one float32 logit matrix
    assert peak < logits_bytes / 16, f"fused peak {peak / 2**20:.1f} MiB above inputs"


def test_opcheck():
    z1 = torch.randn(11, 7, requires_grad=True)
    z2 = torch.randn(11, 7, requires_grad=True)
    torch.library.opcheck(torch.ops.sslkernels.nt_xent_forward.default, (z1, z2, 0.5, True))
    z1d, z2d = z1.detach(), z2.detach()
    _, lse, norms = torch.ops.sslkernels.nt_xent_forward(z1d, z2d, 0.5, True)
    assert norms.numel() == 0  # the C++ route saves no norms: it recomputes them in its sweeps
    torch.library.opcheck(
        torch.ops.sslkernels.nt_xent_backward.default, (torch.tensor(1.0), z1d, z2d, lse, norms, 0.5, True)
    )


def test_fake_saves_norms_on_the_triton_route_only():
    """The forward's third output (the row norms the backward reuses) has the shape each
    route returns: [4N] of the stats dtype on CUDA with normalize, empty otherwise."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        for device, normalize, rows in (("cuda", True, 20), ("cuda", False, 0), ("cpu", True, 0)):
            z = torch.empty(5, 3, dtype=torch.bfloat16, device=device)
            _, lse, norms = torch.ops.sslkernels.nt_xent_forward(z, z, 0.5, normalize)
            assert lse.shape == (10,) and norms.shape == (rows,) and norms.dtype == torch.float32, device


@pytest.mark.slow
def test_torch_compile_fullgraph_cpu():
    def step(a, b):
        return sslkernels.nt_xent(a, b, temperature=0.3) * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    z1 = torch.randn(33, 16, requires_grad=True)
    z2 = torch.randn(33, 16, requires_grad=True)
    out = compiled(z1, z2)
    out.backward()
    expected = step(z1.detach(), z2.detach())
    torch.testing.assert_close(out.detach(), expected)
    assert z1.grad is not None and torch.isfinite(z1.grad).all()


def test_deterministic_and_thread_count_independent():
    z1, z2 = torch.randn(700, 48), torch.randn(700, 48)
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            results.append(_loss_and_grads(sslkernels.nt_xent, z1, z2))
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "z1,z2,kw,exc,match",
    [
        (torch.randn(4, 3), torch.randn(5, 3), {}, ValueError, "same shape"),
        (torch.randn(4, 3), torch.randn(4, 2), {}, ValueError, "same shape"),
        (torch.randn(4), torch.randn(4), {}, ValueError, "`z1` must be 2-D"),
        (torch.randn(4, 3), torch.randn(2, 4, 3), {}, ValueError, "`z2` must be 2-D"),
        (torch.randint(0, 5, (4, 3)), torch.randn(4, 3), {}, TypeError, "`z1` must be float"),
        (torch.randn(4, 3), torch.randn(4, 3, dtype=torch.float64), {}, TypeError, "share a dtype"),
        (torch.randn(4, 3), [[1.0]], {}, TypeError, "`z2` must be a torch.Tensor"),
        (torch.randn(0, 3), torch.randn(0, 3), {}, ValueError, "empty batch"),
        (torch.randn(4, 0), torch.randn(4, 0), {}, ValueError, "zero features"),
        (torch.randn(4, 3), torch.randn(4, 3), {"temperature": 0.0}, ValueError, "temperature"),
        (torch.randn(4, 3), torch.randn(4, 3), {"temperature": -1.0}, ValueError, "temperature"),
        (torch.randn(4, 3), torch.randn(4, 3), {"temperature": float("nan")}, ValueError, "temperature"),
        (torch.randn(4, 3), torch.randn(4, 3), {"temperature": float("inf")}, ValueError, "temperature"),
        (torch.randn(4, 3), torch.randn(4, 3), {"temperature": "0.5"}, TypeError, "temperature"),
    ],
)
def test_bad_input_raises(z1, z2, kw, exc, match):
    with pytest.raises(exc, match=match):
        sslkernels.nt_xent(z1, z2, **kw)


def test_different_devices_raise():
    z1 = torch.randn(4, 3)
    z2 = torch.randn(4, 3, device="meta")
    with pytest.raises(ValueError, match="same device"):
        sslkernels.nt_xent(z1, z2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("which", ["z1", "z2"])
def test_non_finite_input_raises(bad, which):
    z = {"z1": torch.randn(9, 4), "z2": torch.randn(9, 4)}
    z[which][5, 2] = bad
    with pytest.raises(ValueError, match=f"`{which}` contains NaN or Inf"):
        sslkernels.nt_xent(z["z1"], z["z2"])


def test_logit_overflow_raises_instead_of_nan():
    z1 = torch.full((3, 4), 1e20)
    z2 = torch.full((3, 4), -1e20)
    with pytest.raises(ValueError, match="overflow"):
        sslkernels.nt_xent(z1, z2, normalize=False)


def test_import_order_and_thread_env():
    for code in (
        "import sslkernels, torch, numpy",
        "import numpy, torch, sslkernels",
    ):
        env_cases = [{}, {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}]
        for extra in env_cases:
            import os

            env = {**os.environ, **extra}
            script = code + "; z = torch.randn(300, 8); print(float(sslkernels.nt_xent(z, z.flip(0))))"
            out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
            assert out.returncode == 0, out.stderr
            assert float(out.stdout.strip()) > 0


def test_debug_switch():
    previous = sslkernels.debug_enabled()
    try:
        sslkernels.set_debug(True)
        assert sslkernels.debug_enabled() is True
        sslkernels.set_debug(False)
        assert sslkernels.debug_enabled() is False
    finally:
        sslkernels.set_debug(previous)
    script = "import sslkernels; print(sslkernels.debug_enabled())"
    import os

    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, "SSLKERNELS_DEBUG": "1"}
    )
    assert out.stdout.strip() == "True", out.stderr
