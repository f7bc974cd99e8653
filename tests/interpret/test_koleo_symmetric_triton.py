"""The symmetric Triton KoLeo search (`koleo_neighbors_symmetric`: upper-triangular tile
pairs, per-(row, tile) partial bests, a merge kernel) run by the Triton interpreter on CPU
tensors, and the CUDA route of `sslkernels::koleo_neighbors` that takes it.

Oracles: the float64 eager search, judged as in tests/test_koleo.py (`_check_search`), and
the row-block kernel (`koleo_neighbors`, the route of a slice of queries): the same picks
wherever the float64 choice is clear, within rounding elsewhere, and exactly the same on
exact ties (duplicate rows: the smaller index wins). Interpreter tiles are 16 x 16, so the
cases cross blocks with tails, groups that straddle blocks and blocks holding several
groups. Every direct launch of the symmetric kernel here runs with its partial buffer
poisoned (entries that would win the merge and name an out-of-range row), so a slot the
search does not write fails the case (`test_poisoned_partials_catch_an_unwritten_slot`
shows the poison can fail). bfloat16 runs on a GPU only (triton issue 11584; benchmarks/gpu/koleo.py checks it).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton interpreter tests need triton")

from tests.interpret.conftest import interpreted_kernels  # noqa: E402
from tests.test_koleo import _check_search, _judge, _sims64  # noqa: E402

pytestmark = pytest.mark.interpret

EPS = 1e-8


@pytest.fixture(scope="module")
def koleo_kernels():
    return interpreted_kernels("koleo")


@pytest.fixture(scope="module")
def koleo_ops(koleo_kernels):
    from sslkernels.ops import koleo as ops

    return ops


# (N, D, topk, group): N = 2; N not a multiple of the 16-row block; groups that straddle
# blocks (12, 20, 30) and several groups in one block (6, 5); topk 1 and 3, and topk =
# group - 1 (every other row of the group is a neighbour)
CASES = [(2, 3, 1, 2), (37, 20, 1, 37), (37, 20, 3, 37), (40, 33, 3, 20), (48, 16, 1, 12), (48, 16, 3, 12),
         (60, 9, 1, 30), (70, 9, 3, 70), (66, 5, 1, 6), (66, 5, 3, 6), (40, 6, 4, 5)]


def _symmetric(kernels, x, group, topk, hoist=None):
    return kernels.koleo_neighbors_symmetric(x, group, topk, EPS, hoist=hoist, poison_partials=True)


def _assert_same_picks(x, got, want, group, tol=1e-5):
    """`got` and `want` name the same neighbours wherever the float64 similarities of each
    row's top topk + 1 candidates are clearly apart, and picks within `tol` of each other's
    similarity elsewhere (the two routes round a near-tie independently)."""
    n, topk = want.shape
    sims = _sims64(x, EPS)
    rows = torch.arange(n)
    assert float((sims[rows[:, None], got] - sims[rows[:, None], want]).abs().max()) <= tol
    masked = sims.clone()
    masked[rows, rows] = -2
    masked[(rows[None, :] // group) != (rows[:, None] // group)] = -2
    top = masked.topk(min(topk + 1, n), dim=1).values
    clear = (top[:, :-1] - top[:, 1:]).min(dim=1).values > 4 * tol if top.shape[1] > 1 else torch.ones(n, dtype=bool)
    assert bool((got[clear] == want[clear]).all())


@pytest.mark.parametrize("hoist", [True, False], ids=["one-chunk", "k-chunks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("n,d,topk,group", CASES)
def test_symmetric_search_matches_float64_reference(koleo_kernels, dtype, n, d, topk, group, hoist,
                                                    poisoned_outputs):
    assert koleo_kernels.plan_symmetric(d, topk, dtype, hoist)["HOIST"] == hoist
    x = torch.randn(n, d).to(dtype)
    idx = _symmetric(koleo_kernels, x, group, topk, hoist)
    _check_search(x, idx, topk, group)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("n,d,topk,group", CASES)
def test_symmetric_search_matches_the_row_block_route(koleo_kernels, dtype, n, d, topk, group):
    x = torch.randn(n, d).to(dtype)
    got = _symmetric(koleo_kernels, x, group, topk)
    want = koleo_kernels.koleo_neighbors(x, 0, n, group, topk, EPS)
    _assert_same_picks(x, got, want, group)
    assert torch.equal(got, _symmetric(koleo_kernels, x, group, topk))  # deterministic


@pytest.mark.parametrize("topk", [1, 3])
def test_exact_ties_go_to_the_smaller_index_across_tiles(koleo_kernels, topk):
    """Copies in blocks 0, 0, 1, 1 and 2: row 31's ties come from the column side of the
    (0, 1) tile and the row side of (1, 1) and (1, 2), merged across slots."""
    x = torch.randn(45, 6)
    for r in (10, 20, 31, 40):
        x[r] = x[3]
    got = _symmetric(koleo_kernels, x, 45, topk)
    assert torch.equal(got, koleo_kernels.koleo_neighbors(x, 0, 45, 45, topk, EPS))
    if topk == 1:
        assert got[3, 0] == 10 and got[10, 0] == 3 and got[31, 0] == 3 and got[40, 0] == 3
    else:
        assert got[3].tolist() == [10, 20, 31] and got[31].tolist() == [3, 10, 20]
        assert got[40].tolist() == [3, 10, 20]


def test_all_rows_equal(koleo_kernels):
    """Every similarity ties: each row's neighbours are the smallest other indices."""
    x = torch.randn(1, 5).expand(33, 5).contiguous()
    got = _symmetric(koleo_kernels, x, 33, 3)
    want = torch.tensor([[1, 2, 3], [0, 2, 3], [0, 1, 3]] + [[0, 1, 2]] * 30)
    assert torch.equal(got, want)


def test_strided_input_reads_like_its_copy(koleo_kernels):
    x = torch.randn(9, 35).T  # column-major [35, 9]
    assert torch.equal(_symmetric(koleo_kernels, x, 35, 2), _symmetric(koleo_kernels, x.contiguous(), 35, 2))


@pytest.mark.parametrize("topk", [1, 3])
def test_nan_rows_give_indices_in_bounds(koleo_kernels, koleo_ops, topk):
    """As for the row-block kernel: outside debug mode a NaN row must still get indices
    inside x (an index past the end crashes the gather on a GPU), and the loss is NaN."""
    x = torch.randn(40, 5)
    x[20, 2] = float("nan")
    idx = _symmetric(koleo_kernels, x, 40, topk)
    assert bool(((idx >= 0) & (idx < 40)).all()), idx[20]
    assert torch.isnan(koleo_ops.loss_forward_torch(x, idx, 0, 40, EPS))


def test_poisoned_partials_catch_an_unwritten_slot(koleo_kernels, monkeypatch):
    """The poison the other tests rely on can fail: with one tile pair left out, the rows
    of its blocks come back naming row N (out of range)."""
    full = koleo_kernels.tile_pairs
    monkeypatch.setattr(koleo_kernels, "tile_pairs", lambda m, g, b, dev: full(m, g, b, dev)[:-1])
    idx = _symmetric(koleo_kernels, torch.randn(40, 8), 40, 1)
    assert int((idx == 40).sum()) > 0


@pytest.mark.parametrize("m,group,block", [(37, 37, 16), (48, 12, 16), (66, 6, 16), (70, 10, 16), (300, 100, 64),
                                           (16384, 16384, 128), (16384, 256, 128)])
def test_tile_pairs_are_the_upper_triangle_within_groups(koleo_kernels, m, group, block):
    pairs = koleo_kernels.tile_pairs(m, group, block, torch.device("cpu"))
    nb = -(-m // block)
    block_groups = [set(range(b * block // group, (min(m, (b + 1) * block) - 1) // group + 1)) for b in range(nb)]
    want = [(i, j) for i in range(nb) for j in range(i, nb) if block_groups[i] & block_groups[j]]
    assert pairs.tolist() == [list(p) for p in want]
    spans = [len({b for b in range(nb) if g in block_groups[b]}) for g in range(m // group)]
    assert koleo_kernels.partial_slots(m, group, block) >= max(spans)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("n,d,topk,group", [(2, 3, 1, 2), (37, 20, 3, 37), (48, 16, 1, 12), (66, 5, 3, 6)])
def test_loss_and_gradient_of_the_symmetric_picks(koleo_kernels, koleo_ops, dtype, n, d, topk, group):
    """The CUDA loss (torch ops) on the symmetric route's pairs against the float64
    reference (its own float64 search), eager in dtype, and the row-block route's pairs."""
    from sslkernels.reference import koleo_reference
    from tests._utils import loss_and_grads

    x = torch.randn(n, d).to(dtype)
    idx = koleo_ops.search_cuda(x, 0, n, group, topk, EPS)
    rows_idx = koleo_kernels.koleo_neighbors(x, 0, n, group, topk, EPS)

    def fused(t, pairs):
        loss = koleo_ops.loss_forward_torch(t, pairs, 0, group, EPS)
        return loss, koleo_ops.loss_backward_torch(torch.ones((), dtype=loss.dtype), t, pairs, 0, group, EPS)

    f = fused(x, idx)
    e = loss_and_grads(lambda t: koleo_reference(t, topk=topk, group_size=group), x)
    r = loss_and_grads(lambda t: koleo_reference(t, topk=topk, group_size=group), x.double())
    for what, a, b, c in zip(("loss", "grad"), f, e, r):
        _judge(a, b, c, dtype, what)
    _assert_same_picks(x, idx, rows_idx, group)
    # the row-block route's pairs pass the same rule (the two losses differ only by near-ties)
    for what, a, b, c in zip(("loss", "grad"), fused(x, rows_idx), e, r):
        _judge(a, b, c, dtype, what)


def test_the_whole_batch_takes_the_symmetric_route(koleo_kernels, koleo_ops, monkeypatch):
    """No silent fallback: with the row-block launcher broken, the whole-batch search
    (groups and topk > 1 included) still answers, from the symmetric launcher."""
    def broken(*args, **kwargs):
        raise AssertionError("the row-block kernel ran for a whole-batch search")

    x = torch.randn(40, 9)
    for topk, group in ((1, 40), (3, 40), (2, 10)):
        assert koleo_ops.search_route(x, 0, 40, group, topk) == "symmetric"
        want = _symmetric(koleo_kernels, x, group, topk)
        monkeypatch.setattr(koleo_kernels, "koleo_neighbors", broken)
        assert torch.equal(koleo_ops.search_cuda(x, 0, 40, group, topk, EPS), want)
        monkeypatch.undo()


def test_a_slice_of_queries_takes_the_row_block_route(koleo_kernels, koleo_ops, monkeypatch):
    def broken(*args, **kwargs):
        raise AssertionError("the symmetric kernel ran for a slice of the queries")

    x = torch.randn(40, 9)
    assert koleo_ops.search_route(x, 20, 20, 20, 2) == "row_blocks"
    assert koleo_ops.search_route(x, 0, 39, 40, 2) == "row_blocks"
    want = koleo_kernels.koleo_neighbors(x, 20, 20, 20, 2, EPS)
    monkeypatch.setattr(koleo_kernels, "koleo_neighbors_symmetric", broken)
    assert torch.equal(koleo_ops.search_cuda(x, 20, 20, 20, 2, EPS), want)


def test_a_partial_buffer_past_the_bound_takes_the_row_block_route(koleo_kernels, koleo_ops):
    """The route depends on sizes only: a batch whose partial buffer would pass
    MAX_PARTIAL_BYTES searches with the row-block kernel; the same rows in small groups
    (a small buffer) keep the symmetric one."""
    big = torch.empty((300_000, 64), device="meta")
    assert koleo_kernels.partial_bytes(300_000, 64, 300_000, 1, big.dtype) > koleo_ops.MAX_PARTIAL_BYTES
    assert koleo_ops.search_route(big, 0, 300_000, 300_000, 1) == "row_blocks"
    assert koleo_kernels.partial_bytes(300_000, 64, 1000, 1, big.dtype) <= koleo_ops.MAX_PARTIAL_BYTES
    assert koleo_ops.search_route(big, 0, 300_000, 1000, 1) == "symmetric"
