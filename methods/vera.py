"""VeRA (Kopiczko et al., 2024, arXiv:2310.11454): vector-based random matrix adaptation.

One pair of random matrices ``A: (r, max_in)``, ``B: (max_out, r)`` is frozen and shared by every
adapted layer; each layer uses the slices ``A[:, :in]`` and ``B[:out, :]`` and trains only two
vectors, ``lambda_b`` (out, initialised 0) and ``lambda_d`` (r, initialised ``d_initial`` = 0.1)::

    h = W0 x + lambda_b * (B_sl (lambda_d * (A_sl x)))

with no alpha/r scaling. The task head trains as for every method.

Choices:
- The shared pair is Kaiming-uniform (fan-in, gain sqrt(2)) drawn from a CPU
  ``torch.Generator`` seeded with ``projection_seed``, A first then B, exactly as Hugging Face
  PEFT's ``VeraConfig(projection_prng_key=...)``: the same seed gives PEFT's matrices, and the pair
  is reproducible from the seed alone. It is also *saved with the model*: both are persistent
  buffers of one `SharedProjection` module attached once to the model's root (attribute
  ``vera_projection``), so ``state_dict`` carries one copy; layers hold a plain (unregistered)
  reference to it, so the copy is not repeated per layer.
- ``r`` defaults to 256. The paper uses 1024 on RoBERTa-base (hidden 768) for GLUE; our default
  model MiniLM has hidden 384, and r 256 keeps the frozen branch cheaper than the base matmul
  while giving each layer 256 trainable scales (r only adds trainable ``lambda_d`` entries and
  frozen shared memory). Raise it with ``--set vera.r=1024`` for paper settings.
- The paper trains VeRA with learning rates about 10x LoRA's (its vectors move slowly); the
  harness's run-wide ``lr`` applies unless a profile or ``--set vera.lr=...`` changes it.
- Dropout on the branch input, 0 by default (PEFT's ``vera_dropout``); targets ``qv``.

Merge: ``W = W0 + diag(lambda_b) B_sl diag(lambda_d) A_sl`` into each base weight; the shared
module is removed, so the merged model has exactly the original state_dict keys.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harness.hookspecs import hookimpl
from harness.lowrank import (AdaptedLinear, adapted_modules, base_weight, inject_adapters, layer_dims,
                             merge_adapters)
from harness.plugins import Method
from harness.state import TrainState
from harness.targets import find_target_modules

SHARED_ATTR = "vera_projection"


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform over fan-in with gain sqrt(2), from ``generator`` (PEFT's ``_kaiming_init``)."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class SharedProjection(nn.Module):
    """The frozen random pair shared by all layers, as persistent buffers (saved with the model)."""

    def __init__(self, r: int, max_in: int, max_out: int, seed: int):
        super().__init__()
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        self.register_buffer("A", kaiming_uniform((r, max_in), g), persistent=True)
        self.register_buffer("B", kaiming_uniform((max_out, r), g), persistent=True)

    def extra_repr(self) -> str:
        return f"r={self.A.shape[0]}, max_in={self.A.shape[1]}, max_out={self.B.shape[0]}"


class VeRALinear(AdaptedLinear):
    """``h = W0 x + lambda_b * (B[:out] (lambda_d * (A[:, :in] x)))`` with A, B shared and frozen."""

    def __init__(self, base: nn.Module, shared: SharedProjection, d_initial: float = 0.1,
                 dropout: float = 0.0):
        super().__init__(base)
        r, max_in = shared.A.shape
        if self.in_features > max_in or self.out_features > shared.B.shape[0]:
            raise ValueError(f"layer ({self.in_features} -> {self.out_features}) exceeds the shared "
                             f"projection ({max_in} -> {shared.B.shape[0]})")
        # A plain attribute, not a submodule: the model root owns the one registered copy.
        object.__setattr__(self, "_shared", shared)
        w = base_weight(base)
        self.r = r
        self.lambda_b = nn.Parameter(torch.zeros(self.out_features, dtype=w.dtype, device=w.device))
        self.lambda_d = nn.Parameter(torch.full((r,), float(d_initial), dtype=w.dtype, device=w.device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _slices(self) -> tuple[torch.Tensor, torch.Tensor]:
        shared = self._shared
        return shared.A[:, :self.in_features], shared.B[:self.out_features, :]

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self._slices()
        x = self.dropout(x).to(self.lambda_d.dtype)
        return self.lambda_b * F.linear(self.lambda_d * F.linear(x, a.to(x.dtype)), b.to(x.dtype))

    def delta_weight(self) -> torch.Tensor:
        a, b = self._slices()
        d = self.lambda_d
        return self.lambda_b[:, None] * ((b.to(d.dtype) * d) @ a.to(d.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r} (shared)"


class VeRA(Method):
    name = "vera"
    summary = "one frozen random pair shared by all layers; trains per-layer scaling vectors b, d"
    defaults = {"r": 256, "d_initial": 0.1, "dropout": 0.0, "projection_seed": 0, "targets": "qv"}

    @hookimpl
    def inject(self, model: nn.Module, ctx: TrainState) -> None:
        p = self.params
        for param in model.parameters():
            param.requires_grad_(False)
        names = find_target_modules(model, ctx.targets, exclude=ctx.head_names)
        dims = [layer_dims(model.get_submodule(n)) for n in names]
        w = base_weight(model.get_submodule(names[0]))
        shared = SharedProjection(int(p["r"]), max(i for i, _ in dims), max(o for _, o in dims),
                                  p["projection_seed"]).to(device=w.device, dtype=w.dtype)
        model.add_module(SHARED_ATTR, shared)
        inject_adapters(model, ctx.targets,
                        lambda name, layer: VeRALinear(layer, shared, p["d_initial"], p["dropout"]),
                        exclude=ctx.head_names)
        ctx.extras["adapted_modules"] = len(names)

    @hookimpl
    def export_peft(self, model: nn.Module, ctx: TrainState) -> dict[str, Any]:
        """PEFT's VERA format: per-layer lambdas and the shared pair (``save_projection``)."""
        p = self.params
        layers = {n: m for n, m in adapted_modules(model) if isinstance(m, VeRALinear)}
        tensors: dict[str, Any] = {}
        for name, layer in layers.items():
            tensors[f"{name}.vera_lambda_b"] = layer.lambda_b
            tensors[f"{name}.vera_lambda_d"] = layer.lambda_d
        shared = getattr(model, SHARED_ATTR)
        config = {"peft_type": "VERA", "r": int(p["r"]), "target_modules": sorted(layers),
                  "projection_prng_key": int(p["projection_seed"]), "save_projection": True,
                  "vera_dropout": p["dropout"], "d_initial": p["d_initial"], "bias": "none",
                  "fan_in_fan_out": ctx.model_type == "gpt2"}
        # PEFT keeps the shared pair at the top of its wrapper, outside ``base_model.model``.
        return {"config": config, "tensors": tensors,
                "absolute_tensors": {"base_model.vera_A": shared.A, "base_model.vera_B": shared.B}}

    @hookimpl
    def merge(self, model: nn.Module, ctx: TrainState) -> nn.Module:
        merged = merge_adapters(model)
        if hasattr(merged, SHARED_ATTR):
            delattr(merged, SHARED_ATTR)
        return merged
