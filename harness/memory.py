"""Tensor-level memory accounting: sizes, a live-tensor counter and its breakdown.

What a memory budget bounds (``--memory-budget``, ``memory_budget`` in a profile) is the **tensor
memory of training on the training device**: at every moment of a training step, the bytes of
every live tensor storage on that device, that is the model's parameters (frozen and trainable, as
the method stored them: quantised, adapters) and buffers, the gradients, the optimizer state, and
every tensor the forward pass, the backward pass and the optimizer step allocate (activations saved
for backward and temporaries). Its peak over a step is the figure compared with the budget.

How it is measured, the same way on every device: `TensorMemory`, a ``TorchDispatchMode``, sees the
output (and input) tensors of every ATen operation; each storage it has not seen is counted with its
``nbytes`` until the storage is freed (a weak reference on the storage object, which PyTorch keeps
alive exactly as long as the storage). Parameters, buffers, gradients and optimizer state present
when counting starts are registered first. The running total is exact for tensors made by
operators; what an operator's C++ kernel allocates internally without a tensor op (a workspace) is
not seen. On the CPU the allocator-level peak (``torch.profiler``'s memory events) agrees with it
within ``BREAKDOWN_TOLERANCE`` (tests check it); on CUDA the caching allocator's own statistics
(``max_memory_allocated``/``max_memory_reserved``) are recorded beside it. The process's resident set
size on the CPU (also recorded, as a cross-check) includes the interpreter, libraries, data and
allocator slack, and moves in pages: too coarse to bound a training step.

At the peak, the live storages are split by what they are (`CATEGORIES`); the parts add up to the
peak exactly. Counting costs a Python call per operator, so the harness counts only the short probe
steps of the fit search (`harness.budget`), never the timed training.
"""
from __future__ import annotations

import re
import weakref
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MiB = 1024 * 1024

# Breakdown categories, in stacking order.
CATEGORIES = ("frozen_weights", "trainable_weights", "buffers", "gradients", "optimizer_state",
              "activations", "other")
LABELS = {"frozen_weights": "frozen weights", "trainable_weights": "trainable weights",
          "buffers": "buffers", "gradients": "gradients", "optimizer_state": "optimizer state",
          "activations": "activations and temporaries",
          "other": "other state (quantisation constants, inputs made outside torch ops)"}
# |counted peak - allocator peak| <= this share of the peak + BREAKDOWN_SLACK_BYTES: what kernels
# allocate internally without a tensor operation (CPU) or the CUDA allocator's 512-byte rounding.
BREAKDOWN_TOLERANCE = 0.02
BREAKDOWN_SLACK_BYTES = 1 * MiB

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
          "gb": 1000**3, "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2,
          "gib": 1024**3, "tib": 1024**4}


def parse_size(value: Any) -> int | None:
    """Bytes from ``2GiB``, ``1500MiB``, ``2GB``, ``1.5 GiB``, ``512M`` or a number of bytes.

    Binary units (KiB, MiB, GiB, TiB) are powers of 1024, decimal ones (KB, MB, GB, TB, and the
    bare K/M/G/T) powers of 1000. ``None``, ``""``, ``none`` and ``off`` mean no budget."""
    if value is None or isinstance(value, bool):
        if isinstance(value, bool):
            raise ValueError(f"not a memory size: {value!r}")
        return None
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError(f"a memory size must be positive, got {value!r}")
        return int(value)
    text = str(value).strip()
    if text.lower() in ("", "none", "null", "off"):
        return None
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a memory size: {text!r} (e.g. 2GiB, 1500MiB, 2GB)")
    size = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if size <= 0:
        raise ValueError(f"a memory size must be positive, got {text!r}")
    return int(size)


def format_size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _storages(tensors: Iterable[torch.Tensor]) -> dict[int, int]:
    """Distinct storages (by address) of ``tensors`` with their sizes; empty ones left out."""
    out: dict[int, int] = {}
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        st = t.untyped_storage()
        if st.nbytes():
            out[st.data_ptr()] = st.nbytes()
    return out


def parameter_bytes(model: nn.Module) -> dict[str, int]:
    """The model's parameter bytes as stored (shared storages once): trainable, frozen, buffers."""
    params = list(model.parameters())
    trainable = _storages(p for p in params if p.requires_grad)
    frozen = {k: v for k, v in _storages(p for p in params if not p.requires_grad).items()
              if k not in trainable}
    buffers = {k: v for k, v in _storages(model.buffers()).items()
               if k not in trainable and k not in frozen}
    return {"trainable": sum(trainable.values()), "frozen": sum(frozen.values()),
            "buffers": sum(buffers.values())}


def analytical_estimate(model: nn.Module, optimizer_moments: int = 2) -> dict[str, int]:
    """What a formula predicts without activations: weights + gradients + optimizer state.

    Gradients as large as the trainable weights; AdamW keeps ``optimizer_moments`` (2) tensors of
    that size. Activations, temporaries and kernels' workspaces are what the formula leaves out."""
    b = parameter_bytes(model)
    weights = b["trainable"] + b["frozen"] + b["buffers"]
    return {"weights": weights, "gradients": b["trainable"],
            "optimizer_state": optimizer_moments * b["trainable"],
            "total": weights + (1 + optimizer_moments) * b["trainable"]}


class TensorMemory(TorchDispatchMode):
    """Counts live tensor storages on ``device`` while active; the peak and its breakdown.

    ``with TensorMemory(model, device, optimizer=lambda: opt) as tm: ...`` then ``tm.peak`` and
    ``tm.breakdown()``. Call ``mark()`` after anything that creates parameters, gradients or
    optimizer state (the training loop calls it after every backward pass and optimizer step), so
    that storages alive at the peak are told apart by what they are."""

    def __init__(self, model: nn.Module, device: torch.device | str,
                 optimizer: Callable[[], torch.optim.Optimizer | None] = lambda: None):
        super().__init__()
        self.model, self.optimizer = model, optimizer
        self.device = torch.device(device)
        self._live: dict[int, tuple[int, int]] = {}     # storage address -> (uid, bytes)
        self._refs: dict[int, Any] = {}
        self._kind: dict[int, str] = {}                 # uid -> category, from mark()
        self._uid = 0
        self.total = self.peak = self.start_bytes = 0
        self._dirty = False
        self._at_peak: dict[int, tuple[int, int]] = {}
        self.ops = 0

    # -- counting -----------------------------------------------------------------------------
    def _on_device(self, t: torch.Tensor) -> bool:
        d = t.device
        return d.type == self.device.type and (self.device.index is None or d.index == self.device.index
                                               or d.index is None)

    def _see(self, t: torch.Tensor, kind: str | None = None) -> int | None:
        if not self._on_device(t):
            return None
        st = t.untyped_storage()
        n = st.nbytes()
        key = st.data_ptr()
        if not n or not key:
            return None
        known = self._live.get(key)
        if known is not None:
            uid, old = known
            if old != n:  # resized in place
                self._live[key] = (uid, n)
                self._grow(n - old)
            return uid
        self._uid += 1
        uid = self._uid
        self._live[key] = (uid, n)
        self._refs[key] = weakref.ref(st, lambda _r, key=key, uid=uid: self._free(key, uid))
        if kind is not None:
            self._kind[uid] = kind
        self._grow(n)
        return uid

    def _grow(self, n: int) -> None:
        if n < 0:
            self._snapshot_if_peak()
        self.total += n
        if self.total > self.peak:
            self.peak = self.total
            self._dirty = True

    def _snapshot_if_peak(self) -> None:
        if self._dirty:  # memory is about to fall from a new peak: keep what was live there
            self._at_peak = dict(self._live)
            self._dirty = False

    def _free(self, key: int, uid: int) -> None:
        known = self._live.get(key)
        if known is None or known[0] != uid:
            return
        self._snapshot_if_peak()
        del self._live[key]
        self._refs.pop(key, None)
        self.total -= known[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor):  # made before counting began (or outside torch ops)
                self._see(t, "other")
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._see(t)
        return out

    # -- what is what ---------------------------------------------------------------------------
    def mark(self) -> None:
        """Register and label the current parameters, buffers, gradients and optimizer state."""
        for p in self.model.parameters():
            uid = self._see(p)
            if uid is not None:
                self._kind[uid] = "trainable_weights" if p.requires_grad else "frozen_weights"
            if p.grad is not None:
                uid = self._see(p.grad)
                if uid is not None:
                    self._kind[uid] = "gradients"
        for b in self.model.buffers():
            uid = self._see(b)
            if uid is not None and self._kind.get(uid) not in ("trainable_weights", "frozen_weights"):
                self._kind[uid] = "buffers"
        opt = self.optimizer()
        if opt is not None:
            for state in opt.state.values():
                for v in state.values():
                    if torch.is_tensor(v):
                        uid = self._see(v)
                        if uid is not None:
                            self._kind[uid] = "optimizer_state"

    def __enter__(self):
        self.mark()
        self.start_bytes = self.peak = self.total
        self._at_peak = dict(self._live)
        self._dirty = False
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        self.mark()  # parameters or state created inside (restructuring methods) get their label
        self._snapshot_if_peak()
        self._refs.clear()  # stop counting frees: the figures are final
        return out

    def breakdown(self) -> dict[str, int]:
        """Bytes per category of the storages live at the peak; they sum to ``peak``."""
        out = dict.fromkeys(CATEGORIES, 0)
        for uid, n in self._at_peak.values():
            out[self._kind.get(uid, "activations")] += n
        return out


def breakdown_matches(breakdown: dict[str, int], peak: int) -> bool:
    """Whether a breakdown adds up to an independently measured peak within the stated tolerance."""
    return abs(sum(breakdown.values()) - peak) <= BREAKDOWN_TOLERANCE * peak + BREAKDOWN_SLACK_BYTES


__all__ = ["CATEGORIES", "LABELS", "TensorMemory", "parse_size", "format_size", "parameter_bytes",
           "analytical_estimate", "breakdown_matches", "BREAKDOWN_TOLERANCE", "BREAKDOWN_SLACK_BYTES",
           "MiB"]
