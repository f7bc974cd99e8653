"""The device-run package benchmarks/gpu/ on this CPU-only machine: its correctness rule
(the tests' own, sslkernels._tolerance) rejects what it must, its CSV has the promised
columns, and the rehearsal (every section on tiny CPU tensors under TRITON_INTERPRET=1) runs
to its table with every check row PASS and no script error, so a lent GPU is never lost to a
bug in the script or in a section's reference."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmarks.gpu import SECTIONS  # noqa: E402
from benchmarks.gpu._core import CSV_COLUMNS, Row, judge, read_csv, write_csv  # noqa: E402
from sslkernels._tolerance import RESOLUTION, logit_bound  # noqa: E402


def _case(n, d, dtype, seed=0):
    """A float64 reference gradient with entries ~1e-3 (as a loss gradient at N ~ 1000),
    the same values rounded to dtype (an honest result), and eager's error-sized noise."""
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(n, d, generator=g, dtype=torch.float64) * 1e-3
    eager = ref.to(dtype)
    return ref, eager


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,d", [(257, 130), (7, 16)])
def test_rule_rejects_wrong_gradients(n, d, dtype):
    ref, eager = _case(n, d, dtype)
    honest = (ref * (1 + 0.5 * torch.finfo(dtype).eps)).to(dtype)
    assert judge("dz", honest, eager, ref, dtype)[0]
    zero = torch.zeros_like(eager)
    assert not judge("dz", zero, eager, ref, dtype)[0], "a zero gradient passed"
    off = (ref * 1.03).to(dtype)
    assert not judge("dz", off, eager, ref, dtype)[0], "a gradient 3% off passed"
    swapped = eager.clone()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert not judge("dz", swapped, eager, ref, dtype)[0], "two swapped rows passed"
    nan = eager.clone()
    nan[0, 0] = float("nan")
    assert not judge("dz", nan, eager, ref, dtype)[0]
    assert not judge("dz", eager[:-1], eager, ref, dtype)[0]
    assert not judge("dz", eager, eager, ref, dtype, again=off)[0], "a non-deterministic result passed"


def test_rule_floor_is_relative():
    """The same relative error passes or fails whatever the quantity's magnitude."""
    for scale in (1e-6, 1.0, 1e6):
        ref = torch.linspace(1, 2, 50, dtype=torch.float64) * scale
        exact = ref.float()
        small = (ref * (1 + 0.5 * RESOLUTION[torch.float32])).float()
        big = (ref * (1 + 10 * RESOLUTION[torch.float32])).float()
        assert judge("x", small, exact, ref, torch.float32)[0]
        assert not judge("x", big, exact, ref, torch.float32)[0]


def test_rule_gives_a_scalar_its_terms():
    """A loss is a difference of logits up to 1 / t (``terms``): a small loss carries their
    rounding, as the tests judge it, and a zero reference (one candidate per row) lets a
    loss a few ulps of the terms off pass; a wrong loss, or a zero gradient, still fails."""
    terms = logit_bound(temperature=0.1)
    ulp = torch.finfo(torch.float32).eps * 8  # of logits in [8, 16)
    loss = torch.tensor(0.0096, dtype=torch.float64)
    assert judge("loss", (loss + ulp / 3).float(), loss.float(), loss, torch.float32, terms=terms)[0]
    assert not judge("loss", (loss + ulp / 3).float(), loss.float(), loss, torch.float32)[0]
    assert not judge("loss", (loss * 1.03).float(), loss.float(), loss, torch.float32, terms=terms)[0]
    zero = torch.zeros((), dtype=torch.float64)
    assert judge("loss", torch.tensor(ulp / 2), zero.float(), zero, torch.float32, terms=terms)[0]
    ref, eager = _case(7, 16, torch.float32)
    assert not judge("dz", torch.zeros_like(eager), eager, ref, torch.float32, terms=terms)[0]


def test_rule_is_the_tests_rule():
    """On CPU tensors the device run's verdicts are the tests' (one implementation)."""
    from tests._utils import assert_within_eager_error

    ref, eager = _case(257, 130, torch.float32)
    for got in (eager, (ref * 1.03).float(), torch.zeros_like(eager), (ref * (1 + 4e-6)).float()):
        try:
            assert_within_eager_error(got, eager, ref, torch.float32, "dz")
            tests_pass = True
        except AssertionError:
            tests_pass = False
        assert judge("dz", got, eager, ref, torch.float32)[0] == tests_pass


def test_csv_columns_and_rows(tmp_path):
    rows = [Row("nt_xent", "N=8192 D=128", "bf16", "fwdbwd", 2.3, 0.99, 100.0, 5.0, "PASS"),
            Row("svdvals", "B=4096 32x32", "fp32", "fwd", "OOM", 1.0)]
    path = tmp_path / "x.csv"
    write_csv(rows, str(path))
    got = read_csv(str(path))
    assert tuple(got[0].keys()) == CSV_COLUMNS
    assert got[0]["speedup"] == f"{2.3 / 0.99:.3f}" and got[0]["check"] == "PASS"
    assert got[1]["eager_ms"] == "OOM" and got[1]["speedup"] == "" and got[1]["check"] == ""
    with pytest.raises(ValueError, match="pass_"):
        Row("nt_xent", "N=1 D=1", "fp32", "fwd+bwd")
    with pytest.raises(ValueError, match="check"):
        Row("nt_xent", "N=1 D=1", "fp32", "fwd", check="ok")


def _run(args, timeout):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.interpret
def test_rehearsal_runs_every_section(tmp_path):
    """Every section's check and time on tiny shapes, the CSV and the table: a script error
    fails, and so does a FAIL row (the C++ path's numbers under the device run's rule and
    the section's own inputs and references, the run the GPU repeats at full size)."""
    pytest.importorskip("triton")
    csv_path = tmp_path / "rehearsal.csv"
    proc = _run(["--rehearse", "--csv", str(csv_path)], timeout=900)
    out = proc.stdout + proc.stderr
    assert "EXCEPTION" not in out and "Traceback" not in out, out[-6000:]
    failures = out[out.index("FAILURES:"):].split("\n\n")[0] if "FAILURES:" in out else ""
    assert proc.returncode == 0 and not failures, (failures or out[-4000:])[:6000]
    rows = read_csv(str(csv_path))
    assert rows and tuple(rows[0].keys()) == CSV_COLUMNS
    ops = {r["op"].split("[")[0] for r in rows}
    assert {"nt_xent", "sup_con", "info_nce", "clip", "masked_patch_attention", "varlen_attention",
            "svdvals"} <= ops, ops
    assert {r["pass"] for r in rows} <= {"fwd", "bwd", "fwdbwd"}
    assert {r["check"] for r in rows} <= {"PASS", ""} and sum(r["check"] == "PASS" for r in rows) > 50
    timed = [r for r in rows if r["fused_ms"]]
    assert timed and all(float(r["fused_ms"]) > 0 for r in timed if r["fused_ms"] not in ("OOM", "ERR", "SKIP"))
    header = next(line for line in out.splitlines() if line.split()[:3] == ["op", "case", "dtype"])
    table = out[out.index(header):]  # the table's header, a rule, then one line per row
    assert len(table.splitlines()) >= len(rows) + 2 and f"CSV: {csv_path}" in table


def test_dry_run_and_bad_options():
    proc = _run(["--dry-run"], timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in SECTIONS:
        assert name in proc.stdout
    bad = _run(["--only", "nope"], timeout=300)
    assert bad.returncode == 2 and "unknown section" in bad.stderr


@pytest.mark.interpret
def test_device_script_plumbing(tmp_path):
    """scripts/device_run.sh end to end on this machine (its own sslkernels, no install; one
    section rehearsed): the env file, the log and the CSV land under $OUT."""
    pytest.importorskip("triton")
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PY=sys.executable, SKIP_INSTALL="1",
               EXTRA_ARGS="--rehearse --only nt_xent --no-extras", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", os.path.join(REPO, "scripts", "device_run.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode in (0, 1), log[-4000:]
    csvs = sorted(p.name for p in out.glob("gpu-*-cpu.csv"))
    assert len(csvs) == 1, (csvs, log[-3000:])
    rows = read_csv(str(out / csvs[0]))
    assert rows and {r["op"] for r in rows} == {"nt_xent", "nt_xent[unsplit]", "nt_xent[ieee]", "nt_xent[tf32x3]"}
    assert (out / "env.txt").exists() and (out / "device.log").exists()
    assert "device_run: total" in log and "Traceback" not in log


def test_compile_targets_cover_every_kernel_argument():
    """Every planned variant names a type or a value for each argument of its kernel (so the
    sm_90 compile sees what the run launches); fast: nothing is compiled."""
    pytest.importorskip("triton")
    import importlib

    from benchmarks.gpu._core import Ctx, jit_fn

    ctx = Ctx(torch.device("cpu"))
    total = 0
    for name in SECTIONS:
        targets = importlib.import_module(f"benchmarks.gpu.{name}").compile_targets(ctx)
        assert targets, name
        for t in targets:
            args = set(jit_fn(t.kernel).arg_names)
            assert args <= set(t.signature) | set(t.constexprs), (t.tag, sorted(args - set(t.signature) - set(t.constexprs)))
        total += len(targets)
    assert total > 100


def test_compile_only_passes_without_a_gpu():
    """--compile-only on this CPU-only machine: the whole spectral plan on 2 processes, and
    one shard of the loss and attention plans (the lead runs the full plan: --jobs N)."""
    pytest.importorskip("triton")
    proc = _run(["--compile-only", "--only", "spectral", "--jobs", "2", "--no-sass"], timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert out.count(", 0 failure(s)") == 2 and "exit codes [0, 0]" in out, out[-3000:]
    proc = _run(["--compile-only", "--only", "nt_xent,contrastive,attention", "--shard", "0/40"], timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and ", 0 failure(s)" in out, out[-3000:]
    assert "HGMMA" in out  # the SASS was read


_MODEL_CHECK = """
import sys
import pytest
from benchmarks.gpu import model
from benchmarks.gpu._core import Row, write_csv

rows = model.entries()
assert rows and all(r["floor"] > 0 and r["gflop"] >= 0 for r in rows)
floors = model.floors_by_row(rows)
key = ("nt_xent", "N=8192 D=128", "bf16", "fwdbwd")
assert floors[key] == pytest.approx(floors[key[:3] + ("fwd",)] + floors[key[:3] + ("bwd",)])
# 2 M^2 D forward + 4 M^2 D backward (S recomputed, then W Z), M = 2N, over 790 TFLOP/s
assert floors[key] == pytest.approx(6 * (2 * 8192) ** 2 * 128 / model.BF16_FLOPS * 1e3)
path = sys.argv[1]
write_csv([Row("nt_xent", "N=8192 D=128", "bf16", "fwdbwd", 2.3, 0.99, check="PASS"),
           Row("svdvals", "B=4096 32x32", "fp32", "fwd", 4.2, 9.6)], path)
table = model.against(path)
assert f"| {floors[key]:.3f} | 0.9900 | {0.99 / floors[key]:.1f}x |" in table, table
assert "| svdvals | B=4096 32x32 | fp32 | fwd |" in table, table
print("model ok")
"""


def test_model_floors_and_the_comparison(tmp_path):
    """The model's entries are positive floors keyed as the device CSV names its rows, and
    --against pairs a CSV's timed rows with them (fused / floor). In a fresh process: the
    model reads the GPU configs, which the interpreter (set by tests/interpret) replaces."""
    pytest.importorskip("triton")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", _MODEL_CHECK, str(tmp_path / "run.csv")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "model ok" in proc.stdout, proc.stdout + proc.stderr
