"""MTLoRA (Agiza et al., CVPR 2024, arXiv:2403.20320): low-rank adaptation for multi-task learning.

The paper adapts a hierarchical vision transformer (Swin) shared by several dense-prediction tasks:
*task-agnostic* low-rank pairs (TA-LoRA) on the linears of every block, shared by all tasks, and
*task-specific* pairs (TS-LoRA, one per task) at the end of each stage, which turn the shared
stream into one stream per task for that task's decoder. The shared stream continues through the
backbone. The authors' code uses shared rank 64, task rank 4, fixed (untrained) scales 4.0 and
branch dropout 0.05 on qkv, proj, fc1 and fc2; pretrained weights frozen; decoders trained.

Here (a text encoder with one classification head per task, the multitask suite):

- Shared pairs ``s B A`` on the targets (default ``all``: attention and feed-forward linears, the
  paper's qkv/proj/fc1/fc2), in every block: `harness.lowrank.LowRankLinear` with its scale set to
  ``scale`` (``alpha = scale * r``), not ``alpha / r``.
- Task-specific pairs on the same linears of the last ``task_layers`` blocks (default 1; the
  stream a head reads comes out of the last block, as each stage's last block in the paper). A
  batch of task ``t`` (``ctx.current_task``, set by the core from the batch) runs
  ``W0 x + s B A x + s_t B_t A_t x`` there: its own stream, the other tasks' pairs untouched.
  The authors' default mode adds only the task pair in a task stream (``W0 x + s_t B_t A_t x``);
  we keep the shared pair in it too (their ``matrixv2`` mode) so that the shared pairs of the last
  block train at all: with one stream per batch, no head reads a shared-only output there.
- Sizes scaled to the model: MiniLM is 384 wide with 6 blocks, half the width of Swin-T's last
  stage (768) where rank 64 was chosen; the default shared rank is 32 (the same rank-to-width
  ratio), the task rank stays 4 (already the smallest useful), scales 4.0, dropout 0.05.
- A single-task run has one task-specific pair (named ``task``), used for every batch.
- The per-task heads are the suite's (``heads``); they train as for every method.

Merge: the shared pairs fold into their base weights (``W0 + s B A``), as LoRA's. The
task-specific pairs cannot fold (each task needs its own): they stay as separate modules over the
merged weights, and the returned model is the original architecture plus those modules. So the
method is not *mergeable into plain weights* (``mergeable = False``); the merge check still
compares the merged model's logits with the adapted one's, per task, and the record's extras say
what was folded (``merge``).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from harness.hookspecs import hookimpl
from harness.lowrank import (LowRankLinear, base_weight, freeze_and_inject, layer_dims, low_rank_pair,
                             merge_adapters)
from harness.plugins import Method
from harness.state import TrainState
from methods.lisa import find_blocks

SINGLE = "task"  # the one task-specific pair of a single-task run


class TaskLowRank(nn.Module):
    """A layer (shared-adapted or, after merge, plain) plus one low-rank pair per task:
    ``y = layer(x) + s_t B_t A_t x`` for the task ``current()`` names."""

    def __init__(self, layer: nn.Module, tasks: list[str], r: int, scale: float, dropout: float,
                 current: Callable[[], str | None]):
        super().__init__()
        self.layer = layer
        base = layer.base if isinstance(layer, LowRankLinear) else layer
        in_f, out_f = layer_dims(base)
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        for t in tasks:
            self.A[t], self.B[t] = low_rank_pair(r, in_f, out_f, base_weight(base))
        self.r, self.scale = r, scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.current = current  # a function, not a module: reads the run's ctx.current_task

    def task(self) -> str:
        name = self.current()
        if name is None:
            if len(self.A) == 1:
                return next(iter(self.A))
            raise ValueError(f"MTLoRA needs the batch's task (one of {', '.join(self.A)}); "
                             f"ctx.current_task is None")
        if name not in self.A:
            raise ValueError(f"MTLoRA has no task-specific pair for task {name!r} "
                             f"(pairs: {', '.join(self.A)})")
        return name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.task()
        A, B = self.A[t], self.B[t]
        return self.layer(x) + F.linear(F.linear(self.dropout(x).to(A.dtype), A), B) * self.scale

    def extra_repr(self) -> str:
        return f"tasks={list(self.A)}, r={self.r}, scale={self.scale:g}"


class MTLoRA(Method):
    name = "mtlora"
    summary = "shared low-rank pairs everywhere + one pair per task on the last block(s); shared part merges"
    mergeable = False  # the task-specific pairs stay separate modules after merge
    defaults = {"r": 32, "scale": 4.0, "task_r": 4, "task_scale": 4.0, "task_layers": 1,
                "dropout": 0.05, "targets": "all"}

    @hookimpl
    def inject(self, model: nn.Module, ctx: TrainState) -> None:
        p = self.params
        names = freeze_and_inject(model, ctx, lambda _, layer: LowRankLinear(
            layer, r=p["r"], alpha=p["scale"] * p["r"], dropout=p["dropout"]))
        prefix, blocks = find_blocks(model, ctx)
        n = int(p["task_layers"])
        if not 1 <= n <= len(blocks):
            raise ValueError(f"task_layers must be between 1 and the {len(blocks)} blocks, got {n}")
        last = tuple(f"{prefix}.{i}." for i in range(len(blocks) - n, len(blocks)))
        tasks = ctx.task_names or [SINGLE]
        specific = [name for name in names if name.startswith(last)]
        if not specific:
            raise ValueError(f"no target linear in the last {n} block(s) ({', '.join(last)}) for the "
                             f"task-specific pairs; widen targets")
        for name in specific:
            path, _, attr = name.rpartition(".")
            parent = model.get_submodule(path)
            setattr(parent, attr, TaskLowRank(getattr(parent, attr), tasks, p["task_r"],
                                              p["task_scale"], p["dropout"], lambda: ctx.current_task))
        modules = list(model.modules())
        ctx.extras.update(
            tasks=tasks, task_specific_modules=len(specific),
            shared_params=sum(m.A.numel() + m.B.numel() for m in modules if isinstance(m, LowRankLinear)),
            task_specific_params=sum(v.numel() for m in modules if isinstance(m, TaskLowRank)
                                     for v in (*m.A.values(), *m.B.values())))

    @hookimpl
    def merge(self, model: nn.Module, ctx: TrainState) -> nn.Module:
        merge_adapters(model)  # every shared pair, including those under a TaskLowRank
        kept = sum(1 for m in model.modules() if isinstance(m, TaskLowRank))
        ctx.extras["merge"] = (f"shared pairs folded into the weights; {kept} task-specific modules "
                               f"({len(ctx.task_names) or 1} pair(s) each) kept separate")
        return model
