"""pytest-benchmark suites: ``pytest benchmarks/ --benchmark-only``.

Files here are named ``bench_*.py`` so that nothing in this folder matches the
default ``test_*.py`` pattern; this conftest (loaded only when ``benchmarks/``
is on the command line; ``testpaths`` is ``tests``) collects them.

Options (or environment variables):
  --sslk-quick        / SSLK_BENCH_QUICK=1     N=1024 only
  --sslk-rounds=R     / SSLK_BENCH_ROUNDS=R    timed rounds per benchmark (default 5)
  --sslk-warmup=W     / SSLK_BENCH_WARMUP=W    untimed rounds first (default 1)
  --sslk-no-memory    / SSLK_BENCH_MEMORY=0    skip the peak-memory subprocesses
  --sslk-device=DEV   / SSLK_BENCH_DEVICE=DEV  cpu or cuda (default: cuda if available)
"""
from __future__ import annotations

import os

import pytest


def _env_flag(name: str, default: bool) -> bool:
    v = os.environ.get(name)
    if v is None:
        return default
    return v.strip().lower() in {"1", "true", "yes", "on"}


def pytest_addoption(parser):
    g = parser.getgroup("sslkernels benchmarks")
    g.addoption("--sslk-quick", action="store_true", default=_env_flag("SSLK_BENCH_QUICK", False),
                help="N=1024 only (env SSLK_BENCH_QUICK=1)")
    g.addoption("--sslk-rounds", type=int, default=int(os.environ.get("SSLK_BENCH_ROUNDS", "5")),
                help="timed rounds per benchmark (env SSLK_BENCH_ROUNDS)")
    g.addoption("--sslk-warmup", type=int, default=int(os.environ.get("SSLK_BENCH_WARMUP", "1")),
                help="untimed warm-up rounds (env SSLK_BENCH_WARMUP)")
    g.addoption("--sslk-no-memory", action="store_true", default=not _env_flag("SSLK_BENCH_MEMORY", True),
                help="skip peak-memory measurement (env SSLK_BENCH_MEMORY=0)")
    g.addoption("--sslk-device", default=os.environ.get("SSLK_BENCH_DEVICE"), choices=["cpu", "cuda"],
                help="cpu or cuda (env SSLK_BENCH_DEVICE; default cuda if available)")


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def sslk_bench_config(request):
    import torch

    cfg = request.config
    device = cfg.getoption("--sslk-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("--sslk-device cuda but no CUDA device")
    return {
        "quick": cfg.getoption("--sslk-quick"),
        "rounds": cfg.getoption("--sslk-rounds"),
        "warmup": cfg.getoption("--sslk-warmup"),
        "memory": not cfg.getoption("--sslk-no-memory"),
        "device": device,
    }


@pytest.fixture(scope="session")
def sslk_machine(sslk_bench_config):
    from sslkernels._benchmark import machine_info, source_revision

    return {**machine_info(sslk_bench_config["device"]), "source_revision": source_revision()}
