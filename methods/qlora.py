"""QLoRA (Dettmers et al., 2023, arXiv:2305.14314): LoRA over a 4-bit NormalFloat base model.

Every adapted linear's frozen weight is stored as NF4 (16-value code book for normally
distributed weights), quantised in row-major blocks of 64 with one absmax each; *double
quantisation* stores those absmaxes again 8-bit in blocks of 256 (minus their mean), about
0.127 instead of 0.5 bits of scale per parameter. The forward pass dequantises to the compute
dtype and adds LoRA's ``s * B A x``; only A, B (and the task head) train.

Choices:
- Quantisation is bitsandbytes' own (``bnb.nn.Linear4bit``, ``quant_type="nf4"``,
  ``compress_statistics=True``, blocks 64/256); it runs on the CPU as well as on CUDA
  (checked with bitsandbytes 0.50), a dependency of the package; where it is missing the
  method fails at injection with an instruction to install it.
- Compute dtype is the base weight's original dtype (fp32 in our runs); biases, norms and
  embeddings stay unquantised in their dtype, as the paper keeps norms in fp32.
- Defaults as the paper: LoRA on every linear but the task head (``targets: all-linear``),
  r 64, alpha 16, dropout 0.1 (its choice for 7B-13B models). We keep r 64 for small models too
  (the method is defined by it); lower it with ``--set qlora.r=16`` for a cheaper run.
- A and B are Kaiming-uniform/zero in the base weight's dtype, as our LoRA (PEFT's convention).
- ``count_trainable`` also reports ``total`` by logical shape, since a packed 4-bit tensor holds
  two weights per stored element.
- Recorded in the run's extras: ``quantized_bytes_per_param`` (packed NF4 weights plus absmax,
  second-level absmax, offsets and code books, over the quantised weights' count; about 0.52) and
  ``base_bytes_per_param`` (the whole frozen base model: quantised linears plus everything left
  in full precision, embeddings included).

Merge: each layer is dequantised to the original dtype and ``s B A`` is added, giving a plain
``nn.Linear`` (or GPT-2 ``Conv1D``) in high precision: ``W = dequant(W_nf4) + s B A``. The merged
model therefore equals the adapted one, whose base *is* ``dequant(W_nf4)``; it does not equal
the unquantised original model, and it is not re-quantised (that would add quantisation error).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from harness.hookspecs import hookimpl
from harness.lowrank import LowRankLinear, adapted_modules, base_weight, freeze_and_inject, merge_adapters
from harness.plugins import Method
from harness.state import TrainState

BLOCK_SIZE = 64  # bitsandbytes' default 4-bit block; the paper's


def _bnb() -> Any:
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("qlora needs bitsandbytes for its NF4 base weights: "
                          "pip install bitsandbytes") from e
    return bnb


def _quantize(layer: nn.Module) -> nn.Module:
    """An NF4 double-quantised ``Linear4bit`` computing what ``layer`` computes (in its dtype)."""
    bnb = _bnb()
    w = base_weight(layer).detach()
    out_f, in_f = w.shape
    bias = getattr(layer, "bias", None)
    q = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=w.dtype,
                          compress_statistics=True, quant_type="nf4", device="meta")
    q.weight = bnb.nn.Params4bit(w.contiguous().cpu(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=True, blocksize=BLOCK_SIZE)
    if bias is not None:
        q.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    q = q.to(w.device)  # moving to a device is what quantises the weight in bitsandbytes
    # bitsandbytes >= 0.49 on a CPU with AVX512-BF16 re-packs the weight at the first no-grad
    # eval forward, with its absmax rounded to bf16: evaluation would then compute with another
    # weight than training and the merge (and it fails outright for in_features < 64). Keep the
    # one NF4 weight everywhere.
    if hasattr(q, "support_avx512bf16_for_cpu"):
        q.support_avx512bf16_for_cpu = False
    return q


def dequantized_weight(q: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight that a ``Linear4bit`` computes with."""
    bnb = _bnb()
    return bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state)


def quantized_bytes(q: nn.Module, seen: set[int]) -> int:
    """Bytes held by a ``Linear4bit`` weight: packed data plus every scale and code book.

    Code books shared between layers (bitsandbytes caches the 8-bit one) count once (``seen``).
    """
    qs = q.weight.quant_state
    tensors = [q.weight.data, qs.absmax, qs.code]
    if qs.nested:
        tensors += [qs.offset, qs.state2.absmax, qs.state2.code]
    total = 0
    for t in tensors:
        if t is None:
            continue
        key = t.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


class QLoRALinear(LowRankLinear):
    """``h = dequant(W_nf4) x + s B A x``; the base is a bitsandbytes ``Linear4bit``."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__(base, r=r, alpha=alpha, dropout=dropout)
        self.conv1d = type(base).__name__ == "Conv1D"
        self.orig_dtype = base_weight(base).dtype
        self.base = _quantize(base)

    def merged_base(self) -> nn.Module:
        with torch.no_grad():
            w = dequantized_weight(self.base).to(self.orig_dtype) + self.delta_weight().to(self.orig_dtype)
            bias = self.base.bias
            if self.conv1d:
                from transformers.pytorch_utils import Conv1D

                plain = Conv1D(self.out_features, self.in_features).to(w.device, self.orig_dtype)
                plain.weight.copy_(w.T)
                plain.bias.copy_(bias)
            else:
                plain = nn.Linear(self.in_features, self.out_features, bias=bias is not None,
                                  device=w.device, dtype=self.orig_dtype)
                plain.weight.copy_(w)
                if bias is not None:
                    plain.bias.copy_(bias)
        return plain


class QLoRA(Method):
    name = "qlora"
    summary = "LoRA on every linear over an NF4 double-quantised frozen base (bitsandbytes)"
    defaults = {"r": 64, "alpha": 16, "dropout": 0.1, "targets": "all-linear"}

    def make_layer(self, name: str, layer: nn.Module) -> QLoRALinear:
        p = self.params
        return QLoRALinear(layer, r=p["r"], alpha=p["alpha"], dropout=p["dropout"])

    @hookimpl
    def inject(self, model: nn.Module, ctx: TrainState) -> None:
        _bnb()  # fail before touching the model when bitsandbytes is missing
        freeze_and_inject(model, ctx, self.make_layer)
        ctx.extras.update(self.memory(model, ctx))

    def memory(self, model: nn.Module, ctx: TrainState) -> dict[str, float]:
        """Weight memory of the frozen base model (adapters and task head excluded)."""
        seen: set[int] = set()
        q_bytes = q_params = 0
        for _, layer in adapted_modules(model):
            if isinstance(layer, QLoRALinear):
                q_bytes += quantized_bytes(layer.base, seen)
                q_params += layer.in_features * layer.out_features
        other_bytes = other_params = 0
        for name, p in model.named_parameters():
            if p.requires_grad or ctx.is_head(name) or _is_quantized(p):
                continue  # adapters and head are not base weights; quantised ones counted above
            other_bytes += p.numel() * p.element_size()
            other_params += p.numel()
        return {
            "quantized_params": q_params,
            "quantized_bytes": q_bytes,
            "quantized_bytes_per_param": q_bytes / max(1, q_params),
            "base_bytes_per_param": (q_bytes + other_bytes) / max(1, q_params + other_params),
        }

    @hookimpl
    def count_trainable(self, model: nn.Module, ctx: TrainState) -> dict[str, int]:
        method = head = total = 0
        for name, p in model.named_parameters():
            n = _logical_numel(p)
            total += n
            if p.requires_grad:
                if ctx.is_head(name):
                    head += n
                else:
                    method += n
        return {"method": method, "head": head, "total": total}

    @hookimpl
    def merge(self, model: nn.Module, ctx: TrainState) -> nn.Module:
        return merge_adapters(model)


def _is_quantized(p: torch.Tensor) -> bool:
    return getattr(p, "quant_state", None) is not None


def _logical_numel(p: torch.Tensor) -> int:
    qs = getattr(p, "quant_state", None)
    return int(torch.Size(qs.shape).numel()) if qs is not None else p.numel()
