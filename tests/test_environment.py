"""Environment: sslkernels imports and gives the same results with OMP_NUM_THREADS,
OPENBLAS_NUM_THREADS and MKL_NUM_THREADS set or unset, imported before or after torch
and numpy, and with no GPU visible. Each configuration runs in its own interpreter
(`python -m tests.test_environment OUT`), computing every function of
tests/_reliability.py (outputs and gradients, float32 and float64) on fixed inputs.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

# name -> (modules imported first, in order; thread variables to set; extra environment)
CONFIGS = {
    "unset-sslkernels-first": (("sslkernels", "torch", "numpy"), {}, {}),
    "all-1-torch-numpy-first": (("torch", "numpy", "sslkernels"), dict.fromkeys(THREAD_VARS, "1"), {}),
    "all-2-numpy-first-no-gpu": (("numpy", "sslkernels", "torch"), dict.fromkeys(THREAD_VARS, "2"),
                                 {"CUDA_VISIBLE_DEVICES": ""}),
    "mixed-sslkernels-first": (("sslkernels",), {"OPENBLAS_NUM_THREADS": "4", "MKL_NUM_THREADS": "1"},
                               {"CUDA_VISIBLE_DEVICES": "-1"}),
}


def _child(out_path: str, imports: str) -> None:
    import importlib
    for name in imports.split(","):
        importlib.import_module(name)
    import torch as t

    import sslkernels  # noqa: F401
    from tests._reliability import OPS

    results = {"num_threads": t.get_num_threads(), "cuda": t.cuda.is_available(), "ops": {}}
    for spec in OPS:
        for dtype in (t.float32, t.float64):
            tensors = spec.inputs(dtype, seed=11)
            leaves = {k: (v.detach().requires_grad_(True) if k in spec.grads and v.is_floating_point() else v)
                      for k, v in tensors.items()}
            out = spec.run(leaves)
            wanted = [leaves[k] for k in spec.grads if k in leaves]
            grads = t.autograd.grad(out.sum(), wanted) if wanted else ()
            results["ops"][f"{spec.name}-{dtype}"] = [out.detach(), *grads]
    t.save(results, out_path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("env")
    procs = {}
    for name, (imports, threads, extra) in CONFIGS.items():
        env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
        env.update(threads)
        env.update(extra)
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "tests.test_environment", str(folder / f"{name}.pt"), ",".join(imports)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outcomes = {}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        outcomes[name] = (proc.returncode, err[-3000:], folder / f"{name}.pt")
    return outcomes


@pytest.mark.parametrize("name", list(CONFIGS))
def test_imports_and_runs(name, runs):
    rc, err, path = runs[name]
    assert rc == 0, f"{name}: exit {rc}\n{err}"
    results = torch.load(path)
    imports, threads, extra = CONFIGS[name]
    if threads.get("OMP_NUM_THREADS") == "1":
        assert results["num_threads"] == 1  # torch took the setting: the variables do reach the process
    if "CUDA_VISIBLE_DEVICES" in extra:
        assert results["cuda"] is False


@pytest.mark.parametrize("name", [n for n in CONFIGS if n != "unset-sslkernels-first"])
def test_results_do_not_change(name, runs):
    from tests._reliability import BY_NAME

    base, other = (torch.load(runs[n][2]) for n in ("unset-sslkernels-first", name))
    assert base["ops"].keys() == other["ops"].keys() and base["ops"]
    for key, want in base["ops"].items():
        got = other["ops"][key]
        spec = BY_NAME[key.rsplit("-", 1)[0]]
        for i, (g, w) in enumerate(zip(got, want)):
            if spec.thread_bitwise or base["num_threads"] == other["num_threads"]:
                assert torch.equal(g, w), f"{key}[{i}]: differs under {name}"
            else:
                torch.testing.assert_close(g, w, rtol=1e-5 if g.dtype == torch.float32 else 1e-11, atol=1e-7)


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
