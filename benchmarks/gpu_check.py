#!/usr/bin/env python
"""The one prepared script for a GPU machine: a shim for `python -m benchmarks.gpu`
(the package benchmarks/gpu/, one section per kernel family; --help lists the options).

    python benchmarks/gpu_check.py                  # checks, timings, CSV, table last
    python benchmarks/gpu_check.py --compile-only   # no GPU: compile for sm_90, report spills / HGMMA
    python benchmarks/gpu_check.py --rehearse       # no GPU: every section on tiny shapes (interpreter)
"""
import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.gpu._runner import main

    sys.exit(main(sys.argv[1:]))
