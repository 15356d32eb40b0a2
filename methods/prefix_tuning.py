"""Prefix Tuning (Li and Liang, 2021, arXiv:2101.00190): trainable key/value prefixes in every layer.

The paper prepends ``L`` activations to every layer's attention keys and values (the frozen model
attends to them like to earlier tokens) and, because optimising them directly was unstable,
produces them from a smaller matrix through an MLP: ``P = MLP(P')`` with
``Linear(d, h) -> tanh -> Linear(h, layers * 2 * kv_dim)``. After training only ``P`` is kept.

Choices: ``P'`` is ``(L, embed_dim)`` initialised N(0, 1) (``nn.Embedding``'s default, as the
paper's code and PEFT); ``embed_dim`` defaults to the model's hidden size ``d`` (the paper's);
Hugging Face PEFT uses the key/value width instead, which differs only under grouped-query
attention (set ``embed_dim`` to it to match PEFT there). ``h = encoder_hidden_size`` is 512 (the
``mid_dim`` of the paper's code). ``kv_dim = kv_heads * head_dim``, so grouped-query models get
prefixes for their key/value heads. The prefix goes in as a ``transformers.DynamicCache`` (route
``prefix`` of ``methods._prompting``; the module names ``embedding`` and ``transform`` are PEFT's,
so weights copy 1:1); position ids of real tokens start at ``L`` (the backbones do this from the
cache length). ``dropout`` on the produced prefix, default 0. Backbone frozen, task head trains.
Refuses gradient checkpointing (transformers would drop the prefix). Default ``L = 20``.

Merge: the MLP's output is computed once and kept as the buffer ``virtual_prompt.cached``; the
embedding and MLP are deleted. The returned model is inference-only (``mergeable = False``).
"""
from __future__ import annotations

import torch
from torch import nn

from methods._prompting import Dims, PromptMethod


class PrefixMLP(nn.Module):
    """``P'`` through ``Linear -> tanh -> Linear`` to one flat key/value prefix per virtual token."""

    def __init__(self, num_virtual_tokens: int, embed_dim: int, hidden: int, out: int):
        super().__init__()
        self.embedding = nn.Embedding(num_virtual_tokens, embed_dim)
        self.transform = nn.Sequential(nn.Linear(embed_dim, hidden), nn.Tanh(), nn.Linear(hidden, out))

    def forward(self) -> torch.Tensor:
        return self.transform(self.embedding.weight)


class PrefixTuning(PromptMethod):
    name = "prefix_tuning"
    summary = "per-layer key/value prefixes produced by an MLP; only the prefix kept after training"
    mergeable = False
    route = "prefix"
    defaults = {"num_virtual_tokens": 20, "encoder_hidden_size": 512, "embed_dim": None,
                "dropout": 0.0}

    def make_source(self, model: nn.Module, dims: Dims) -> nn.Module:
        p = self.params
        return PrefixMLP(int(p["num_virtual_tokens"]), int(p["embed_dim"] or dims.hidden),
                         int(p["encoder_hidden_size"]), dims.prefix_width)
