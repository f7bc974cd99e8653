"""The one-sweep CLIP forward of the Triton InfoNCE kernels (lead 6): for symmetric calls
`info_nce_forward` computes each S tile once, the query rows' online LSE and the key
columns' partial (max, sum) per row block in the same `_lse_fwd_kernel` launch (COL_PART),
merged in a fixed order by `_col_lse_merge_kernel`. Run by the Triton interpreter on CPU
tensors (32 x 32 tiles, BLOCK_K 32: D = 3 / 16 hoisted rows, 40 / 130 the chunked path).

Checked here: that the route is the one taken (launches counted: a silent fallback to the
two-pass forward fails), loss / lse / gradients against the float64 reference under the
rule of tests/_utils.py for N off and on the tile (N = 1 included), D = 130, float32 /
float16 / float64, with and without the retrieval terms and a queue; agreement with the
two-pass forward; bitwise determinism; the merge reading only the row blocks written.
The existing InfoNCE interpreter tests (plain, terms, split) run through this route too.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton interpreter tests need triton")

from tests._utils import assert_within_eager_error, logit_bound  # noqa: E402
from tests.interpret import test_info_nce_terms_triton as terms_tests  # noqa: E402
from tests.interpret.test_info_nce_triton import _inputs  # noqa: E402

pytestmark = pytest.mark.interpret

# (N, D, K): N = 1, 31 / 33 / 70 around the 32-row tile, 64 on it; D = 130 (not a multiple
# of 16, chunked); K > 0: a queue on the query side (the row direction only)
CASES = [(1, 3, 0), (31, 16, 0), (33, 40, 0), (64, 16, 0), (70, 130, 0), (33, 16, 40)]


class _CountingLaunches:
    """Stands in for a jitted kernel: records each launch's constexpr flags, then launches."""

    def __init__(self, kernel, log, name):
        self.kernel, self.log, self.name = kernel, log, name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.name, kwargs.get("COL_PART"), kwargs.get("SPLIT")))
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.fixture
def launches(contrastive_kernels, monkeypatch):
    log = []
    for name in ("_lse_fwd_kernel", "_col_lse_merge_kernel"):
        monkeypatch.setattr(contrastive_kernels, name,
                            _CountingLaunches(getattr(contrastive_kernels, name), log, name))
    return log


def _lse_reference(q, key, neg, t, normalize, bias, key_ids, queue_ids):
    """[query direction | key direction] lse in q's dtype (float64 for the oracle): the
    bias on the query direction only, the id mask on both, the diagonal kept."""
    n = q.shape[0]
    logits, logits_t = terms_tests._both_directions_logits(q, key, neg, t, normalize, bias)
    drop = torch.zeros(logits.shape, dtype=torch.bool)
    if key_ids is not None:
        cand_ids = key_ids if queue_ids is None else torch.cat([key_ids, queue_ids])
        drop = key_ids[:, None] == cand_ids[None, :]
        drop[:, :n] &= ~torch.eye(n, dtype=torch.bool)
    lse_q = torch.logsumexp(logits.masked_fill(drop, float("-inf")), dim=1)
    lse_k = torch.logsumexp(logits_t.masked_fill(drop[:, :n].T, float("-inf")), dim=1)
    return torch.cat([lse_q, lse_k])


def _check(kernels, dtype, case, normalize, which):
    n, d, k = case
    fused, _ = terms_tests._check(kernels, dtype, (n, d, k, True, True), normalize, which)
    q, key, neg = _inputs(n, d, k, dtype, normalize)
    bias, key_ids, queue_ids = terms_tests._terms(n, k, dtype, which)
    t = (0.2 if dtype == torch.float16 else 0.07) if normalize else 0.5
    t64 = torch.tensor(t, dtype=torch.float64)
    _, lse = kernels.info_nce_forward(q, key, neg, t64, normalize, True, True, True,
                                      **terms_tests._launcher_terms(q, bias, key_ids, queue_ids))
    eager = _lse_reference(q, key, neg, t64, normalize, bias, key_ids, queue_ids)
    ref = _lse_reference(*(None if x is None else x.double() for x in (q, key, neg)), t64, normalize, bias,
                         key_ids, queue_ids)
    terms = logit_bound(q, key, neg, temperature=t, normalize=normalize)
    if bias is not None:
        terms += float(bias.abs().max())
    assert_within_eager_error(lse, eager, ref, dtype, "lse", terms)


# N = 1 with ids: the tile's padding rows share key 0's id and keep nothing, log2(0) on lanes
# never stored (the interpreter's numpy warns)
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("which", ["none", "both"])
@pytest.mark.parametrize("case", CASES, ids=[f"{n}x{d}k{k}" for n, d, k in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_matches_float64_reference(contrastive_kernels, poisoned_outputs, launches, dtype, case, which, normalize):
    _check(contrastive_kernels, dtype, case, normalize, which)
    assert ("_col_lse_merge_kernel", None, None) in launches


@pytest.mark.parametrize("which", ["bias", "ids"])
@pytest.mark.parametrize("case", [CASES[2], CASES[5]], ids=["33x40k0", "33x16k40"])
def test_each_term_alone(contrastive_kernels, poisoned_outputs, case, which):
    _check(contrastive_kernels, torch.float32, case, True, which)


@pytest.mark.parametrize("case", [CASES[1], CASES[4]], ids=["31x16k0", "70x130k0"])
def test_float16(contrastive_kernels, poisoned_outputs, case):
    _check(contrastive_kernels, torch.float16, case, True, "both")


def _run(kernels, q, key, neg, t, **terms):
    loss, lse = kernels.info_nce_forward(q, key, neg, t, True, True, True, True, **terms)
    grads = kernels.info_nce_backward(torch.tensor(1.0, dtype=q.dtype), q, key, neg, t, lse, True, True, True,
                                      True, **terms)
    return [loss, lse, *grads]


@pytest.mark.parametrize("k", [0, 40])
def test_route_is_one_sweep(contrastive_kernels, poisoned_outputs, launches, monkeypatch, k):
    """A CLIP-shaped call launches the forward kernel once, with COL_PART, then the merge;
    forced off, the two-pass forward launches it twice without. With a split queue the
    one sweep stays (split 0 writes the column partials)."""
    q, key, neg = _inputs(33, 16, k, torch.float32, True)
    t = torch.tensor(0.07)
    contrastive_kernels.info_nce_forward(q, key, neg, t, True, True, True, True)
    assert launches == [("_lse_fwd_kernel", True, False), ("_col_lse_merge_kernel", None, None)]
    launches.clear()
    monkeypatch.setattr(contrastive_kernels, "CLIP_ONE_SWEEP", False)
    contrastive_kernels.info_nce_forward(q, key, neg, t, True, True, True, True)
    assert launches == [("_lse_fwd_kernel", False, False)] * 2
    launches.clear()
    contrastive_kernels.info_nce_forward(q, key, neg, t, True, False, True, True)  # one direction: untouched
    assert launches == [("_lse_fwd_kernel", False, False)]
    if k:
        launches.clear()
        monkeypatch.setattr(contrastive_kernels, "CLIP_ONE_SWEEP", None)
        monkeypatch.setattr(contrastive_kernels, "QUEUE_SPLITS", 3)
        contrastive_kernels.info_nce_forward(q, key, neg, t, True, True, True, True)
        assert launches == [("_lse_fwd_kernel", True, True), ("_col_lse_merge_kernel", None, None)]


def test_route_by_size(contrastive_kernels, monkeypatch):
    """The automatic choice: the one sweep while its partials fit _COL_PART_MAX_BYTES."""
    k = contrastive_kernels
    monkeypatch.setattr(k, "CLIP_ONE_SWEEP", None)
    assert k._clip_one_sweep(8192, 256, torch.bfloat16)
    rows = k._col_part_row_blocks(8192, 256, torch.bfloat16)
    assert 2 * rows * 8192 * 4 <= k._COL_PART_MAX_BYTES
    monkeypatch.setattr(k, "_COL_PART_MAX_BYTES", 2 * rows * 8192 * 4 - 1)
    assert not k._clip_one_sweep(8192, 256, torch.bfloat16)


def test_agrees_with_two_passes_and_is_deterministic(contrastive_kernels, poisoned_outputs, monkeypatch):
    """Same loss, lse and gradients as the two-pass forward up to float32 summation order
    (the key direction's sums run over other tiles); two runs bitwise equal."""
    q, key, neg = _inputs(70, 40, 40, torch.float32, True)
    t = torch.tensor(0.07, dtype=torch.float64)
    bias, key_ids, queue_ids = terms_tests._terms(70, 40, torch.float32, "both")
    kw = terms_tests._launcher_terms(q, bias, key_ids, queue_ids)
    one = _run(contrastive_kernels, q, key, neg, t, **kw)
    again = _run(contrastive_kernels, q, key, neg, t, **kw)
    for name, a, b in zip(("loss", "lse", "dq", "dk", "dneg", "dt"), one, again):
        assert torch.equal(a, b), f"{name}: not bitwise equal across runs"
    monkeypatch.setattr(contrastive_kernels, "CLIP_ONE_SWEEP", False)
    two = _run(contrastive_kernels, q, key, neg, t, **kw)
    for name, a, b in zip(("loss", "lse", "dq", "dk", "dneg", "dt"), one, two):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6 * float(b.abs().max()), msg=name)


@pytest.mark.parametrize("merge_rows", [1, 2, 32])
def test_merge_reads_only_the_row_blocks_written(contrastive_kernels, poisoned_outputs, monkeypatch, merge_rows):
    """The partial buffer holds rows for the smallest tile autotuning may pick; the merge
    stops at the count the forward wrote (the rows past it are NaN under poisoned_outputs),
    whether its steps of merge_rows row blocks divide the 3 row blocks or not; the steps
    change only the rounding of the key direction's sums."""
    q, key, _ = _inputs(70, 16, 0, torch.float64, True)
    t = torch.tensor(0.1, dtype=torch.float64)
    default = _run(contrastive_kernels, q, key, None, t)
    monkeypatch.setattr(contrastive_kernels, "_COL_MERGE_ROWS", merge_rows)
    base = _run(contrastive_kernels, q, key, None, t)
    real = contrastive_kernels._col_part_row_blocks
    monkeypatch.setattr(contrastive_kernels, "_col_part_row_blocks", lambda n, d, dtype: real(n, d, dtype) + 3)
    wide = _run(contrastive_kernels, q, key, None, t)
    for a, b, c in zip(base, wide, default):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-13, atol=1e-13)


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")  # lse = -inf, wanted
def test_fully_masked_key_column(contrastive_kernels, poisoned_outputs):
    """positive_on_diagonal=False, every query of id 0: the keys of id 0 keep no query and get
    lse = -inf from the merge (as from the two-pass forward); key 3 (id 5) keeps them all."""
    q, key, _ = _inputs(7, 16, 0, torch.float64, False, seed=4)
    anchor = torch.zeros(7, dtype=torch.int64)
    cand = torch.zeros(7, dtype=torch.int64)
    cand[3] = 5
    kw = dict(anchor_ids=anchor, candidate_ids=cand, positive_on_diagonal=False)
    _, lse = contrastive_kernels.info_nce_forward(q, key, None, 0.5, False, True, True, False, **kw)
    drop = anchor[:, None] == cand[None, :]
    ref_k = torch.logsumexp((key @ q.T / 0.5).masked_fill(drop.T, float("-inf")), dim=1)
    assert torch.isinf(ref_k).sum() == 6
    torch.testing.assert_close(lse[7:], ref_k, rtol=1e-12, atol=1e-12)
