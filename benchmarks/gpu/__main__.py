"""python -m benchmarks.gpu [options]: see benchmarks/gpu/__init__.py."""
import sys

from benchmarks.gpu._runner import main

sys.exit(main())
