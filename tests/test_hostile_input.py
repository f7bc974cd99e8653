"""Hostile input, table-driven: every public function of tests/_reliability.py gets wrong
ranks, dtypes, non-tensors, a device mix (meta tensors stand in for another device),
shape mismatches, zero-size and huge (expanded, stride-0) tensors, NaN/Inf, bad scalar
arguments, and non-contiguous or overlapping (expanded) tensors.

Expected: the documented ValueError / TypeError with a message that names the argument
in backticks; non-contiguous and expanded inputs are valid and give the result of their
contiguous copies. The whole table runs in one subprocess (`python -m
tests.test_hostile_input`), which prints each case before running it, so a segfault
or abort is reported against the case that caused it instead of killing pytest.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import pytest
import torch

from tests._reliability import OPS

ROOT = pathlib.Path(__file__).resolve().parents[1]
HUGE = 2**31 + 1  # one past what the CPU core's 32-bit BLAS sizes can address


@dataclass(frozen=True)
class Case:
    id: str
    op: str
    # (tensors, options) of the spec -> (tensors, options) of the case
    mutate: Callable[[dict, dict], Tuple[dict, dict]]
    expect: object  # an exception type, or "same" (valid, equal to the contiguous copy), or "ok"
    names: Tuple[str, ...] = ()  # one of them must appear in backticks in the message


def _replace(name, fn):
    def mutate(tensors, options):
        out = dict(tensors)
        out[name] = fn(tensors[name])
        return out, options
    return mutate


def _all(fn, kinds=("float",), spec=None):
    def mutate(tensors, options):
        return {k: (fn(v) if spec.args[k].kind in kinds else v) for k, v in tensors.items()}, options
    return mutate


def _to_rank(x, r):
    if r == 0:
        return x.reshape(-1)[0].clone()
    if r < x.dim():
        return x.flatten(0, x.dim() - r)
    while x.dim() < r:
        x = x.unsqueeze(0)
    return x


def _poke(x, index, value):
    x = x.clone()
    x.view(-1)[index] = value
    return x


def _non_contiguous(x):
    if x.dim() >= 2:
        return x.mT.contiguous().mT  # column-major storage
    return torch.stack([x, x], dim=1)[:, 0]  # stride 2


def _expanded(x):
    return x[:1].expand_as(x)  # every row the same memory


def _huge_last(x):
    return x[..., :1].expand(*x.shape[:-1], HUGE)


def _huge_first(x):
    return x[:1].expand(HUGE, *x.shape[1:])


def cases_for(spec):
    tensors = spec.inputs(torch.float32, seed=1)
    out = []

    def add(kind, mutate, expect, names=()):
        out.append(Case(f"{spec.name}-{kind}", spec.name, mutate, expect, tuple(names)))

    for name, arg in spec.args.items():
        if name not in tensors:
            continue
        x = tensors[name]
        wrong_ranks = {min(arg.ranks) - 1} | (set() if arg.more_dims_ok else {max(arg.ranks) + 1})
        for r in sorted(wrong_ranks - set(arg.ranks)):
            if r >= 0:
                add(f"{name}-rank{r}", _replace(name, lambda t, r=r: _to_rank(t, r)), ValueError, [name])
        add(f"{name}-list", _replace(name, lambda t: t.tolist()), TypeError, [name])
        add(f"{name}-numpy", _replace(name, lambda t: t.numpy()), TypeError, [name])
        bad_dtypes = arg.bad_dtypes or ((torch.int64, torch.bool, torch.complex64) if arg.kind == "float"
                                        else (torch.float32, torch.bool))
        for dt in bad_dtypes:
            add(f"{name}-{str(dt).split('.')[-1]}", _replace(name, lambda t, dt=dt: t.to(dt)), TypeError, [name])
        if len(tensors) > 1:
            # a mix is between two arguments: the message may name either
            add(f"{name}-meta-device", _replace(name, lambda t: t.to("meta")), ValueError, list(tensors))
        if arg.kind == "float" and arg.values_checked:
            add(f"{name}-nan-last", _replace(name, lambda t: _poke(t, -1, float("nan"))), ValueError, [name])
            add(f"{name}-inf-first", _replace(name, lambda t: _poke(t, 0, float("inf"))), ValueError, [name])
            add(f"{name}-neg-inf-middle", _replace(name, lambda t: _poke(t, t.numel() // 2, -float("inf"))),
                ValueError, [name])
        for d in range(x.dim()):
            # an empty dim makes the arguments disagree: the message may name either side
            add(f"{name}-zero-dim{d}", _replace(name, lambda t, d=d: t.narrow(d, 0, 0)),
                "ok" if d in arg.empty_dims else ValueError, list(tensors))
        add(f"{name}-non-contiguous", _replace(name, _non_contiguous), "same")
        add(f"{name}-expanded", _replace(name, _expanded), "same" if arg.expand_ok else ValueError, [name])
    floats = [k for k in tensors if spec.args[k].kind == "float"]
    add("all-huge-last-dim", _all(_huge_last, spec=spec), ValueError, floats)
    add("all-huge-first-dim", _all(_huge_first, kinds=("float", "int"), spec=spec), ValueError, floats)
    add("all-zero-rows", _all(lambda t: t.narrow(0, 0, 0), kinds=("float", "int"), spec=spec),
        "ok" if spec.empty_batch_ok else ValueError, list(tensors))
    for label, name, fn in spec.mismatches:
        add(f"{name}-{label.replace(' ', '-')}", _replace(name, fn), ValueError, [name])
    for overrides, exc, name in spec.bad_scalars:
        value = "-".join(f"{k}={v!r}" for k, v in overrides.items()).replace(" ", "")
        add(f"scalar-{value}", lambda t, o, ov=overrides: (t, {**o, **ov}), exc, [name])
    return out


CASES = [case for spec in OPS for case in cases_for(spec)]
BY_ID = {case.id: case for case in CASES}
SPECS = {spec.name: spec for spec in OPS}
assert len(BY_ID) == len(CASES), "case ids must be unique"


def _outputs_and_grads(spec, tensors, options):
    """The op's output, plus gradients of its sum for the differentiable arguments."""
    def leaf(k, v):
        if k in spec.grads and isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.detach().requires_grad_(True)
        return v
    leaves = {k: leaf(k, v) for k, v in tensors.items()}
    out = spec.run(leaves, options)
    wanted = [leaves[k] for k in spec.grads if k in leaves]
    grads = torch.autograd.grad(out.sum(), wanted, allow_unused=True) if wanted else ()
    return (out.detach(), *[g for g in grads if g is not None])


def run_case(case: Case) -> dict:
    """Run one case in this process; return what happened, for the parent to judge."""
    spec = SPECS[case.op]
    base = spec.inputs(torch.float32, seed=1)
    tensors, options = case.mutate(base, dict(spec.defaults))
    try:
        got = _outputs_and_grads(spec, tensors, options)
    except Exception as exc:  # noqa: BLE001 - the type is what the table checks
        return {"id": case.id, "outcome": "raised", "type": type(exc).__name__,
                "valid": isinstance(exc, (ValueError, TypeError)) and not isinstance(exc, NotImplementedError),
                "is_expected": isinstance(case.expect, type) and isinstance(exc, case.expect),
                "message": str(exc)[:500]}
    finite = all(bool(torch.isfinite(g.double()).all()) for g in got)
    result = {"id": case.id, "outcome": "returned", "finite": finite}
    if case.expect == "same":
        contiguous = {k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in tensors.items()}
        want = _outputs_and_grads(spec, contiguous, options)
        result["max_diff"] = max(float((g.double() - w.double()).abs().max()) if g.numel() else 0.0
                                 for g, w in zip(got, want))
        result["scale"] = max(float(w.double().abs().max()) if w.numel() else 0.0 for w in want)
    return result


def judge(case: Case, result: Optional[dict]) -> None:
    assert result is not None, f"{case.id}: no result (the subprocess died before or while running it)"
    if isinstance(case.expect, type):
        assert result["outcome"] == "raised", f"{case.id}: expected {case.expect.__name__}, the call returned"
        assert result["is_expected"], (
            f"{case.id}: expected {case.expect.__name__}, got {result['type']}: {result['message']}")
        assert any(re.search(f"`{n}[`=]", result["message"]) for n in case.names), (
            f"{case.id}: the message does not name {case.names}: {result['message']}")
        return
    assert result["outcome"] == "returned", f"{case.id}: valid input raised {result['type']}: {result['message']}"
    assert result["finite"], f"{case.id}: valid input gave NaN/Inf"
    if case.expect == "same":
        assert result["max_diff"] <= 1e-5 * max(1.0, result["scale"]), (
            f"{case.id}: differs from its contiguous copy by {result['max_diff']:.3e}")


def _run_table(ids, timeout=300, extra_env=None):
    """Run cases in a fresh interpreter; returns ({id: result}, returncode, stderr tail, last id started)."""
    env = dict(os.environ, **(extra_env or {}))
    proc = subprocess.run([sys.executable, "-m", "tests.test_hostile_input", *ids], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    results, started = {}, None
    for line in proc.stdout.splitlines():
        if line.startswith("START "):
            started = line[6:]
        elif line.startswith("{"):
            r = json.loads(line)
            results[r["id"]] = r
    return results, proc.returncode, proc.stderr[-2000:], started


@pytest.fixture(scope="module")
def table():
    results, rc, err, started = _run_table([c.id for c in CASES])
    crash = None
    if rc != 0:
        crash = f"the table's interpreter died (exit {rc}, signal {-rc if rc < 0 else '-'}) in case {started}: {err}"
    return results, crash


@pytest.mark.parametrize("case_id", list(BY_ID))
def test_hostile_case(case_id, table):
    results, crash = table
    case = BY_ID[case_id]
    if case_id not in results and crash:
        pytest.fail(crash)
    judge(case, results.get(case_id))


def test_every_public_function_is_in_the_table():
    import sslkernels
    covered = {spec.name for spec in OPS}
    exported = {name for name in sslkernels.__all__ if callable(getattr(sslkernels, name))
                and not isinstance(getattr(sslkernels, name), type) and name not in ("set_debug", "debug_enabled")}
    # Structural helpers without a numeric kernel: their bad-input tables live beside their
    # tests (tests/test_packing.py, tests/test_attention_modules.py), not in this OpSpec table.
    pending = {"pack_patches", "unpack_patches", "patch_vit"}
    assert exported - pending <= covered, f"public functions without hostile-input cases: {exported - pending - covered}"


def test_the_harness_reports_a_crash():
    # A case that segfaults must show up as a dead interpreter naming it, not as a pass.
    results, rc, err, started = _run_table(["__segfault__"], timeout=120)
    assert rc != 0 and started == "__segfault__" and "__segfault__" not in results


def test_the_judge_rejects_wrong_outcomes():
    case = Case("x", "nt_xent", None, ValueError, ("z1",))
    with pytest.raises(AssertionError, match="got TypeError"):
        judge(case, {"outcome": "raised", "type": "TypeError", "is_expected": False, "message": "`z1`"})
    with pytest.raises(AssertionError, match="does not name"):
        judge(case, {"outcome": "raised", "type": "ValueError", "is_expected": True, "message": "bad input"})
    with pytest.raises(AssertionError, match="returned"):
        judge(case, {"outcome": "returned", "finite": False})
    with pytest.raises(AssertionError, match="NaN"):
        judge(Case("y", "nt_xent", None, "ok"), {"outcome": "returned", "finite": False})


def _main(ids):
    torch.manual_seed(0)
    for case_id in ids or list(BY_ID):
        print("START " + case_id, flush=True)
        if case_id == "__segfault__":
            os.kill(os.getpid(), signal.SIGSEGV)
        print(json.dumps(run_case(BY_ID[case_id])), flush=True)


if __name__ == "__main__":
    _main(sys.argv[1:])
