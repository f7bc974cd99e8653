"""Launch helpers that cut the host cost of a step: a launch ticket that replaces a torch
reduction after a kernel, and a launcher that skips the Autotuner's Python once a key's
config is chosen (benchmarks/GPU_MODEL.md, "Lead 1 built").
"""
from __future__ import annotations

import torch

__all__ = ["ticket", "TunedLauncher"]

_TICKETS: dict = {}


def ticket(device: torch.device) -> torch.Tensor:
    """A zeroed int32 counter for a kernel's programs to draw tickets from (atomic add): the
    program that draws the last one finishes the launch's reduction and sets the counter
    back to 0, so one buffer per (device, stream) serves every launch queued on that stream
    without a zero-fill launch. Launches on other streams may overlap: they get their own.
    Under CUDA-graph capture a fresh one is returned, its zero-fill recorded in the graph."""
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return torch.zeros(1, dtype=torch.int32, device=device)
        key = (device, torch.cuda.current_stream(device).cuda_stream)
    else:  # the interpreter: programs run one after another on the host
        key = (device, None)
    counter = _TICKETS.get(key)
    if counter is None:
        counter = _TICKETS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return counter


class TunedLauncher:
    """An autotuned kernel launched through its Autotuner the first time a key is seen
    (which tunes, or takes the pinned config when autotuning is off) and afterwards
    straight on the Autotuner's JIT function with the config it chose: the same kernel and
    config, without the Autotuner's per-call key building (~5-7 us a launch).

    `key` must determine the Autotuner's choice: the kernel's autotune key values and the
    dtypes of its tensor arguments. `grid` is called with the config's kwargs, as the
    Autotuner calls it. A config with a pre-hook always goes through the Autotuner."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.chosen: dict = {}

    def forget(self) -> None:
        """Drop every choice, the Autotuner's own included: the next call of each key tunes
        again (or takes the pinned config), e.g. after autotuning was switched on or off."""
        self.chosen.clear()
        self.kernel.cache.clear()

    def __call__(self, key, grid, *args, **meta):
        chosen = self.chosen.get(key)
        if chosen is None:
            self.kernel[grid](*args, **meta)
            config = self.kernel.best_config
            if config.pre_hook is None:
                self.chosen[key] = (dict(config.kwargs), config.all_kwargs())
            return
        kwargs, launch_kwargs = chosen
        self.kernel.fn[grid(kwargs)](*args, **meta, **launch_kwargs)
