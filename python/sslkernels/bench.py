"""``sslkernels bench``: speed and peak memory of the fused ops against eager PyTorch.

    sslkernels bench                          # headline cases, ~3 min on 2 cores; results in ./bench-results/
    sslkernels bench --full                   # the whole grid of every op (~12 min on 2 cores)
    sslkernels bench --quick                  # one small case per op
    sslkernels bench --n 4096 --d 128 --passes fwd bwd fwdbwd --repeat 10
    python -m sslkernels.bench --device cuda --dtype bfloat16

For every (op, shape, dtype, pass) it times eager and fused on the same inputs
(median of ``--repeat`` calls after ``--warmup``), measures the peak memory of
each above its inputs (CPU: a fresh subprocess per measurement, peak RSS; CUDA:
``torch.cuda.max_memory_allocated``), prints one table and writes
``results.csv``, ``results.png`` and ``run.json`` (machine, command, runtime)
to ``--out``. tqdm (progress bar) and matplotlib (PNG) are optional: without them
progress comes as plain lines and no PNG is drawn (``pip install "sslkernels[bench]"``). The measuring code lives in ``sslkernels._benchmark``, shared
with the pytest-benchmark suite in ``benchmarks/``.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import os
import shlex
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from sslkernels import _benchmark as B

DEFAULT_PASSES = ("fwd", "fwdbwd")   # --full and --quick; the headline suite runs each op's headline pass
DEFAULT_REPEAT = 5     # --full
HEADLINE_REPEAT = 3    # the default suite: its cases take 0.1-4 s a call, so 3 keep it within ~3 min on 2 cores
DEFAULT_WARMUP = 1
QUICK_REPEAT = 3

CSV_COLUMNS = [
    "op", "shape", "dtype", "device", "pass",
    "eager_ms", "fused_ms", "speedup", "eager_ms_min", "fused_ms_min", "repeat", "warmup",
    "eager_peak_mib", "fused_peak_mib", "memory_ratio", "memory_method", "rel_diff",
    "machine_id", "cpu_model", "threads", "torch_version", "triton_version", "gpu_name",
]
# extra per-op size columns ("n", "d", ...) go between "shape" and "dtype"


def _parse_size(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--size expects NAME=V1[,V2...], got {text!r}")
    name, vals = text.split("=", 1)
    try:
        values = [int(v) for v in vals.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size values must be integers, got {vals!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"--size values must be >= 1, got {vals!r}")
    return name.strip().lower(), values


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return v


def _nonneg(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sslkernels bench",
        description="Time and measure the peak memory of sslkernels' fused ops against eager PyTorch.",
    )
    p.add_argument("--ops", nargs="+", default=None, metavar="OP",
                   help=f"ops to benchmark (registered: {', '.join(sorted(B.OPS))}; default: all)")
    p.add_argument("--n", nargs="+", type=_positive, default=None, metavar="N",
                   help="rows per view (contrastive losses); headline 8192, --full 1024 4096 8192")
    p.add_argument("--d", nargs="+", type=_positive, default=None, metavar="D",
                   help="embedding dimension; headline 128 (256 for info_nce), --full 128 256")
    p.add_argument("--size", action="append", type=_parse_size, default=[], metavar="NAME=V1,V2",
                   help="any size parameter of an op, e.g. --size n=512,2048 (repeatable)")
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=sorted(B.DTYPES), metavar="DTYPE",
                   help="float32 (default), float16, bfloat16, float64")
    p.add_argument("--passes", nargs="+", default=None, choices=B.PASSES, metavar="PASS",
                   help="fwd, bwd (backward alone after an untimed forward), fwdbwd; default: fwdbwd "
                        "(fwd for forward-only ops), with --full / --quick: fwd fwdbwd")
    p.add_argument("--repeat", type=_positive, default=None,
                   help=f"timed calls per impl, the median is reported (default {HEADLINE_REPEAT}, --full {DEFAULT_REPEAT}, "
                        f"--quick {QUICK_REPEAT})")
    p.add_argument("--warmup", type=_nonneg, default=None, help=f"untimed calls per impl first (default {DEFAULT_WARMUP})")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=_positive, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    suite = p.add_mutually_exclusive_group()
    suite.add_argument("--full", action="store_true",
                       help="the whole size grid of every op instead of the headline cases (~12 min on 2 cores)")
    suite.add_argument("--quick", action="store_true",
                       help="smallest shape only (N=1024, D=128 for nt_xent) and 3 repetitions, unless given explicitly")
    p.add_argument("--out", default="bench-results", help="output folder for results.csv / .png / run.json (default ./bench-results)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar / progress lines")
    return p


def _size_overrides(args) -> Dict[str, List[int]]:
    over: Dict[str, List[int]] = {}
    if args.n:
        over["n"] = list(args.n)
    if args.d:
        over["d"] = list(args.d)
    for name, values in args.size:
        over[name] = values
    return over


def _fmt(x: Optional[float], spec: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def format_table(rows: List[dict]) -> str:
    headers = ["op", "shape", "dtype", "pass", "eager ms", "fused ms", "speed-up",
               "eager peak MiB", "fused peak MiB", "mem ratio", "machine"]
    body = []
    for r in rows:
        body.append([
            r["op"], r["shape"], r["dtype"], r["pass"],
            _fmt(r["eager_ms"], ".2f"), _fmt(r["fused_ms"], ".2f"), _fmt(r["speedup"], ".2f") + "x",
            _fmt(r["eager_peak_mib"], ".1f"), _fmt(r["fused_peak_mib"], ".1f"),
            (_fmt(r["memory_ratio"], ".1f") + "x") if r["memory_ratio"] is not None else "-",
            r["machine_id"],
        ])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(headers)]
    left = {0, 1, 2, 3, 10}

    def line(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(b) for b in body]
    return "\n".join(out)


def write_csv(path: str, rows: List[dict], size_cols: Sequence[str]) -> None:
    cols = CSV_COLUMNS[:2] + list(size_cols) + CSV_COLUMNS[2:]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})


def write_plot(path: str, rows: List[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['op']}\n{r['shape'].replace(' ', chr(10))}\n{r['dtype']} {r['pass']}" for r in rows]
    x = list(range(len(rows)))
    fig, (ax_t, ax_m) = plt.subplots(2, 1, figsize=(max(8, 1.0 * len(rows)), 9))
    speed = [r["speedup"] if r["speedup"] == r["speedup"] else 0.0 for r in rows]
    bars = ax_t.bar(x, speed, color="tab:blue")
    ax_t.axhline(1.0, color="grey", lw=1, ls="--")
    for b, s in zip(bars, speed):
        ax_t.annotate(f"{s:.2f}x", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7)
    ax_t.set_xticks(x, labels, fontsize=7)
    ax_t.set_ylabel("speed-up, eager time / fused time (median)")
    ax_t.set_title("time")

    w = 0.4
    em = [r["eager_peak_mib"] or 0.0 for r in rows]
    fm = [r["fused_peak_mib"] or 0.0 for r in rows]
    ax_m.bar([i - w / 2 for i in x], em, w, label="eager", color="tab:orange")
    ax_m.bar([i + w / 2 for i in x], fm, w, label="fused", color="tab:green")
    if any(v > 0 for v in em + fm):
        ax_m.set_yscale("log")
    for i, r in enumerate(rows):
        if r["memory_ratio"] is not None:
            ax_m.annotate(f"{r['memory_ratio']:.0f}x" if r["memory_ratio"] >= 10 else f"{r['memory_ratio']:.1f}x",
                          (i, max(em[i], fm[i])), ha="center", va="bottom", fontsize=7)
    ax_m.set_xticks(x, labels, fontsize=7)
    ax_m.set_ylabel("peak memory above inputs, MiB")
    ax_m.set_title("memory" + ("" if any(v > 0 for v in em + fm) else " (not measured)"))
    ax_m.legend()
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plan_cases(ops, overrides: Dict[str, List[int]], suite: str, dtypes: Sequence[str],
               passes: Optional[Sequence[str]] = None) -> List[tuple]:
    """Every (op, sizes, dtype, pass) a run measures, grouped by (op, sizes, dtype).

    ``suite`` is "headline" (the default: each op's headline case and pass), "full" or
    "quick"; ``overrides`` replace a size axis; ``passes`` (None: the suite's own) are
    filtered by what each op has (forward-only ops skip bwd)."""
    cases = []
    for op in ops:
        wanted = passes or (op.headline_passes if suite == "headline" else DEFAULT_PASSES)
        for sizes in op.grid({k: v for k, v in overrides.items() if k in op.params}, suite=suite):
            for dtype in dtypes:
                cases += [(op, sizes, dtype, p) for p in wanted if p in op.passes]
    return cases


EXTRAS_HINT = 'pip install "sslkernels[bench]" brings it'


def _optional_module(name: str, without: str):
    """``import name``, or None after a one-line hint on stderr saying what the run does without it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        print(f"sslkernels bench: {name} is not installed: {without} ({EXTRAS_HINT})", file=sys.stderr, flush=True)
        return None


def _clock(seconds: Optional[float]) -> str:
    if seconds is None:
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}:{s:02d}"


class Progress:
    """Steps done out of all, elapsed time and an ETA: a tqdm bar, or one plain line per step.

    The ETA adds up an estimate for every step still to run: a timing step costs the mean
    of the timing steps so far; a memory step costs a subprocess start-up (the mean
    measured on the memory steps so far, ``STARTUP_GUESS_S`` before the first) plus one
    pass of its case as the timing step measured it.
    """

    STARTUP_GUESS_S = 3.0

    def __init__(self, timing_steps: int, memory_steps: Sequence[Tuple[str, str]], tqdm_module=None,
                 enabled: bool = True, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.timing_left = timing_steps
        self.memory_left = list(memory_steps)      # (case key, impl), in the order they run
        self.total = timing_steps + len(self.memory_left)
        self.done = 0
        self.timing_s: List[float] = []
        self.startup_s: List[float] = []
        self.pass_s: Dict[Tuple[str, str], float] = {}
        self.steps: List[Tuple[str, float]] = []   # (what, seconds) of every step that ran
        self._what = ""
        self.t0 = time.perf_counter()
        self._step_t0 = self.t0
        self.bar = None
        if enabled and tqdm_module is not None:
            self.bar = tqdm_module.tqdm(total=self.total, file=self.stream, dynamic_ncols=True, unit="step",
                                        bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                                   "[{elapsed}{postfix}]")

    def eta(self) -> Optional[float]:
        """Seconds still to go, or None before anything has been measured."""
        if not self.timing_s and self.timing_left:
            return None
        timing = self.timing_left * (sum(self.timing_s) / len(self.timing_s)) if self.timing_left else 0.0
        startup = sum(self.startup_s) / len(self.startup_s) if self.startup_s else self.STARTUP_GUESS_S
        known = list(self.pass_s.values())
        fallback = sum(known) / len(known) if known else 0.0
        memory = sum(startup + self.pass_s.get(step, fallback) for step in self.memory_left)
        return timing + memory

    def begin(self, what: str) -> None:
        self._step_t0 = time.perf_counter()
        self._what = what
        if not self.enabled:
            return
        eta = f"ETA {_clock(self.eta())}"
        if self.bar is not None:
            self.bar.set_description_str(what, refresh=False)
            self.bar.set_postfix_str(eta)
        else:
            elapsed = _clock(time.perf_counter() - self.t0)
            width = len(str(self.total))
            print(f"[{self.done + 1:>{width}}/{self.total}] {elapsed} elapsed, {eta}  {what}",
                  file=self.stream, flush=True)

    def timed(self, key: str, eager_ms: float, fused_ms: float) -> None:
        """A timing step ended; its medians predict that case's memory steps."""
        self.timing_s.append(time.perf_counter() - self._step_t0)
        self.timing_left -= 1
        for impl, ms in (("eager", eager_ms), ("fused", fused_ms)):
            if ms == ms:   # not NaN
                self.pass_s[(key, impl)] = ms / 1e3
        self._advance()

    def measured(self, key: str, impl: str) -> None:
        """A memory step ended: what it took beyond one pass is the subprocess start-up."""
        took = time.perf_counter() - self._step_t0
        self.startup_s.append(max(0.0, took - self.pass_s.get((key, impl), 0.0)))
        if (key, impl) in self.memory_left:
            self.memory_left.remove((key, impl))
        self._advance()

    def _advance(self) -> None:
        self.steps.append((self._what, round(time.perf_counter() - self._step_t0, 4)))
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(args) -> int:
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("sslkernels bench: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    try:
        ops = [B.get_op(name) for name in (args.ops or sorted(B.OPS))]
    except ValueError as e:
        print(f"sslkernels bench: {e}", file=sys.stderr)
        return 2
    overrides = _size_overrides(args)
    for name in overrides:
        if not any(name in op.params for op in ops):
            print(f"sslkernels bench: no selected op has a size parameter {name!r}", file=sys.stderr)
            return 2
    suite = "full" if args.full else "quick" if args.quick else "headline"
    repeat = args.repeat or {"quick": QUICK_REPEAT, "headline": HEADLINE_REPEAT}.get(suite, DEFAULT_REPEAT)
    warmup = DEFAULT_WARMUP if args.warmup is None else args.warmup
    threads = torch.get_num_threads()

    cases = plan_cases(ops, overrides, suite, args.dtype, args.passes)
    passes = sorted({c[3] for c in cases}, key=B.PASSES.index)

    def case_key(op, sizes, dtype, p) -> str:
        return json.dumps([op.name, sizes, dtype, p])

    tqdm_module = None
    if not args.no_progress:
        tqdm_module = _optional_module("tqdm", "progress comes as plain lines, no bar")
    plot = not args.no_plot and _optional_module("matplotlib", "no results.png, the table and CSV as usual") is not None

    machine = B.machine_info(device)
    mdesc = B.describe_machine(machine)
    print(mdesc, flush=True)
    print(f"{len(cases)} cases ({suite} suite" + ("; --full runs the whole grid" if suite == "headline" else "")
          + f"), {repeat} timed calls each", flush=True)
    load_start = B.load_average()
    if device == "cpu":
        pre = B.CpuContention().start()
        time.sleep(0.5)
        busy = pre.stop()
        if busy is not None and busy > 0.25:
            print(f"warning: other processes are using {busy:.2f} CPUs right now: the timings will be "
                  "disturbed (the figure for the whole run is printed at the end)", flush=True)
    contention = B.CpuContention().start()

    memory_steps = [] if args.no_memory else [(case_key(*c), impl) for c in cases for impl in B.IMPLS]
    progress = Progress(len(cases), memory_steps, tqdm_module=tqdm_module, enabled=not args.no_progress)
    rows: List[dict] = []
    dev = torch.device(device)
    try:
        # Timing first, inputs built once per (op, sizes, dtype).
        timings = {}
        groups: List[tuple] = []
        for op, sizes, dtype, _ in cases:
            if (op, sizes, dtype) not in groups:
                groups.append((op, sizes, dtype))
        for op, sizes, dtype in groups:
            inputs = op.make_inputs(sizes, B.DTYPES[dtype], dev)
            for p in (c[3] for c in cases if c[:3] == (op, sizes, dtype)):
                key = case_key(op, sizes, dtype, p)
                progress.begin(f"time {op.name} {op.shape_label(sizes)} {dtype} {p}")
                timings[key] = t = B.time_pair(op, inputs, p, repeat, warmup)
                progress.timed(key, t.eager_median, t.fused_median)
            del inputs
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        # Then memory, one fresh subprocess per (case, impl) on CPU.
        for op, sizes, dtype, p in cases:
            key = case_key(op, sizes, dtype, p)
            t = timings[key]
            peaks = {}
            for impl in B.IMPLS:
                if args.no_memory:
                    peaks[impl] = B.Peak(None, "skipped (--no-memory)")
                    continue
                progress.begin(f"memory {op.name} {op.shape_label(sizes)} {dtype} {p} {impl}")
                peaks[impl] = B.measure_peak(op, sizes, dtype, impl, p, device=device, threads=threads)
                progress.measured(key, impl)
            methods = sorted({pk.method for pk in peaks.values()})
            rows.append({
                "op": op.name, "shape": op.shape_label(sizes), **{k: v for k, v in sizes.items()},
                "dtype": dtype, "device": device, "pass": p,
                "eager_ms": t.eager_median, "fused_ms": t.fused_median, "speedup": t.speedup,
                "eager_ms_min": min(t.eager_ms), "fused_ms_min": min(t.fused_ms),
                "repeat": repeat, "warmup": warmup,
                "eager_peak_mib": peaks["eager"].mib, "fused_peak_mib": peaks["fused"].mib,
                "memory_ratio": B.memory_ratio(peaks["eager"], peaks["fused"]),
                "memory_method": "; ".join(methods), "rel_diff": t.rel_diff,
                **{k: machine[k] for k in ("machine_id", "cpu_model", "threads", "torch_version",
                                           "triton_version", "gpu_name")},
            })
    finally:
        progress.close()

    elapsed = time.perf_counter() - t_start
    load_end = B.load_average()
    others = contention.stop()
    os.makedirs(args.out, exist_ok=True)
    size_cols = []
    for op in ops:
        size_cols += [p for p in op.params if p not in size_cols]
    csv_path = os.path.join(args.out, "results.csv")
    write_csv(csv_path, rows, size_cols)
    png_path = None
    if plot:
        png_path = os.path.join(args.out, "results.png")
        write_plot(png_path, rows, mdesc)
    command = "sslkernels bench " + " ".join(shlex.quote(a) for a in args._argv)
    with open(os.path.join(args.out, "run.json"), "w") as f:
        json.dump({"command": command.strip(), "source_revision": B.source_revision(), "machine": machine, "device": device, "suite": suite, "passes": passes,
                   "repeat": repeat, "warmup": warmup, "seconds": round(elapsed, 1),
                   "load_average_start": load_start, "load_average_end": load_end,
                   "other_processes_cores": None if others is None else round(others, 2),
                   "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   "step_seconds": [{"step": w, "seconds": t} for w, t in progress.steps]}, f, indent=2)

    print()
    print(format_table(rows))
    print()
    methods = sorted({r["memory_method"] for r in rows})
    print(f"times: median of {repeat} after {warmup} warm-up, ms; speed-up = eager / fused.")
    print(f"memory: peak above inputs, MiB ({'; '.join(methods)}); mem ratio = eager / fused.")
    print(f"wrote {csv_path}" + (f", {png_path}" if png_path else "") + f", {os.path.join(args.out, 'run.json')}")
    if others is not None:
        cpus = os.cpu_count() or 0
        print(f"other processes used {others:.2f} of {cpus} CPUs on average during the run"
              + (" -- timings disturbed, rerun on an idle machine" if device == "cpu" and others > 0.1 else ""))
    print(f"total {elapsed:.1f} s")
    return 0


SUBCOMMANDS = ("bench",)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``sslkernels`` console script.

    ``sslkernels bench [options]``; the subcommand may be left out
    (``main(["--quick"])`` and ``python -m sslkernels.bench --quick`` run it too).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        argv = argv[1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    args._argv = argv
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
