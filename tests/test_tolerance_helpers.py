"""Every value-judging test proves it can fail. Each test below runs a real value test
(or its helper) on a result made wrong in one of three ways and expects it to fail:

- the gradients all zero,
- the gradients a few percent off (3%, 8% in bfloat16),
- two rows of each gradient swapped (the rows of largest and smallest norm, so a swap
  of two zero rows cannot hide it),

at the sizes and dtypes those tests use (float32 / float16 / bfloat16, every N > 1 case:
at N = 1 the true gradient is zero). The contrastive and attention tests are run as
they are, with `sslkernels.<function>` replaced by the real kernel whose gradients are
corrupted; the interpreter tests' and the property tests' rule (the same
`tests._utils.assert_within_eager_error`) is fed corrupted float64 gradients at their
sizes, so no Triton kernel has to run here. The issue's mutant, right loss and zero
gradients, is the "zero" case of the first tests.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import sslkernels
import tests.test_attention as attention_tests
import tests.test_info_nce as info_nce_tests
import tests.test_info_nce_terms as info_nce_terms_tests
import tests.test_nt_xent as nt_xent_tests
import tests.test_properties as property_tests
import tests.test_sup_con as sup_con_tests
import tests.test_svdvals as svdvals_tests
from tests._reliability import BY_NAME
from tests._utils import assert_within_eager_error, logit_bound

HALF_AND_SINGLE = (torch.float32, torch.float16, torch.bfloat16)


def _swap_extreme_rows(g: torch.Tensor) -> torch.Tensor:
    rows = g.reshape(-1, g.shape[-1]) if g.dim() > 1 else g.reshape(-1, 1)
    norms = rows.double().norm(dim=1)
    hi, lo = int(norms.argmax()), int(norms.argmin())
    out = rows.clone()
    out[[hi, lo]] = rows[[lo, hi]]
    return out.reshape(g.shape)


# "A few percent": 3% in float32, 10% in float16 and 8% in bfloat16, whose short mantissas
# put eager's own error, and with it the rule's bound (2x eager's + a few ulps of the
# scale), at a few percent of a gradient: float16 at t = 0.07 (N = 7, D = 65) lets 5% pass.
FEW_PERCENT = {torch.float16: 0.10, torch.bfloat16: 0.08}

CORRUPTIONS = {
    "zero": torch.zeros_like,
    "few % off": lambda g: g * (1 + FEW_PERCENT.get(g.dtype, 0.03)),
    "swapped rows": _swap_extreme_rows,
}


class _CorruptedBackward(torch.autograd.Function):
    """Returns `out` (computed with its own graph on `copies`); its backward takes the true
    gradients for the upstream it gets and hands them out corrupted."""

    @staticmethod
    def forward(ctx, out, copies, corrupt, *inputs):
        ctx.out, ctx.copies, ctx.corrupt = out, copies, corrupt
        return out.detach().clone()

    @staticmethod
    def backward(ctx, upstream):
        with torch.enable_grad():
            grads = torch.autograd.grad(ctx.out, ctx.copies, upstream.to(ctx.out.dtype), allow_unused=True)
        return (None, None, None, *[None if g is None else ctx.corrupt(g) for g in grads])


def corrupted(fn, corrupt):
    """`fn` with its true result and its gradients passed through `corrupt`."""
    def call(*args, **kwargs):
        keys = list(kwargs)
        flat = list(args) + [kwargs[k] for k in keys]
        wanted = [i for i, a in enumerate(flat) if isinstance(a, torch.Tensor) and a.requires_grad]
        with torch.enable_grad():
            copies = list(flat)
            for i in wanted:
                copies[i] = flat[i].detach().requires_grad_(True)
            out = fn(*copies[:len(args)], **dict(zip(keys, copies[len(args):])))
        return _CorruptedBackward.apply(out, [copies[i] for i in wanted], corrupt, *[flat[i] for i in wanted])
    return call


def _cases(test_fn):
    """Every parameter combination of a parametrized test function, as keyword dicts."""
    axes = []
    for mark in getattr(test_fn, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        names = [n.strip() for n in mark.args[0].split(",")]
        values = [v if len(names) > 1 else (v,) for v in mark.args[1]]
        axes.append([dict(zip(names, v)) for v in values])
    for combo in itertools.product(*axes):
        merged = {}
        for part in combo:
            merged.update(part)
        yield merged


def _true_gradient_is_zero(name, case):
    """Cases whose exact gradient is 0 (a zero gradient is right there), like N = 1: SupCon's
    one class of two rows, MoCo with the own key only, t = 0.01 (p = 1 up to e^-100)."""
    return (case.get("classes") == 1 and case.get("n") == 2) or (name.startswith("test_moco") and case["k"] == 0) \
        or case.get("temperature") == 0.01


def _must_fail(test_fn, case, what):
    with pytest.raises(AssertionError):
        test_fn(**case)
    return what


# (module, test function, public function replaced, how the case's N is named, extra arguments)
CONTRASTIVE = [
    (nt_xent_tests, "test_matches_float64_reference", "nt_xent", "n", {"poisoned_outputs": None}),
    (nt_xent_tests, "test_temperatures_float32", "nt_xent", None, {}),
    (sup_con_tests, "test_matches_float64_reference", "sup_con", "n", {"poisoned_outputs": None}),
    (info_nce_tests, "test_matches_float64_reference", "info_nce", "n", {"poisoned_outputs": None}),
    (info_nce_tests, "test_moco_mode_without_in_batch_negatives", "info_nce", "n", {}),
    (info_nce_tests, "test_per_query_hard_negatives", "info_nce", "n", {}),
    (info_nce_terms_tests, "test_matches_float64_reference", "info_nce", "n", {}),
    (info_nce_terms_tests, "test_bias_and_queue_ids_in_moco_mode", "info_nce", None, {}),
]


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
@pytest.mark.parametrize("module,name,public,n_key,extra", CONTRASTIVE,
                         ids=[f"{m.__name__.split('.')[-1]}.{n}" for m, n, *_ in CONTRASTIVE])
def test_contrastive_value_tests_reject_wrong_gradients(monkeypatch, module, name, public, n_key, extra, corruption):
    """Includes the issue's mutant (right loss, zero gradients): every float16 / bfloat16
    (and float32) case with N > 1 of these tests must fail."""
    test_fn = getattr(module, name)
    monkeypatch.setattr(sslkernels, public, corrupted(getattr(sslkernels, public), CORRUPTIONS[corruption]))
    checked = 0
    for case in _cases(test_fn):
        if case.get("dtype", torch.float32) not in HALF_AND_SINGLE or (n_key and case[n_key] <= 1) \
                or _true_gradient_is_zero(name, case):
            continue
        torch.manual_seed(0)  # the value tests draw their inputs from the global generator
        _must_fail(test_fn, {**case, **extra}, f"{name} {case}")
        checked += 1
    assert checked > 0


ATTENTION = [("test_masked_matches_float64_reference", "masked_patch_attention"),
             ("test_varlen_matches_float64_reference", "varlen_attention")]


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
@pytest.mark.parametrize("name,public", ATTENTION, ids=[a for a, _ in ATTENTION])
def test_attention_value_tests_reject_wrong_gradients(monkeypatch, name, public, corruption):
    test_fn = getattr(attention_tests, name)
    monkeypatch.setattr(sslkernels, public, corrupted(getattr(sslkernels, public), CORRUPTIONS[corruption]))
    checked = 0
    for case in _cases(test_fn):
        if case["dtype"] not in HALF_AND_SINGLE:
            continue
        if name.startswith("test_varlen") and max(case["case"][0]) <= 1:
            continue  # one key per query: dq and dk are exactly zero, and a zero gradient is right
        torch.manual_seed(0)
        _must_fail(test_fn, {**case, "poisoned_outputs": None}, f"{name} {case}")
        checked += 1
    assert checked > 0


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_svdvals_rule_rejects_wrong_values(monkeypatch, corruption):
    """The singular-value tests' rule (error / sigma_max <= TOL) at their sizes: all zero,
    3% off, and two matrices' singular values swapped."""
    real = sslkernels.svdvals_ex

    def wrong(A, *args, **kwargs):
        S, info = real(A, *args, **kwargs)
        if corruption == "swapped rows":
            return _swap_extreme_rows(S.reshape(S.shape[0], -1)).reshape(S.shape), info
        return CORRUPTIONS[corruption](S), info

    monkeypatch.setattr(sslkernels, "svdvals_ex", wrong)
    for case in _cases(svdvals_tests.test_matches_float64_lapack):
        if corruption == "swapped rows" and min(case["m"], case["n"]) < 1:
            continue
        torch.manual_seed(0)
        _must_fail(svdvals_tests.test_matches_float64_lapack, {**case, "poisoned_outputs": None}, str(case))


# ------------------------------------------ the shared rule at the interpreter's sizes


def _nt_xent_results(n, d, dtype, normalize, temperature):
    from tests.interpret.test_nt_xent_triton import _inputs, _reference
    z1, z2 = _inputs(n, d, dtype, normalize)
    return (z1, z2), _reference(z1, z2, temperature, normalize), _reference(z1.double(), z2.double(), temperature,
                                                                           normalize)


def _sup_con_results(n, d, classes, dtype, normalize, temperature):
    from tests.interpret.test_sup_con_triton import _inputs, _reference
    x, labels = _inputs(n, d, classes, dtype, normalize)
    return (x,), _reference(x, labels, temperature, normalize), _reference(x.double(), labels, temperature, normalize)


def _info_nce_results(n, d, k, symmetric, in_batch, dtype, normalize, temperature):
    from tests.interpret.test_info_nce_triton import _inputs, _reference
    q, key, neg = _inputs(n, d, k, dtype, normalize)
    t = torch.tensor(temperature, dtype=torch.float64)
    eager = _reference(q, key, neg, t, symmetric, in_batch, normalize)
    ref = _reference(*(None if x is None else x.double() for x in (q, key, neg)), t, symmetric, in_batch, normalize)
    return (q, key), eager, ref


def _interpreter_cases():
    pytest.importorskip("triton", reason="the interpreter tests' inputs live beside their Triton tests")
    from tests.interpret import test_info_nce_triton, test_nt_xent_triton, test_sup_con_triton
    for dtype in (torch.float32, torch.float16):  # what the interpreter tests run
        for (n, d), normalize, t in itertools.product(test_nt_xent_triton.SHAPES, (True, False), (0.1, 0.5)):
            if n > 1:
                yield f"nt_xent {n}x{d}", dtype, _nt_xent_results(n, d, dtype, normalize, t)
        for (n, d, c), normalize in itertools.product(test_sup_con_triton.CASES, (True, False)):
            if n > 1:
                yield f"sup_con {n}x{d}c{c}", dtype, _sup_con_results(n, d, c, dtype, normalize,
                                                                     0.1 if normalize else 0.5)
        for (n, d, k, sym, ib), normalize in itertools.product(test_info_nce_triton.CASES, (True, False)):
            if n > 1:
                t = (0.2 if dtype == torch.float16 else 0.07) if normalize else 0.5  # as the test
                yield f"info_nce {n}x{d}k{k}", dtype, _info_nce_results(n, d, k, sym, ib, dtype, normalize, t)


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_shared_rule_rejects_wrong_gradients_at_the_interpreter_sizes(corruption):
    """The interpreter tests judge with assert_within_eager_error: fed the float64
    gradients rounded to the dtype and then corrupted, it must refuse every one."""
    checked = 0
    for label, dtype, (_, eager, ref) in _interpreter_cases():
        for i, (e, r) in enumerate(zip(eager[1:], ref[1:]), start=1):
            if r.dim() == 0 or not r.abs().max() > 0:
                continue  # the temperature's gradient (a scalar), a queue gradient of zeros
            assert_within_eager_error(r.to(e.dtype), e, r, dtype, f"{label} grad {i}")  # the right one passes
            with pytest.raises(AssertionError):
                assert_within_eager_error(CORRUPTIONS[corruption](r.to(e.dtype)), e, r, dtype, f"{label} grad {i}")
            checked += 1
    assert checked > 0


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
@pytest.mark.parametrize("name", ["nt_xent", "sup_con", "info_nce", "masked_patch_attention", "varlen_attention"])
def test_property_rule_rejects_wrong_gradients(name, corruption):
    """test_properties.assert_rule (the shared rule plus the scalar-output magnitude) on
    each op's table sizes, small and large, in every half / single dtype."""
    spec = BY_NAME[name]
    for sizes, dtype in itertools.product((spec.small, spec.large), HALF_AND_SINGLE):
        tensors = spec.build(dict(sizes), dtype, 1.0, 0)
        as64 = {k: (v.double() if v.is_floating_point() else v) for k, v in tensors.items()}
        eager = property_tests._outputs_and_grads(spec.reference, tensors, spec.defaults, spec.grads)
        ref = property_tests._outputs_and_grads(spec.reference, as64, spec.defaults, spec.grads)
        for e, r in zip(eager[1:], ref[1:]):
            if not r.abs().max() > 0:
                continue
            with pytest.raises(AssertionError):
                property_tests.assert_rule(CORRUPTIONS[corruption](r.to(e.dtype)), e, r, f"{name} {sizes} {dtype}")


def test_logit_bound_only_widens_scalars_and_zero_references():
    ref = torch.tensor([1e-3, -2e-3], dtype=torch.float64)
    wrong = torch.zeros(2, dtype=torch.float16)
    with pytest.raises(AssertionError):  # a large `terms` does not excuse a zero gradient
        assert_within_eager_error(wrong, ref.half(), ref, torch.float16, "grad", terms=1e4)
    loss = torch.tensor(1e-4, dtype=torch.float64)
    assert_within_eager_error(loss.float() + 1e-6, loss.float(), loss, torch.float32, "loss",
                              terms=logit_bound(temperature=0.5))
    with pytest.raises(AssertionError):
        assert_within_eager_error(loss.float() + 1e-6, loss.float(), loss, torch.float32, "loss")

