"""Shared machinery for methods that add a weight delta to existing linear layers.

`AdaptedLinear` wraps a frozen base layer (``nn.Linear`` or GPT-2's transposed ``Conv1D``) and adds
the output of a *branch*. Subclasses define the branch (`delta_forward`) and its weight form
(`delta_weight`, shape ``(out, in)``); merging, unmerging, injection and export are written once
here. `LowRankLinear` is the ``h = W0 x + s B A x`` layer that the low-rank family builds on.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from harness.targets import is_linear, find_target_modules


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The base layer's weight as ``(out, in)`` whatever its storage (Conv1D stores ``(in, out)``)."""
    return layer.weight.T if _is_conv1d(layer) else layer.weight


def _is_conv1d(layer: nn.Module) -> bool:
    return type(layer).__name__ == "Conv1D"


def layer_dims(layer: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear or Conv1D layer."""
    out_f, in_f = base_weight(layer).shape
    return in_f, out_f


class AdaptedLinear(nn.Module):
    """A frozen base linear plus a trainable branch: ``y = base(x) + delta_forward(x)``."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = layer_dims(base)
        for p in self.base.parameters():
            p.requires_grad_(False)

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:  # pragma: no cover - abstract
        """The branch as a dense ``(out, in)`` matrix, in the base weight's dtype."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        # Out-of-place add: the base output may be a view autograd still needs.
        return out + self.delta_forward(x)

    def merged_base(self) -> nn.Module:
        """Return the base layer with the branch folded into its weight (a new plain module)."""
        with torch.no_grad():
            delta = self.delta_weight().to(self.base.weight.dtype)
            merged = _clone_plain(self.base)
            if _is_conv1d(merged):
                merged.weight.add_(delta.T)
            else:
                merged.weight.add_(delta)
        return merged


def _clone_plain(layer: nn.Module) -> nn.Module:
    """A copy of a linear/Conv1D layer with detached, trainable-by-default parameters."""
    import copy

    clone = copy.deepcopy(layer)
    for p in clone.parameters():
        p.requires_grad_(True)
    return clone


def low_rank_pair(r: int, in_features: int, out_features: int,
                  like: torch.Tensor) -> tuple[nn.Parameter, nn.Parameter]:
    """LoRA's pair ``A: (r, in)``, ``B: (out, r)``: A Kaiming-uniform (``a = sqrt(5)``, as
    ``nn.Linear`` and PEFT), B zero, so the branch starts at zero; dtype and device of ``like``."""
    if r <= 0:
        raise ValueError(f"rank must be positive, got r={r}")
    A = nn.Parameter(torch.empty(r, in_features, dtype=like.dtype, device=like.device))
    B = nn.Parameter(torch.zeros(out_features, r, dtype=like.dtype, device=like.device))
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    return A, B


class LowRankLinear(AdaptedLinear):
    """``h = W0 x + s * B A x`` with ``A: (r, in)``, ``B: (out, r)``.

    A is Kaiming-uniform (``a = sqrt(5)``, as ``nn.Linear`` and PEFT), B is zero, so the adapted
    model starts equal to the base. Dropout applies only to the branch's input.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 rank_scaling: str = "standard"):
        super().__init__(base)
        self.A, self.B = low_rank_pair(r, self.in_features, self.out_features, base_weight(base))
        self.r = r
        self.scale = alpha / math.sqrt(r) if rank_scaling == "rs" else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x).to(self.A.dtype)
        return F.linear(F.linear(x, self.A), self.B) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        z = F.linear(self.dropout(x).to(self.A.dtype), self.A)
        # One fused GEMM, out + s * z B^T: no output-sized temporaries for the scaling and the
        # sum (an unfused branch allocates two), and autograd keeps only z (rank r) and B.
        flat = out.reshape(-1, out.shape[-1])
        fused = torch.addmm(flat, z.reshape(-1, self.r).to(flat.dtype), self.B.T.to(flat.dtype),
                            alpha=self.scale)
        return fused.view(out.shape)

    def delta_weight(self) -> torch.Tensor:
        return (self.B @ self.A) * self.scale

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scale={self.scale:g}"


def inject_adapters(model: nn.Module, targets: list[str],
                    factory: Callable[[str, nn.Module], AdaptedLinear],
                    exclude: list[str] | None = None) -> list[str]:
    """Replace every target linear of ``model`` by ``factory(name, layer)``; return the names.

    Raises ``ValueError`` when no module matches, naming what was looked for, so a wrong target
    list fails before training instead of training nothing.
    """
    names = find_target_modules(model, targets, exclude=exclude)
    for name in names:
        parent, attr = _parent(model, name)
        setattr(parent, attr, factory(name, getattr(parent, attr)))
    return names


def freeze_and_inject(model: nn.Module, ctx, factory: Callable[[str, nn.Module], AdaptedLinear]) -> list[str]:
    """The usual ``inject`` of an adapter method: freeze the backbone, wrap ``ctx.targets`` (never
    the task head), and record how many modules were adapted."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = inject_adapters(model, ctx.targets, factory, exclude=ctx.head_names)
    ctx.extras["adapted_modules"] = len(names)
    return names


def adapted_modules(model: nn.Module) -> Iterator[tuple[str, AdaptedLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLinear):
            yield name, module


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every `AdaptedLinear` into its base weight, in place; returns the plain model."""
    for name, module in list(adapted_modules(model)):
        parent, attr = _parent(model, name)
        setattr(parent, attr, module.merged_base())
    return model


def resolve_steps(value: float, total_steps: int) -> int:
    """A step count given either absolutely (``value >= 1``) or as a fraction of the run (``< 1``).

    Schedules written for paper-length runs (thousands of steps) must shrink with our short ones;
    a fraction keeps one default meaningful for both.
    """
    if value < 0:
        raise ValueError(f"a step count cannot be negative, got {value}")
    return int(round(value * total_steps)) if value < 1 else int(value)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


__all__ = ["AdaptedLinear", "LowRankLinear", "low_rank_pair", "inject_adapters", "freeze_and_inject", "adapted_modules",
           "merge_adapters", "base_weight", "layer_dims", "is_linear", "resolve_steps"]
