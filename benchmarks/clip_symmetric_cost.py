"""Cost of the symmetric (CLIP) InfoNCE relative to the one-direction loss, forward +
backward, on the same inputs in one run (the issue's bar: at most 1.3x).

    python benchmarks/clip_symmetric_cost.py [--n 8192] [--d 256] [--repeat 5]
"""
import argparse
import statistics
import time

import torch

import sslkernels


def median_seconds(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(args.n, args.d, generator=g, requires_grad=True)
    k = torch.randn(args.n, args.d, generator=g, requires_grad=True)
    one = median_seconds(lambda: sslkernels.info_nce(q, k, 0.07).backward(), args.repeat)
    both = median_seconds(lambda: sslkernels.info_nce(q, k, 0.07, symmetric=True).backward(), args.repeat)
    print(f"N={args.n} D={args.d} threads={torch.get_num_threads()}: one direction {one * 1e3:.1f} ms, "
          f"symmetric {both * 1e3:.1f} ms, ratio {both / one:.2f}x")


if __name__ == "__main__":
    main()
