"""The training examples run end to end for a few steps, and use public API only."""
from __future__ import annotations

import ast
import math
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = sorted(p for p in EXAMPLES.glob("*.py") if p.name != "common.py") + [EXAMPLES / "common.py"]


def _run(script, *args, timeout=240):
    out = subprocess.run([sys.executable, str(EXAMPLES / script), "--no-progress", "--threads", "1", *args],
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def _summary(script, *args):
    """Run an example; its ``SUMMARY {json}`` line, checked for the keys every example prints."""
    import json

    out = _run(script, *args)
    line = [ln for ln in out.splitlines() if ln.startswith("SUMMARY ")]
    assert line, out[-2000:]
    summary = json.loads(line[-1][len("SUMMARY "):])
    for key in ("final_loss", "rankme", "probe_acc", "probe_acc_random_init", "raw_logreg_acc", "wall_time_s"):
        assert key in summary and math.isfinite(summary[key]), key
    assert 0.0 <= summary["probe_acc"] <= 1.0
    return summary


def test_simclr_smoke():
    summary = _summary("simclr.py", "--epochs", "1", "--max-steps", "3")
    assert summary["steps"] == 3


def test_rankme_selection_smoke(tmp_path):
    _run("rankme_selection.py", "--temperatures", "0.1", "0.5", "--lrs", "0.001", "--epochs", "1",
         "--max-steps", "2", "--out-dir", str(tmp_path))
    rows = (tmp_path / "rankme_selection.csv").read_text().strip().splitlines()
    assert rows[0].startswith("temperature,lr,rankme,probe_acc") and len(rows) == 3
    assert (tmp_path / "rankme_selection.png").stat().st_size > 0


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_examples_use_public_api_only(script):
    tree = ast.parse(script.read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.startswith("sslkernels"):
                parts = name.split(".")
                assert not any(p.startswith("_") for p in parts) and "ops" not in parts, (script.name, name)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "sslkernels":
            assert not node.attr.startswith("_") and node.attr != "ops", (script.name, node.attr)


def test_tabular_jepa_smoke():
    summary = _summary("tabular_jepa.py", "--epochs", "1", "--max-steps", "3")
    assert summary["steps"] == 3 and summary["tokens_seen"] > 0 and summary["dataset"] == "breast_cancer"


def test_ijepa_smoke():
    runs = {flag: _summary("ijepa.py", "--epochs", "1", "--max-steps", "3", *flag) for flag in ((), ("--truncate",))}
    packed, truncated = runs[()], runs[("--truncate",)]
    assert packed["steps"] == truncated["steps"] == 3 and truncated["truncate"] and not packed["truncate"]
    # same seed, same masks: the packed run reads every visible context token, the truncating one fewer
    assert packed["tokens_visible"] == truncated["tokens_visible"] == packed["tokens_seen"]
    assert truncated["tokens_seen"] < truncated["tokens_visible"] and truncated["truncation_drop_frac"] > 0


def test_retrieval_smoke():
    import json

    out = _run("retrieval.py", "--max-steps", "3", "--users", "300", "--items", "200")
    summary = json.loads([ln for ln in out.splitlines() if ln.startswith("SUMMARY ")][-1][len("SUMMARY "):])
    for key in ("recall_popularity", "recall_plain", "recall_corrected", "final_loss_plain", "final_loss_corrected"):
        assert math.isfinite(summary[key]), key
    assert summary["steps"] == 3 and 0.0 <= summary["recall_corrected"] <= 1.0
