"""LoRA (Hu et al., 2021, arXiv:2106.09685): a trainable low-rank update beside frozen weights.

Each target linear computes ``h = W0 x + s * B A x`` with ``A: (r, in)``, ``B: (out, r)`` and
``s = alpha / r`` (``alpha / sqrt(r)`` with ``rank_scaling: rs``, rsLoRA). Everything else in the
backbone is frozen; the task head trains.

Choices (as Hugging Face PEFT's code, which the paper's Gaussian init differs from): A is
Kaiming-uniform with ``a = sqrt(5)``, B is zero, dropout only on the branch's input. Defaults
r 8, alpha 16, dropout 0, targets ``qv`` (query and value, the paper's GLUE setting); ``targets``
takes a preset (qv, attn, mlp, all, all-linear) or module-name suffixes, as PEFT's
``target_modules``.

Merge: ``W = W0 + s B A`` into the base weight (transposed for GPT-2's Conv1D); the returned model
is the original architecture with no adapter module left. Export: PEFT's ``LORA`` format
(``lora_A``/``lora_B`` per module), which ``PeftModel.from_pretrained`` loads.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from harness.hookspecs import hookimpl
from harness.lowrank import LowRankLinear, adapted_modules, freeze_and_inject, merge_adapters
from harness.plugins import Method
from harness.state import TrainState


class LoRA(Method):
    name = "lora"
    summary = "low-rank update B A beside frozen linear weights"
    defaults = {"r": 8, "alpha": 16, "dropout": 0.0, "targets": "qv", "rank_scaling": "standard"}

    layer_class: type[LowRankLinear] = LowRankLinear  # variants swap the layer, keep the rest

    def make_layer(self, name: str, layer: nn.Module) -> LowRankLinear:
        p = self.params
        return self.layer_class(layer, r=p["r"], alpha=p["alpha"], dropout=p["dropout"],
                                rank_scaling=p["rank_scaling"])

    @hookimpl
    def inject(self, model: nn.Module, ctx: TrainState) -> None:
        freeze_and_inject(model, ctx, self.make_layer)

    @hookimpl
    def merge(self, model: nn.Module, ctx: TrainState) -> nn.Module:
        return merge_adapters(model)

    def peft_config(self, names: list[str], ctx: TrainState) -> dict[str, Any]:
        p = self.params
        return {"peft_type": "LORA", "r": p["r"], "lora_alpha": p["alpha"],
                "lora_dropout": p["dropout"], "use_rslora": p["rank_scaling"] == "rs",
                "target_modules": names, "bias": "none", "use_dora": False,
                "fan_in_fan_out": ctx.model_type == "gpt2", "init_lora_weights": True}

    def peft_tensors(self, name: str, layer: nn.Module) -> dict[str, Any]:
        return {f"{name}.lora_A.weight": layer.A, f"{name}.lora_B.weight": layer.B}

    @hookimpl
    def export_peft(self, model: nn.Module, ctx: TrainState) -> dict[str, Any]:
        layers = dict(adapted_modules(model))
        tensors: dict[str, Any] = {}
        for name, layer in layers.items():
            tensors.update(self.peft_tensors(name, layer))
        return {"config": self.peft_config(sorted(layers), ctx), "tensors": tensors}
