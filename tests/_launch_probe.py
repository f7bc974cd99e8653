"""Run in a fresh process by tests/test_triton_compat.py: the SIGReg and KoLeo launchers
(row-block and symmetric) on
small CPU tensors, through Triton's real JIT entry (its binder, specialisation and launch
options) with a stand-in CUDA driver for sm_90. The JIT's cache hook records each launch
and returns True, so nothing is compiled or launched (the outputs stay uninitialised).
Prints one JSON line per launch ("launch": the kernel, num_warps, num_stages, constexprs),
then one per compile target of the two sections ("target", in the same terms; a target's
num_stages None resolved to Triton's default, as a launch that names none gets)."""
from __future__ import annotations

import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # the compiled path's JIT, not the interpreter

import torch  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402


class StandInCUDA:
    """What the JIT asks of the driver before compiling: device, stream and target."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


def record(**event):
    launch = event["compile"]
    fn = event["fn"].jit_function
    constexprs = {fn.arg_names[path[0]]: str(value) for path, value in launch["constants"].items()
                  if len(path) == 1 and fn.params[path[0]].is_constexpr}
    print(json.dumps({"kind": "launch", "kernel": fn.__name__, "num_warps": launch["num_warps"],
                      "num_stages": launch["num_stages"], "constexprs": constexprs}), flush=True)
    return True  # handled: the JIT neither compiles nor launches


def main() -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.gpu import sigreg as sigreg_section
    from sslkernels.kernels import koleo, sigreg

    driver.set_active(StandInCUDA())
    knobs.runtime.jit_cache_hook = record
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        proj, dirs = torch.randn(1, 40, 24).to(dtype), torch.randn(24, 33).to(dtype)
        knots, t_max = sigreg_section.KNOTS, sigreg_section.T_MAX
        sigreg.sigreg_stats(proj, dirs, knots, t_max)
        grad = torch.zeros(1, 33, knots, dtype=torch.float64)
        sigreg.sigreg_stats_backward(proj, dirs, grad, grad, knots, t_max, True)
        x = torch.randn(70, 256).to(dtype)  # D = 256: the KoLeo section's compile plan
        for topk, hoist in ((1, False), (2, False), (3, False), (1, True), (2, True)):
            koleo.koleo_neighbors(x, 0, 70, 70, topk, 1e-8, hoist=hoist)
        # the merge's column block follows the partials per row: the section's plan is for a
        # large batch, so the symmetric search runs at its timed N = 16384 (nothing is computed)
        batch = torch.empty(16384, 256, dtype=dtype).normal_()
        for topk, hoist in ((1, True), (1, False), (3, True), (3, False)):
            koleo.koleo_neighbors_symmetric(batch, batch.shape[0], topk, 1e-8, hoist=hoist)

    from triton.backends.nvidia.compiler import CUDAOptions

    from benchmarks.gpu import koleo as koleo_section
    from benchmarks.gpu._core import Ctx, jit_fn

    ctx = Ctx(torch.device("cpu"))
    for t in sigreg_section.compile_targets(ctx) + koleo_section.compile_targets(ctx):
        fn = jit_fn(t.kernel)
        constexprs = {name: str(v) for name, v in t.constexprs.items()
                      if fn.params[fn.arg_names.index(name)].is_constexpr}
        stages = CUDAOptions.num_stages if t.num_stages is None else t.num_stages
        print(json.dumps({"kind": "target", "kernel": fn.__name__, "num_warps": t.num_warps, "num_stages": stages,
                          "constexprs": constexprs}), flush=True)


if __name__ == "__main__":
    main()
