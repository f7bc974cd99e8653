"""SigLIP's sigmoid loss: the fused CPU path against the float64 eager oracle and
open_clip's SigLipLoss, autograd, compile, determinism, memory, errors, and the
process_group ring on 2 and 3 Gloo ranks against the one-process loss."""
import os
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F

import sslkernels
from sslkernels.reference import siglip_reference
from tests._utils import assert_within_eager_error, import_bypassing_init, max_abs_error, run_gloo_ranks

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SIZES = [(1, 3), (7, 65), (257, 130), (300, 5)]


def _pairs(n, d, dtype=torch.float32, noise=0.8, generator=None):
    image = F.normalize(torch.randn(n, d, generator=generator, dtype=torch.float64), dim=1)
    text = F.normalize(image + noise * torch.randn(n, d, generator=generator, dtype=torch.float64), dim=1)
    return image.to(dtype), text.to(dtype)


def _grads(fn, image, text, scale, bias, grad_loss=1.0):
    """(loss, d image, d text, d scale[, d bias]) of fn on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_(True) if isinstance(t, torch.Tensor) else t
              for t in (image, text, scale, bias)]
    loss = fn(*leaves)
    wrt = [t for t in leaves if isinstance(t, torch.Tensor)]
    grads = torch.autograd.grad(loss, wrt, grad_outputs=torch.full_like(loss, grad_loss))
    return [loss.detach(), *grads]


def assert_close_to_reference(fused, eager, ref64, dtype, what):
    """The shared rule with its relative floor only (no `terms`): RESOLUTION[dtype] * max|ref64|."""
    assert_within_eager_error(fused, eager, ref64, dtype, what)


def test_reference_check_can_fail():
    image, text = _pairs(257, 130, torch.float64)
    scale = torch.tensor(10.0, dtype=torch.float64)
    ref = _grads(siglip_reference, image, text, scale, None)
    eager = _grads(siglip_reference, image.float(), text.float(), scale.float(), None)
    dx = ref[1]
    swapped = dx.clone()
    swapped[[0, 1]] = dx[[1, 0]]
    for wrong in (torch.zeros_like(dx), dx * 1.03, swapped):
        with pytest.raises(AssertionError):
            assert_close_to_reference(wrong, eager[1], dx, torch.float32, "self-test")
    assert_close_to_reference(eager[1], eager[1], dx, torch.float32, "self-test")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", SIZES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_float64_reference(dtype, n, d, with_bias, poisoned_outputs):
    image, text = _pairs(n, d, dtype)
    scale = torch.tensor(10.0)
    bias = torch.tensor(-10.0) if with_bias else None
    scale_dt = scale.to(dtype)
    bias_dt = bias.to(dtype) if with_bias else None
    ref = _grads(siglip_reference, image.double(), text.double(), scale.double(),
                 bias.double() if with_bias else None)
    eager = _grads(siglip_reference, image, text, scale_dt, bias_dt)
    fused = _grads(sslkernels.siglip_loss, image, text, scale_dt, bias_dt)
    assert fused[0].dtype == dtype and fused[1].dtype == dtype and fused[3].dtype == dtype
    for name, f, e, r in zip(["loss", "dimage", "dtext", "dscale", "dbias"], fused, eager, ref):
        assert_close_to_reference(f, e, r, dtype, name)


@pytest.mark.parametrize("scale,bias", [(1e3, 0.0), (50.0, -40.0), (0.0, 3.0), (-5.0, 2.0)])
def test_extreme_and_signed_scales_are_stable(scale, bias):
    """Logits far into both tails (softplus stays exact, sigmoid saturates without NaN),
    a zero and a negative scale."""
    image, text = _pairs(130, 17, torch.float32)
    s, b = torch.tensor(scale), torch.tensor(bias)
    ref = _grads(siglip_reference, image.double(), text.double(), s.double(), b.double())
    eager = _grads(siglip_reference, image, text, s, b)
    fused = _grads(sslkernels.siglip_loss, image, text, s, b)
    for name, f, e, r in zip(["loss", "dimage", "dtext", "dscale", "dbias"], fused, eager, ref):
        assert_close_to_reference(f, e, r, torch.float32, name)


def test_tiny_loss_terms_keep_relative_accuracy():
    """Every pair confidently right: each term is ~exp(-|l|), far below float32's epsilon
    relative to 1, and the loss must still be accurate relative to itself."""
    image = torch.eye(8, 8, dtype=torch.float64)
    scale, bias = torch.tensor(20.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    ref = siglip_reference(image, image, scale, bias)
    got = sslkernels.siglip_loss(image.float(), image.float(), scale.float(), bias.float())
    assert float(ref) < 1e-3
    assert abs(float(got) - float(ref)) <= 1e-6 * float(ref)


def test_float_and_tensor_scalars_agree_and_no_bias_means_zero():
    image, text = _pairs(33, 9)
    as_float = sslkernels.siglip_loss(image, text, 7.5, -2.0)
    as_tensor = sslkernels.siglip_loss(image, text, torch.tensor(7.5), torch.tensor(-2.0, dtype=torch.float64))
    as_one_element = sslkernels.siglip_loss(image, text, torch.tensor([7.5]), torch.tensor([-2.0]))
    assert torch.equal(as_float, as_tensor) and torch.equal(as_float, as_one_element)
    assert torch.equal(sslkernels.siglip_loss(image, text, 7.5), sslkernels.siglip_loss(image, text, 7.5, 0.0))


def test_gradcheck_float64():
    image, text = _pairs(6, 4, torch.float64)
    args = (image.requires_grad_(), text.requires_grad_(),
            torch.tensor(3.0, dtype=torch.float64, requires_grad=True),
            torch.tensor(-1.5, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(sslkernels.siglip_loss, args)
    assert torch.autograd.gradcheck(lambda a, b, s: sslkernels.siglip_loss(a, b, s), args[:3])


def test_opcheck():
    image, text = _pairs(19, 7)
    op = torch.ops.sslkernels.siglip_loss_and_grads.default
    scale, bias = torch.tensor(4.0, requires_grad=True), torch.tensor(-1.0, requires_grad=True)
    for positives in (True, False):
        for b in (bias, None):
            torch.library.opcheck(op, (image.requires_grad_(), text.requires_grad_(), scale, b, positives, True))
            torch.library.opcheck(op, (image.detach(), text.detach(), scale.detach(), b.detach() if b is not None else None,
                                        positives, False))
    strided = torch.randn(7, 38)[:, ::2]
    torch.library.opcheck(op, (strided, torch.randn(5, 19, dtype=torch.float32), scale, None, True, True))


def test_unequal_counts_at_the_op_level_match_the_reference():
    """The op takes M != N texts (the ring's blocks are N x N, but the kernel is general)."""
    image, text = torch.randn(9, 5, dtype=torch.float64), torch.randn(14, 5, dtype=torch.float64)
    scale, bias = torch.tensor(2.0, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    loss, dimage, dtext, dscale, dbias = torch.ops.sslkernels.siglip_loss_and_grads(image, text, scale, bias,
                                                                                   True, True)
    leaves = [t.clone().requires_grad_() for t in (image, text, scale, bias)]
    logits = leaves[2] * leaves[0] @ leaves[1].T + leaves[3]
    labels = -torch.ones_like(logits)
    labels.diagonal().fill_(1.0)
    ref = -F.logsigmoid(labels * logits).sum() / 9
    expected = torch.autograd.grad(ref, leaves)
    torch.testing.assert_close(loss, ref.detach())
    for got, want in zip((dimage, dtext, dscale, dbias), expected):
        torch.testing.assert_close(got, want)


def test_torch_compile_fullgraph_cpu():
    image, text = _pairs(40, 12)
    scale = torch.tensor(10.0, requires_grad=True)
    fn = torch.compile(lambda a, b, s: sslkernels.siglip_loss(a, b, s, -10.0), fullgraph=True)
    got = _grads(lambda a, b, s, _: fn(a, b, s), image, text, scale, None)
    want = _grads(lambda a, b, s, _: sslkernels.siglip_loss(a, b, s, -10.0), image, text, scale, None)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_thread_count_independent_bitwise():
    image, text = _pairs(700, 40)  # 11 x 11 blocks of 64: rounds that 2 and 3 threads split unevenly
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(_grads(sslkernels.siglip_loss, image, text, torch.tensor(10.0), torch.tensor(-10.0)))
            with torch.no_grad():
                results[-1].append(sslkernels.siglip_loss(image, text, 10.0, -10.0))
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    assert torch.equal(results[0][0], results[0][-1])  # the loss-only sweep gives the same loss


def test_saves_nothing_quadratic_for_backward():
    n, d = 300, 8
    image, text = _pairs(n, d)
    image.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = sslkernels.siglip_loss(image, text, torch.tensor(10.0, requires_grad=True), -10.0)
    loss.backward()
    assert saved and max(saved) <= n * d


def test_no_grad_computes_the_loss_only():
    image, text = _pairs(50, 6)
    image.requires_grad_()
    with torch.no_grad():
        loss = sslkernels.siglip_loss(image, text, 10.0, -10.0)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, siglip_reference(image.detach(), text, 10.0, -10.0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_gradients_are_scaled_before_rounding(dtype):
    """Under an AMP loss scale the saved float32 gradients are multiplied first, so
    entries below the half type's normal range survive."""
    image, text = _pairs(200, 16, dtype)
    loss_scale = 2.0 ** 15
    ref = _grads(siglip_reference, image.double(), text.double(), torch.tensor(10.0, dtype=torch.float64), None,
                 grad_loss=loss_scale)
    # the scale stays a float32 parameter, as under AMP (its scaled gradient overflows float16)
    eager = _grads(siglip_reference, image, text, torch.tensor(10.0), None, grad_loss=loss_scale)
    fused = _grads(sslkernels.siglip_loss, image, text, torch.tensor(10.0), None, grad_loss=loss_scale)
    for name, f, e, r in zip(["loss", "dimage", "dtext", "dscale"], fused, eager, ref):
        assert_close_to_reference(f, e, r, dtype, name)


def test_create_graph_raises():
    image, text = _pairs(5, 3)
    image.requires_grad_()
    loss = sslkernels.siglip_loss(image, text, 10.0)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(loss, image, create_graph=True)


# ---------------------------------------------------------------- errors

_X = torch.randn(4, 3)


@pytest.mark.parametrize("args,exc,match", [
    ((_X, torch.randn(5, 3), 1.0), ValueError, "same shape"),
    ((_X, torch.randn(4, 2), 1.0), ValueError, "same shape"),
    ((_X, _X.double(), 1.0), TypeError, "share a dtype"),
    ((_X, _X.int(), 1.0), TypeError, "text_features"),
    ((_X[0], _X[0], 1.0), ValueError, "image_features"),
    ((torch.randn(0, 3), torch.randn(0, 3), 1.0), ValueError, "empty batch"),
    ((torch.randn(4, 0), torch.randn(4, 0), 1.0), ValueError, "zero features"),
    ((_X, _X, float("nan")), ValueError, "logit_scale"),
    ((_X, _X, torch.tensor(float("inf"))), ValueError, "logit_scale"),
    ((_X, _X, torch.ones(2)), ValueError, "logit_scale"),
    ((_X, _X, torch.tensor(3)), TypeError, "logit_scale"),
    ((_X, _X, "10"), TypeError, "logit_scale"),
    ((_X, _X, 1.0, True), TypeError, "logit_bias"),
    ((_X, _X, 1.0, torch.tensor(float("-inf"))), ValueError, "logit_bias"),
    ((_X, _X, 1.0, torch.zeros(3)), ValueError, "logit_bias"),
    (("x", _X, 1.0), TypeError, "image_features"),
])
def test_bad_input_raises(args, exc, match):
    with pytest.raises(exc, match=match):
        sslkernels.siglip_loss(*args)


@pytest.mark.parametrize("which", ["image_features", "text_features"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_features_raise(which, bad):
    image, text = _pairs(9, 4)
    (image if which == "image_features" else text)[3, 1] = bad
    with pytest.raises(ValueError, match=f"`{which}` contains NaN or Inf"):
        sslkernels.siglip_loss(image.requires_grad_(), text, 10.0)


def test_overflowing_logits_raise_not_nan():
    image = torch.full((4, 8), 3e18)
    with pytest.raises(ValueError, match="overflow"):
        sslkernels.siglip_loss(image, image, 10.0)
    with pytest.raises(ValueError, match="overflow"), torch.no_grad():
        sslkernels.siglip_loss(image, image, 10.0)


def test_direct_op_without_grads_cannot_backpropagate():
    image, text = _pairs(4, 3)
    image.requires_grad_()
    loss, *_ = torch.ops.sslkernels.siglip_loss_and_grads(image, text, torch.tensor(1.0), None, True, False)
    with pytest.raises(RuntimeError, match="want_grads=False"):
        loss.backward()


# ---------------------------------------------------------------- nn.SigLipLoss against open_clip


def _open_clip_siglip():
    return import_bypassing_init("open_clip.loss").SigLipLoss


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_module_matches_open_clip(with_bias, dtype):
    theirs = _open_clip_siglip()()
    ours = sslkernels.nn.SigLipLoss()
    image, text = _pairs(96, 32, dtype)
    scale = torch.tensor(10.0, dtype=dtype).exp() / 2000  # open_clip passes logit_scale.exp()
    bias = torch.tensor(-10.0, dtype=dtype) if with_bias else None
    expected = _grads(lambda a, b, s, c: theirs(a, b, s, c), image, text, scale, bias)
    got = _grads(lambda a, b, s, c: ours(a, b, s, c), image, text, scale, bias)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-13)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **tol)
    out = ours(image, text, scale, bias, output_dict=True)
    assert set(out) == set(theirs(image, text, scale, bias, output_dict=True)) == {"contrastive_loss"}


def test_module_signature_matches_open_clip():
    import inspect

    theirs = _open_clip_siglip()
    ours = sslkernels.nn.SigLipLoss
    assert list(inspect.signature(ours.__init__).parameters) == list(inspect.signature(theirs.__init__).parameters)
    for name, p in inspect.signature(theirs.__init__).parameters.items():
        assert inspect.signature(ours.__init__).parameters[name].default == p.default
    assert list(inspect.signature(ours.forward).parameters) == list(inspect.signature(theirs.forward).parameters)
    assert ours().dist_impl == theirs().dist_impl == "bidir"
    assert list(ours().state_dict()) == list(theirs().state_dict()) == []


def test_module_bad_arguments():
    with pytest.raises(ValueError, match="dist_impl"):
        sslkernels.nn.SigLipLoss(dist_impl="ring")
    with pytest.raises(ValueError, match="rank"):
        sslkernels.nn.SigLipLoss(rank=2, world_size=2)
    with pytest.raises(ValueError, match="world_size"):
        sslkernels.nn.SigLipLoss(world_size=0)
    image, text = _pairs(4, 3)
    with pytest.raises(ValueError, match="torch.distributed"):
        sslkernels.nn.SigLipLoss(rank=0, world_size=2)(image, text, torch.tensor(10.0))


# ---------------------------------------------------------------- process_group ring (Gloo)

B, DIM = 5, 7  # rows per rank, features
SCALE, BIAS = 6.0, -3.0
JOIN_TIMEOUT_S = 150


def _world_data(world: int):
    g = torch.Generator().manual_seed(77 + world)
    return _pairs(world * B, DIM, torch.float64, generator=g)


def _rank_cases(rank, world):
    """name -> (fn(image, text, scale, bias) -> this rank's loss, grad_loss of this rank)."""
    import sslkernels.nn

    group = torch.distributed.group.WORLD
    fn = lambda a, b, s, c: sslkernels.siglip_loss(a, b, s, c, process_group=group)  # noqa: E731
    module = sslkernels.nn.SigLipLoss(rank=rank, world_size=world)
    cases = {
        "ring": (fn, 1.0),
        "module": (lambda a, b, s, c: module(a, b, s, c), 1.0),
        # ranks with different upstream gradients: the backward reruns the ring
        "weighted": (fn, 1.0 + rank),
    }
    try:
        theirs = _open_clip_siglip()
        for impl in ("bidir", "shift", "gather"):
            clip = theirs(rank=rank, world_size=world, dist_impl=impl)
            cases[f"open_clip_{impl}"] = (lambda a, b, s, c, m=clip: m(a, b, s, c), 1.0)
    except BaseException as exc:  # pytest.skip when open_clip is missing
        if type(exc).__name__ != "Skipped":
            raise
    return cases


def _rank_worker(rank, world, port, out_dir):
    result = {}
    try:
        torch.set_num_threads(1)
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                             world_size=world, timeout=timedelta(seconds=60))
        image, text = _world_data(world)
        mine = slice(rank * B, (rank + 1) * B)
        scale = torch.tensor(SCALE, dtype=torch.float64)
        bias = torch.tensor(BIAS, dtype=torch.float64)
        for name, (fn, grad_loss) in _rank_cases(rank, world).items():
            result[name] = _grads(fn, image[mine], text[mine], scale, bias, grad_loss=grad_loss)
        # float32 features on the ring, loss only under no_grad
        with torch.no_grad():
            result["no_grad"] = sslkernels.siglip_loss(image[mine].float(), text[mine].float(), SCALE, BIAS,
                                                       process_group=torch.distributed.group.WORLD)
        try:  # unequal batches: the same ValueError on every rank, nobody hangs
            rows = B + (rank == world - 1)
            sslkernels.siglip_loss(torch.randn(rows, DIM), torch.randn(rows, DIM), 1.0,
                                   process_group=torch.distributed.group.WORLD)
            result["unequal"] = None
        except ValueError as exc:
            result["unequal"] = str(exc)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    except BaseException:  # noqa: BLE001
        import traceback

        result = {"error": traceback.format_exc()}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


_RESULTS = {}


def _spawn(world, tmp_path_factory):
    if world not in _RESULTS:
        out = str(tmp_path_factory.mktemp(f"siglip_world{world}"))
        results = run_gloo_ranks(_rank_worker, world, out, "tests.test_siglip", JOIN_TIMEOUT_S)
        _RESULTS[world] = results
    return _RESULTS[world]


def _one_process_expectation(world, weights):
    """Rank r's loss (its images against every text, over B) and the gradients the
    ring contract gives: rank r's features get d(sum_s w_s L_s)/d(its rows); the scale
    and bias get d(w_r L_r)/d(scale, bias) on rank r."""
    image, text = _world_data(world)
    leaves = [t.clone().requires_grad_() for t in (image, text)]
    scale = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(BIAS, dtype=torch.float64, requires_grad=True)
    logits = scale * leaves[0] @ leaves[1].T + bias
    labels = -torch.ones_like(logits)
    labels.diagonal().fill_(1.0)
    per_rank = (-F.logsigmoid(labels * logits)).reshape(world, B, -1).sum(dim=(1, 2)) / B
    total = (torch.tensor(weights, dtype=torch.float64) * per_rank).sum()
    dimage, dtext = torch.autograd.grad(total, leaves, retain_graph=True)
    expected = []
    for r in range(world):
        ds, db = torch.autograd.grad(weights[r] * per_rank[r], [scale, bias], retain_graph=True)
        mine = slice(r * B, (r + 1) * B)
        expected.append([per_rank[r].detach(), dimage[mine], dtext[mine], ds, db])
    # the one-process loss on the concatenated batch is the mean of the ranks' losses
    one_process = siglip_reference(image, text, SCALE, BIAS)
    torch.testing.assert_close(per_rank.mean().detach(), one_process, rtol=1e-12, atol=0)
    return expected


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", ["ring", "module", "weighted", "open_clip_bidir", "open_clip_shift",
                                  "open_clip_gather"])
def test_ring_matches_one_process_loss(world, case, tmp_path_factory):
    results = _spawn(world, tmp_path_factory)
    if case not in results[0]:
        pytest.skip("open_clip is not installed")
    weights = [1.0 + r for r in range(world)] if case == "weighted" else [1.0] * world
    expected = _one_process_expectation(world, weights)
    for r in range(world):
        for name, got, want in zip(["loss", "dimage", "dtext", "dscale", "dbias"], results[r][case], expected[r]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"{case} rank {r} {name}")


@pytest.mark.parametrize("world", [2, 3])
def test_ring_loss_only_and_unequal_batches(world, tmp_path_factory):
    results = _spawn(world, tmp_path_factory)
    expected = _one_process_expectation(world, [1.0] * world)
    for r in range(world):
        assert results[r]["no_grad"].dtype == torch.float32
        torch.testing.assert_close(results[r]["no_grad"].double(), expected[r][0], rtol=1e-5, atol=0)
        assert results[r]["unequal"] is not None and "same number of rows" in results[r]["unequal"]


def _chunked_reference(image, text, scale, bias, rows=1024):
    """The float64 loss and gradients without holding N x N at once."""
    x, y = image.double(), text.double()
    n = x.shape[0]
    loss = torch.zeros((), dtype=torch.float64)
    dx, dy = torch.zeros_like(x), torch.zeros_like(y)
    dscale = torch.zeros((), dtype=torch.float64)
    dbias = torch.zeros((), dtype=torch.float64)
    for r0 in range(0, n, rows):
        xy = x[r0:r0 + rows] @ y.T
        logits = scale * xy + bias
        labels = -torch.ones_like(logits)
        idx = torch.arange(r0, min(r0 + rows, n))
        labels[idx - r0, idx] = 1.0
        loss += -F.logsigmoid(labels * logits).sum()
        g = -labels * torch.sigmoid(-labels * logits)
        dx[r0:r0 + rows] = scale * g @ y
        dy += scale * g.T @ x[r0:r0 + rows]
        dscale += (g * xy).sum()
        dbias += g.sum()
    return [t / n for t in (loss, dx, dy, dscale, dbias)]


def test_large_batch_tiles_match_and_are_thread_independent():
    """N = 8200 takes the 512-row tiles (and a ragged last block)."""
    image, text = _pairs(8200, 4)
    ref = _chunked_reference(image, text, 10.0, -10.0)
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(_grads(sslkernels.siglip_loss, image, text, torch.tensor(10.0), torch.tensor(-10.0)))
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(*results):
        assert torch.equal(a, b)
    for name, got, want in zip(["loss", "dimage", "dtext", "dscale", "dbias"], results[0], ref):
        err = max_abs_error(got, want)
        assert err <= 1e-5 * float(want.abs().max()), f"{name}: {err:.3e}"


def test_bench_case_runs_both_implementations_on_the_same_inputs(tmp_path):
    from sslkernels import _benchmark as B
    from sslkernels.bench import main

    op = B.get_op("siglip")
    assert op.grid() == [{"n": 8192, "d": 256}]  # the bar's shape (issue 13)
    inputs = op.make_inputs({"n": 33, "d": 9}, torch.float64, torch.device("cpu"))
    torch.testing.assert_close(op.fused(*inputs), op.eager(*inputs), rtol=1e-12, atol=0)
    rc = main(["--ops", "siglip", "--n", "64", "--d", "16", "--repeat", "1", "--warmup", "0", "--no-memory",
               "--no-plot", "--no-progress", "--out", str(tmp_path)])
    assert rc == 0 and "siglip" in (tmp_path / "results.csv").read_text()
