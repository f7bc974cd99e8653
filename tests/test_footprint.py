"""The one-time footprint of the first fused call in a process, and what of it is ours.

Measured (README, "Memory"): the first call of any sslkernels op raises the resident set by
~74 MB in a venv with only `pip install .` (torch 2.13, no Triton), ~148 MB with Triton
installed. Nearly all of it is torch's: `torch.library.custom_op` wraps every kernel in
`torch._disable_dynamo`, which imports `torch._dynamo` (and through it sympy, and Triton
where installed) on the first call of any custom op. What stays of ours is the touched code
pages of `_C` and OpenBLAS (and of torch's own kernels that the wrappers call), one OpenMP
worker per extra thread, OpenBLAS's per-thread buffers and what the allocator keeps of our
per-call scratch: under 1 MB allocated. These tests bound that part, each in a fresh
interpreter, and check that nothing of a call stays allocated afterwards.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
# every family's first fused call, torch._dynamo imported before (measured 14 MB, 0.5 MB of it
# allocated memory, the rest code pages of _C, OpenBLAS and torch's kernels behind the wrappers)
OURS_FIRST_CALLS_MB = 32.0
OURS_FIRST_CALLS_ANON_MB = 8.0
STEADY_HEAP_MB = 1.0         # heap in use after a round at the multi-tile sizes, against before it

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/self/status") or "LD_PRELOAD" in os.environ,
    reason="needs Linux /proc and glibc's mallinfo2, without a preloaded allocator (ASan replaces malloc)")

_SCRIPT = textwrap.dedent("""
    import ctypes, gc, json, os, sys
    sys.path.insert(0, {repo!r})
    def rss_mb(kind="VmRSS"):   # VmRSS = RssAnon (allocated memory) + RssFile (code pages) + RssShmem
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith(kind + ":")) / 1024
    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                     "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = MallInfo2
    def heap_mb():
        m = mallinfo2()
        return (m.uordblks + m.hblkhd) / 2**20
    # as after a plain `pip install .`: no Lightning (sslkernels.monitor probes it at import,
    # and it imports torch._dynamo itself)
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
        sys.modules[name] = None
    import torch
    import sslkernels
    from tests._reliability import OPS
    torch.set_num_threads({threads})
    def one_round(which):
        for spec in OPS:
            t = spec.inputs(torch.float32, seed=3, sizes=getattr(spec, which))
            leaves = {{k: (v.detach().requires_grad_(True) if k in spec.grads and v.is_floating_point() else v)
                      for k, v in t.items()}}
            out = spec.run(leaves)
            if spec.grads:
                out.sum().backward()
            del t, leaves, out
        gc.collect()
    result = {{"dynamo_before": "torch._dynamo" in sys.modules}}
    if {preimport}:
        before = rss_mb()
        import torch._dynamo
        result["dynamo_import_mb"] = rss_mb() - before
    before, anon = rss_mb(), rss_mb("RssAnon")
    one_round("small")
    result["first_calls_mb"] = rss_mb() - before
    result["first_calls_anon_mb"] = rss_mb("RssAnon") - anon
    result["dynamo_after"] = "torch._dynamo" in sys.modules
    heap = heap_mb()
    one_round("large")
    result["second_round_heap_mb"] = heap_mb() - heap
    print(json.dumps(result))
""")


def _measure(threads: int, preimport: bool) -> dict:
    code = _SCRIPT.format(repo=str(REPO), threads=threads, preimport=preimport)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("threads", [1, 2])
def test_our_part_of_the_first_calls_is_bounded(threads):
    r = _measure(threads, preimport=True)
    assert r["first_calls_mb"] <= OURS_FIRST_CALLS_MB, r
    assert r["first_calls_anon_mb"] <= OURS_FIRST_CALLS_ANON_MB, r
    # nothing of a call stays allocated: scratch is per call, no cache grows with the sizes
    assert r["second_round_heap_mb"] <= STEADY_HEAP_MB, r


def test_the_rest_of_the_first_call_is_torch_dynamo():
    r = _measure(2, preimport=False)
    baseline = _measure(2, preimport=True)
    assert not r["dynamo_before"]
    if not r["dynamo_after"]:
        # a torch whose custom_op does not import dynamo: then the whole first call is ours
        assert r["first_calls_mb"] <= OURS_FIRST_CALLS_MB, r
        return
    assert r["first_calls_mb"] <= baseline["dynamo_import_mb"] + OURS_FIRST_CALLS_MB, (r, baseline)
