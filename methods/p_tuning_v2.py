"""P-Tuning v2 (Liu et al., 2022, arXiv:2110.07602): key/value prefixes in every layer, stored directly.

The paper applies deep prompts (per-layer prefixes, as prefix tuning) but drops the
reparameterisation MLP: the prefix is a free ``(L, layers * 2 * kv_dim)`` parameter. The backbone
is frozen; classification uses a randomly initialised linear head (on [CLS] for BERT-style
encoders) instead of a verbaliser. Reported for RoBERTa-large on RTE: prefix length 128, lr 5e-3.

Choices (as the paper's code, ``PrefixEncoder`` with ``prefix_projection=False``): the prefix is an
``nn.Embedding`` initialised N(0, 1), with dropout 0.1 on it during training (the code applies the
model's ``hidden_dropout_prob``); ``kv_dim = kv_heads * head_dim`` (grouped-query attention gets
prefixes for its key/value heads). It reaches attention as a ``transformers.DynamicCache``
(route ``prefix`` of ``methods._prompting``); on BERT the real tokens' positions start at ``L``,
as in the paper's code (``past_key_values_length``) and in PEFT. The head is the model's own
sequence-classification head (BERT: pooler output of the first token -> linear; the core trains
it). Refuses gradient checkpointing. Default ``L = 20`` (smaller than the paper's RTE setting, for
CPU runs; set ``num_virtual_tokens``).

``init``: ``random`` (N(0, 1), the paper's code and PEFT's), ``vocab`` (the keys and values the
frozen model itself computes for ``L`` token ids drawn uniformly from the vocabulary:
Prefix-Tuning's initialisation from the activations of real words, Li & Liang 2021, sec. 7.2;
decoders only, an encoder returns no key/value cache) or ``auto`` (default): ``vocab`` where the
model returns a key/value cache, else ``random``. On a pretrained decoder a random N(0, 1) prefix
is far from anything attention has seen: SmolLM2-135M-Instruct's response loss on the instruction
suite's smoke run was 8.1 with it (the bare model's is about 1), ROUGE-L 1.1; with ``vocab`` 1.07,
ROUGE-L 31.1 (LoRA: 32.6). Encoders (the paper's setting, and GLUE here) keep the paper's init.

Merge: the prefix (dropout off) is kept as the buffer ``virtual_prompt.cached``; the returned
model is inference-only (``mergeable = False``).
"""
from __future__ import annotations

import torch
from torch import nn

from methods._prompting import (Dims, EmbeddingSource, PromptMethod, prefix_from_tokens,
                               returns_key_value_cache)

INITS = ("auto", "random", "vocab")


class PTuningV2(PromptMethod):
    name = "p_tuning_v2"
    summary = "per-layer key/value prefixes stored directly (no MLP), frozen backbone, trained head"
    mergeable = False
    route = "prefix"
    defaults = {"num_virtual_tokens": 20, "dropout": 0.1, "init": "auto"}

    def make_source(self, model: nn.Module, dims: Dims) -> nn.Module:
        n, init = int(self.params["num_virtual_tokens"]), self.params["init"]
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if init == "auto":
            init = "vocab" if returns_key_value_cache(model) else "random"
        rows = None
        if init == "vocab":
            vocab = model.get_input_embeddings().weight.shape[0]
            rows = prefix_from_tokens(model, torch.randint(0, vocab, (n,)), dims)
        return EmbeddingSource(n, dims.prefix_width, rows)
