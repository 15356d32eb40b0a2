"""LongLoRA (Chen et al., 2023, arXiv:2309.12307): extend a model's context cheaply.

What the paper does: continued language modelling on long sequences (up to 100k tokens) with
(1) LoRA on the attention projections q, k, v, o, plus fully trainable input embeddings and
normalisation layers ("LoRA+": LoRA alone cannot adapt to long contexts, the embeddings and norms,
a few percent of the weights, close most of the gap to full fine-tuning); (2) RoPE scaled to the
target length by linear position interpolation (Chen et al. 2023; positions divided by
``target / original context``); (3) shifted sparse attention (S2-Attn) during training only: the
sequence is split into groups of 1/4 of its length, attention stays within a group, and half of the
heads work on groups shifted by half a group so that information flows between neighbouring
groups. Inference uses ordinary full attention, so the trained model is a plain model.

Our choices:

- LoRA r 8, alpha 16 on q, k, v, o (`harness.lowrank.LowRankLinear`, as our LoRA), every
  embedding and norm weight (``*RMSNorm``/``LayerNorm``) trainable, the LM head frozen (as the
  paper, whose Llama 2 has separate input and output embeddings). A model that *ties* them (SmolLM2)
  would train its output head through the shared matrix, so ``untie_lm_head`` (on) gives the head
  its own frozen copy of the original matrix first and sets ``tie_word_embeddings = False``; the
  saved model then holds two matrices (SmolLM2: +28M parameters on disk). Off: the tied matrix
  trains as both.
- RoPE: ``rope_factor`` ``auto`` is ``target_length / max_position_embeddings`` when that exceeds 1
  and 1 (off) otherwise; ``target_length`` defaults to the run's ``max_length`` (the training
  length). A number sets the factor (1 = off). The model's config gets
  ``rope_parameters = {"rope_type": "linear", "factor": f, ...}`` and its rotary-embedding module is
  rebuilt from it (transformers 5 computes ``inv_freq / f``, i.e. positions divided by ``f``), so
  a saved model reloads with the same positions. SmolLM2 was pretrained to 8,192 positions: at
  CPU lengths (<= 4k) ``auto`` leaves RoPE as it is.
- S2-Attn (``s2_attn``, on): an attention function registered with transformers'
  ``AttentionInterface``; the model's ``config._attn_implementation`` names it, and it runs S2-Attn
  only while the attention module is in training mode (``model.train()``) and queries and keys
  have the same length; in eval mode it calls the model's original implementation (sdpa, eager,
  flash) with the original mask, bit for bit. Group size ``G = group_fraction * n`` (0.25; rounded
  down to even; sequences shorter than 4 tokens use full attention). Heads ``[0, h/2)`` attend
  causally within ``[0, G), [G, 2G), ...``; heads ``[h/2, h)`` within ``[0, G/2), [G/2, 3G/2), ...,
  [n - G/2, n)``. The paper's code rolls the shifted heads by ``-G/2`` and applies one causal
  mask per group, which lets the first ``G/2`` tokens see the last ``G/2`` (the wrap-around, a
  leak the authors acknowledge); here the wrapped group is split in its two halves, so no token
  attends across the wrap-around and every token sees only earlier tokens. Each segment is a plain
  causal block, so SDPA runs with ``is_causal`` and no mask tensor. A length that is not a multiple
  of G is padded at the end (causality keeps real tokens from seeing the padding); right-padded
  batches need nothing more, left padding is refused. Keys and values are repeated to all heads
  (GQA) because a kv head may serve shifted and unshifted query heads.
- Llama-architecture models only (SmolLM2, Llama, the tests' tiny Llama); others fail with an error.

Merge: LoRA folds into the projections (``W0 + s B A``); the trained embeddings and norms are
already the model's own weights; the attention implementation is set back to the original, so the
merged model is the plain architecture with the original state-dict keys, and in eval mode
(full attention) predicts what the adapted model predicted. The config keeps the RoPE scaling and,
when untied, ``tie_word_embeddings = False``. No Hugging Face PEFT export (PEFT has no S2-Attn or
RoPE scaling; the merged model saved by ``--save`` is the portable artefact).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from harness.hookspecs import hookimpl
from harness.lowrank import freeze_and_inject, merge_adapters
from harness.state import TrainState
from methods.lora import LoRA

SUPPORTED = ("llama",)
NAME = "longlora_s2"


# -- S2-Attn ---------------------------------------------------------------------------------
def group_size(n: int, fraction: float) -> int:
    """Tokens per group for a sequence of ``n``: ``fraction * n`` rounded down to even (>= 2)."""
    return max(2, int(n * fraction) // 2 * 2)


def _causal_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: int, scaling: float | None,
                   dropout: float) -> torch.Tensor:
    """Causal attention within consecutive blocks of ``size`` along the sequence; ``(b, h, L, d)``."""
    b, h, length, d = q.shape
    nb = length // size

    def blocks(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(b, h, nb, size, d).transpose(1, 2).reshape(b * nb, h, size, d)

    out = F.scaled_dot_product_attention(blocks(q), blocks(k), blocks(v), is_causal=True,
                                         dropout_p=dropout, scale=scaling)
    return out.reshape(b, nb, h, size, d).transpose(1, 2).reshape(b, h, length, d)


def shifted_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: int,
                             scaling: float | None = None, dropout: float = 0.0) -> torch.Tensor:
    """S2-Attn over ``(batch, heads, n, head_dim)`` (keys and values already at ``heads``).

    Heads ``[0, h//2)``: causal within ``[0, G), [G, 2G), ...``; heads ``[h//2, h)``: causal within
    ``[0, G/2), [G/2, 3G/2), ..., [n - G/2, n)`` (shifted by half a group; the wrap-around group of
    a roll is split, so nothing crosses it). Returns ``(batch, heads, n, head_dim)``.
    """
    if group % 2:
        raise ValueError(f"S2-Attn group size must be even, got {group}")
    b, h, n, d = q.shape
    m = -(-n // group) * group
    if m != n:  # pad the end: every real token precedes the padding, so causality hides it
        q, k, v = (F.pad(x, (0, 0, 0, m - n)) for x in (q, k, v))
    half, s = h // 2, group // 2
    out_plain = _causal_blocks(q[:, :half], k[:, :half], v[:, :half], group, scaling, dropout)
    qs, ks, vs = q[:, half:], k[:, half:], v[:, half:]
    # The two half groups at either end, as two blocks of s: [0, s) and [m - s, m).
    ends = [torch.cat([x[:, :, :s], x[:, :, m - s:]], dim=2) for x in (qs, ks, vs)]
    out_ends = _causal_blocks(*ends, s, scaling, dropout)
    parts = [out_ends[:, :, :s]]
    if m > group:
        parts.append(_causal_blocks(qs[:, :, s:m - s], ks[:, :, s:m - s], vs[:, :, s:m - s], group,
                                    scaling, dropout))
    parts.append(out_ends[:, :, s:])
    out = torch.cat([out_plain, torch.cat(parts, dim=2)], dim=1)
    return out[:, :, :n]


@dataclass
class S2State:
    """What the registered attention function needs from an attention module."""
    fallback: Callable[..., Any]      # the model's original attention function (eval mode)
    original: str                     # its name in config._attn_implementation
    group_fraction: float


def _right_padded_only(mask: torch.Tensor | None, n: int) -> bool:
    """True when ``mask`` hides no key that precedes a visible one (no padding, or right padding)."""
    if mask is None:
        return True
    if mask.dim() == 4:  # (b, 1, q, k): the last query row sees every real key
        row = mask[:, 0, -1, :]
        valid = row if row.dtype == torch.bool else row == 0
    else:  # (b, k) padding mask (flash-attention implementations)
        valid = mask.bool()
    valid = valid[:, -n:].int()
    return bool((valid[:, 1:] <= valid[:, :-1]).all())


def s2_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0,
                 scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention interface: S2-Attn in training mode, the original function otherwise."""
    state: S2State = module.longlora_s2
    n = query.shape[2]
    if not module.training or key.shape[2] != n or n < 4:
        return state.fallback(module, query, key, value, attention_mask, dropout=dropout,
                              scaling=scaling, **kwargs)
    if not _right_padded_only(attention_mask, n):
        raise ValueError("S2-Attn supports unpadded or right-padded batches only; this batch is "
                         "left-padded (pad on the right for training)")
    rep = query.shape[1] // key.shape[1]
    if rep > 1:
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    out = shifted_sparse_attention(query, key, value, group_size(n, state.group_fraction),
                                   scaling=scaling, dropout=dropout)
    return out.transpose(1, 2).contiguous(), None


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("Attention")
            and hasattr(m, "layer_idx") and hasattr(m, "config")]


def enable_s2_attn(model: nn.Module, group_fraction: float) -> str:
    """Route the model's attention through `s2_attention`; returns the original implementation."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if not 0 < group_fraction <= 1:
        raise ValueError(f"longlora: group_fraction must be in (0, 1], got {group_fraction}")
    original = model.config._attn_implementation or "eager"
    if original.startswith(NAME):
        raise ValueError("longlora: S2-Attn is already enabled on this model")
    modules = _attention_modules(model)
    if not modules:
        raise ValueError("longlora: found no attention module (a *Attention module with layer_idx)")
    eager = getattr(sys.modules[type(modules[0]).__module__], "eager_attention_forward", None)
    fallback = ALL_ATTENTION_FUNCTIONS.get_interface(original, eager)
    if fallback is None:
        raise ValueError(f"longlora: no attention function for implementation {original!r}")
    name = f"{NAME}:{original}"  # one registration per original: the mask function must match it
    AttentionInterface.register(name, s2_attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    for m in modules:
        m.longlora_s2 = S2State(fallback, original, group_fraction)
    model.config._attn_implementation = name
    return original


def disable_s2_attn(model: nn.Module) -> None:
    """Back to the original attention implementation (what `merge` leaves behind)."""
    original = None
    for m in _attention_modules(model):
        state = m.__dict__.pop("longlora_s2", None)
        original = state.original if state is not None else original
    if original is not None:
        model.config._attn_implementation = original


# -- RoPE position interpolation -------------------------------------------------------------
def rotary_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if type(m).__name__.endswith("RotaryEmbedding")]


def scale_rope(model: nn.Module, factor: float) -> None:
    """Linear position interpolation: positions divided by ``factor`` (config and module rebuilt)."""
    if factor < 1:
        raise ValueError(f"longlora: rope_factor must be >= 1 (1 = off), got {factor}")
    if factor == 1:
        return
    config = model.config
    rope = dict(getattr(config, "rope_parameters", None) or {})
    kind = rope.get("rope_type", "default")
    if kind not in ("default", "linear"):
        raise ValueError(f"longlora: the model already uses RoPE type {kind!r}; linear interpolation "
                         f"applies to plain RoPE only (set rope_factor=1)")
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    config.rope_parameters = {**rope, "rope_type": "linear", "factor": float(rope.get("factor", 1.0)) * factor}
    found = rotary_modules(model)
    if not found:
        raise ValueError("longlora: found no rotary-embedding module to rebuild")
    for name, old in found:
        new = type(old)(old.config).to(old.inv_freq.device)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def resolve_rope_factor(value: Any, target_length: int, config: Any) -> float:
    if value == "auto":
        rope = getattr(config, "rope_parameters", None) or {}
        original = rope.get("original_max_position_embeddings") or config.max_position_embeddings
        return max(1.0, target_length / original)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"longlora: rope_factor must be 'auto' or a number >= 1, got {value!r}") from None


# -- the method ------------------------------------------------------------------------------
def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


class LongLoRA(LoRA):
    name = "longlora"
    summary = "LoRA on q,k,v,o + trainable embeddings and norms, RoPE interpolation, S2-Attn in training"
    defaults = {"r": 8, "alpha": 16, "dropout": 0.0, "targets": "attn", "rank_scaling": "standard",
                "train_embeddings": True, "train_norms": True, "untie_lm_head": True,
                "rope_factor": "auto", "target_length": None, "s2_attn": True, "group_fraction": 0.25}

    @hookimpl
    def inject(self, model: nn.Module, ctx: TrainState) -> None:
        p = self.params
        if ctx.model_type not in SUPPORTED:
            raise ValueError(f"longlora supports Llama-architecture models ({', '.join(SUPPORTED)}: "
                             f"SmolLM2, Llama); this model is {ctx.model_type!r}")
        freeze_and_inject(model, ctx, self.make_layer)
        if p["train_embeddings"]:
            emb, out = model.get_input_embeddings(), model.get_output_embeddings()
            tied = out is not None and out.weight is emb.weight
            if tied and p["untie_lm_head"]:  # the head keeps the original matrix, frozen
                out.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
                model.config.tie_word_embeddings = False
            emb.weight.requires_grad_(True)
            ctx.extras["lm_head_untied"] = bool(tied and p["untie_lm_head"])
        if p["train_norms"]:
            for module in model.modules():
                if _is_norm(module):
                    for param in module.parameters(recurse=False):
                        param.requires_grad_(True)
        target = int(p["target_length"] or ctx.train.max_length)
        factor = resolve_rope_factor(p["rope_factor"], target, model.config)
        scale_rope(model, factor)
        ctx.extras["rope_factor"] = factor
        if p["s2_attn"]:
            enable_s2_attn(model, float(p["group_fraction"]))
            ctx.extras["s2_group_fraction"] = float(p["group_fraction"])

    @hookimpl
    def merge(self, model: nn.Module, ctx: TrainState) -> nn.Module:
        disable_s2_attn(model)
        return merge_adapters(model)

    @hookimpl
    def export_peft(self, model: nn.Module, ctx: TrainState) -> None:
        return None  # PEFT has no S2-Attn nor RoPE scaling: the merged model is the artefact
