"""The one training loop. Every method and task goes through `fit`; methods act only via hooks."""
from __future__ import annotations

import math
import random
import time
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from harness.measure import PeakMemory, optimizer_state_bytes
from harness.models import autocast_context
from harness.state import TrainState


class NonFiniteLoss(FloatingPointError):
    pass


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup to 1 over ``warmup`` steps, then linear decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup  # the first step already gets a non-zero rate
    return max(0.0, (total - step) / max(1, total - warmup))


_NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight", "ln_1.weight",
             "ln_2.weight", "ln_f.weight")


def default_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """All trainable parameters; biases and norm weights without weight decay (as HF Trainer)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith(_NO_DECAY) or p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def attach_probes(ctx: TrainState, train_rows: list[dict], collate: Any) -> None:
    """Give methods ``ctx.train_batches()`` and ``ctx.compute_loss`` for their own probes.

    The runner calls this before ``inject`` too, so a method can choose what to train from data
    (gradient scores, a short probe run) before the trainable-parameter count is taken.
    """
    def train_batches() -> Iterator[dict[str, torch.Tensor]]:
        # Fixed order, on the device: a probe, not the training stream.
        loader = DataLoader(train_rows, batch_size=ctx.train.batch_size, shuffle=False,
                            collate_fn=collate)
        for batch in loader:
            yield to_device(batch, ctx.device)

    def compute_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with autocast_context(ctx.device):
            return model(**batch).loss

    ctx.train_batches, ctx.compute_loss = train_batches, compute_loss


class Trainer:
    """Runs one (method, task) training: optimizer, schedule, accumulation, clipping, hooks."""

    def __init__(self, model: nn.Module, pm: Any, ctx: TrainState, train_rows: list[dict],
                 collate: Any):
        self.model, self.pm, self.ctx = model, pm, ctx
        cfg = ctx.train
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.loader = DataLoader(train_rows, batch_size=cfg.batch_size, shuffle=True,
                                 collate_fn=collate, generator=self.generator)
        per_epoch = math.ceil(len(self.loader) / cfg.grad_accum)
        ctx.total_steps = cfg.max_steps or max(1, math.ceil(per_epoch * cfg.epochs))
        self.warmup = int(cfg.warmup_ratio * ctx.total_steps)
        self.collate = collate
        self.train_rows = train_rows
        attach_probes(ctx, train_rows, collate)
        ctx._rebuild = self._rebuild_optimizer
        self.optimizer: torch.optim.Optimizer | None = None

    # -- optimizer ----------------------------------------------------------------------------
    def _groups(self) -> list[dict[str, Any]]:
        groups = self.pm.hook.param_groups(model=self.model, ctx=self.ctx)
        if groups is None:
            groups = default_param_groups(self.model, self.ctx.train.weight_decay)
        out = []
        for g in groups:
            g = dict(g)
            g["params"] = [p for p in g["params"] if p.requires_grad]
            g.setdefault("lr", self.ctx.train.lr)
            g.setdefault("weight_decay", self.ctx.train.weight_decay)
            g["initial_lr"] = g["lr"]
            if g["params"]:
                out.append(g)
        if not out:
            raise ValueError(f"method {self.ctx.config.method!r} left no trainable parameter")
        return out

    def _rebuild_optimizer(self) -> None:
        old = self.optimizer
        self.optimizer = torch.optim.AdamW(self._groups(), lr=self.ctx.train.lr)
        if old is not None:  # keep the moments of parameters that stay; drop the rest (frees memory)
            keep = {p for g in self.optimizer.param_groups for p in g["params"]}
            for p, state in old.state.items():
                if p in keep:
                    self.optimizer.state[p] = state
            old.state.clear()
        self._set_lr(self.ctx.step)
        self.ctx.optimizer = self.optimizer
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]

    def _set_lr(self, step: int) -> None:
        f = lr_factor(step, self.ctx.total_steps, self.warmup)
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * f

    # -- the loop -----------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        ctx, cfg, model, hook = self.ctx, self.ctx.train, self.model, self.pm.hook
        self._rebuild_optimizer()
        model.train()
        hook.on_train_start(model=model, ctx=ctx)
        memory = PeakMemory(ctx.device)
        memory.start()
        samples = tokens = 0
        loss_sum = torch.zeros((), device=ctx.device)
        losses: list[float] = []
        micro = 0
        opt_state_peak = 0
        start = time.perf_counter()
        while ctx.step < ctx.total_steps:
            for batch in self.loader:
                samples += batch["labels"].shape[0]
                if "attention_mask" in batch:
                    tokens += int(batch["attention_mask"].sum())
                batch = to_device(batch, ctx.device)
                with autocast_context(ctx.device):
                    outputs = model(**batch)
                    loss = outputs.loss
                    for extra in hook.extra_loss(model=model, batch=batch, outputs=outputs, ctx=ctx):
                        if extra is not None:
                            loss = loss + extra
                (loss / cfg.grad_accum).backward()
                loss_sum += loss.detach().float()
                micro += 1
                if micro % cfg.grad_accum:
                    continue
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
                self.optimizer.step()
                ctx.step += 1
                hook.on_step(model=model, ctx=ctx)
                self._set_lr(ctx.step)
                self.optimizer.zero_grad(set_to_none=True)
                if ctx.step == 1:  # optimizer state exists after the first step
                    opt_state_peak = optimizer_state_bytes(self.optimizer)
                # One host sync per 10 steps: NaN is caught without slowing GPU runs.
                if ctx.step % 10 == 0 or ctx.step == ctx.total_steps:
                    mean = loss_sum.item() / micro
                    if not math.isfinite(mean):
                        raise NonFiniteLoss(
                            f"loss became {mean} by step {ctx.step}; lower the learning rate "
                            f"(--set lr=...) or enable clipping (--set max_grad_norm=1.0)")
                    losses.append(mean)
                    ctx.extras["_last_loss"] = mean
                    loss_sum.zero_()
                    micro = 0
                if ctx.step >= ctx.total_steps:
                    break
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        seconds = time.perf_counter() - start
        peak = memory.peak()
        opt_state_peak = max(opt_state_peak, optimizer_state_bytes(self.optimizer))
        hook.on_train_end(model=model, ctx=ctx)
        ctx.extras.pop("_last_loss", None)
        return {
            "throughput": {
                "train_seconds": seconds,
                "steps": ctx.step,
                "samples": samples,
                "tokens": tokens,
                "samples_per_s": samples / seconds,
                "tokens_per_s": tokens / seconds,
                "step_time_ms": 1000 * seconds / max(1, ctx.step),
            },
            "memory": {
                "peak_bytes": peak,
                "baseline_bytes": memory.baseline_bytes,
                "kind": memory.kind,
                "optimizer_state_bytes": opt_state_peak,
            },
            "loss_curve": losses,
            "optimizer_rebuilds": ctx.rebuilds,
        }
