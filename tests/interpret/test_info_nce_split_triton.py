"""The queue split of the Triton InfoNCE kernels (a small batch against a long shared queue:
several programs per row block share the queue's tiles, their statistics / gradient shares
merged by the launchers in a fixed order), forced on in the interpreter, where
`_queue_splits` would never choose it: the value tests of the plain kernels and of the
retrieval terms run again with 3 splits (the interpreter's tiles are 32 wide: queues of 5
and 40 rows leave splits without a tile, 130 rows give every split one or two), plus a
direct comparison with the unsplit kernels."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton interpreter tests need triton")

from tests.interpret import test_info_nce_terms_triton as terms_tests  # noqa: E402
from tests.interpret import test_info_nce_triton as plain_tests  # noqa: E402

pytestmark = pytest.mark.interpret

# (N, D, K, symmetric, in_batch_negatives), as those tests' CASES
LONG_QUEUES = [(7, 16, 130, False, True), (33, 40, 130, True, True), (9, 16, 130, False, False)]
QUEUED = [c for c in plain_tests.CASES if c[2] > 0] + LONG_QUEUES
TERMS_QUEUED = [c for c in terms_tests.CASES if c[2] > 0] + LONG_QUEUES


@pytest.fixture
def split_kernels(contrastive_kernels, monkeypatch):
    monkeypatch.setattr(contrastive_kernels, "QUEUE_SPLITS", 3)
    return contrastive_kernels


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("case", QUEUED, ids=plain_tests._ids(QUEUED, "k"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_plain_value_tests_with_a_split_queue(split_kernels, poisoned_outputs, dtype, case, normalize):
    plain_tests.test_matches_float64_reference(split_kernels, poisoned_outputs, dtype, case, normalize)


@pytest.mark.parametrize("which", terms_tests.TERMS)
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("case", TERMS_QUEUED, ids=terms_tests._ids(TERMS_QUEUED))
def test_retrieval_terms_with_a_split_queue(split_kernels, poisoned_outputs, case, normalize, which):
    terms_tests.test_matches_float64_reference(split_kernels, poisoned_outputs, torch.float32, case, normalize,
                                               which)


def test_split_agrees_with_the_unsplit_kernels(contrastive_kernels, monkeypatch):
    """Same loss, lse and gradients up to the order of the float32 sums (and exactly the
    same lse layout), for splits that do and do not divide the queue's tiles."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(9, 16, generator=g)
    key = q + 0.8 * torch.randn(9, 16, generator=g)
    queue = torch.randn(150, 16, generator=g)
    t = torch.tensor(0.1)

    def run(splits):
        monkeypatch.setattr(contrastive_kernels, "QUEUE_SPLITS", splits)
        loss, lse = contrastive_kernels.info_nce_forward(q, key, queue, t, True, False, True, True)
        grads = contrastive_kernels.info_nce_backward(torch.tensor(1.0), q, key, queue, t, lse, True, False, True,
                                                      True)
        return [loss, lse, *grads]

    base = run(1)
    for splits in (2, 5, 8):
        for name, a, b in zip(("loss", "lse", "dq", "dk", "dqueue", "dt"), run(splits), base):
            assert a.shape == b.shape and a.dtype == b.dtype, name
            torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6 * float(b.abs().max()), msg=f"{name}, {splits}")
