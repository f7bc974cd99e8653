"""The benchmark CLI and its shared measuring helpers (sslkernels.bench, sslkernels._benchmark)."""
from __future__ import annotations

import csv
import math
import os

import pytest
import torch

from sslkernels import _benchmark as B
from sslkernels.bench import CSV_COLUMNS, main

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak RSS needs /proc")


def _num(text: str) -> float:
    v = float(text)
    assert math.isfinite(v), text
    return v


def test_cli_quick_writes_csv_png_and_positive_memory(tmp_path, capsys):
    out = tmp_path / "res"
    rc = main(["--ops", "nt_xent", "--quick", "--n", "64", "--d", "16", "--repeat", "1", "--out", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "machine m-" in printed and "speed-up" in printed

    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames
        rows = list(reader)
    assert cols == CSV_COLUMNS[:2] + ["n", "d"] + CSV_COLUMNS[2:]
    # --quick: default passes (fwd, fwdbwd) on the one requested shape
    assert [(r["op"], r["n"], r["d"], r["dtype"], r["pass"]) for r in rows] == [
        ("nt_xent", "64", "16", "float32", "fwd"),
        ("nt_xent", "64", "16", "float32", "fwdbwd"),
    ]
    for r in rows:
        assert r["shape"] == "N=64 D=16"
        assert _num(r["eager_ms"]) > 0 and _num(r["fused_ms"]) > 0
        assert _num(r["speedup"]) == pytest.approx(_num(r["eager_ms"]) / _num(r["fused_ms"]))
        assert r["repeat"] == "1"
        assert r["memory_method"] == "VmHWM-after-clear_refs", r["memory_method"]
        assert _num(r["eager_peak_mib"]) > 0
        assert _num(r["fused_peak_mib"]) >= 0
        assert _num(r["rel_diff"]) < 1e-4           # fused and eager computed the same loss
        assert r["machine_id"].startswith("m-") and r["threads"] == str(torch.get_num_threads())
        assert r["torch_version"] == torch.__version__
    png = out / "results.png"
    assert png.exists() and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "run.json").exists()


def test_peak_memory_grows_with_the_eager_logits():
    # eager holds (2N)^2 float32 logits: 4 MiB at N=512, so the peak must exceed that;
    # the fused op keeps nothing N x N.
    op = B.get_op("nt_xent")
    eager = B.measure_peak(op, {"n": 512, "d": 32}, "float32", "eager", "fwdbwd")
    fused = B.measure_peak(op, {"n": 512, "d": 32}, "float32", "fused", "fwdbwd")
    assert eager.method == fused.method == "VmHWM-after-clear_refs"
    assert eager.mib > 4.0
    assert 0 <= fused.mib < eager.mib
    assert B.memory_ratio(eager, fused) == pytest.approx(eager.mib / fused.mib)


def test_peak_memory_without_reset_is_real_or_absent():
    # The fallback when clear_refs is not writable: a number only when VmHWM rose during the pass.
    op = B.get_op("nt_xent")
    p = B.measure_peak(op, {"n": 512, "d": 32}, "float32", "eager", "fwdbwd", no_reset=True)
    if p.mib is None:
        assert p.method.startswith("unavailable")
    else:
        assert p.method == "VmHWM-no-reset" and p.mib > 4.0


@pytest.mark.parametrize("pass_", B.PASSES)
def test_make_pass_timed_region(pass_):
    op = B.get_op("nt_xent")
    z1, z2 = op.make_inputs({"n": 16, "d": 8}, torch.float32, torch.device("cpu"))
    setup, target = B.make_pass(op.fused, (z1, z2), pass_)
    z1.grad = torch.ones_like(z1)
    args = setup()
    assert z1.grad is None                       # setup clears gradients
    out = target(*args)
    if pass_ == "fwd":
        assert out.dim() == 0 and z1.grad is None
    else:
        assert z1.grad is not None and z2.grad is not None
        assert torch.isfinite(z1.grad).all()


def test_registry_and_grid():
    op = B.get_op("nt_xent")
    assert [tuple(s.values()) for s in op.grid()] == [(n, d) for n in (1024, 4096, 8192) for d in (128, 256)]
    assert op.grid(quick=True) == [{"n": 1024, "d": 128}]
    assert op.grid({"d": [7]}, quick=True) == [{"n": 1024, "d": 7}]
    with pytest.raises(ValueError, match="unknown benchmark op"):
        B.get_op("nope")
    with pytest.raises(ValueError, match="already registered"):
        B.register_op(op)


def test_cli_rejects_bad_options(tmp_path, capsys):
    assert main(["--ops", "nope", "--out", str(tmp_path)]) == 2
    assert main(["bench", "--size", "zz=3", "--out", str(tmp_path)]) == 2
    with pytest.raises(SystemExit):
        main(["--passes", "sideways"])
