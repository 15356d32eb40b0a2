"""AdaLoRA (Zhang et al., 2023, arXiv:2303.10512): LoRA whose rank is reallocated while training.

Each target linear computes ``h = W0 x + s * P diag(E) Q x`` (an SVD-like form: P ``(out, r)``,
E ``(r,)``, Q ``(r, in)``), ``s = alpha / r_init`` fixed. A global budget of singular values
shrinks during training; the least important triplets ``(P[:, i], E[i], Q[i, :])`` are masked by
zeroing ``E[i]``:

- sensitivity ``I = |theta * grad|`` per entry, smoothed ``I_bar = b1 I_bar + (1 - b1) I``,
  uncertainty ``U_bar = b2 U_bar + (1 - b2) |I - I_bar|`` (with the updated ``I_bar``, as the
  authors' and PEFT's code), entry score ``I_bar * U_bar``;
- triplet score = ``E[i]``'s score + mean score of row i of Q + mean score of column i of P;
- budget (total rank over all layers): ``b0 = r_init * layers`` up to step ``t_init``, then
  ``b(t) = b_T + (b0 - b_T) (1 - (t - t_init) / (T - t_init - t_final))^3`` (floored to an
  integer), ``b_T = target_r * layers`` for the last ``t_final`` steps;
- every ``delta_t`` steps of the decay phase, the ``b(t)`` best triplets over all layers keep
  their E entry and the others are zeroed (they may regrow before the next allocation, as in the
  paper's code); from step ``T - t_final`` on, the mask is fixed at ``b_T`` and applied after
  every step;
- orthogonality regulariser ``weight * mean over matrices ||P^T P - I||_F, ||Q Q^T - I||_F``,
  added to the loss through ``extra_loss``.

Scores and masks are computed in ``on_step`` (after ``optimizer.step()``, before ``zero_grad()``:
the step's gradients are still there), as the reference ``update_and_allocate``.

Choices:
- P and Q Gaussian with std 0.02, E zero (the code's init; the adapted model starts equal to the
  base). Exactly ``b(t)`` triplets survive each allocation (top-k; ties broken by order) rather
  than "above the k-th value", which can keep fewer on ties.
- The orthogonality loss averages over matrices (P and Q of each layer count separately), as the
  authors' ``compute_orth_regu``; weight 0.1 (theirs; PEFT's default is 0.5).
- Schedule defaults are fractions of the run so they fit our short runs (a value < 1 is a
  fraction of the optimizer steps, >= 1 an absolute count): ``t_init`` 0.1, ``t_final`` 0.2,
  ``delta_t`` 0.01 (at least 1 step). The paper's GLUE runs use thousands of steps, ``delta_T`` 100.
- ``r_init`` 12, ``target_r`` 8 (PEFT's defaults: a final average rank of LoRA's r 8), alpha 16,
  dropout 0, targets ``attn`` (every attention projection; the paper adapts all of them, plus the
  feed-forward linears).
- PEFT's layer scales by ``alpha / (r_init + 1e-5)``; we scale by ``alpha / r_init`` exactly.
- Recorded in the extras: ``final_ranks`` (per adapted matrix), ``final_total_rank``,
  ``budget_target``, and ``allocations`` (step, budget, kept rank after masking).

Merge: ``W = W0 + s P diag(E) Q`` with the final (masked) E; masked triplets add nothing. The
returned model is the plain original architecture.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harness.hookspecs import hookimpl
from harness.lowrank import (AdaptedLinear, adapted_modules, freeze_and_inject, merge_adapters,
                             resolve_steps)
from harness.plugins import Method
from harness.state import TrainState


class SVDLinear(AdaptedLinear):
    """``h = W0 x + s * P diag(E) Q x``; ``mask`` marks the triplets the budget kept."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__(base)
        if r <= 0:
            raise ValueError(f"rank must be positive, got r={r}")
        w = self.base.weight
        self.r = r
        self.scale = alpha / r  # r_init, never the current rank
        self.P = nn.Parameter(torch.randn(self.out_features, r, dtype=w.dtype, device=w.device) * 0.02)
        self.E = nn.Parameter(torch.zeros(r, dtype=w.dtype, device=w.device))
        self.Q = nn.Parameter(torch.randn(r, self.in_features, dtype=w.dtype, device=w.device) * 0.02)
        self.register_buffer("mask", torch.ones(r, dtype=torch.bool, device=w.device), persistent=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x).to(self.Q.dtype)
        return F.linear(F.linear(x, self.Q) * self.E, self.P) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return (self.P * self.E) @ self.Q * self.scale

    def rank(self) -> int:
        return int(self.mask.sum())

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scale={self.scale:g}"


def budget_at(step: int, b0: int, b_t: int, t_init: int, t_final: int, total: int) -> int:
    """The total rank allowed after ``step`` optimizer steps (cubic decay between the phases)."""
    decay_end = total - t_final
    if step <= t_init:
        return b0
    if step >= decay_end:
        return b_t
    frac = 1 - (step - t_init) / (decay_end - t_init)
    return int(b_t + (b0 - b_t) * frac ** 3)


class AdaLoRA(Method):
    name = "adalora"
    summary = "SVD-form low-rank update whose rank budget is reallocated by importance scores"
    defaults = {"r_init": 12, "target_r": 8, "alpha": 16, "dropout": 0.0, "targets": "attn",
                "t_init": 0.1, "t_final": 0.2, "delta_t": 0.01, "beta1": 0.85, "beta2": 0.85,
                "orth_weight": 0.1}

    def make_layer(self, name: str, layer: nn.Module) -> SVDLinear:
        p = self.params
        return SVDLinear(layer, r=p["r_init"], alpha=p["alpha"], dropout=p["dropout"])

    def _layers(self, model: nn.Module) -> dict[str, SVDLinear]:
        # Cached: extra_loss runs every micro-batch and the layers never change after inject.
        if getattr(self, "_cache", None) is None or self._cache[0] is not model:
            self._cache = (model, {n: m for n, m in adapted_modules(model) if isinstance(m, SVDLinear)})
        return self._cache[1]

    @hookimpl
    def inject(self, model: nn.Module, ctx: TrainState) -> None:
        if not 0 < self.params["target_r"] <= self.params["r_init"]:
            raise ValueError(f"adalora needs 0 < target_r <= r_init, got target_r="
                             f"{self.params['target_r']}, r_init={self.params['r_init']}")
        freeze_and_inject(model, ctx, self.make_layer)

    @hookimpl
    def on_train_start(self, model: nn.Module, ctx: TrainState) -> None:
        p, total = self.params, ctx.total_steps
        n = len(self._layers(model))
        self.b0, self.b_t = p["r_init"] * n, p["target_r"] * n
        self.t_init = resolve_steps(p["t_init"], total)
        self.t_final = min(resolve_steps(p["t_final"], total), max(0, total - self.t_init))
        self.delta_t = max(1, resolve_steps(p["delta_t"], total))
        self.ipt: dict[int, torch.Tensor] = {}  # keyed by id(param): smoothed sensitivity
        self.unc: dict[int, torch.Tensor] = {}  # smoothed uncertainty
        self.final_fixed = False
        ctx.extras.update(budget_initial=self.b0, budget_target=self.b_t,
                          schedule={"t_init": self.t_init, "t_final": self.t_final,
                                    "delta_t": self.delta_t, "total": total})
        ctx.extras["allocations"] = []

    def budget(self, step: int, total: int) -> int:
        return budget_at(step, self.b0, self.b_t, self.t_init, self.t_final, total)

    # -- importance -----------------------------------------------------------------------------
    @torch.no_grad()
    def _update_scores(self, layers: dict[str, SVDLinear]) -> None:
        b1, b2 = self.params["beta1"], self.params["beta2"]
        for layer in layers.values():
            for param in (layer.P, layer.E, layer.Q):
                if param.grad is None:
                    continue
                key = id(param)
                sens = (param * param.grad).abs().float()
                if key not in self.ipt:
                    self.ipt[key] = torch.zeros_like(sens)
                    self.unc[key] = torch.zeros_like(sens)
                self.ipt[key].mul_(b1).add_(sens, alpha=1 - b1)
                self.unc[key].mul_(b2).add_((sens - self.ipt[key]).abs(), alpha=1 - b2)

    def _score(self, param: torch.Tensor) -> torch.Tensor:
        key = id(param)
        if key not in self.ipt:
            return torch.zeros(param.shape, device=param.device)
        return self.ipt[key] * self.unc[key]

    def triplet_scores(self, layer: SVDLinear) -> torch.Tensor:
        """Per singular value: its own score + mean over row i of Q + mean over column i of P."""
        return self._score(layer.E) + self._score(layer.Q).mean(dim=1) + self._score(layer.P).mean(dim=0)

    @torch.no_grad()
    def allocate(self, layers: dict[str, SVDLinear], budget: int) -> int:
        """Keep the ``budget`` best triplets over all layers; zero the other E entries."""
        names = list(layers)
        scores = torch.cat([self.triplet_scores(layers[n]) for n in names])
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep[torch.topk(scores, k=min(budget, scores.numel())).indices] = True
        offset = 0
        for n in names:
            layer = layers[n]
            layer.mask.copy_(keep[offset:offset + layer.r])
            offset += layer.r
            layer.E.masked_fill_(~layer.mask, 0.0)
        return int(keep.sum())

    # -- hooks ----------------------------------------------------------------------------------
    @hookimpl
    def on_step(self, model: nn.Module, ctx: TrainState) -> None:
        layers = self._layers(model)
        step, total = ctx.step, ctx.total_steps
        if step >= total - self.t_final:  # final phase: one last allocation at b_T, then fixed
            if not self.final_fixed:
                if step <= total - self.t_final:
                    self._update_scores(layers)  # this step still belongs to the decay
                kept = self.allocate(layers, self.b_t)
                ctx.extras["allocations"].append((step, self.b_t, kept))
                self.final_fixed = True
            with torch.no_grad():
                for layer in layers.values():
                    layer.E.masked_fill_(~layer.mask, 0.0)
        else:
            self._update_scores(layers)
            if step > self.t_init and (step - self.t_init) % self.delta_t == 0:
                b = self.budget(step, total)
                kept = self.allocate(layers, b)
                ctx.extras["allocations"].append((step, b, kept))

    @hookimpl
    def on_train_end(self, model: nn.Module, ctx: TrainState) -> None:
        self._record(self._layers(model), ctx)

    def _record(self, layers: dict[str, SVDLinear], ctx: TrainState) -> None:
        ranks = {n: layer.rank() for n, layer in layers.items()}
        ctx.extras["final_ranks"] = ranks
        ctx.extras["final_total_rank"] = sum(ranks.values())
        ctx.extras["effective_params"] = sum(
            ranks[n] * (layer.in_features + layer.out_features + 1) for n, layer in layers.items())

    @hookimpl
    def extra_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], outputs: Any,
                   ctx: TrainState) -> torch.Tensor | None:
        weight = self.params["orth_weight"]
        if not weight:
            return None
        terms = []
        for layer in self._layers(model).values():
            for cov in (layer.P.T @ layer.P, layer.Q @ layer.Q.T):
                eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
                terms.append(torch.linalg.matrix_norm(cov - eye, ord="fro"))
        return weight * torch.stack(terms).mean() if terms else None

    @hookimpl
    def export_peft(self, model: nn.Module, ctx: TrainState) -> dict[str, Any]:
        """PEFT's ADALORA format: ``lora_A`` = Q, ``lora_B`` = P, ``lora_E`` = E as a column.

        Pruned triplets are exported as zero entries of E at full ``init_r`` (PEFT's scaling
        ``alpha / ranknum`` uses ``init_r`` too), so the outputs are the same without a rank
        pattern.
        """
        p = self.params
        layers = self._layers(model)
        tensors: dict[str, Any] = {}
        for name, layer in layers.items():
            tensors[f"{name}.lora_A"] = layer.Q
            tensors[f"{name}.lora_B"] = layer.P
            tensors[f"{name}.lora_E"] = (layer.E * layer.mask).unsqueeze(1)
        config = {"peft_type": "ADALORA", "r": p["target_r"], "init_r": p["r_init"],
                  "target_r": p["target_r"], "lora_alpha": p["alpha"], "lora_dropout": p["dropout"],
                  "target_modules": sorted(layers), "total_step": max(1, ctx.total_steps),
                  "bias": "none", "fan_in_fan_out": ctx.model_type == "gpt2"}
        return {"config": config, "tensors": tensors}

    @hookimpl
    def merge(self, model: nn.Module, ctx: TrainState) -> nn.Module:
        return merge_adapters(model)
