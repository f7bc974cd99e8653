"""Contrastive losses (NT-Xent, SupCon, InfoNCE): eager PyTorch against sslkernels,
forward / backward / forward+backward.

    pytest benchmarks/bench_contrastive.py --benchmark-only             # full grid
    SSLK_BENCH_QUICK=1 pytest benchmarks/ --benchmark-only              # N=1024 only

Each benchmark group is one (shape, dtype, pass), so pytest-benchmark prints
eager and fused side by side. ``bwd`` times ``loss.backward()`` alone after an
untimed fresh forward (``setup``). Peak memory above the inputs (a fresh
subprocess per measurement on CPU; ``max_memory_allocated`` on CUDA) and the
machine go into ``extra_info``. Timing and memory code: ``sslkernels._benchmark``,
the same as ``sslkernels bench``.
"""
from __future__ import annotations

import functools
import json

import pytest

from sslkernels import _benchmark as B

OP_NAMES = ("nt_xent", "sup_con", "info_nce")
DTYPE = "float32"


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        quick = metafunc.config.getoption("--sslk-quick")
        cases = [(name, sizes) for name in OP_NAMES for sizes in B.get_op(name).grid(quick=quick)]
        ids = [f"{name}-" + "-".join(f"{k}{v}" for k, v in sizes.items()) for name, sizes in cases]
        metafunc.parametrize("case", cases, ids=ids)


@functools.lru_cache(maxsize=None)
def _peak(op_name: str, sizes_json: str, pass_: str, impl: str, device: str) -> B.Peak:
    return B.measure_peak(B.get_op(op_name), json.loads(sizes_json), DTYPE, impl, pass_, device=device)


@pytest.mark.parametrize("impl", B.IMPLS)
@pytest.mark.parametrize("pass_", B.PASSES)
def test_contrastive(benchmark, case, pass_, impl, sslk_bench_config, sslk_machine):
    import torch

    op_name, sizes = case
    OP = B.get_op(op_name)
    cfg = sslk_bench_config
    device = cfg["device"]
    inputs = OP.make_inputs(sizes, B.DTYPES[DTYPE], torch.device(device))
    setup, target = B.make_pass(OP.impl(impl), inputs, pass_)

    benchmark.group = f"{OP.name} {OP.shape_label(sizes)} {DTYPE} {pass_}"
    benchmark.extra_info.update({
        "op": OP.name, "impl": impl, "pass": pass_, "dtype": DTYPE, "device": device,
        **sizes, "shape": OP.shape_label(sizes), **sslk_machine, "load_average": B.load_average(),
    })

    contention = B.CpuContention().start()
    benchmark.pedantic(target, setup=lambda: (setup(), {}), rounds=cfg["rounds"],
                       warmup_rounds=cfg["warmup"], iterations=1)
    benchmark.extra_info["other_processes_cores"] = contention.stop()   # ~0 on an idle machine
    for t in inputs:
        if t.requires_grad:
            t.grad = None
    del inputs

    if cfg["memory"]:
        key = json.dumps(sizes, sort_keys=True)
        peaks = {i: _peak(op_name, key, pass_, i, device) for i in B.IMPLS}
        benchmark.extra_info.update({
            "peak_mib": peaks[impl].mib,
            "eager_peak_mib": peaks["eager"].mib,
            "fused_peak_mib": peaks["fused"].mib,
            "memory_ratio": B.memory_ratio(peaks["eager"], peaks["fused"]),
            "memory_method": peaks[impl].method,
        })
        if impl == "eager" and peaks["eager"].method.startswith("error"):
            pytest.fail(f"peak-memory worker failed: {peaks['eager'].method}")
