#!/usr/bin/env python
"""A shim: `python -m benchmarks.gpu --only contrastive` (the section benchmarks/gpu/contrastive.py);
options as for benchmarks/gpu_check.py."""
import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.gpu._runner import main

    sys.exit(main(["--only", "contrastive", *sys.argv[1:]]))
