"""Delta-LoRA (Zi et al., 2023, arXiv:2309.02411): LoRA whose product's change also moves ``W``.

Each target linear computes ``h = W x + s * B A x`` as LoRA does, but after every optimizer step
from step ``K`` on the frozen weight is updated in place by the change of the low-rank product::

    W <- W + lam * (s B_new A_new - s B_old A_old)

with no gradient and no optimizer state for ``W`` (so memory stays LoRA's, bar one copy of the
pairs). The paper removes dropout from the branch, because the product's change must be the
change of the function the branch computes.

Choices:
- ``lam`` 2 (the paper's, low confidence). ``start_step`` (the paper's K, 500 of a long run)
  defaults to 0.1: a value below 1 is a fraction of the run's optimizer steps, 1 or more an
  absolute step number (`harness.lowrank.resolve_steps`). Updates apply after steps
  ``K+1, K+2, ...``; the product is tracked from the first step, so the first update adds only
  that step's change, never the accumulated product.
- The old product is not stored densely: a copy of ``(A, B)`` taken after the previous step is
  enough (``r (in + out)`` numbers per layer instead of ``in * out``), and the difference is
  formed once per step.
- ``W`` is kept in fp32 (a lower-precision base is upcast at injection): steps of ``lam`` times a
  small product change round to nothing in bf16.
- Defaults otherwise as LoRA: r 8, alpha 16, targets ``qv``; dropout is fixed at 0 (no parameter).

Merge: ``W_T + s B_T A_T`` (the updated base plus the final product), as LoRA's merge.
"""
from __future__ import annotations

import torch
from torch import nn

from harness.hookspecs import hookimpl
from harness.lowrank import (LowRankLinear, adapted_modules, base_weight, freeze_and_inject,
                             merge_adapters, resolve_steps)
from harness.plugins import Method
from harness.state import TrainState


class DeltaLoRALinear(LowRankLinear):
    """A LoRA layer without branch dropout whose base weight follows the product's change."""

    def __init__(self, base: nn.Module, r: int, alpha: float):
        if base.weight.dtype != torch.float32:
            base = base.float()  # small deltas vanish in half precision
        super().__init__(base, r=r, alpha=alpha, dropout=0.0)
        # Pairs after the previous step; plain tensors (not buffers) so state_dict stays LoRA's.
        self._old_A: torch.Tensor | None = None
        self._old_B: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Without autocast, a half-precision activation would not meet the fp32 base weight.
        out = self.base(x.to(self.base.weight.dtype)) + self.delta_forward(x)
        return out.to(x.dtype)

    @torch.no_grad()
    def remember(self) -> None:
        self._old_A, self._old_B = self.A.detach().clone(), self.B.detach().clone()

    @torch.no_grad()
    def apply_delta(self, lam: float) -> torch.Tensor:
        """``W += lam * s (B A - B_old A_old)``; returns the product's change (for tests/logs)."""
        change = (self.B @ self.A - self._old_B @ self._old_A) * self.scale
        w = base_weight(self.base)  # (out, in) view, also of GPT-2's transposed Conv1D storage
        w.add_(change.to(w.dtype), alpha=lam)
        return change


class DeltaLoRA(Method):
    name = "delta_lora"
    summary = "LoRA whose product's per-step change is also added to the frozen weight"
    defaults = {"r": 8, "alpha": 16, "lam": 2.0, "start_step": 0.1, "targets": "qv"}

    def make_layer(self, name: str, layer: nn.Module) -> DeltaLoRALinear:
        return DeltaLoRALinear(layer, r=self.params["r"], alpha=self.params["alpha"])

    @hookimpl
    def inject(self, model: nn.Module, ctx: TrainState) -> None:
        freeze_and_inject(model, ctx, self.make_layer)

    def _layers(self, model: nn.Module) -> list[DeltaLoRALinear]:
        return [m for _, m in adapted_modules(model) if isinstance(m, DeltaLoRALinear)]

    @hookimpl
    def on_train_start(self, model: nn.Module, ctx: TrainState) -> None:
        self.start = resolve_steps(self.params["start_step"], ctx.total_steps)
        ctx.extras["delta_start_step"] = self.start
        for layer in self._layers(model):
            layer.remember()

    @hookimpl
    def on_step(self, model: nn.Module, ctx: TrainState) -> None:
        # ctx.step counts steps taken, so step K+1 is the first whose change reaches W.
        update = ctx.step > self.start
        for layer in self._layers(model):
            if update:
                layer.apply_delta(self.params["lam"])
            layer.remember()

    @hookimpl
    def merge(self, model: nn.Module, ctx: TrainState) -> nn.Module:
        return merge_adapters(model)
