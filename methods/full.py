"""Full fine-tuning: the reference every PEFT method is measured against.

Paper: none; it is the standard baseline (every parameter of the backbone and head trains).
Choices: one AdamW group with the core's default weight-decay split (no decay on biases and
norm weights). Merge: identity, the trained model is already plain.
"""
from __future__ import annotations

from torch import nn

from harness.hookspecs import hookimpl
from harness.plugins import Method
from harness.state import TrainState


class FullFineTuning(Method):
    name = "full"
    summary = "every parameter trains (reference)"
    defaults: dict = {}

    @hookimpl
    def inject(self, model: nn.Module, ctx: TrainState) -> None:
        for p in model.parameters():
            p.requires_grad_(True)

    @hookimpl
    def merge(self, model: nn.Module, ctx: TrainState) -> nn.Module:
        return model
