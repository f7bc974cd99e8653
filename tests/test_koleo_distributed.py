"""KoLeo with gather_distributed on 2 Gloo ranks (127.0.0.1) against the one-process
oracle: DINOv3's KoLeoLossDistributed semantics, every rank's rows candidates, each rank
the loss over its own rows, groups of `group_size` rows of the gathered batch.

Expected rank r loss: the mean over its rows of -log(dist + eps) with the neighbours
searched in the float64 global batch. Expected rank r gradient of its own slice: the
one-process gradient of sum_s loss_s (all_gather's backward sums every rank's
contribution to a row back to its owner); so the DDP average is that of mean_s loss_s.
"""
from __future__ import annotations

import os
import traceback
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F

from sslkernels.reference import koleo_neighbors_reference
from tests._utils import run_gloo_ranks

torch.distributed.is_available() or pytest.skip("torch.distributed is not available", allow_module_level=True)

WORLD, ROWS, D = 2, 9, 6
JOIN_TIMEOUT_S = 150
# (name, topk, group_size of the gathered batch or None)
CASES = [("whole", 1, None), ("top3", 3, None), ("group_per_rank", 2, ROWS)]


def _global_x(dtype=torch.float32):
    return torch.randn(WORLD * ROWS, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    result = {}
    try:
        import sslkernels

        torch.set_num_threads(1)
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                             world_size=world, timeout=timedelta(seconds=60))
        for dtype in (torch.float32, torch.float64):
            for name, topk, group in CASES:
                x = _global_x(dtype)[rank * ROWS:(rank + 1) * ROWS].clone().requires_grad_()
                loss = sslkernels.nn.KoLeoLoss(topk=topk, group_size=group, gather_distributed=True)(x)
                loss.backward()
                result[(name, dtype)] = (loss.detach(), x.grad)
        errors = {}
        for label, kwargs, rows in (("group not a multiple of the rank batch", dict(group_size=6), ROWS),
                                    ("unequal batches", {}, ROWS + rank)):
            try:
                sslkernels.nn.KoLeoLoss(gather_distributed=True, **kwargs)(torch.randn(rows, D))
                errors[label] = None
            except Exception as exc:  # noqa: BLE001 (checked by the parent)
                errors[label] = (type(exc).__name__, str(exc))
        result["errors"] = errors
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    except BaseException:  # noqa: BLE001
        result = {"error": traceback.format_exc()}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("koleo_world2"))
    return run_gloo_ranks(_worker, WORLD, out, "tests.test_koleo_distributed", JOIN_TIMEOUT_S)


def _expected(topk, group):
    x = _global_x(torch.float64).requires_grad_()
    idx = koleo_neighbors_reference(x.detach(), 1e-8, topk, group)
    xn = F.normalize(x, eps=1e-8)
    dist = F.pairwise_distance(xn.unsqueeze(1).expand(-1, topk, -1), xn[idx], eps=1e-8)
    terms = -(dist + 1e-8).log()
    losses = torch.stack([terms[r * ROWS:(r + 1) * ROWS].mean() for r in range(WORLD)])
    (grad,) = torch.autograd.grad(losses.sum(), x)
    return losses.detach(), grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name,topk,group", CASES)
def test_matches_one_process(results, name, topk, group, dtype):
    losses, grad = _expected(topk, group)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for r in range(WORLD):
        loss, g = results[r][(name, dtype)]
        assert loss.dtype == dtype
        torch.testing.assert_close(loss.double(), losses[r], **tol)
        torch.testing.assert_close(g.double(), grad[r * ROWS:(r + 1) * ROWS], **tol)


def test_bad_groups_and_unequal_batches_raise_on_every_rank(results):
    for r in range(WORLD):
        errors = results[r]["errors"]
        kind, msg = errors["group not a multiple of the rank batch"]
        assert kind == "ValueError" and "`group_size`" in msg
        kind, msg = errors["unequal batches"]
        assert kind == "ValueError" and "same number of rows" in msg
