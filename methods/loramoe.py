"""LoRAMoE (Dou et al., 2023, arXiv:2312.09979): a mixture of LoRA experts on the feed-forward layers.

The paper keeps the backbone frozen and puts ``N`` LoRA experts and a router on each feed-forward
linear: ``y = W0 x + sum_i g_i(x) s B_i A_i x`` with ``g(x) = softmax(R x)``, a dense (every
expert, every token) softmax over a bias-free linear router ``R: in -> N``. Experts are split into
groups meant for different kinds of data; a *localized balancing constraint* keeps the routing
balanced within a group while letting a group specialise: with ``Q[n, m]`` the router weight of
expert ``n`` summed over the tokens of sample ``m`` and ``I[n, m] = 1 + delta`` when expert ``n``'s
group is sample ``m``'s type (``1 - delta`` otherwise), ``Z = I * Q`` and the loss is
``beta * Var(Z) / Mean(Z)^2`` (the squared coefficient of variation). Paper: 6 experts,
``beta = delta = 0.1``.

Our choices:

- Targets ``mlp`` (BERT's intermediate and output dense; Llama's gate, up and down projections),
  6 experts of rank 4, ``alpha`` 8 (``s = alpha / r = 2``, our LoRA's scale), no branch dropout,
  router initialised as ``nn.Linear`` (Kaiming-uniform), experts as LoRA (A Kaiming-uniform, B zero,
  so the model starts equal to the base). Router and experts run in the layer's dtype; the softmax
  in fp32.
- Sample type = the batch's task (``ctx.current_task``; the multitask suite gives one task per
  batch). The experts are split into contiguous groups, one per task of the suite (expert ``i`` of
  ``N`` in group ``floor(i * G / N)``, ``G = min(tasks, N)``; task ``k`` owns group ``k mod G``).
  A single-task run has one type and one group: every ``I`` is ``1 + delta`` and the constraint is
  plain balancing.
- ``Q`` sums over real tokens only (the attention mask); ``Var`` is the unbiased sample variance
  over all ``N x batch`` entries (``torch.var``, as the ``cv_squared`` the MoE reference code
  uses), with ``1e-10`` added to the denominator; the loss is averaged over the adapted layers and
  added through the ``extra_loss`` hook in training only.

Merge: none. The routing weights depend on each token's input, so the experts cannot be folded
into one weight matrix (``mergeable = False``; the table says so).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.hookspecs import hookimpl
from harness.lowrank import AdaptedLinear, adapted_modules, base_weight, freeze_and_inject, low_rank_pair
from harness.plugins import Method
from harness.state import TrainState


class MoELoRALinear(AdaptedLinear):
    """``y = W0 x + sum_i softmax(R x)_i * s B_i A_i x``; keeps the last training routing."""

    def __init__(self, base: nn.Module, experts: int, r: int, alpha: float, dropout: float = 0.0):
        super().__init__(base)
        if experts < 1:
            raise ValueError(f"experts must be at least 1, got {experts}")
        w = base_weight(base)
        pairs = [low_rank_pair(r, self.in_features, self.out_features, w) for _ in range(experts)]
        self.A = nn.Parameter(torch.stack([a.data for a, _ in pairs]))   # (N, r, in)
        self.B = nn.Parameter(torch.stack([b.data for _, b in pairs]))   # (N, out, r)
        self.router = nn.Linear(self.in_features, experts, bias=False, dtype=w.dtype, device=w.device)
        self.experts, self.r, self.scale = experts, r, alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.gates: torch.Tensor | None = None  # (..., N) of the last training forward

    def route(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.router(x).float(), dim=-1).to(x.dtype)

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.A.dtype)
        gates = self.route(x)
        if self.training:
            self.gates = gates
        n, r = self.experts, self.r
        # All experts' A in one GEMM, weight each expert's rank-r code by its gate, then all B in
        # one GEMM: sum_i g_i B_i A_i x without an (experts x out) intermediate per token.
        z = F.linear(self.dropout(x), self.A.reshape(n * r, -1)).unflatten(-1, (n, r))
        z = (z * gates.unsqueeze(-1)).flatten(-2)
        return F.linear(z, self.B.permute(1, 0, 2).reshape(self.out_features, n * r)) * self.scale

    def delta_weight(self) -> torch.Tensor:  # pragma: no cover - routing is input-dependent
        raise NotImplementedError("LoRAMoE's update depends on the input: it has no weight form")

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, experts={self.experts}, r={self.r}"


def expert_groups(experts: int, types: int) -> torch.Tensor:
    """Group of each expert: contiguous, ``G = min(types, experts)`` groups."""
    g = min(max(types, 1), experts)
    return torch.tensor([i * g // experts for i in range(experts)])


def balancing_loss(gates: torch.Tensor, mask: torch.Tensor | None, sample_group: torch.Tensor,
                   groups: torch.Tensor, delta: float) -> torch.Tensor:
    """``Var(Z) / Mean(Z)^2`` with ``Z[n, m] = (1 +- delta) * sum_tokens gates[m, :, n]``.

    ``gates``: ``(batch, tokens, N)``; ``mask``: ``(batch, tokens)`` or None; ``sample_group``:
    ``(batch,)``, the expert group each sample's type owns; ``groups``: ``(N,)``.
    """
    g = gates.float()
    if mask is not None:
        g = g * mask.unsqueeze(-1).to(g.dtype)
    q = g.sum(dim=1).T                                                   # (N, batch)
    match = groups.to(q.device)[:, None] == sample_group.to(q.device)[None, :]
    z = q * torch.where(match, 1.0 + delta, 1.0 - delta)
    return z.var() / (z.mean() ** 2 + 1e-10)


class LoRAMoE(Method):
    name = "loramoe"
    summary = "mixture of LoRA experts with a softmax router on the FFN linears; localized balancing loss"
    mergeable = False
    defaults = {"experts": 6, "r": 4, "alpha": 8, "dropout": 0.0, "targets": "mlp",
                "beta": 0.1, "delta": 0.1}

    @hookimpl
    def inject(self, model: nn.Module, ctx: TrainState) -> None:
        p = self.params
        freeze_and_inject(model, ctx, lambda _, layer: MoELoRALinear(
            layer, experts=int(p["experts"]), r=int(p["r"]), alpha=p["alpha"], dropout=p["dropout"]))
        self.types: list[str | None] = ctx.task_names or [None]  # None: a single-task run
        self.groups = expert_groups(int(p["experts"]), len(self.types))
        ctx.extras["expert_groups"] = {str(t): [i for i, g in enumerate(self.groups.tolist())
                                                if g == self._group(t)] for t in self.types}

    def _group(self, task: str | None) -> int:
        """The expert group that samples of ``task`` weight up."""
        if task not in self.types:
            if len(self.types) > 1:
                raise ValueError(f"LoRAMoE: the batch's task {task!r} is none of {self.types}")
            task = self.types[0]
        return self.types.index(task) % (int(self.groups.max()) + 1)

    @hookimpl
    def extra_loss(self, model: nn.Module, batch: dict, outputs, ctx: TrainState) -> torch.Tensor | None:
        if not model.training or not self.params["beta"]:
            return None
        layers = [m for _, m in adapted_modules(model) if isinstance(m, MoELoRALinear) and m.gates is not None]
        if not layers:
            return None
        group = self._group(ctx.current_task)  # one task per batch: one sample type
        mask = batch.get("attention_mask")
        losses = []
        for m in layers:
            gates = m.gates
            m.gates = None  # the graph is freed with this batch's backward
            if gates.dim() == 2:  # (tokens, N): one sample
                gates = gates.unsqueeze(0)
            real = mask if mask is not None and mask.shape == gates.shape[:2] else None
            losses.append(balancing_loss(gates, real, torch.full((gates.shape[0],), group),
                                         self.groups, self.params["delta"]))
        return self.params["beta"] * torch.stack(losses).mean()
