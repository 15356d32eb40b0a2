"""LoRA+ (Hayou et al., 2024, arXiv:2402.12354): LoRA with a higher learning rate for B than for A.

The paper shows that with equal rates for A and B, feature learning is inefficient at large width;
setting ``lr_B = ratio * lr_A`` fixes it. The layers, the forward pass and the merge are LoRA's
(`methods.lora`); only the optimizer's parameter groups differ.

Choices (as the authors' reference grouping, also Hugging Face PEFT's
``create_loraplus_optimizer``): B and every 1-D trainable parameter (biases of the task head) take
``lr * ratio``; A and every other 2-D parameter (the head's weight) take the base rate. ``ratio``
defaults to 16 (the paper's general advice; the authors' MNLI script uses 80). Weight decay follows
the harness's convention (the run's value for 2-D tensors, none for 1-D ones), where PEFT's helper
applies one ``loraplus_weight_decay`` (0 by default) to all groups. The learning-rate schedule
scales every group by the same factor, so the ratio holds throughout training.

Merge: as LoRA, ``W = W0 + s B A``.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from harness.hookspecs import hookimpl
from harness.lowrank import LowRankLinear, adapted_modules
from harness.state import TrainState
from methods.lora import LoRA


class LoRAPlus(LoRA):
    name = "lora_plus"
    summary = "LoRA with B (and 1-D params) at lr * ratio"
    defaults = {**LoRA.defaults, "ratio": 16}

    @hookimpl
    def param_groups(self, model: nn.Module, ctx: TrainState) -> list[dict[str, Any]]:
        lr, wd = ctx.train.lr, ctx.train.weight_decay
        fast_lr = lr * float(self.params["ratio"])
        b_ids = {id(m.B) for _, m in adapted_modules(model) if isinstance(m, LowRankLinear)}
        slow, fast, fast_1d = [], [], []
        for _, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if p.ndim < 2:
                fast_1d.append(p)
            elif id(p) in b_ids:
                fast.append(p)
            else:
                slow.append(p)
        groups = [{"params": slow, "lr": lr, "weight_decay": wd},
                  {"params": fast, "lr": fast_lr, "weight_decay": wd},
                  {"params": fast_1d, "lr": fast_lr, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]
