"""Every registered op (contrastive losses, svdvals, RankMe): eager PyTorch against
sslkernels, for each pass the op has (fwd / bwd / fwdbwd; forward only for svdvals
and rankme).

    pytest benchmarks/ --benchmark-only                                 # full grid
    SSLK_BENCH_QUICK=1 pytest benchmarks/ --benchmark-only              # small cases
    pytest benchmarks/ --benchmark-only -k "sup_con"                    # one op

Each benchmark group is one (op, shape, dtype, pass), so pytest-benchmark prints
eager and fused side by side. ``bwd`` times ``loss.backward()`` alone after an
untimed fresh forward (``setup``). ``extra_info`` holds the peak memory above the
inputs (a fresh subprocess per measurement on CPU; ``max_memory_allocated`` on
CUDA), the machine, the other processes' CPU use, and for forward passes the
error of the output against the eager op on float64 inputs (relative to its
largest value). Timing and memory code: ``sslkernels._benchmark``, the same as
``sslkernels bench``.
"""
from __future__ import annotations

import functools
import json

import pytest

from sslkernels import _benchmark as B

DTYPE = "float32"


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        quick = metafunc.config.getoption("--sslk-quick")
        cases = [
            (name, sizes, pass_)
            for name in sorted(B.OPS)
            for sizes in B.get_op(name).grid(suite="quick" if quick else "full")
            for pass_ in B.get_op(name).passes
        ]
        ids = [f"{n}-" + "-".join(f"{k}{v}" for k, v in s.items()) + f"-{p}" for n, s, p in cases]
        metafunc.parametrize("case", cases, ids=ids)


@functools.lru_cache(maxsize=None)
def _peak(op_name: str, sizes_json: str, pass_: str, impl: str, device: str) -> B.Peak:
    return B.measure_peak(B.get_op(op_name), json.loads(sizes_json), DTYPE, impl, pass_, device=device)


@functools.lru_cache(maxsize=None)
def _reference(op_name: str, sizes_json: str):
    """The eager op on float64 copies of the case's inputs (computed once, on the CPU)."""
    import torch

    op = B.get_op(op_name)
    inputs = op.make_inputs(json.loads(sizes_json), torch.float64, torch.device("cpu"))
    with torch.no_grad():
        return op.eager(*inputs)


@pytest.mark.parametrize("impl", B.IMPLS)
def test_op(benchmark, case, impl, sslk_bench_config, sslk_machine):
    import torch

    op_name, sizes, pass_ = case
    op = B.get_op(op_name)
    cfg = sslk_bench_config
    device = cfg["device"]
    inputs = op.make_inputs(sizes, B.DTYPES[DTYPE], torch.device(device))
    setup, target = B.make_pass(op.impl(impl), inputs, pass_)

    benchmark.group = f"{op.name} {op.shape_label(sizes)} {DTYPE} {pass_}"
    benchmark.extra_info.update({
        "op": op.name, "impl": impl, "pass": pass_, "dtype": DTYPE, "device": device,
        **sizes, "shape": op.shape_label(sizes), **sslk_machine, "load_average": B.load_average(),
    })

    contention = B.CpuContention().start()
    out = benchmark.pedantic(target, setup=lambda: (setup(), {}), rounds=cfg["rounds"],
                             warmup_rounds=cfg["warmup"], iterations=1)
    benchmark.extra_info["other_processes_cores"] = contention.stop()   # ~0 on an idle machine
    if pass_ == "fwd" and isinstance(out, torch.Tensor):
        ref = _reference(op_name, json.dumps(sizes, sort_keys=True))
        scale = float(ref.abs().max()) or 1.0
        benchmark.extra_info["error_vs_float64"] = float((out.double().cpu() - ref).abs().max()) / scale
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
