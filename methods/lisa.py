"""LISA, layerwise importance sampling (Pan et al., 2024, arXiv:2403.17919).

Paper (and its LMFlow code): no parameter is added. The embeddings and the output head always
train; the transformer blocks are frozen except ``gamma`` of them, sampled uniformly without
replacement, and the sample is redrawn every ``K`` steps. Memory falls towards that of training
``gamma`` blocks, while over a run every block gets trained.

Choices here:
- Blocks are found generically as the backbone's largest ``nn.ModuleList`` by parameter count
  (``bert.encoder.layer``, ``model.layers``, ``transformer.h``, ...). Everything outside that list
  (embeddings, final or embedding norms, pooler, task head) always trains, as in LMFlow.
- Defaults ``interval`` K = 20 and ``gamma`` = 2. The first sample is drawn in ``inject``; after
  optimizer steps K, 2K, ... (not after the last step) a new sample is drawn, the blocks leaving
  are frozen and their ``.grad`` dropped, and the optimizer is rebuilt from ``param_groups``
  (the core's default groups over the parameters now trainable): AdamW state of blocks leaving is
  freed, the state of parameters that stay (embeddings, a block drawn again) is kept.
- The RNG is ``random.Random(train.seed)``: the schedule is reproducible and recorded in
  ``extras["active_blocks"]`` as ``[{"from_step": s, "blocks": [...]}, ...]``.
- The trainable count is what trains at any one time (always-on parameters + ``gamma`` blocks,
  plus the head), the figure memory scales with; ``extras["blocks_trained"]`` lists every block
  that trained at some point of the run.

Merge: identity; the model never left its architecture.
"""
from __future__ import annotations

import random
from typing import Any

from torch import nn

from harness.hookspecs import hookimpl
from harness.plugins import Method
from harness.state import TrainState
from harness.train import default_param_groups


def find_blocks(model: nn.Module, ctx: TrainState | None = None) -> tuple[str, nn.ModuleList]:
    """The backbone's stack of transformer blocks: its largest ``nn.ModuleList`` of 2+ modules."""
    best: tuple[tuple[int, int], str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if ctx is not None and ctx.is_head(name):
            continue
        key = (sum(p.numel() for p in module.parameters()), len(module))
        if best is None or key > best[0]:
            best = (key, name, module)
    if best is None:
        raise ValueError("no stack of transformer blocks (nn.ModuleList) found in the model")
    return best[1], best[2]


class LISA(Method):
    name = "lisa"
    summary = "embeddings and head always train; gamma random blocks train, redrawn every K steps"
    mergeable = True
    defaults: dict[str, Any] = {"interval": 20, "gamma": 2}

    def __init__(self, params: dict[str, Any] | None = None):
        super().__init__(params)
        self.blocks: nn.ModuleList | None = None
        self.active: list[int] = []
        self.rng = random.Random(0)

    def _sample(self) -> list[int]:
        return sorted(self.rng.sample(range(len(self.blocks)), int(self.params["gamma"])))

    def _activate(self, active: list[int]) -> None:
        for i, block in enumerate(self.blocks):
            on = i in active
            for p in block.parameters():
                p.requires_grad_(on)
                if not on:
                    p.grad = None  # the next zero_grad only reaches the new optimizer's params
        self.active = active

    @hookimpl
    def inject(self, model: nn.Module, ctx: TrainState) -> None:
        gamma, interval = int(self.params["gamma"]), int(self.params["interval"])
        list_name, self.blocks = find_blocks(model, ctx)
        if not 1 <= gamma <= len(self.blocks) or interval < 1:
            raise ValueError(f"{self.name}: need 1 <= gamma <= {len(self.blocks)} blocks and "
                             f"interval >= 1 (got gamma={gamma}, interval={interval})")
        self.rng = random.Random(ctx.train.seed)
        for p in model.parameters():
            p.requires_grad_(True)  # always-on part: everything outside the block list
        self._activate(self._sample())
        ctx.extras.update({"block_list": list_name, "n_blocks": len(self.blocks),
                           "active_blocks": [{"from_step": 0, "blocks": self.active}]})

    @hookimpl
    def param_groups(self, model: nn.Module, ctx: TrainState) -> list[dict[str, Any]]:
        return default_param_groups(model, ctx.train.weight_decay)  # trainable params only

    @hookimpl
    def on_step(self, model: nn.Module, ctx: TrainState) -> None:
        if ctx.step % int(self.params["interval"]) or ctx.step >= ctx.total_steps:
            return
        self._activate(self._sample())
        ctx.rebuild_optimizer()
        ctx.extras["active_blocks"].append({"from_step": ctx.step, "blocks": self.active})

    @hookimpl
    def on_train_end(self, model: nn.Module, ctx: TrainState) -> None:
        ctx.extras["blocks_trained"] = sorted({i for s in ctx.extras["active_blocks"]
                                               for i in s["blocks"]})

    @hookimpl
    def merge(self, model: nn.Module, ctx: TrainState) -> nn.Module:
        return model
