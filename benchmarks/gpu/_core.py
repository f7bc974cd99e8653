"""What every section shares: the run context, the rows, the correctness rule, timing,
and the sm_90 compile of one kernel variant. Nothing here parses argv or reads another
module's globals."""
from __future__ import annotations

import csv
import dataclasses
import gc
import io
import os
import re
import statistics
import subprocess
import tempfile
import time as _time
import traceback
from typing import Any, Callable, Optional, Sequence

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

PASSES = ("fwd", "bwd", "fwdbwd")
CSV_COLUMNS = ("op", "case", "dtype", "pass", "eager_ms", "fused_ms", "speedup", "eager_mb", "fused_mb", "check")

Number = Optional[Any]  # float, None (not measured) or a word ("OOM", "ERR", "SKIP")


@dataclasses.dataclass
class Row:
    """One line of the CSV. ``case`` is labelled as `sslkernels bench` prints it
    (e.g. "N=8192 D=128"); ``pass_`` is fwd, bwd or fwdbwd; ``check`` PASS, FAIL or ""."""

    op: str
    case: str
    dtype: str
    pass_: str
    eager_ms: Number = None
    fused_ms: Number = None
    eager_mb: Number = None
    fused_mb: Number = None
    check: str = ""
    note: str = ""  # the log's detail (errors against the bound); not a CSV column

    def __post_init__(self):
        if self.pass_ not in PASSES:
            raise ValueError(f"Row.pass_ must be one of {PASSES}, got {self.pass_!r}")
        if self.check not in ("", "PASS", "FAIL"):
            raise ValueError(f"Row.check must be PASS, FAIL or empty, got {self.check!r}")

    @property
    def speedup(self) -> Optional[float]:
        e, f = self.eager_ms, self.fused_ms
        if isinstance(e, float) and isinstance(f, float) and f > 0:
            return e / f
        return None

    def cells(self) -> list[str]:
        def num(x, spec):
            if x is None:
                return ""
            return format(x, spec) if isinstance(x, float) else str(x)

        return [self.op, self.case, self.dtype, self.pass_, num(self.eager_ms, ".4f"), num(self.fused_ms, ".4f"),
                num(self.speedup, ".3f"), num(self.eager_mb, ".2f"), num(self.fused_mb, ".2f"), self.check]


def write_csv(rows: Sequence[Row], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            w.writerow(r.cells())


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def format_table(rows: Sequence[Row]) -> str:
    lines = [list(CSV_COLUMNS)] + [[c or "-" for c in r.cells()] for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(CSV_COLUMNS))]
    out = io.StringIO()
    for i, line in enumerate(lines):
        out.write("  ".join(c.rjust(w) if i else c.ljust(w) for c, w in zip(line, widths)).rstrip() + "\n")
        if i == 0:
            out.write("  ".join("-" * w for w in widths) + "\n")
    return out.getvalue()


@dataclasses.dataclass
class Ctx:
    """The run as the sections see it."""

    device: torch.device
    rehearse: bool = False  # tiny shapes (--rehearse: on CPU tensors under TRITON_INTERPRET=1; --tiny)
    quick: bool = False  # the headline timings only
    extras: bool = True  # the extra correctness cases
    deadline_s: float = 0.0  # 0: none
    t0: float = dataclasses.field(default_factory=_time.time)
    failures: list = dataclasses.field(default_factory=list)
    # CUDA-graph replay of each fwd+bwd timing beside do_bench's (host cost out: lead 1 of
    # GPU_MODEL.md); `time_pass` leaves the last one here for `timed` to log
    graph_replays: bool = True
    last_graph: Optional[str] = None

    def log(self, msg: str) -> None:
        print(f"[{_time.time() - self.t0:7.1f}s] {msg}", flush=True)

    def time_left(self) -> float:
        return float("inf") if self.deadline_s <= 0 else self.deadline_s - (_time.time() - self.t0)

    def fail(self, msg: str) -> None:
        self.failures.append(msg)
        self.log("FAIL " + msg)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)


# ---------------------------------------------------------------------------- the rule


def resolution_for(dtype: torch.dtype, on_gpu: bool) -> float:
    """The floor's resolution (sslkernels._tolerance, the tests' table). fp32 on a GPU takes
    that of the Triton kernels' fp32 products: TF32 under torch's TF32 switch, else tf32x3
    (SSLKERNELS_FP32_DOT=ieee: IEEE); the C++ path (the rehearsal) multiplies in IEEE fp32."""
    from sslkernels._tolerance import PRODUCT_RESOLUTION, RESOLUTION

    if dtype == torch.float32 and on_gpu:
        from sslkernels.kernels._common import FP32_PRECISION, dot_precision

        return PRODUCT_RESOLUTION[dot_precision(dtype, FP32_PRECISION)]
    return RESOLUTION[dtype]


def judge(what: str, fused: torch.Tensor, eager: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype,
          again: Optional[torch.Tensor] = None, resolution: Optional[float] = None,
          terms: float = 0.0) -> tuple[bool, str]:
    """The tests' rule (`sslkernels._tolerance.within_eager_error`): |fused - ref64| <=
    2 |eager - ref64| + the rounding floor (relative to max|ref64|; a scalar, or a reference
    that is zero up to rounding, also takes ``terms``, the size of what it is a difference
    of), fused finite, of ref64's shape, and bitwise equal to ``again`` (a second run) when
    given. -> (passed, one-line message with the errors relative to max|ref64|)."""
    from sslkernels._tolerance import within_eager_error

    if resolution is None:
        resolution = resolution_for(dtype, fused.is_cuda)
    v = within_eager_error(fused, eager, ref64, dtype, terms, resolution)
    if v.problem:
        return False, f"{what}: {v.problem} FAIL"
    if again is not None and not torch.equal(fused, again):
        return False, f"{what}: second run differs (not deterministic) FAIL"
    scale = float(ref64.detach().double().abs().max()) if ref64.numel() else 0.0
    rel = scale if scale > 0 else 1.0
    return v.ok, (f"{what} err {v.err_fused / rel:.1e} (eager {v.err_eager / rel:.1e}, bound {v.bound / rel:.1e})"
                  + ("" if v.ok else " FAIL"))


def judge_all(names: Sequence[str], fused, eager, ref64, dtype, again=None, resolution=None,
              terms: float = 0.0) -> tuple[bool, str]:
    ok, msgs = True, []
    again = again if again is not None else [None] * len(names)
    for what, f, e, r, f2 in zip(names, fused, eager, ref64, again):
        good, msg = judge(what, f, e, r, dtype, f2, resolution, terms)
        ok = ok and good
        msgs.append(msg)
    return ok, "; ".join(msgs)


def run_check(ctx: Ctx, row: Row, fn: Callable[[], tuple[bool, str]]) -> Row:
    """Fills row.check / row.note from fn() -> (ok, msg); an exception is a FAIL."""
    try:
        ok, msg = fn()
    except Exception:  # noqa: BLE001  (recorded, the run goes on)
        ok, msg = False, "EXCEPTION " + traceback.format_exc(limit=4)
    row.check, row.note = ("PASS" if ok else "FAIL"), msg
    ctx.log(f"check {row.op} {row.case} {row.dtype}: {row.check}  {msg}")
    if not ok:
        ctx.failures.append(f"{row.op} {row.case} {row.dtype}: {msg}")
    return row


def loss_and_grads(fn: Callable, tensors: Sequence, wants: Sequence[bool], grad: Any = None) -> list:
    """[output, grads of the tensors flagged in ``wants``] of fn(*fresh leaves)."""
    leaves = [x.detach().clone().requires_grad_(bool(w)) if isinstance(x, torch.Tensor) else x
              for x, w in zip(tensors, wants)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, [x for x, w in zip(leaves, wants) if w], grad)
    return [out.detach(), *grads]


# ---------------------------------------------------------------------------- timing


def median_ms(ctx: Ctx, fn: Callable[[], Any], grad_to_none=None) -> float:
    """Median time of fn: triton's do_bench (CUDA events) on a GPU; on the CPU (rehearsal)
    the median of a few host-clock runs."""
    if ctx.cuda:
        from triton.testing import do_bench

        r = do_bench(fn, warmup=10, rep=40, grad_to_none=grad_to_none, quantiles=[0.5])
        return float(r[0] if isinstance(r, (list, tuple)) else r)
    times = []
    for _ in range(3):
        if grad_to_none:
            for x in grad_to_none:
                x.grad = None
        t = _time.perf_counter()
        fn()
        times.append((_time.perf_counter() - t) * 1e3)
    return float(statistics.median(times))


def peak_mb(ctx: Ctx, fn: Callable[[], Any]) -> Optional[float]:
    """Peak device memory of one fn() above what was allocated before it (None on CPU)."""
    if not ctx.cuda:
        fn()
        return None
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


GRAPH_REPLAYS = 20


def graph_replay_ms(step: Callable, leaves: Sequence[torch.Tensor], replays: int = GRAPH_REPLAYS) -> float:
    """Median ms of one replay of `step` captured in a CUDA graph: the device time of the
    step without the host's launches, dispatch and autograd (do_bench includes them).
    `step` has run (compiled, autotuned) before; the gradients are allocated by two warm-up
    steps on a side stream, as torch.cuda.graph's whole-network capture asks, and the
    replays accumulate into them (timing only)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times)


def time_pass(ctx: Ctx, fn: Callable, args: Sequence, leaves: Sequence[torch.Tensor], mode: str,
              grad: Any = None, no_grad_fwd: bool = False, graph: bool = False) -> tuple[float, Optional[float]]:
    """-> (median ms, peak MB) of ``fn(*args)`` (mode "fwd"; under no_grad if
    ``no_grad_fwd``) or of ``fn(*args).backward(grad)`` ("fwdbwd"). Compiles / autotunes
    outside the measurements; lets torch.cuda.OutOfMemoryError through. ``graph``: also a
    CUDA-graph replay of the fwd+bwd step (left in ctx.last_graph), for the sections whose
    steps make no host sync (a failed capture can leave the CUDA context unusable)."""
    if mode == "fwd":
        def step():
            with torch.set_grad_enabled(not no_grad_fwd):
                fn(*args)
    elif mode == "fwdbwd":
        def step():
            fn(*args).backward(grad)
    else:
        raise ValueError(f"time_pass: mode must be fwd or fwdbwd, got {mode!r}")

    def clear():
        for leaf in leaves:
            leaf.grad = None

    def one():
        clear()
        step()

    try:
        step()
        clear()
        mb = peak_mb(ctx, one)
        ms = median_ms(ctx, step, grad_to_none=list(leaves))
        if graph and ctx.cuda and ctx.graph_replays and mode == "fwdbwd":
            try:
                ctx.last_graph = f"{graph_replay_ms(step, leaves):.4f} ms"
            except Exception as exc:  # noqa: BLE001 (a host sync in the step: not capturable)
                ctx.last_graph = f"not capturable ({type(exc).__name__}: {str(exc)[:120]}); no more replays"
                ctx.graph_replays = False  # one failed capture is enough to learn from; keep the run safe
                torch.cuda.synchronize()
        return ms, mb
    finally:
        clear()
        gc.collect()
        if ctx.cuda:
            torch.cuda.empty_cache()


def timed(ctx: Ctx, row: Row, impl: str, thunk: Callable[[], tuple], baseline: bool = None) -> Row:
    """row.<impl>_ms / _mb from thunk() -> (ms, MB); OOM and errors become words. A fused
    error is a failure of the run; a baseline's (eager, Flex, a torch driver) a note."""
    try:
        ms, mb = thunk()
    except torch.cuda.OutOfMemoryError:
        ms = mb = "OOM"
        gc.collect()
        if ctx.cuda:
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        ms = mb = "ERR"
        msg = f"timing {impl} {row.op} {row.case} {row.dtype} {row.pass_}: " + traceback.format_exc(limit=4)
        if impl == "fused" if baseline is None else not baseline:
            ctx.fail(msg)
        else:
            ctx.log(msg)
    setattr(row, f"{impl}_ms", ms)
    setattr(row, f"{impl}_mb", mb)
    if ctx.last_graph is not None:
        ctx.log(f"graph replay {impl} {row.op} {row.case} {row.dtype} {row.pass_}: {ctx.last_graph} "
                f"(do_bench: {ms} ms)")
        ctx.last_graph = None
    return row


def log_timing(ctx: Ctx, row: Row) -> None:
    sp = row.speedup
    ctx.log(f"time {row.op} {row.case} {row.dtype} {row.pass_}: eager {row.eager_ms} ms {row.eager_mb} MB, "
            f"fused {row.fused_ms} ms {row.fused_mb} MB" + (f" ({sp:.2f}x)" if sp else ""))


def free(ctx: Ctx) -> None:
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()


def fp32_precision(tf32: bool):
    """Context manager: eager's fp32 matmuls in TF32 (tf32=True) or IEEE, restored after."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        matmul = torch.backends.cuda.matmul
        prev = matmul.allow_tf32
        prev_prec = getattr(matmul, "fp32_precision", None)
        matmul.allow_tf32 = tf32
        if prev_prec is not None:  # torch >= 2.9: the knob eager reads
            matmul.fp32_precision = "tf32" if tf32 else "ieee"
        try:
            yield
        finally:
            matmul.allow_tf32 = prev
            if prev_prec is not None:
                matmul.fp32_precision = prev_prec

    return cm()


# ---------------------------------------------------------------------------- compile for sm_90


@dataclasses.dataclass
class CompileTarget:
    """One kernel variant as it will launch: ``signature`` maps runtime arguments to
    Triton types ("*fp32", "i32", ...), ``constexprs`` the rest (the config's meta
    included), ``aligned`` the integer arguments divisible by 16 at run time (pointers
    are always 16-byte aligned), ``wgmma`` whether its tile products should be Hopper's
    HGMMA (checked in the SASS). ``num_stages`` None: the launch names none, so Triton's
    default applies (the CUDA backend's, 3 in Triton 3.6-3.9)."""

    tag: str
    kernel: Any
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: Optional[int]
    aligned: tuple = ()
    wgmma: bool = False


def jit_fn(kernel):
    """The jitted function under autotune / heuristics wrappers (a JITFunction, or the
    interpreter's InterpretedFunction when TRITON_INTERPRET=1)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    # not by attribute: an Autotuner has arg_names too, and a JITFunction has .fn
    while not isinstance(kernel, (JITFunction, InterpretedFunction)):
        kernel = kernel.fn
    return kernel


def _tool(name: str) -> Optional[str]:
    import triton

    for cand in (f"{name}-blackwell", name):
        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", cand)
        if os.path.exists(path):
            return path
    return None


@dataclasses.dataclass
class CompileResult:
    tag: str
    ok: bool
    seconds: float = 0.0
    regs: Optional[int] = None
    spill_bytes: Optional[int] = None
    smem: Optional[int] = None
    hgmma: Optional[int] = None  # HGMMA instructions in the SASS
    hmma: Optional[int] = None  # the older MMA (Ampere's)
    error: str = ""

    def line(self, wgmma_expected: bool) -> str:
        if not self.ok:
            return f"  {self.tag}: COMPILE FAILED: {self.error}"
        mma = "" if self.hgmma is None else f" HGMMA {self.hgmma} HMMA {self.hmma}"
        warn = ""
        if wgmma_expected and self.hgmma == 0:
            warn += " NO-HGMMA"
        if self.spill_bytes:
            warn += " SPILLS"
        return (f"  {self.tag:72s} {self.seconds:5.1f}s smem {self.smem:6d} regs {self.regs} "
                f"spill {self.spill_bytes}B{mma}{warn}")


def compile_target(t: CompileTarget, sass: bool = True) -> CompileResult:
    """Compile t for sm_90 (no GPU needed), then ptxas -v for registers / spills and the
    SASS (cuobjdump) for the matrix instructions."""
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    fn = jit_fn(t.kernel)
    names = fn.arg_names
    full = {k: t.signature.get(k, "constexpr") for k in names}
    missing = set(names) - set(t.signature) - set(t.constexprs)
    if missing:
        return CompileResult(t.tag, False, error=f"arguments with neither a type nor a value: {sorted(missing)}")
    attrs = {(names.index(k),): BaseBackend.parse_attr("D") for k, v in t.signature.items()
             if v.startswith("*") or k in t.aligned}
    src = ASTSource(fn, full, constexprs=dict(t.constexprs), attrs=attrs)
    t0 = _time.time()
    try:
        options = {"num_warps": t.num_warps}
        if t.num_stages is not None:
            options["num_stages"] = t.num_stages
        ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    except Exception as exc:  # noqa: BLE001
        return CompileResult(t.tag, False, _time.time() - t0, error=f"{type(exc).__name__}: {str(exc)[-1500:]}")
    res = CompileResult(t.tag, True, _time.time() - t0, smem=int(ck.metadata.shared))
    ptxas, cuobjdump = _tool("ptxas"), _tool("cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        if ptxas:
            ptx = os.path.join(tmp, "k.ptx")
            with open(ptx, "w") as f:
                f.write(ck.asm["ptx"])
            out = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", ptx, "-o", os.path.join(tmp, "k.o")],
                                 capture_output=True, text=True)
            regs = re.findall(r"Used (\d+) registers", out.stderr)
            spill = re.findall(r"(\d+) bytes spill stores", out.stderr)
            res.regs = int(regs[0]) if regs else None
            res.spill_bytes = int(spill[0]) if spill else None
            if out.returncode != 0:
                res.ok, res.error = False, "ptxas: " + out.stderr[-300:]
        if sass and cuobjdump and "cubin" in ck.asm:
            cubin = os.path.join(tmp, "k.cubin")
            with open(cubin, "wb") as f:
                f.write(ck.asm["cubin"])
            out = subprocess.run([cuobjdump, "--dump-sass", cubin], capture_output=True, text=True)
            if out.returncode == 0:
                res.hgmma = len(re.findall(r"\bHGMMA\.", out.stdout))
                res.hmma = len(re.findall(r"\bHMMA\.", out.stdout))
    return res


def timing_grid(ctx, family: str, ns, ds, dts, label):
    """(dtype name, d, n) of a section's timing grid, dtype outermost; a case that would
    start with under 25 s left before the run's deadline is logged and skipped."""
    for dt in dts:
        for d in ds:
            for n in ns:
                if ctx.time_left() < 25:
                    ctx.log(f"{family} timing {label(n, d)} {dt}: skipped (deadline)")
                    continue
                yield dt, d, n
