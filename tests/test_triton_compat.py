"""The kernels' Triton source against the oldest Triton that runs it: the device image's
3.6.0 (tests here run 3.9). `bash scripts/check_triton36.sh` compiles every kernel variant
with 3.6 for sm_90 and rehearses the device run under it; what 3.6 rejects and a newer
Triton accepts is pinned here, by reading the source, so that any Triton catches it."""
from __future__ import annotations

import ast
import glob
import os
import re
import subprocess
import sys

import pytest

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


def test_the_device_run_counts_its_compiles(tmp_path):
    """The device run's CompileClock (Triton's compilation listener, 3.6 and later): one
    sm_90 compile of one SIGReg variant counts as one compile with its seconds, and the same
    compile again, from the same TRITON_CACHE_DIR, as a cache hit."""
    pytest.importorskip("triton")
    env = dict(os.environ, PYTHONUNBUFFERED="1", TRITON_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("TRITON_INTERPRET", None)
    lines = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--compile-only", "--only", "sigreg",
                               "--shard", "0/8", "--no-sass"], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=600)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-3000:]
        lines.append(next(line for line in out.splitlines() if line.startswith("compile-only shard 0/8")))
    first = re.search(r"(\d+) Triton compile\(s\) \((\d+) from the cache\), ([\d.]+)s compiling", lines[0])
    again = re.search(r"(\d+) Triton compile\(s\) \((\d+) from the cache\), ([\d.]+)s compiling", lines[1])
    assert first and again, lines
    assert first.group(1, 2) == ("1", "0") and float(first.group(3)) > 0, lines[0]
    assert again.group(1, 2) == ("1", "1") and float(again.group(3)) < float(first.group(3)), lines[1]


def test_compile_targets_compile_what_the_launchers_launch():
    """--compile-only must compile the variant the device runs: for every SIGReg and KoLeo
    launch (recorded at Triton's JIT entry by tests/_launch_probe.py, nothing compiled), a
    compile target of the same kernel and constexprs with the same num_warps and num_stages.
    Both plans once compiled at num_stages 2 while the launchers ran Triton's default 3.
    (In a fresh process: beside tests/interpret the kernels here are interpreted.)"""
    pytest.importorskip("triton")
    import json

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "_launch_probe.py")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    launches = [r for r in records if r["kind"] == "launch"]
    assert len(launches) >= 20 and {x["kernel"] for x in launches} == {
        "_sigreg_stats_kernel", "_sigreg_dx_kernel", "_koleo_search_kernel", "_koleo_symmetric_kernel",
        "_koleo_merge_kernel"}
    planned = {}
    for t in (r for r in records if r["kind"] == "target"):
        planned.setdefault((t["kernel"], tuple(sorted(t["constexprs"].items()))), set()).add(
            (t["num_warps"], t["num_stages"]))
    for x in launches:
        key = (x["kernel"], tuple(sorted(x["constexprs"].items())))
        assert key in planned, f"launched but not in the compile plan: {x}"
        assert (x["num_warps"], x["num_stages"]) in planned[key], (x, planned[key])
