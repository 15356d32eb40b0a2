"""Which linear layers a method adapts, per architecture, as Hugging Face PEFT's target lists do.

A target is a module-name suffix on a dot boundary (``"query"`` matches
``bert.encoder.layer.0.attention.self.query``) or a regular expression prefixed with ``re:``
that must match the whole name. Presets name common choices per architecture:

- ``qv``: query and value projections (the LoRA paper's GLUE setting)
- ``attn``: every attention projection
- ``mlp``: the feed-forward linears
- ``all``: ``attn`` + ``mlp``
- ``all-linear``: every linear layer except the task head and the LM head
"""
from __future__ import annotations

import re

from torch import nn

_BERT_LIKE = {
    "qv": ["query", "value"],
    "attn": ["query", "key", "value", "attention.output.dense"],
    "mlp": ["intermediate.dense", r"re:.*layer\.\d+\.output\.dense"],
}
_LLAMA_LIKE = {
    "qv": ["q_proj", "v_proj"],
    "attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
}
PRESETS: dict[str, dict[str, list[str]]] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "deberta-v2": {
        "qv": ["query_proj", "value_proj"],
        "attn": ["query_proj", "key_proj", "value_proj", "attention.output.dense"],
        "mlp": ["intermediate.dense", r"re:.*layer\.\d+\.output\.dense"],
    },
    "distilbert": {
        "qv": ["q_lin", "v_lin"],
        "attn": ["q_lin", "k_lin", "v_lin", "out_lin"],
        "mlp": ["lin1", "lin2"],
    },
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    # GPT-2 fuses q, k and v into one Conv1D.
    "gpt2": {"qv": ["c_attn"], "attn": ["c_attn", "attn.c_proj"], "mlp": ["mlp.c_fc", "mlp.c_proj"]},
}
# Never adapted by "all-linear": output heads.
_HEAD_NAMES = ("classifier", "score", "lm_head", "qa_outputs", "pooler", "cls")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def resolve_targets(model_type: str, targets: str | list[str] | None) -> list[str]:
    """Turn a preset name, a comma-separated string or a list into target patterns."""
    if targets is None:
        targets = "qv"
    if isinstance(targets, str):
        if targets == "all-linear":
            return ["all-linear"]
        presets = PRESETS.get(model_type)
        if targets in ("qv", "attn", "mlp", "all"):
            if presets is None:
                raise ValueError(
                    f"no target preset for architecture {model_type!r}; pass module names, e.g. "
                    f"--set targets=q_proj,v_proj, or targets=all-linear (known: {sorted(PRESETS)})")
            if targets == "all":
                return presets["attn"] + presets["mlp"]
            return list(presets[targets])
        return [t.strip() for t in targets.split(",") if t.strip()]
    return list(targets)


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def find_target_modules(model: nn.Module, targets: list[str],
                        exclude: list[str] | None = None) -> list[str]:
    """Names of the linear modules matching ``targets`` (and none of ``exclude``)."""
    exclude = list(exclude or [])
    names = []
    for name, module in model.named_modules():
        if not is_linear(module):
            continue
        if any(_matches(name, e) or name.startswith(e + ".") for e in exclude):
            continue
        if targets == ["all-linear"]:
            if any(part in _HEAD_NAMES for part in name.split(".")):
                continue
            names.append(name)
        elif any(_matches(name, t) for t in targets):
            names.append(name)
    if not names:
        raise ValueError(f"no linear module matches targets {targets}; "
                         f"set targets to module-name suffixes of this model or a preset "
                         f"(qv, attn, mlp, all, all-linear)")
    return names
