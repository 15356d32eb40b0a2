"""LoRA-FA (Zhang et al., 2023, arXiv:2308.03303): LoRA with the down-projection A frozen.

Each target linear computes ``h = W0 x + s * B A x`` as LoRA, but A stays at its random
initialisation and only B (zero at init) trains, with the task head. Because no trainable weight
needs the layer input ``x`` for its gradient, autograd keeps only the rank-r ``A x`` for B's
gradient instead of ``x``: that is the activation-memory saving the paper is about. A frozen
``nn.Parameter`` is enough for this (autograd saves a matmul's input only when the other operand
needs a gradient); `tests/test_lora_family_a.py` checks it by counting the bytes saved for backward.

Choices: A is Kaiming-uniform as LoRA (and PEFT's ``create_lorafa_optimizer``, which freezes
``lora_A``); hyperparameters as LoRA (r 8, alpha 16, targets ``qv``). The paper's version 2
gradient correction ``g_B <- g_B (A A^T + eps I)^-1 / s^2`` is not implemented: plain AdamW on B.

Merge: as LoRA, ``W = W0 + s B A``.
"""
from __future__ import annotations

from torch import nn

from harness.lowrank import LowRankLinear
from methods.lora import LoRA


class FrozenALowRankLinear(LowRankLinear):
    """`LowRankLinear` whose A is frozen, so autograd saves ``A x``, not ``x``, for backward."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 rank_scaling: str = "standard"):
        super().__init__(base, r=r, alpha=alpha, dropout=dropout, rank_scaling=rank_scaling)
        self.A.requires_grad_(False)


class LoRAFA(LoRA):
    name = "lora_fa"
    summary = "LoRA with A frozen at its random init; only B trains (less activation memory)"
    defaults = dict(LoRA.defaults)
    layer_class = FrozenALowRankLinear
