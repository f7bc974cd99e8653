"""Leaks: 2000 forward (+ backward where there is one) calls of every public function in
tests/_reliability.py keep the process flat after a warm-up: resident set growth within a
few MB, and glibc's bytes in use (mallinfo2: what the C++ core, torch's CPU allocator and
Python's arenas hold) within 2 MB. RSS alone can hide a leak that reuses memory freed
earlier in the process; bytes in use cannot.

Sizes are chosen so that leaking one input-sized buffer per call (>= 4 KiB) would add
8 MB or more over the 2000 calls; the harness itself is checked on a function that leaks.
"""
from __future__ import annotations

import ctypes
import gc
import os

import pytest
import torch

from tests._reliability import OPS

CALLS = 2000
WARMUP = 200
ALLOWED_RSS_GROWTH = 4 * 2**20  # bytes
ALLOWED_HEAP_GROWTH = 2 * 2**20
# Sizes whose inputs are >= 4 KiB (float32), still quick; other functions use `small`.
LEAK_SIZES = {
    "nt_xent": {"n": 40, "d": 32}, "sup_con": {"n": 40, "d": 32, "classes": 5},
    "info_nce": {"n": 24, "d": 32, "k": 16}, "svdvals": {"b": 8, "m": 16, "n": 9},
    "svdvals_ex": {"b": 4, "m": 20, "n": 17}, "rankme": {"b": 0, "m": 64, "n": 16},
    "effective_rank": {"b": 0, "m": 64, "n": 16}, "nesum": {"b": 0, "m": 64, "n": 16},
    "alpha_req": {"b": 0, "m": 64, "n": 16}, "lidar": {"n": 32, "q": 2, "d": 16},
    "masked_patch_attention": {"b": 4, "l": 16, "h": 2, "dh": 16, "k": 12},
    "varlen_attention": {"b": 4, "max_len": 40, "h": 2, "dh": 16},
}


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo2():
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _mallinfo2()
pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/self/statm") or _MALLINFO2 is None or "LD_PRELOAD" in os.environ,
    reason="needs Linux /proc and glibc mallinfo2, without a preloaded allocator (ASan replaces malloc)")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def heap_bytes() -> int:
    info = _MALLINFO2()
    return info.uordblks + info.hblkhd


def growth(step, calls=CALLS, warmup=WARMUP):
    """(RSS growth, heap-in-use growth) over `calls` calls of step() after `warmup` calls."""
    for _ in range(warmup):
        step()
    gc.collect()
    rss, heap = rss_bytes(), heap_bytes()
    for _ in range(calls):
        step()
    gc.collect()
    return rss_bytes() - rss, heap_bytes() - heap


def forward_backward(spec, tensors):
    leaves = {k: (v.detach().requires_grad_(True) if k in spec.grads and v.is_floating_point() else v)
              for k, v in tensors.items()}

    def step():
        out = spec.run(leaves)
        if spec.grads:
            out.sum().backward()
            for k in spec.grads:
                if k in leaves:
                    leaves[k].grad = None
    return step


@pytest.fixture
def one_thread():
    # Memory, not threads, is under test here (threads: test_threads_determinism.py). On a
    # busy 2-core machine a 2-thread OpenMP region on these small inputs costs ~7 ms of
    # waiting for a descheduled thread against ~0.4 ms on one: 2000 calls would take minutes.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("spec", OPS, ids=lambda s: s.name)
def test_memory_stays_flat(spec, one_thread):
    tensors = spec.inputs(torch.float32, seed=7, sizes=LEAK_SIZES.get(spec.name, spec.small))
    rss, heap = growth(forward_backward(spec, tensors))
    assert heap <= ALLOWED_HEAP_GROWTH, f"{spec.name}: {heap / 2**20:.2f} MB more heap in use after {CALLS} calls"
    assert rss <= ALLOWED_RSS_GROWTH, f"{spec.name}: RSS grew {rss / 2**20:.1f} MB over {CALLS} calls"


def test_the_harness_sees_a_leak():
    kept = []
    x = torch.randn(40, 32)

    def leaky():  # keeps one 5 KiB tensor per call, as a leaked buffer would
        kept.append(x * 2)
    rss, heap = growth(leaky)
    assert heap > 2 * ALLOWED_HEAP_GROWTH
