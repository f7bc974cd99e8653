"""Cross-rank contrastive losses: ``mode="ring"`` against ``mode="all_gather"``, on W Gloo ranks.

    python benchmarks/ring_vs_all_gather.py                 # 2 ranks, 1 thread each, b = 4096
    python benchmarks/ring_vs_all_gather.py --world 3 --rows 2048 --dim 256

Each rank runs forward + backward of the same loss on its own rows (b per rank, so
the global batch is W b) in both modes and reports the median time (slowest rank, a
barrier before each repeat) and the peak resident memory above the inputs
(VmHWM after resetting it through /proc/self/clear_refs, with glibc's mmap threshold
at 64 KiB so freed blocks leave the resident set). all_gather mode holds the
gathered batch (O(W b D)) and, for nt_xent / sup_con, every rank computes the whole
global loss; ring mode holds its rows plus one block in flight and computes only its
own anchors. The two modes' losses are checked equal before timing.

CPU only (Gloo on 127.0.0.1); on GPUs the same losses run on NCCL.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sslkernels
from sslkernels._benchmark import _proc_status_kb, _reset_peak_rss

MODES = ("all_gather", "ring")


def _losses(rows: int, dim: int, classes: int, rank: int):
    """(name, inputs, fn(inputs, mode) -> loss) per case; inputs differ per rank."""
    g = torch.Generator().manual_seed(1000 + rank)
    z1, z2 = torch.randn(rows, dim, generator=g), torch.randn(rows, dim, generator=g)
    labels = torch.randint(0, classes, (rows,), generator=g)
    grp = dist.group.WORLD
    return [
        ("nt_xent", (z1, z2),
         lambda x, mode: sslkernels.nt_xent(x[0], x[1], temperature=0.5, process_group=grp, mode=mode)),
        ("sup_con", (torch.cat([z1, z2]), torch.cat([labels, labels])),
         lambda x, mode: sslkernels.sup_con(x[0], x[1], temperature=0.1, process_group=grp, mode=mode)),
        ("info_nce symmetric", (z1, z2),
         lambda x, mode: sslkernels.info_nce(x[0], x[1], temperature=0.07, symmetric=True, process_group=grp,
                                             mode=mode)),
    ]


def _leaves(inputs):
    return [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]


def _once(fn, inputs, mode) -> torch.Tensor:
    x = _leaves(inputs)
    loss = fn(x, mode)
    loss.backward()
    return loss.detach()


def _peak_mib(fn, inputs, mode) -> float:
    x = _leaves(inputs)
    base = _proc_status_kb()["VmRSS"]
    if not _reset_peak_rss():
        return float("nan")
    loss = fn(x, mode)
    loss.backward()
    return (_proc_status_kb()["VmHWM"] - base) / 1024.0


def _worker(rank: int, world: int, port: int, args, queue) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        rows = []
        for name, inputs, fn in _losses(args.rows, args.dim, args.classes, rank):
            values = {mode: _once(fn, inputs, mode) for mode in MODES}  # also the warm-up
            torch.testing.assert_close(values["ring"].double(), values["all_gather"].double(), rtol=1e-4, atol=1e-5)
            for mode in MODES:
                times = []
                for _ in range(args.repeat):
                    dist.barrier()
                    start = time.perf_counter()
                    _once(fn, inputs, mode)
                    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
                    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
                    times.append(float(elapsed))
                dist.barrier()
                peak = torch.tensor([_peak_mib(fn, inputs, mode)], dtype=torch.float64)
                dist.all_reduce(peak, op=dist.ReduceOp.MAX)
                rows.append((name, mode, statistics.median(times) * 1e3, float(peak)))
        if rank == 0:
            queue.put(rows)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2, help="ranks (default 2: one per core here)")
    parser.add_argument("--rows", type=int, default=4096, help="rows per rank and view (default 4096)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--classes", type=int, default=100, help="SupCon classes (default 100)")
    parser.add_argument("--threads", type=int, default=1, help="threads per rank (default 1)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)

    # Blocks above 64 KiB come from mmap and go back to the OS when freed, so the ranks'
    # resident-set peak follows their live tensors (glibc's heap would otherwise reuse
    # freed pages without raising RSS, and a pass could read as 0 MiB).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, args.world, port, args, queue)) for r in range(args.world)]
    for p in procs:
        p.start()
    rows = queue.get(timeout=3600)
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        print("a rank failed", file=sys.stderr)
        return 1

    print(f"W = {args.world} Gloo ranks x {args.threads} thread(s), b = {args.rows} rows per rank and view, "
          f"D = {args.dim}, float32, forward + backward; torch {torch.__version__}, {os.cpu_count()} CPUs")
    print("| loss | all_gather ms | ring ms | speed-up | all_gather peak MiB | ring peak MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    by = {(n, m): (t, p) for n, m, t, p in rows}
    for name in dict.fromkeys(n for n, _, _, _ in rows):
        (ta, pa), (tr, pr) = by[name, "all_gather"], by[name, "ring"]
        print(f"| {name} | {ta:.1f} | {tr:.1f} | {ta / tr:.2f}x | {pa:.1f} | {pr:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
