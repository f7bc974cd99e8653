"""The runner: parses the options, sets the environment the kernels read at import, runs
each section's check and time, writes the CSV and prints the table last."""
from __future__ import annotations

import argparse
import datetime
import importlib
import os
import re
import subprocess
import sys
import time

from benchmarks.gpu import SECTIONS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
    import benchmarks.gpu as pkg

    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=pkg.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="import, print the plan, exit (no GPU needed)")
    p.add_argument("--compile-only", action="store_true",
                   help="compile every planned kernel variant for sm_90: ptxas registers / spills, SASS HGMMA")
    p.add_argument("--rehearse", action="store_true",
                   help="every section on tiny CPU tensors under TRITON_INTERPRET=1, the CSV and the table")
    p.add_argument("--tiny", action="store_true",
                   help="the rehearsal's tiny shapes on the default device (a GPU: for compute-sanitizer)")
    p.add_argument("--only", action="append", default=None, metavar="SECTION",
                   help=f"run these sections only (repeatable or comma-separated; of {', '.join(SECTIONS)})")
    p.add_argument("--jobs", type=int, default=1, help="--compile-only: this many processes")
    p.add_argument("--shard", default=None, metavar="I/N", help="--compile-only: the I-th of N shares of the targets")
    p.add_argument("--no-sass", action="store_true", help="--compile-only: skip the cuobjdump SASS read")
    p.add_argument("--no-autotune", action="store_true", help="one default config per kernel (SSLKERNELS_AUTOTUNE=0)")
    p.add_argument("--time-first", action="store_true",
                   help="every section's timings (the headline rows, each checked at its shape) before the checks")
    p.add_argument("--quick", action="store_true", help="the headline timings only")
    p.add_argument("--no-extras", action="store_true", help="skip the extra correctness cases")
    p.add_argument("--no-graph-replays", action="store_true",
                   help="skip the CUDA-graph replay timing of the nt_xent / contrastive / siglip fwd+bwd rows")
    p.add_argument("--deadline", type=float, default=0.0,
                   help="seconds: past it, remaining checks and timings are skipped and the table printed")
    p.add_argument("--wheels", default=os.path.join(REPO, ".whl"),
                   help="--rehearse: the carried wheels to install into a fresh 3.12 venv (scripts/build_device_wheels.sh)")
    p.add_argument("--csv", default=None, help="CSV path (default: $OUT/ or benchmarks/results/gpu-<date>-<card>.csv)")
    args = p.parse_args(argv)
    names = [n for item in (args.only or list(SECTIONS)) for n in item.split(",") if n]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        p.error(f"--only: unknown section(s) {unknown}; known: {list(SECTIONS)}")
    args.only = names
    if args.shard is not None and not re.fullmatch(r"\d+/\d+", args.shard):
        p.error("--shard takes I/N, e.g. 0/4")
    return args


def _set_environment(args) -> None:
    """Before any kernel module is imported: they read these at import."""
    if args.no_autotune:
        os.environ["SSLKERNELS_AUTOTUNE"] = "0"
    if args.rehearse:
        os.environ["TRITON_INTERPRET"] = "1"
        for name in ("sslkernels.kernels.contrastive", "sslkernels.kernels.attention", "sslkernels.kernels.spectral",
                     "sslkernels.kernels.sigreg"):
            mod = sys.modules.get(name)
            if mod is not None and not getattr(mod, "INTERPRET", True):
                raise RuntimeError(f"--rehearse: {name} was imported before TRITON_INTERPRET=1 was set; "
                                   "run the rehearsal in a fresh process")


def load_sections(names):
    return [importlib.import_module(f"benchmarks.gpu.{n}") for n in names]


def card_slug() -> str:
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name().lower().replace("nvidia", "").strip()
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


def default_csv(rehearse: bool) -> str:
    day = datetime.date.today().isoformat()
    name = f"{'rehearsal' if rehearse else 'gpu'}-{day}-{card_slug()}.csv"
    out = os.environ.get("OUT")
    return os.path.join(out if out else os.path.join(REPO, "benchmarks", "results"), name)


# ---------------------------------------------------------------------------- compile time


class CompileClock:
    """Triton's compiles in this process, through its compilation listener where the
    installed Triton has one (3.6 and later): how many, how many the on-disk cache served,
    and the seconds spent. The device run logs it after every section, so the share of its
    deadline that goes to the JIT is measured there (whether carrying a compiled
    TRITON_CACHE_DIR could pay), not guessed from this machine's compile-only times."""

    def __init__(self):
        self.compiles = self.cache_hits = 0
        self.seconds = 0.0
        self._mark = (0, 0, 0.0)
        try:
            from triton import knobs

            previous = knobs.compilation.listener
        except (ImportError, AttributeError):  # a Triton without the listener: nothing counted
            self.installed = False
            return

        def listen(**event):
            self.compiles += 1
            self.cache_hits += bool(event.get("cache_hit"))
            self.seconds += getattr(event.get("times"), "total", 0) / 1e6  # microseconds
            if previous is not None:
                previous(**event)

        knobs.compilation.listener = listen
        self.installed = True

    def since_last(self) -> str:
        """The compiles since the previous call, in words."""
        then = self._mark
        self._mark = (self.compiles, self.cache_hits, self.seconds)
        if not self.installed:
            return "compiles not counted (this Triton has no compilation listener)"
        return (f"{self.compiles - then[0]} Triton compile(s) ({self.cache_hits - then[1]} from the cache), "
                f"{self.seconds - then[2]:.1f}s compiling")


# ---------------------------------------------------------------------------- compile-only


def compile_only(args, sections, ctx, clock=None) -> int:
    from benchmarks.gpu._core import compile_target

    if args.jobs > 1 and args.shard is None:
        base = [sys.executable, "-m", "benchmarks.gpu", "--compile-only", "--only", ",".join(args.only)]
        if args.no_sass:
            base.append("--no-sass")
        procs = [subprocess.Popen(base + ["--shard", f"{i}/{args.jobs}"], cwd=REPO) for i in range(args.jobs)]
        codes = [p.wait() for p in procs]
        print(f"compile-only: {args.jobs} shards, exit codes {codes}")
        return 0 if all(c == 0 for c in codes) else 1
    i, n = (int(x) for x in args.shard.split("/")) if args.shard else (0, 1)
    targets = [t for s in sections if hasattr(s, "compile_targets") for t in s.compile_targets(ctx)]
    mine = targets[i::n]
    failures, spills, no_hgmma = 0, 0, 0
    for t in mine:
        res = compile_target(t, sass=not args.no_sass)
        print(res.line(t.wgmma), flush=True)
        failures += not res.ok
        spills += bool(res.ok and res.spill_bytes)
        no_hgmma += bool(res.ok and t.wgmma and res.hgmma == 0)
    print(f"compile-only{f' shard {i}/{n}' if args.shard else ''}: {len(mine)} of {len(targets)} targets, "
          f"{failures} failure(s), {spills} with spills, {no_hgmma} expected HGMMA without it; "
          f"{clock.since_last() if clock else ''}")
    return 1 if failures else 0


def rehearse_wheels(ctx, folder: str) -> None:
    """The device run's install step here: the carried wheels into a fresh Python 3.12 venv
    with --no-index (scripts/build_device_wheels.sh --check); skipped, said so, without them."""
    if not os.path.isdir(folder) or not any(f.endswith(".whl") for f in os.listdir(folder)):
        ctx.log(f"wheel rehearsal: no carried wheels in {folder} (bash scripts/build_device_wheels.sh "
                "builds them); skipped")
        return
    proc = subprocess.run(["bash", os.path.join(REPO, "scripts", "build_device_wheels.sh"), "--check", folder],
                          cwd=REPO, capture_output=True, text=True)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
    if proc.returncode != 0:
        ctx.fail("wheel rehearsal: " + " | ".join(tail))
    else:
        ctx.log("wheel rehearsal: " + (tail[-1] if tail else "ok"))


# ---------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    _set_environment(args)
    import torch
    import triton

    from benchmarks.gpu._core import Ctx, format_table, write_csv

    sections = load_sections(args.only)
    print(f"torch {torch.__version__}, triton {triton.__version__}, python {sys.version.split()[0]}")
    if torch.cuda.is_available():
        gib = torch.cuda.get_device_properties(0).total_memory / 2**30
        print(f"device: {torch.cuda.get_device_name()} ({gib:.0f} GiB)")
    else:
        print("device: no CUDA device")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.rehearse else "cpu")
    ctx = Ctx(device=device, rehearse=args.rehearse or args.tiny, quick=args.quick, extras=not args.no_extras,
              graph_replays=not args.no_graph_replays,
              deadline_s=args.deadline)
    print("sections: " + ", ".join(f"{s.NAME} ({(s.__doc__ or '').strip().splitlines()[0]})" for s in sections))
    if args.dry_run:
        from sslkernels.kernels import contrastive as K

        print(f"kernels: {os.path.dirname(K.__file__)}; autotune={K.AUTOTUNE}, interpret={K.INTERPRET}")
        print("dry run: nothing executed")
        return 0
    clock = CompileClock()
    if args.compile_only:
        return compile_only(args, sections, ctx, clock)
    if device.type != "cuda" and not args.rehearse:
        print("no CUDA device: use --dry-run, --compile-only or --rehearse here")
        return 2

    rows = []
    phases = ("time", "check") if args.time_first else ("check", "time")
    order = ([(s, p) for p in phases for s in sections] if args.time_first else
             [(s, p) for s in sections for p in phases])
    for s, phase in order:
        fn = getattr(s, phase, None)
        if fn is None:
            continue
        if ctx.time_left() < 30:
            ctx.fail(f"{s.NAME}.{phase}: skipped, deadline reached")
            continue
        ctx.log(f"section {s.NAME}: {phase}")
        try:
            rows += fn(ctx)
        except Exception:  # noqa: BLE001  (recorded; the other sections still run)
            import traceback

            ctx.fail(f"{s.NAME}.{phase}: EXCEPTION " + traceback.format_exc(limit=6))
        ctx.log(f"section {s.NAME}: {phase} done; {clock.since_last()}")

    if args.rehearse:
        rehearse_wheels(ctx, args.wheels)
    path = args.csv or default_csv(args.rehearse or args.tiny)
    write_csv(rows, path)
    if ctx.failures:
        print("\nFAILURES:")
        for f in ctx.failures:
            print("  " + f)
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (rehearsal, TRITON_INTERPRET=1)"
    print(f"\nsslkernels vs eager PyTorch on {where} (torch {torch.__version__}, triton {triton.__version__}); "
          "ms = median (do_bench on a GPU), MB = peak above the inputs, speedup = eager / fused")
    print(format_table(rows), end="")
    print(f"CSV: {path} ({len(rows)} rows)")
    print(f"{'FAILED' if ctx.failures else 'ALL CHECKS PASSED'} ({len(ctx.failures)} failure(s)); "
          f"total {time.time() - ctx.t0:.0f}s, of which {clock.seconds:.0f}s in {clock.compiles} Triton compile(s) "
          f"({clock.cache_hits} from the cache)")
    return 1 if ctx.failures else 0
