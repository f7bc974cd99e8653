"""The kernels' Triton source against the oldest Triton that runs it: the device image's
3.6.0 (tests here run 3.9). `bash scripts/check_triton36.sh` compiles every kernel variant
with 3.6 for sm_90 and rehearses the device run under it; what 3.6 rejects and a newer
Triton accepts is pinned here, by reading the source, so that any Triton catches it."""
from __future__ import annotations

import ast
import glob
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = sorted(glob.glob(os.path.join(REPO, "kernels", "*.py")))


def _tl_calls(name: str):
    """(file, line, ast.Call) of every `tl.<name>(...)` in kernels/."""
    for path in KERNELS:
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "tl"):
                yield os.path.relpath(path, REPO), node.lineno, node


def test_kernels_exist():
    assert len(KERNELS) >= 6 and sum(1 for _ in _tl_calls("dot")) >= 15


def test_dot_with_an_accumulator_names_its_out_dtype():
    """Triton 3.6's tl.dot defaults out_dtype to float32 and asserts the accumulator has
    that dtype, so a float64 accumulator without out_dtype fails to compile there (3.7+
    default out_dtype to the accumulator's dtype). Every tl.dot given an accumulator (third
    argument or acc=) passes out_dtype explicitly."""
    bare = []
    for path, line, call in _tl_calls("dot"):
        keywords = {k.arg for k in call.keywords}
        if (len(call.args) >= 3 or "acc" in keywords) and "out_dtype" not in keywords:
            bare.append(f"{path}:{line}")
    assert not bare, f"tl.dot with an accumulator but no out_dtype (fails on Triton 3.6 for float64): {bare}"
