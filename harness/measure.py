"""Peak memory of the training loop (a cross-check) and parameter counting.

The figure a run reports and its memory budget bounds is the tensor-level peak of
`harness.memory` (measured in the fit's probe steps, `harness.budget`); the loop's own figures
below are recorded beside it as ``memory.train_*``.

Peak memory is read from the system at two points only (start and end of training), so
measuring costs nothing inside the timed loop:

- CUDA: ``torch.cuda.reset_peak_memory_stats`` then ``max_memory_allocated`` (tensor bytes).
- CPU (Linux): the kernel's resident-set high-water mark. Writing ``5`` to
  ``/proc/self/clear_refs`` resets ``VmHWM`` to the current RSS; ``VmHWM`` at the end is the
  peak resident memory of the process during training: weights, gradients, optimizer state,
  activations and the allocator's slack. Each run of a matrix runs in its own process, so one run's
  freed memory cannot hide in another's figure. Where the reset is impossible (not Linux), the
  figure is the process's lifetime peak and is marked so.
"""
from __future__ import annotations

import resource
import sys
from dataclasses import dataclass

import torch
from torch import nn

MiB = 1024 * 1024


def _rss_status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _release_freed_memory() -> None:
    """Return memory freed before training (data loading, probes) to the OS, so that the
    resident-set baseline and peak describe training, not the allocator's leftovers."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


@dataclass
class PeakMemory:
    device: torch.device
    baseline_bytes: int = 0
    resettable: bool = True

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = torch.cuda.memory_allocated(self.device)
            return
        _release_freed_memory()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.resettable = True
        except OSError:
            self.resettable = False
        self.baseline_bytes = _rss_status("VmRSS") or 0

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        hwm = _rss_status("VmHWM")
        if hwm is not None:
            return hwm
        usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(usage if sys.platform == "darwin" else usage * 1024)

    @property
    def kind(self) -> str:
        if self.device.type == "cuda":
            return "cuda_max_allocated"
        return "cpu_peak_rss" if self.resettable else "cpu_lifetime_peak_rss"


def count_parameters(model: nn.Module, is_head) -> dict[str, int]:
    """Trainable elements split into task head and method, plus the model's total."""
    head = method = total = 0
    for name, p in model.named_parameters():
        n = p.numel()
        total += n
        if p.requires_grad:
            if is_head(name):
                head += n
            else:
                method += n
    return {"method": method, "head": head, "total": total}


def optimizer_state_bytes(optimizer: torch.optim.Optimizer | None) -> int:
    if optimizer is None:
        return 0
    size = 0
    for state in optimizer.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                size += v.numel() * v.element_size()
    return size


def current_rss() -> int:
    return _rss_status("VmRSS") or 0


__all__ = ["PeakMemory", "count_parameters", "optimizer_state_bytes", "current_rss", "MiB"]
