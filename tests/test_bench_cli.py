"""The benchmark CLI and its shared measuring helpers (sslkernels.bench, sslkernels._benchmark)."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from sslkernels import _benchmark as B
from sslkernels import bench as bench_cli
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
    assert op.grid(suite="quick") == [{"n": 1024, "d": 128}]
    assert op.grid({"d": [7]}, suite="quick") == [{"n": 1024, "d": 7}]
    assert op.grid(suite="headline") == [{"n": 8192, "d": 128}]
    assert op.grid({"n": [256, 512]}, suite="headline") == [{"n": 256, "d": 128}, {"n": 512, "d": 128}]
    with pytest.raises(ValueError, match="suite must be"):
        op.grid(suite="everything")
    with pytest.raises(ValueError, match="unknown benchmark op"):
        B.get_op("nope")
    with pytest.raises(ValueError, match="already registered"):
        B.register_op(op)


def test_cli_rejects_bad_options(tmp_path, capsys):
    assert main(["--ops", "nope", "--out", str(tmp_path)]) == 2
    assert main(["bench", "--size", "zz=3", "--out", str(tmp_path)]) == 2
    with pytest.raises(SystemExit):
        main(["--passes", "sideways"])


# ---- the default (headline) suite, --full, progress and ETA, optional tqdm / matplotlib


def test_every_headline_case_names_a_registered_op_and_all_its_sizes():
    for name, sizes in B.HEADLINE_CASES.items():
        op = B.get_op(name)
        assert set(sizes) == set(op.params), name
        assert op.grid(suite="headline") == [{p: sizes[p] for p in op.params}]


def test_default_suite_is_one_headline_case_per_op_and_full_is_the_grid():
    ops = [B.OPS[n] for n in sorted(B.OPS)]
    headline = bench_cli.plan_cases(ops, {}, "headline", ["float32"])
    assert sorted(c[0].name for c in headline) == sorted(B.OPS)            # one case per op
    for op, sizes, dtype, p in headline:
        assert p == ("fwdbwd" if "bwd" in op.passes else "fwd")
        if op.name in B.HEADLINE_CASES:
            assert sizes == B.HEADLINE_CASES[op.name]
    full = bench_cli.plan_cases(ops, {}, "full", ["float32"])
    assert len(full) == sum(len(op.grid()) * len([p for p in ("fwd", "fwdbwd") if p in op.passes]) for op in ops)
    # an op without a headline entry still runs, at its first quick case
    op = B.get_op("nt_xent")
    saved = B.HEADLINE_CASES.pop("nt_xent")
    try:
        assert bench_cli.plan_cases([op], {}, "headline", ["float32"]) == [(op, {"n": 1024, "d": 128}, "float32", "fwdbwd")]
    finally:
        B.HEADLINE_CASES["nt_xent"] = saved


def test_full_and_quick_exclude_each_other(tmp_path):
    with pytest.raises(SystemExit):
        main(["--full", "--quick", "--out", str(tmp_path)])


def test_eta_adds_timing_and_memory_estimates(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(bench_cli.time, "perf_counter", lambda: now[0])
    pr = bench_cli.Progress(2, [("a", "eager"), ("a", "fused"), ("b", "eager"), ("b", "fused")], enabled=False)
    assert pr.eta() is None                      # nothing measured yet
    pr.begin("time a")
    now[0] += 10.0
    pr.timed("a", eager_ms=2000.0, fused_ms=500.0)
    # one timing step left (10 s), four memory steps of 3 s start-up (the guess) + one pass each;
    # case b is not timed yet: its passes count as the mean of a's (1.25 s)
    assert pr.eta() == pytest.approx(10.0 + (3 + 2.0) + (3 + 0.5) + 2 * (3 + 1.25))
    pr.begin("time b")
    now[0] += 4.0
    pr.timed("b", eager_ms=1000.0, fused_ms=1000.0)
    pr.begin("memory a eager")
    now[0] += 3.0                                # 1 s of start-up beyond a's 2 s eager pass
    pr.measured("a", "eager")
    assert pr.eta() == pytest.approx((1 + 0.5) + (1 + 1.0) + (1 + 1.0))
    assert pr.done == 3 and pr.total == 6


def _csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_headline_default_with_progress_lines_and_no_optional_modules(tmp_path, capsys, monkeypatch):
    # tqdm and matplotlib hidden, as after a plain `pip install sslkernels`: the run still
    # succeeds, says once what it does without each, prints progress lines with an ETA.
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "res"
    rc = main(["--ops", "nt_xent", "--n", "64", "--d", "16", "--repeat", "1", "--out", str(out)])
    assert rc == 0
    err = capsys.readouterr().err
    hints = [ln for ln in err.splitlines() if "is not installed" in ln]
    assert len(hints) == 2 and all('pip install "sslkernels[bench]"' in h for h in hints), err
    assert any(h.startswith("sslkernels bench: tqdm is not installed") for h in hints)
    assert any(h.startswith("sslkernels bench: matplotlib is not installed") for h in hints)
    steps = [ln for ln in err.splitlines() if ln.startswith("[")]
    # headline suite: fwd+bwd only -> one timing step and two memory steps
    assert [s.split("  ", 1)[1] for s in steps] == [
        "time nt_xent N=64 D=16 float32 fwdbwd",
        "memory nt_xent N=64 D=16 float32 fwdbwd eager",
        "memory nt_xent N=64 D=16 float32 fwdbwd fused",
    ]
    assert "ETA ?" in steps[0] and all("ETA " in s and "ETA ?" not in s for s in steps[1:])
    with open(out / "run.json") as f:
        run = json.load(f)
    assert run["suite"] == "headline"
    assert [s["step"] for s in run["step_seconds"]] == [s.split("  ", 1)[1] for s in steps]
    assert all(s["seconds"] > 0 for s in run["step_seconds"])
    rows = _csv_rows(out / "results.csv")
    assert [(r["op"], r["n"], r["d"], r["pass"]) for r in rows] == [("nt_xent", "64", "16", "fwdbwd")]
    assert float(rows[0]["fused_peak_mib"]) >= 0
    assert not (out / "results.png").exists()


def test_progress_bar_when_tqdm_is_there(tmp_path, capsys):
    pytest.importorskip("tqdm")
    out = tmp_path / "res"
    rc = main(["--ops", "nt_xent", "--n", "64", "--d", "16", "--repeat", "1", "--no-memory", "--no-plot",
               "--out", str(out)])
    assert rc == 0
    err = capsys.readouterr().err
    assert "is not installed" not in err
    assert "ETA" in err and "1/1" in err and not any(ln.startswith("[1/1]") for ln in err.splitlines())


# ---- the bar's command in a fresh virtual environment with only the wheel installed

FRESH_VENV = os.environ.get("SSLK_FRESH_VENV")


@pytest.mark.skipif(not FRESH_VENV, reason="needs SSLK_FRESH_VENV: scripts/check_wheel.sh (run by .ci/run) "
                                           "builds the wheel, installs it alone into a fresh venv and sets it")
def test_bench_in_fresh_venv_with_plain_install(tmp_path):
    venv_python = os.path.join(FRESH_VENV, "bin", "python")
    probe = subprocess.run([venv_python, "-c", "import importlib.util as u; "
                            "print([m for m in ('tqdm', 'matplotlib') if u.find_spec(m)])"],
                           capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "[]", "the fresh venv holds optional modules: " + probe.stdout
    out = tmp_path / "fresh"
    cmd = [os.path.join(FRESH_VENV, "bin", "sslkernels"), "bench", "--ops", "nt_xent", "--n", "256", "--d", "32",
           "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = _csv_rows(out / "results.csv")
    assert [(r["op"], r["n"], r["d"], r["pass"]) for r in rows] == [
        ("nt_xent", "256", "32", "fwd"), ("nt_xent", "256", "32", "fwdbwd")]
    assert all(float(r["eager_ms"]) > 0 and float(r["fused_ms"]) > 0 for r in rows)
    assert "tqdm is not installed" in proc.stderr and "matplotlib is not installed" in proc.stderr
