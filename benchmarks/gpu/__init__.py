"""The one prepared script for a GPU machine, one section module per kernel family.

    python -m benchmarks.gpu                   # checks, timings, CSV, one table last
    python -m benchmarks.gpu --only spectral   # one family
    python -m benchmarks.gpu --compile-only    # no GPU: compile every planned variant for sm_90
    python -m benchmarks.gpu --rehearse        # no GPU: every section on tiny shapes on the CPU
                                               # (TRITON_INTERPRET=1), the CSV and the table
    python benchmarks/gpu_check.py ...         # the same (a thin shim)

A section is a module of this package listed in ``SECTIONS``. It defines, all optional
but ``NAME``:

    NAME: str                                   # the --only name
    def check(ctx: Ctx) -> list[Row]            # correctness rows (check = PASS / FAIL)
    def time(ctx: Ctx) -> list[Row]             # timing rows (their own check where cheap)
    def compile_targets(ctx: Ctx) -> list[CompileTarget]   # what --compile-only builds

``Ctx``, ``Row``, ``CompileTarget`` and the shared helpers (the correctness rule
``judge``, ``time_pass``, inputs on ``ctx.device``) live in ``_core``. A section reads
``ctx.rehearse`` to pick its tiny shapes, never argv or another section's globals; it
imports ``sslkernels`` inside its functions, so the runner can set the environment
(TRITON_INTERPRET, SSLKERNELS_AUTOTUNE) first. An exception in a section is recorded as a
failure and the run goes on; the runner owns the deadline, the CSV and the table.
"""
from __future__ import annotations

# Run order: the families no GPU has run yet first, NT-Xent's headline timings early.
SECTIONS = ("nt_xent", "contrastive", "attention", "spectral", "sigreg", "siglip", "koleo")

__all__ = ["SECTIONS"]
