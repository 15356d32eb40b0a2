"""DoRA (Liu et al., 2024, arXiv:2402.09353): weight-decomposed low-rank adaptation.

The adapted weight is split into a direction and a magnitude:
``W' = m * V / ||V||`` with ``V = W0 + s B A`` (LoRA's update on the direction) and ``||V||`` the
norm of each output row (over the input dimension). ``m`` (one entry per output feature) trains,
initialised to the row norms of ``W0`` so that the model starts equal to the base; A and B are
LoRA's (Kaiming-uniform A, zero B), the task head trains too.

Choices (as the paper's section 4.3 and Hugging Face PEFT): ``||V||`` is recomputed every forward
and detached, so no gradient flows through the norm (it saves memory; the paper reports no loss of
accuracy). The bias is not scaled. Forward without materialising ``W'``::

    g   = m / ||W0 + s B A||          (the norm under no_grad; out x in, cheap next to a batch)
    out = g * (W0 x + s B A x) + bias

which costs LoRA's forward plus one element-wise scale per output. With branch dropout active in
training, the base term is recomputed on the dropped input, as PEFT does:
``out = base(x) + (g - 1) W0 drop(x) + g s B A drop(x)``. Defaults as LoRA (r 8, alpha 16,
targets ``qv``).

Merge: ``W = (m / ||W0 + s B A||) * (W0 + s B A)`` row-wise into the base weight (transposed for
GPT-2's Conv1D), bias unchanged; the result is the original architecture.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harness.lowrank import LowRankLinear, base_weight
from harness.state import TrainState
from methods.lora import LoRA


class DoRALinear(LowRankLinear):
    """``out = (m / ||W0 + s B A||_row) * (W0 x + s B A x) + bias`` with the norm detached."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 rank_scaling: str = "standard"):
        super().__init__(base, r=r, alpha=alpha, dropout=dropout, rank_scaling=rank_scaling)
        with torch.no_grad():  # B = 0, so ||V|| = ||W0|| and the layer starts equal to the base
            self.m = nn.Parameter(torch.linalg.vector_norm(base_weight(base), dim=1).clone())

    def weight_norm(self) -> torch.Tensor:
        """Row norms of ``V = W0 + s B A``, outside the graph (the paper's detached norm)."""
        with torch.no_grad():
            v = torch.addmm(base_weight(self.base).to(self.A.dtype), self.B, self.A, alpha=self.scale)
            return torch.linalg.vector_norm(v, dim=1)

    def _dropout_active(self) -> bool:
        return self.training and isinstance(self.dropout, nn.Dropout) and self.dropout.p > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.m / self.weight_norm()  # gradient reaches m only
        w0 = base_weight(self.base)
        bias = self.base.bias
        if self._dropout_active():
            xd = self.dropout(x).to(self.A.dtype)
            lora = F.linear(F.linear(xd, self.A), self.B)
            return self.base(x) + (g - 1) * F.linear(xd, w0.to(xd.dtype)) + (g * self.scale) * lora
        x = x.to(self.A.dtype)
        # One base matmul without bias, LoRA's two thin ones added in place (the matmul's backward
        # does not need its output), then scale and add the bias in one op that saves y for m.
        y = F.linear(x, w0.to(x.dtype))
        y.add_(F.linear(F.linear(x, self.A), self.B), alpha=self.scale)
        return y * g if bias is None else torch.addcmul(bias.to(y.dtype), y, g)

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        # DoRA rescales the base term too, so its branch is the whole change of the output.
        return self.forward(x) - self.base(x)

    def delta_weight(self) -> torch.Tensor:
        w0 = base_weight(self.base)
        v = torch.addmm(w0.to(self.A.dtype), self.B, self.A, alpha=self.scale)
        g = self.m / torch.linalg.vector_norm(v, dim=1)
        return (g[:, None] * v).to(w0.dtype) - w0

    def extra_repr(self) -> str:
        return super().extra_repr() + ", magnitude=row"


class DoRA(LoRA):
    name = "dora"
    summary = "LoRA on the direction plus a trainable per-row magnitude (W' = m V / ||V||)"
    defaults = dict(LoRA.defaults)
    layer_class = DoRALinear

    # Export: PEFT's LORA format with use_dora, the magnitude under its own key.
    def peft_config(self, names: list[str], ctx: TrainState) -> dict[str, Any]:
        return {**super().peft_config(names, ctx), "use_dora": True}

    def peft_tensors(self, name: str, layer: nn.Module) -> dict[str, Any]:
        return {**super().peft_tensors(name, layer), f"{name}.lora_magnitude_vector": layer.m}
