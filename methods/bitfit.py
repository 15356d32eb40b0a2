"""BitFit (Ben Zaken et al., 2022, arXiv:2106.10199): train only the bias terms.

Paper: freeze every weight of the pretrained model and fine-tune only its biases (and the task
classifier). About 0.1% of BERT's parameters, close to full fine-tuning on GLUE at small and
medium data sizes.

Choices here: every backbone parameter whose name ends in ``bias`` trains (attention, MLP, norm
and pooler biases alike; the paper's main setting), the task head trains densely as for every
method. Biases sit in the no-weight-decay group of the core's default optimizer groups.
Architectures without biases (Llama, Mistral, Qwen2 projections) are refused with a clear error,
since nothing would train.

Merge: identity; only existing parameters changed.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from harness.hookspecs import hookimpl
from harness.plugins import Method
from harness.state import TrainState


class BitFit(Method):
    name = "bitfit"
    summary = "only the bias terms of the backbone train (plus the head)"
    mergeable = True
    defaults: dict[str, Any] = {}

    @hookimpl
    def inject(self, model: nn.Module, ctx: TrainState) -> None:
        biases = 0
        for name, p in model.named_parameters():
            is_bias = name.endswith("bias") and not ctx.is_head(name)
            p.requires_grad_(is_bias)
            biases += is_bias
        if not biases:
            raise ValueError(f"{self.name}: this model ({ctx.model_type}) has no bias parameters "
                             f"outside the head; nothing would train")
        ctx.extras["bias_tensors"] = biases

    @hookimpl
    def merge(self, model: nn.Module, ctx: TrainState) -> nn.Module:
        return model
