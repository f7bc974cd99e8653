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
