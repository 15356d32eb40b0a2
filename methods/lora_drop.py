"""LoRA-Drop (Zhou et al., 2024, arXiv:2402.07721): keep LoRA only where its output matters.

A *sampling phase* trains LoRA briefly on a fraction of the training data, then scores every
adapted layer by the mean squared norm of its LoRA output, ``g_i = E_x ||s B_i A_i x||^2``,
normalised so the scores sum to 1. The layers with the highest scores are kept, in order, until
their cumulative score reaches ``threshold`` (or the ``keep`` highest when ``keep`` is set). Kept
layers get their own LoRA pair; every other layer shares one pair with the other dropped layers
of its module type. Then the real training runs on the full data.

Choices:
- The sampling phase runs inside ``on_train_start`` with its own AdamW at the run's learning rate
  and weight decay on the LoRA pairs and the task head, one pass over every ``1/sample_frac``-th
  batch of ``ctx.train_batches()`` (spread over the data, not its first part). Afterwards the head
  is restored to its state before sampling and all pairs are new (A Kaiming-uniform, B zero), so
  the full training starts from the same point as LoRA's, only with fewer pairs; then
  ``ctx.rebuild_optimizer()``. Its cost (``sampling_seconds``, ``sampling_steps``) is recorded in
  the extras: the core's throughput clock starts after ``on_train_start`` and does not include it.
- Scores are measured after the sampling training, with no gradient, over the same sampled
  batches; padding positions are excluded (the batch's ``attention_mask``). Scores at the end of
  sampling reflect what the trained pairs do, which early (near-zero B) steps would dilute.
- Module type: the layer's name with its block index removed (``encoder.layer.*.attention.self.query``),
  so a shared pair always has one shape.
- Defaults: r 8, alpha 16, dropout 0, targets ``qv`` (as our LoRA), ``sample_frac`` 0.1,
  ``threshold`` 0.9, ``keep`` None.
- Parameter counts: the core counts trainable parameters right after ``inject``, when every layer
  still has its own pair (LoRA's count); the count after dropping is ``trainable_after_drop`` in
  the extras.

Merge: each layer folds the pair it uses, ``W = W0 + s B A`` (own or shared); the result is the
plain original architecture.
"""
from __future__ import annotations

import re
import time
from typing import Any, Iterable

import torch
from torch import nn

from harness.hookspecs import hookimpl
from harness.lowrank import LowRankLinear, adapted_modules, freeze_and_inject, merge_adapters
from harness.plugins import Method
from harness.state import TrainState


def module_type(name: str) -> str:
    """The name with block indices replaced by ``*``: layers of one type share a pair."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", name)


@torch.no_grad()
def layer_scores(model: nn.Module, layers: dict[str, LowRankLinear],
                 batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Mean over non-padding tokens of ``||s B A x||^2`` per layer, normalised to sum 1."""
    sums = {n: 0.0 for n in layers}
    counts = {n: 0 for n in layers}
    mask: dict[str, torch.Tensor | None] = {"m": None}

    def hook(name: str):
        def fn(module: LowRankLinear, args: tuple, output: torch.Tensor) -> None:
            sq = module.delta_forward(args[0]).float().pow(2).sum(-1)  # (batch, seq)
            m = mask["m"]
            if m is not None and m.shape == sq.shape:
                sq = sq * m
                counts[name] += int(m.sum())
            else:
                counts[name] += sq.numel()
            sums[name] += float(sq.sum())
        return fn

    handles = [layer.register_forward_hook(hook(n)) for n, layer in layers.items()]
    was_training = model.training
    model.eval()  # no dropout: score what the trained pair computes
    try:
        for batch in batches:
            m = batch.get("attention_mask")
            mask["m"] = m.to(torch.float32) if m is not None else None
            model(**batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    raw = {n: sums[n] / max(1, counts[n]) for n in layers}
    total = sum(raw.values())
    if total <= 0:  # nothing trained: every layer equally (un)important
        return {n: 1.0 / len(raw) for n in raw}
    return {n: v / total for n, v in raw.items()}


def select_layers(scores: dict[str, float], threshold: float, keep: int | None = None) -> list[str]:
    """Highest-scoring layers until their cumulative score reaches ``threshold`` (or the top ``keep``)."""
    order = sorted(scores, key=lambda n: scores[n], reverse=True)
    if keep is not None:
        return order[:max(0, int(keep))]
    kept, cumulative = [], 0.0
    for n in order:
        if cumulative >= threshold:
            break
        kept.append(n)
        cumulative += scores[n]
    return kept


class LoRADrop(Method):
    name = "lora_drop"
    summary = "LoRA pairs only on layers whose LoRA output matters; one shared pair for the rest"
    defaults = {"r": 8, "alpha": 16, "dropout": 0.0, "targets": "qv", "sample_frac": 0.1,
                "threshold": 0.9, "keep": None}

    def make_layer(self, name: str, layer: nn.Module) -> LowRankLinear:
        p = self.params
        return LowRankLinear(layer, r=p["r"], alpha=p["alpha"], dropout=p["dropout"])

    @hookimpl
    def inject(self, model: nn.Module, ctx: TrainState) -> None:
        freeze_and_inject(model, ctx, self.make_layer)

    @hookimpl
    def on_train_start(self, model: nn.Module, ctx: TrainState) -> None:
        start = time.perf_counter()
        layers = {n: m for n, m in adapted_modules(model) if isinstance(m, LowRankLinear)}
        sample, steps = self._sampling_phase(model, ctx)
        scores = layer_scores(model, layers, sample)
        kept = select_layers(scores, self.params["threshold"], self.params["keep"])
        self._rebuild_pairs(layers, set(kept))
        ctx.rebuild_optimizer()  # the sampled pairs left; the new ones join
        ctx.extras.update({
            "layer_scores": scores,
            "kept_layers": kept,
            "shared_types": sorted({module_type(n) for n in layers if n not in kept}),
            "trainable_after_drop": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "sampling_steps": steps,
            "sampling_seconds": time.perf_counter() - start,
        })

    def _sampling_phase(self, model: nn.Module, ctx: TrainState) -> tuple[list[dict[str, Any]], int]:
        """Train the pairs (and head) on every k-th batch; return those batches and the step count."""
        stride = max(1, round(1 / self.params["sample_frac"]))
        sample = [b for i, b in enumerate(ctx.train_batches()) if i % stride == 0]
        trainable = [p for p in model.parameters() if p.requires_grad]
        head = {n: p.detach().clone() for n, p in model.named_parameters()
                if p.requires_grad and ctx.is_head(n)}
        opt = torch.optim.AdamW(trainable, lr=ctx.train.lr, weight_decay=ctx.train.weight_decay)
        model.train()
        for batch in sample:
            loss = ctx.compute_loss(model, batch)
            loss.backward()
            if ctx.train.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trainable, ctx.train.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # the real training starts from the original head
            for n, p in model.named_parameters():
                if n in head:
                    p.copy_(head[n])
        return sample, len(sample)

    def _rebuild_pairs(self, layers: dict[str, LowRankLinear], kept: set[str]) -> None:
        """Fresh pairs: own ones for kept layers, one per module type for the others."""
        shared: dict[str, LowRankLinear] = {}
        for name, layer in layers.items():
            fresh = self.make_layer(name, layer.base)
            if name not in kept:
                owner = shared.setdefault(module_type(name), fresh)
                fresh.A, fresh.B = owner.A, owner.B  # the same Parameter objects: one pair
            with torch.no_grad():
                layer.A = fresh.A
                layer.B = fresh.B

    @hookimpl
    def merge(self, model: nn.Module, ctx: TrainState) -> nn.Module:
        return merge_adapters(model)
