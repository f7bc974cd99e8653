"""Triton kernels on CPU tensors: TRITON_INTERPRET=1 must be set before any
`@triton.jit` runs (the decorator reads it), so it is set here, at import.

Side effect: every Triton kernel module first imported in this pytest process is
interpreted, so GPU runs of the Triton path belong in a separate process
(`benchmarks/gpu_check.py`), not next to this folder.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

# Without Triton the folder is skipped by the module-level `pytest.importorskip` of
# each test module: a skip raised here, in a conftest, aborts the whole run when the
# folder is named on the command line (it only skips when collected from tests/).


def interpreted_kernels(family: str):
    """`sslkernels.kernels.<family>`, interpreted (re-imported if something imported
    it before this conftest set TRITON_INTERPRET)."""
    name = f"sslkernels.kernels.{family}"
    module = sys.modules.get(name)
    if module is None:
        module = importlib.import_module(name)
    elif not module.INTERPRET:
        module = importlib.reload(module)
    assert module.INTERPRET, "the kernels were not built in interpreter mode"
    return module


@pytest.fixture(scope="session")
def contrastive_kernels():
    return interpreted_kernels("contrastive")


@pytest.fixture(scope="session")
def spectral_kernels():
    return interpreted_kernels("spectral")


@pytest.fixture(scope="session")
def sigreg_kernels():
    return interpreted_kernels("sigreg")


def _launch_options() -> frozenset:
    """Keyword arguments a CUDA launch takes besides the kernel's own parameters."""
    import dataclasses

    try:
        from triton.backends.nvidia.compiler import CUDAOptions

        return frozenset(f.name for f in dataclasses.fields(CUDAOptions))
    except ImportError:  # a Triton without the NVIDIA backend: the options every version has
        return frozenset({"num_warps", "num_ctas", "num_stages", "maxnreg", "enable_fp_fusion", "debug"})


@pytest.fixture(scope="session", autouse=True)
def launches_name_only_real_parameters():
    """The interpreter drops a launch's unknown keyword arguments without a word, where the
    JIT on a GPU raises ("Keyword argument X was specified but unrecognised"): a constexpr
    meant for one kernel passed to another (it happened: the NT-Xent forward's RED_BLOCK
    reached the lse forward through their shared plan) would pass every test here and fail
    the first device run. So every interpreted launch is checked against its kernel."""
    import inspect

    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        yield
        return
    options = _launch_options()
    original = InterpretedFunction.run

    def checked_run(self, *args, grid, warmup, **kwargs):
        params = set(inspect.signature(self.fn).parameters)
        unknown = sorted(k for k in kwargs if k not in params and k not in options)
        if unknown:
            raise TypeError(f"launch of {self.fn.__name__} names {unknown}, which are neither its parameters "
                            "nor launch options: the GPU's JIT would raise")
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = checked_run
    try:
        yield
    finally:
        InterpretedFunction.run = original
