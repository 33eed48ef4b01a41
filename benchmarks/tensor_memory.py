"""Live tensor bytes on the CPU, the analogue of `torch.cuda.max_memory_allocated` (benchmarks only).

A TorchDispatchMode sees every tensor an operator creates (factory functions, results, gradients, optimizer states,
DeepSpeed's flat buffers: all go through the dispatcher), counts each new storage once and subtracts it when the
storage is freed. Peaks are kept per phase (forward, backward, optimizer step), set by hooks on the model and on
every torch optimizer. Process RSS (VmHWM) is reported beside it: it adds the allocator's own slack.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary


class TensorMemory(TorchDispatchMode):
    """`with TensorMemory() as memory:` ... `memory.peak`, `memory.peaks[phase]` (bytes of live storages)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.phase = "setup"
        self.setup_peak = 0  # the peak before the first forward (model building, engine start)
        self.peaks: dict[str, int] = {}
        self._storages: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._handles: list[Any] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_leaves(out):
            if isinstance(value, torch.Tensor) and value.device.type == "cpu":
                self._count(value.untyped_storage())
        return out

    def _count(self, storage: torch.UntypedStorage) -> None:
        if storage in self._storages:
            return
        size = storage.nbytes()
        self._storages[storage] = size
        weakref.finalize(storage, self._free, size)
        self.live += size
        if self.live > self.peak:
            self.peak = self.live
        if self.live > self.peaks.get(self.phase, 0):
            self.peaks[self.phase] = self.live

    def _free(self, size: int) -> None:
        self.live -= size

    def count_existing(self, tensors) -> None:
        """Count tensors created before the mode was entered (e.g. data made with numpy)."""
        for tensor in tensors:
            self._count(tensor.untyped_storage())

    def reset_peak(self, phase: str) -> None:
        """Start measuring the training peak here (e.g. at the first forward, after set-up)."""
        self.setup_peak = max(self.setup_peak, self.peak)
        self.peak = self.live
        self.peaks = {}
        self.phase = phase

    def watch(self, model: torch.nn.Module, steps: int) -> None:
        """Label phases: forward (model's forward), backward (until an optimizer steps), step, then forward again;
        after the `steps`-th optimizer step, "stage end" (evaluation, export, merge, hand-off)."""
        done = [0]

        def forward_start(module, args):
            if self.phase == "setup":
                self.reset_peak("forward")
            if self.phase != "stage end":
                self.phase = "forward"

        def forward_end(module, args, output):
            if torch.is_grad_enabled() and self.phase != "stage end":
                self.phase = "backward"

        def step_start(optimizer, args, kwargs):
            self.phase = "step"

        def step_end(optimizer, args, kwargs):
            done[0] += 1
            self.phase = "stage end" if done[0] == steps else "after step"

        self._handles += [model.register_forward_pre_hook(forward_start), model.register_forward_hook(forward_end),
                          register_optimizer_step_pre_hook(step_start), register_optimizer_step_post_hook(step_end)]

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        return super().__exit__(*exc)


def process_peak_rss() -> int:
    """VmHWM: the most resident memory this process has had, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def process_rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0
