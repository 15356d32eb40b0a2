"""P-Tuning (Liu et al., 2021, arXiv:2103.10385): virtual tokens produced by a prompt encoder.

The paper learns pseudo-token embeddings ``h_i`` and feeds them through a prompt encoder, a
2-layer bidirectional LSTM followed by a 2-layer ReLU MLP, so that the virtual tokens depend on
each other; the encoder's outputs replace the pseudo tokens in the input. It reports the
reparameterisation stabilises training compared with free embeddings.

Choices (as Hugging Face PEFT's ``PromptEncoder`` with ``encoder_reparameterization_type="LSTM"``,
whose module names and shapes ours share so weights copy 1:1): embedding ``(L, d)`` initialised
N(0, 1) (``nn.Embedding``'s default), ``LSTM(d, h, num_layers=encoder_num_layers,
bidirectional=True, dropout=encoder_dropout)``, MLP ``Linear(2h, 2h) -> ReLU -> Linear(2h, d)``;
``h = encoder_hidden_size`` defaults to ``d`` (PEFT's default). The paper places pseudo tokens
inside a hand-written template; we prepend all ``L`` of them (PEFT's choice), through the
``embeddings`` route of ``methods._prompting`` (attention mask, labels and token types extended).
Backbone frozen, task head trains. Default ``L = 20``.

Merge: the encoder's output for the ``L`` tokens is computed once (eval mode) and kept as the
buffer ``virtual_prompt.cached``; the embedding, LSTM and MLP are deleted. The returned model is
inference-only and predicts what the trained one did (``mergeable = False``: nothing is folded
into the backbone's weights).
"""
from __future__ import annotations

import torch
from torch import nn

from methods._prompting import Dims, PromptMethod


class PromptEncoder(nn.Module):
    """Embedding -> bidirectional LSTM -> MLP, producing ``(L, d)`` virtual token embeddings."""

    def __init__(self, num_virtual_tokens: int, dim: int, hidden: int, num_layers: int = 2,
                 dropout: float = 0.0):
        super().__init__()
        self.embedding = nn.Embedding(num_virtual_tokens, dim)
        self.lstm_head = nn.LSTM(input_size=dim, hidden_size=hidden, num_layers=num_layers,
                                 dropout=dropout, bidirectional=True, batch_first=True)
        self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(),
                                      nn.Linear(2 * hidden, dim))

    def forward(self) -> torch.Tensor:
        # One sequence of L tokens: every prompt row is the same for all examples of a batch.
        out, _ = self.lstm_head(self.embedding.weight.unsqueeze(0))
        return self.mlp_head(out)[0]


class PTuning(PromptMethod):
    name = "p_tuning"
    summary = "virtual tokens from an LSTM + MLP prompt encoder; encoder output cached after training"
    mergeable = False
    route = "embeddings"
    defaults = {"num_virtual_tokens": 20, "encoder_hidden_size": None, "encoder_num_layers": 2,
                "encoder_dropout": 0.0}

    def make_source(self, model: nn.Module, dims: Dims) -> nn.Module:
        p = self.params
        return PromptEncoder(int(p["num_virtual_tokens"]), dims.hidden,
                             int(p["encoder_hidden_size"] or dims.hidden),
                             int(p["encoder_num_layers"]), float(p["encoder_dropout"]))
