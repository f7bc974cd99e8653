"""GEMM rate of the BLAS the C++ core links (scipy-openblas32) on one tile shape
(row-major, B transposed: C[M x N] = A[M x K] B[N x K]^T), one tile stream per
thread, operands hot in cache: the best rate a fused CPU path built on these tile
products can reach. Default: the NT-Xent tile (256 x 256 x 128), whose fused floor
is 4 (2N)^2 D flop at this rate; `--shape 256 512 256` is the InfoNCE one-sweep
logit tile (strip of 256 queries x 512 candidates, D = 256).

    python benchmarks/blas_tile_rate.py [--shape M N K]
"""
import argparse
import ctypes
import os
import threading
import time

import numpy as np
import scipy_openblas32

lib = ctypes.CDLL(os.path.join(scipy_openblas32.get_lib_dir(), "libscipy_openblas.so"))
lib.scipy_openblas_set_num_threads(1)


def worker(m, n, k, res):
    a = np.random.rand(m, k).astype(np.float32)
    b = np.random.rand(n, k).astype(np.float32)
    c = np.zeros((m, n), np.float32)
    f = lib.scipy_cblas_sgemm
    ptr = lambda x: x.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    args = (101, 111, 112, m, n, k, ctypes.c_float(1.0), ptr(a), k, ptr(b), k, ctypes.c_float(0.0), ptr(c), n)
    for _ in range(50):
        f(*args)
    reps = max(100, int(1e11 / (2 * m * n * k)))
    t = time.perf_counter()
    for _ in range(reps):
        f(*args)
    res.append(2 * m * n * k * reps / (time.perf_counter() - t) / 1e9)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 256, 128), metavar=("M", "N", "K"))
    m, n, k = parser.parse_args().shape
    for nt in (1, 2):
        res = []
        ths = [threading.Thread(target=worker, args=(m, n, k, res)) for _ in range(nt)]
        [t.start() for t in ths]
        [t.join() for t in ths]
        print(f"{nt} threads: {m}x{n}x{k} sgemm", [round(r) for r in res], "GFLOP/s per thread, total", round(sum(res)))


if __name__ == "__main__":
    main()
