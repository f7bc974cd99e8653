"""Property-based tests of every public function in tests/_reliability.py: random shapes
(1, odd sizes and sizes just above the tile / route boundaries), dtypes, options
(temperatures 0.05..2, normalize, symmetric, ...) and input scales 1e-3..1e3.

The design's rule: |fused - ref64| <= 2 |eager - ref64| + floor, where ref64 is the eager
formula on float64 copies of the very same inputs, eager the formula in the inputs'
dtype, floor = RESOLUTION[output dtype] * max(|ref64|, magnitude) (tests/_utils.py), magnitude
(`OpSpec.magnitude`, for scalar outputs only: the largest logit of a contrastive loss) so a
loss that cancels to ~0 still gets the rounding of the logits it came from, while a
gradient's floor is its own scale and a zero gradient fails; a documented accuracy (`OpSpec.promised`: svdvals'
float64 Gram route, 1e-8 sigma_max, where float64 eager is the oracle itself) replaces
the floor when larger. Gradients too, where the function has them. Profiles (tests/conftest.py): "ci" by default, HYPOTHESIS_PROFILE=long
or --hypothesis-profile=long for a longer local run.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from tests._reliability import OPS
from tests._utils import assert_within_eager_error, max_abs_error


def _scales(dtype, options):
    """Input scales 1e-3..1e3 (log-uniform): unnormalised contrastive logits and attention's
    q.k reach 1e4 and far beyond (they grow as scale^2). float16 keeps its results
    representable: 1e-2..1e2, and at most 2 for unnormalised contrastive rows, logits up to
    4 D / t, ~1e4 at D = 130 and t = 0.05 (below float16's 65504)."""
    lo, hi = -3.0, 3.0
    if dtype == torch.float16:
        lo, hi = -2.0, (math.log10(2.0) if options.get("normalize") is False else 2.0)
    return st.floats(lo, hi).map(lambda e: 10.0 ** e)


def _outputs_and_grads(fn, tensors, options, grads):
    leaves = {k: (v.detach().clone().requires_grad_(True) if k in grads and v.is_floating_point() else v)
              for k, v in tensors.items()}
    out = fn(**leaves, **options)
    wanted = [leaves[k] for k in grads if k in leaves]
    if not wanted:
        return [out.detach()]
    # a fixed upstream gradient that is not 1, so a dropped grad_loss factor shows
    upstream = torch.full_like(out, 0.75)
    return [out.detach(), *torch.autograd.grad(out, wanted, upstream)]


def assert_rule(fused, eager, ref, what, magnitude=0.0, promised=0.0):
    """The shared rule (tests/_utils.py), with `magnitude` as the size of the terms a
    scalar output is computed from; a documented accuracy (`promised`) replaces the
    rule's bound when larger."""
    if promised and torch.isfinite(fused.double()).all() \
            and max_abs_error(fused, ref) <= 2 * max_abs_error(eager, ref) + promised:
        return
    assert_within_eager_error(fused, eager, ref, fused.dtype, what, magnitude)


@pytest.mark.parametrize("spec", OPS, ids=lambda s: s.name)
@given(data=st.data())
def test_fused_matches_float64_reference(spec, data):
    sizes = data.draw(spec.sizes, label="sizes")
    options = data.draw(spec.options, label="options")
    dtype = data.draw(st.sampled_from(spec.dtypes), label="dtype")
    scale = data.draw(_scales(dtype, options), label="scale")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    tensors = spec.build(sizes, dtype, scale, seed)
    as64 = {k: (v.double() if v.is_floating_point() else v) for k, v in tensors.items()}
    fused = _outputs_and_grads(spec.call, tensors, options, spec.grads)
    eager = _outputs_and_grads(spec.reference, tensors, options, spec.grads)
    ref = _outputs_and_grads(spec.reference, as64, options, spec.grads)
    # a true result beyond the dtype's range (float16's 65504: a SigLIP sum of N^2 terms at
    # scale 100) has no representable answer to judge
    assume(all(r.abs().max() <= torch.finfo(dtype).max for r in ref))
    names = ["output"] + [f"grad {k}" for k in spec.grads if k in tensors]
    for name, f, e, r in zip(names, fused, eager, ref):
        what = "output" if name == "output" else name[5:]
        # the logits' size: the floor of a scalar output, and of a gradient only where it
        # is zero up to float64 rounding (tests/_utils.rounding_floor)
        magnitude = spec.magnitude(as64, options, "output") if spec.magnitude else 0.0
        promised = spec.promised(f.dtype, r, as64, options) if spec.promised else 0.0
        assert_rule(f, e, r, f"{spec.name} {name} sizes={sizes} options={options} scale={scale:.3g}",
                    magnitude, promised)


def test_the_rule_rejects_a_wrong_result():
    ref = torch.tensor([1.0, 2.0], dtype=torch.float64)
    eager = ref.float() + 1e-6
    assert_rule(ref.float(), eager, ref, "exact")
    with pytest.raises(AssertionError, match="fused error"):
        assert_rule(ref.float() + 1e-3, eager, ref, "off by 1e-3")
    with pytest.raises(AssertionError, match="NaN"):
        assert_rule(torch.tensor([float("nan"), 2.0]), eager, ref, "nan")


def test_lidar_with_eps_0_and_rank_deficient_between_scatter_is_finite():
    # N - 1 < D: Sigma_b has zero eigenvalues, p = 0 there; 0 log 0 must count as 0 (was NaN).
    import sslkernels
    views = torch.randn(2, 2, 2, generator=torch.Generator().manual_seed(0))
    value = sslkernels.lidar(views, eps=0.0)
    assert torch.isfinite(value) and 1.0 <= float(value) <= 2.0


# ---------------------------------------------------------------- siglip (issue 13)


@given(n=st.integers(1, 70), d=st.integers(1, 20), seed=st.integers(0, 2**16),
       logit_scale=st.floats(0.5, 20.0), logit_bias=st.floats(-10.0, 5.0))
def test_siglip_symmetries(n, d, seed, logit_scale, logit_bias):
    """The labels are symmetric in i, j: swapping images and texts, or permuting the pairs,
    leaves the loss (float64, so exactly enough) unchanged and permutes the gradients."""
    import sslkernels

    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, d, generator=g, dtype=torch.float64)
    text = torch.randn(n, d, generator=g, dtype=torch.float64)
    perm = torch.randperm(n, generator=g)
    loss = sslkernels.siglip_loss(image, text, logit_scale, logit_bias)
    swapped = sslkernels.siglip_loss(text, image, logit_scale, logit_bias)
    permuted = sslkernels.siglip_loss(image[perm], text[perm], logit_scale, logit_bias)
    tol = 1e-12 * max(1.0, float(loss.abs()))
    assert abs(float(swapped - loss)) <= tol and abs(float(permuted - loss)) <= tol
    x = image.clone().requires_grad_()
    xp = image[perm].clone().requires_grad_()
    (dx,) = torch.autograd.grad(sslkernels.siglip_loss(x, text, logit_scale, logit_bias), x)
    (dxp,) = torch.autograd.grad(sslkernels.siglip_loss(xp, text[perm], logit_scale, logit_bias), xp)
    torch.testing.assert_close(dxp, dx[perm], rtol=1e-10, atol=1e-14)
