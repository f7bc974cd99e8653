"""sslkernels.sigreg / nn.SIGReg: the CPU core against the float64 eager reference
(lightly's formulas), the angle-addition recurrence against direct cos / sin, the
ops (opcheck, gradcheck, compile), thread-count determinism, lightly parity, bad
input, and the statistics summed over 2 and 3 Gloo ranks."""
from __future__ import annotations

import math
import os
import traceback
from datetime import timedelta

import pytest
import torch

import sslkernels
from sslkernels.ops import sigreg as sigreg_ops
from sslkernels.reference import sigreg_reference
from tests._utils import assert_within_eager_error, import_bypassing_init, loss_and_grads, run_gloo_ranks

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _unit_directions(d: int, s: int, dtype=torch.float64) -> torch.Tensor:
    a = torch.randn(d, s, dtype=torch.float64)
    return (a / a.norm(dim=0)).to(dtype)


# (proj shape, S): N in {1, 7, 257, 600}, D in {1, 3, 65, 130}, S across the 8-lane
# chunks and the column / row tiles (32 .. 256), leading batch dims.
CASES = [((1, 3), 5), ((7, 65), 130), ((257, 33), 17), ((600, 20), 300), ((2, 3, 40, 7), 9), ((5, 1), 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,s", CASES, ids=str)
def test_matches_float64_reference(shape, s, dtype, poisoned_outputs):
    proj64 = torch.randn(*shape, dtype=torch.float64)
    dirs64 = _unit_directions(shape[-1], s)
    proj, dirs = proj64.to(dtype), dirs64.to(dtype)
    ref = loss_and_grads(sigreg_reference, proj.double(), dirs.double())
    eager = loss_and_grads(sigreg_reference, proj, dirs)
    fused = loss_and_grads(sslkernels.sigreg, proj, dirs)
    assert fused[0].dtype == dtype and fused[0].shape == ()
    assert fused[1].dtype == dtype and fused[1].shape == proj.shape
    assert fused[2].dtype == dtype and fused[2].shape == dirs.shape
    for what, f, e, r in zip(("loss", "dproj", "ddirections"), fused, eager, ref):
        assert_within_eager_error(f, e, r, dtype, f"sigreg {what} {shape} S={s}")


def test_value_checker_can_fail():
    # The tolerance rule rejects a zero gradient, one a few percent off and swapped rows.
    proj, dirs = torch.randn(257, 33, dtype=torch.float64), _unit_directions(33, 17)
    ref = loss_and_grads(sigreg_reference, proj, dirs)
    eager = loss_and_grads(sigreg_reference, proj.float(), dirs.float())
    grad = ref[1]
    for bad in (torch.zeros_like(grad), grad * 1.03, grad[[1, 0, *range(2, grad.shape[0])]]):
        with pytest.raises(AssertionError):
            assert_within_eager_error(bad, eager[1], grad, torch.float32, "self-test")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_recurrence_rounding_against_direct_cos_sin(dtype):
    """N = 1, D = 1, proj = 1: the statistics are cos(t_k x_s) and sin(t_k x_s) themselves,
    x_s = directions[0, s] exactly. Against float64 cos / sin of t_k x for all 17 knots and
    |x| up to 60 (far past the data range of unit-direction projections of normalised
    embeddings) the recurrence, in float64, stays within 2e-13: a float32 recurrence
    would be ~1e-6 off, a wrong knot spacing O(1)."""
    knots, t_max = 17, 3.0
    x = torch.cat([torch.linspace(-60, 60, 4001, dtype=torch.float64), torch.randn(999, dtype=torch.float64) * 4,
                   torch.tensor([0.0, 1e-30, -math.pi, 2 * math.pi / 0.1875])]).to(dtype)
    cos_sum, sin_sum = sigreg_ops.sigreg_stats(torch.ones(1, 1, 1, dtype=dtype), x[None, :], knots, t_max)
    t = torch.arange(knots, dtype=torch.float64) * (t_max / (knots - 1))
    angles = x.double()[:, None] * t
    assert float((cos_sum[0] - angles.cos()).abs().max()) <= 2e-13
    assert float((sin_sum[0] - angles.sin()).abs().max()) <= 2e-13
    assert bool((cos_sum[0, :, 0] == 1).all()) and bool((sin_sum[0, :, 0] == 0).all())


def test_huge_projections_take_the_scalar_path():
    # |dt x| above the reduction limit (1e6): std::sin / std::cos, still exact to rounding.
    x = torch.tensor([1.0e7, -3.3e8, 12345678.9, 0.5], dtype=torch.float64)
    cos_sum, sin_sum = sigreg_ops.sigreg_stats(torch.ones(1, 1, 1, dtype=torch.float64), x[None, :], 17, 3.0)
    angles = x[:, None] * (torch.arange(17, dtype=torch.float64) * (3.0 / 16))
    # the recurrence's error grows with the angle (each step rounds sin / cos of ~1e8)
    assert float((cos_sum[0] - angles.cos()).abs().max()) <= 1e-6
    assert float((sin_sum[0] - angles.sin()).abs().max()) <= 1e-6


def test_directions_without_grad_and_noncontiguous_inputs():
    proj = torch.randn(130, 300, dtype=torch.float64).t()  # [300, 130], column-major
    dirs = _unit_directions(130, 41).t().contiguous().t()  # strides (1, 130)
    assert not proj.is_contiguous() and not dirs.is_contiguous()
    p = proj.clone().requires_grad_()
    loss = sslkernels.sigreg(p, dirs)
    loss.backward()
    p_ref = proj.contiguous().requires_grad_()
    ref = sigreg_reference(p_ref, dirs.contiguous())
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-10, atol=1e-12 * float(p_ref.grad.abs().max()))
    # only directions require grad
    d = dirs.clone().requires_grad_()
    sslkernels.sigreg(proj, d, knots=5, t_max=1.5).backward()
    d_ref = dirs.clone().requires_grad_()
    sigreg_reference(proj, d_ref, knots=5, t_max=1.5).backward()
    torch.testing.assert_close(d.grad, d_ref.grad, rtol=1e-10, atol=1e-12 * float(d_ref.grad.abs().max()))


def test_gradcheck_float64():
    proj = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    dirs = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p, a: sslkernels.sigreg(p, a, knots=5, t_max=2.0), (proj, dirs))
    assert torch.autograd.gradcheck(lambda p: sslkernels.sigreg(p, dirs.detach(), knots=17), (proj,))


def test_opcheck():
    proj = torch.randn(2, 9, 5, requires_grad=True)
    dirs = torch.randn(5, 11, requires_grad=True)
    torch.library.opcheck(torch.ops.sslkernels.sigreg_stats.default, (proj, dirs, 17, 3.0))
    g_cos = torch.randn(2, 11, 17, dtype=torch.float64)
    g_sin = torch.randn(2, 11, 17, dtype=torch.float64)
    for wants in (True, False):
        torch.library.opcheck(torch.ops.sslkernels.sigreg_stats_backward.default,
                              (proj.detach(), dirs.detach(), g_cos, g_sin, 17, 3.0, wants))


@pytest.mark.slow
def test_torch_compile_fullgraph_cpu():
    fn = torch.compile(lambda p, a: sslkernels.sigreg(p, a, knots=9, t_max=2.5), fullgraph=True)
    proj = torch.randn(3, 40, 8, requires_grad=True)
    dirs = _unit_directions(8, 33, torch.float32).requires_grad_()
    out = fn(proj, dirs)
    out.backward()
    expected = loss_and_grads(lambda p, a: sslkernels.sigreg(p, a, knots=9, t_max=2.5), proj.detach(), dirs.detach())
    torch.testing.assert_close(out.detach(), expected[0])
    torch.testing.assert_close(proj.grad, expected[1])
    torch.testing.assert_close(dirs.grad, expected[2])


def test_memory_holds_no_n_by_s_by_knots_tensor():
    # The autograd graph keeps the inputs and the [B, S, knots] statistics only.
    proj = torch.randn(4096, 16, requires_grad=True)
    dirs = _unit_directions(16, 1024, torch.float32)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = sslkernels.sigreg(proj, dirs)
    loss.backward()
    assert max(saved) <= max(proj.numel(), dirs.numel()), saved


# ---------------------------------------------------------------- bad input


def _bad_calls():
    p, a = torch.randn(6, 4), torch.randn(4, 3)
    return [
        (lambda: sslkernels.sigreg(p, torch.randn(5, 3)), ValueError, "directions"),
        (lambda: sslkernels.sigreg(p, torch.randn(4)), ValueError, "directions"),
        (lambda: sslkernels.sigreg(p, a.double()), TypeError, "directions"),
        (lambda: sslkernels.sigreg(p.long(), a), TypeError, "proj"),
        (lambda: sslkernels.sigreg(torch.randn(4), a), ValueError, "proj"),
        (lambda: sslkernels.sigreg([[1.0]], a), TypeError, "proj"),
        (lambda: sslkernels.sigreg(torch.randn(0, 4), a), ValueError, "proj"),
        (lambda: sslkernels.sigreg(torch.randn(2, 0, 4), a), ValueError, "proj"),
        (lambda: sslkernels.sigreg(p, torch.randn(4, 0)), ValueError, "directions"),
        (lambda: sslkernels.sigreg(p, a, knots=1), ValueError, "knots"),
        (lambda: sslkernels.sigreg(p, a, knots=2.0), TypeError, "knots"),
        (lambda: sslkernels.sigreg(p, a, knots=True), TypeError, "knots"),
        (lambda: sslkernels.sigreg(p, a, t_max=0.0), ValueError, "t_max"),
        (lambda: sslkernels.sigreg(p, a, t_max=-1.0), ValueError, "t_max"),
        (lambda: sslkernels.sigreg(p, a, t_max=float("nan")), ValueError, "t_max"),
        (lambda: sslkernels.sigreg(p, a, t_max="3"), TypeError, "t_max"),
        (lambda: sslkernels.sigreg(p.index_fill(0, torch.tensor([3]), float("nan")), a), ValueError, "proj"),
        (lambda: sslkernels.sigreg(p, a.index_fill(1, torch.tensor([2]), float("inf"))), ValueError, "directions"),
        (lambda: sslkernels.sigreg(p * 1e30, a * 1e30), ValueError, "overflow"),
        (lambda: sslkernels.sigreg(p, a, process_group="world"), ValueError, "process_group"),
        (lambda: sslkernels.nn.SIGReg(knots=1), ValueError, "knots"),
        (lambda: sslkernels.nn.SIGReg(t_max=0), ValueError, "t_max"),
        (lambda: sslkernels.nn.SIGReg(num_vectors=0), ValueError, "num_vectors"),
        (lambda: sslkernels.nn.SIGReg()(torch.randn(5)), ValueError, "proj"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_bad_input_names_the_argument(index):
    call, error, name = _bad_calls()[index]
    with pytest.raises(error, match=name):
        call()


# ---------------------------------------------------------------- lightly parity


def _lightly_sigreg():
    return import_bypassing_init("lightly.loss.lejepa_loss", extra_packages=("lightly.utils",)).SIGReg


@pytest.mark.parametrize("shape", [(64, 32), (3, 50, 16), (2, 2, 9, 5)], ids=str)
@pytest.mark.parametrize("kwargs", [{}, {"knots": 9, "t_max": 2.0, "num_vectors": 77}], ids=str)
def test_module_matches_lightly(shape, kwargs):
    LightlySIGReg = _lightly_sigreg()
    ours, theirs = sslkernels.nn.SIGReg(**kwargs), LightlySIGReg(**kwargs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-6, atol=1e-7)
    assert (ours.num_vectors, ours.gather_distributed) == (theirs.num_vectors, theirs.gather_distributed)
    proj = torch.randn(*shape)
    torch.manual_seed(3)
    loss_ours, grad_ours = loss_and_grads(ours, proj)
    torch.manual_seed(3)  # the same torch.randn call: the same directions
    loss_theirs, grad_theirs = loss_and_grads(theirs, proj)
    assert loss_ours.dtype == loss_theirs.dtype
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=2e-5, atol=0)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-4, atol=2e-5 * float(grad_theirs.abs().max()))


def test_module_rejects_what_lightly_rejects():
    LightlySIGReg = _lightly_sigreg()
    for kwargs in ({"knots": 1}, {"t_max": 0.0}, {"num_vectors": 0}):
        with pytest.raises(ValueError):
            LightlySIGReg(**kwargs)
        with pytest.raises(ValueError):
            sslkernels.nn.SIGReg(**kwargs)
    with pytest.raises(TypeError):
        sslkernels.nn.SIGReg(17)  # keyword-only, as lightly's
    with pytest.raises(TypeError):
        LightlySIGReg(17)


# ---------------------------------------------------------------- distributed (Gloo)

JOIN_TIMEOUT_S = 120


def _rank_rows(rank: int) -> int:
    return 5 + 3 * rank  # unequal batches: the statistics and N are summed, nothing is gathered


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    result = {}
    try:
        torch.set_num_threads(1)
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                             world_size=world, timeout=timedelta(seconds=60))
        torch.manual_seed(0)
        full = torch.randn(sum(_rank_rows(r) for r in range(world)), 6, dtype=torch.float64)
        dirs = _unit_directions(6, 13)
        start = sum(_rank_rows(r) for r in range(rank))
        mine = full[start:start + _rank_rows(rank)]
        result["functional"] = loss_and_grads(
            lambda p, a: sslkernels.sigreg(p, a, knots=9, process_group=torch.distributed.group.WORLD), mine, dirs)
        torch.manual_seed(100 + rank)  # different seeds: the broadcast makes the directions agree
        module = sslkernels.nn.SIGReg(num_vectors=21, gather_distributed=True)
        p = mine.clone().requires_grad_()
        loss = module(p)
        loss.backward()
        torch.manual_seed(100)  # rank 0's draw
        rank0_dirs = torch.randn(6, 21, dtype=torch.float64)
        result["module"] = (loss.detach(), p.grad, rank0_dirs / rank0_dirs.norm(dim=0))
        torch.distributed.destroy_process_group()
    except BaseException:  # noqa: BLE001
        result = {"error": traceback.format_exc()}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("world", [2, 3])
def test_statistics_summed_across_ranks(world, tmp_path):
    results = run_gloo_ranks(_worker, world, str(tmp_path), "tests.test_sigreg", JOIN_TIMEOUT_S)
    torch.manual_seed(0)
    full = torch.randn(sum(_rank_rows(r) for r in range(world)), 6, dtype=torch.float64)
    dirs = _unit_directions(6, 13)
    loss, dfull, ddirs = loss_and_grads(lambda p, a: sigreg_reference(p, a, knots=9), full, dirs)
    start = 0
    for r, res in enumerate(results):
        rows = _rank_rows(r)
        got_loss, got_dproj, got_ddirs = res["functional"]
        torch.testing.assert_close(got_loss, loss, rtol=1e-12, atol=0)
        # every rank returns the global loss, so each rank's rows get W x dL/dproj (DDP averages)
        torch.testing.assert_close(got_dproj, world * dfull[start:start + rows], rtol=1e-10, atol=1e-14)
        start += rows
    torch.testing.assert_close(sum(res["functional"][2] for res in results) / world, ddirs, rtol=1e-10, atol=1e-14)

    module_dirs = results[0]["module"][2]
    loss_m, dfull_m = loss_and_grads(lambda p: sigreg_reference(p, module_dirs), full)
    start = 0
    for r, res in enumerate(results):
        rows = _rank_rows(r)
        torch.testing.assert_close(res["module"][0], loss_m, rtol=1e-12, atol=0)
        torch.testing.assert_close(res["module"][1], world * dfull_m[start:start + rows], rtol=1e-10, atol=1e-14)
        start += rows
