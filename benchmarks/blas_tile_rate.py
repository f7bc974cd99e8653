"""GEMM rate of the BLAS the C++ core links (scipy-openblas32) on the NT-Xent tile shape
(256 x 256 x 128, row-major, B transposed), one tile stream per thread: the
physical floor of the fused CPU path is 4 (2N)^2 D flop at this rate.

    python benchmarks/blas_tile_rate.py
"""
import ctypes, time, numpy as np, threading, scipy_openblas32, os
lib = ctypes.CDLL(os.path.join(scipy_openblas32.get_lib_dir(), "libscipy_openblas.so"))
lib.scipy_openblas_set_num_threads(1)
T, D = 256, 128
def worker(res):
    a = np.random.rand(T, D).astype(np.float32); b = np.random.rand(T, D).astype(np.float32); c = np.zeros((T, T), np.float32)
    f = lib.scipy_cblas_sgemm
    args = (101, 111, 112, T, T, D, ctypes.c_float(1.0), a.ctypes.data_as(ctypes.c_void_p), D, b.ctypes.data_as(ctypes.c_void_p), D, ctypes.c_float(0.0), c.ctypes.data_as(ctypes.c_void_p), T)
    for _ in range(50): f(*args)
    n = 2000; t = time.perf_counter()
    for _ in range(n): f(*args)
    res.append(2 * T * T * D * n / (time.perf_counter() - t) / 1e9)
for nt in (1, 2):
    res = []; ths = [threading.Thread(target=worker, args=(res,)) for _ in range(nt)]
    [t.start() for t in ths]; [t.join() for t in ths]
    print(nt, "threads: S-tile sgemm", [round(r) for r in res], "GFLOP/s per thread, total", round(sum(res)))
