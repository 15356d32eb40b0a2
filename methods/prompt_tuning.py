"""Prompt Tuning (Lester et al., 2021, arXiv:2104.08691): L trainable virtual token embeddings.

The paper prepends ``L`` learned vectors to the (frozen) model's input embeddings and trains only
them; the attention mask covers them and they are never scored. Initialisation from sampled
vocabulary (or from class-label words) beat random uniform ``[-0.5, 0.5]`` in the paper.

Choices: ``init`` is ``vocab`` (default: embeddings of ids drawn uniformly from the whole
vocabulary, as Hugging Face PEFT's ``SAMPLE_VOCAB``; the paper drew from the 5,000 most frequent
SentencePiece tokens, which a WordPiece/BPE id order does not give), ``random`` (uniform
``[-0.5, 0.5]``, the paper's) or ``text`` (the embeddings of ``init_text``, tokenised with
``tokenizer`` or the model's own, without special tokens, repeated or cut to ``L``, as PEFT's
``TEXT``). The rows are prepended at the embedding layer (``methods._prompting``, route
``embeddings``), so the backbone adds its position and token-type embeddings on top, as PEFT's
``inputs_embeds`` route; unlike PEFT, decoder classification heads still pool the last real token
of right-padded rows. On BERT the pooler therefore reads the first virtual token, as in PEFT. The
task head trains (the core unfreezes it); the backbone is frozen. Default ``L = 20``.

Merge: returns the same model, inference-only, with the prompt kept as the buffer
``virtual_prompt.cached`` (for this method the cached rows are the trained embedding itself); it
is not folded into weights (``mergeable = False``).
"""
from __future__ import annotations

import torch
from torch import nn

from methods._prompting import Dims, EmbeddingSource, PromptMethod

INITS = ("vocab", "random", "text")


def text_ids(text: str, tokenizer: str, n: int) -> list[int]:
    """Token ids of ``text`` (no special tokens), repeated or cut to ``n``."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tokenizer)(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"init_text {text!r} tokenises to nothing")
    return (ids * (n // len(ids) + 1))[:n]


class PromptTuning(PromptMethod):
    name = "prompt_tuning"
    summary = "L trainable virtual token embeddings prepended to the frozen model's input"
    mergeable = False
    route = "embeddings"
    defaults = {"num_virtual_tokens": 20, "init": "vocab", "init_text": "", "tokenizer": None}

    def make_source(self, model: nn.Module, dims: Dims) -> nn.Module:
        p, n = self.params, int(self.params["num_virtual_tokens"])
        table = model.get_input_embeddings().weight.detach()
        if p["init"] == "random":
            init = torch.empty(n, dims.hidden).uniform_(-0.5, 0.5)
        elif p["init"] == "vocab":
            init = table[torch.randint(0, table.shape[0], (n,))]
        elif p["init"] == "text":
            if not p["init_text"]:
                raise ValueError("init: text needs init_text")
            tok = p["tokenizer"] or getattr(model, "name_or_path", None) or model.config._name_or_path
            ids = torch.tensor(text_ids(p["init_text"], tok, n))
            if int(ids.max()) >= table.shape[0]:
                raise ValueError(f"tokenizer {tok!r} gives ids beyond the model's vocabulary")
            init = table[ids.to(table.device)]
        else:
            raise ValueError(f"init must be one of {INITS}, got {p['init']!r}")
        return EmbeddingSource(n, dims.hidden, init.float().cpu())
