"""The one training loop. Every method and task goes through `fit`; methods act only via hooks."""
from __future__ import annotations

import contextlib
import math
import random
import time
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from harness import distributed as dist
from harness.measure import PeakMemory, optimizer_state_bytes
from harness.memory import TensorMemory
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


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors moved to ``device``; other values (a multitask batch's ``"task"`` name, which the
    multitask model takes as ``task=``) passed through as they are."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def batches(rows: list[dict], collate: Any, size: int) -> Iterator[dict[str, Any]]:
    """Consecutive rows in batches of at most ``size``, in order. A batch never spans two tasks:
    rows of a multitask suite carry ``"task"`` (grouped by it) and each batch serves one head."""
    chunk: list[dict] = []
    for row in rows:
        if chunk and (len(chunk) == size or row.get("task") != chunk[0].get("task")):
            yield collate(chunk)
            chunk = []
        chunk.append(row)
    if chunk:
        yield collate(chunk)


def attach_probes(ctx: TrainState, train_rows: list[dict], collate: Any) -> None:
    """Give methods ``ctx.train_batches()`` and ``ctx.compute_loss`` for their own probes.

    The runner calls this before ``inject`` too, so a method can choose what to train from data
    (gradient scores, a short probe run) before the trainable-parameter count is taken.
    """
    def train_batches() -> Iterator[dict[str, torch.Tensor]]:
        # Fixed order, on the device: a probe, not the training stream.
        for batch in batches(train_rows, collate, ctx.train.batch_size):
            yield to_device(batch, ctx.device)

    def compute_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ctx.current_task = batch.get("task")
        with autocast_context(ctx.device):
            return model(**batch).loss

    ctx.train_batches, ctx.compute_loss = train_batches, compute_loss


class Trainer:
    """Runs one (method, task) training: optimizer, schedule, accumulation, clipping, hooks.

    ``track_memory``: count live tensor bytes (`harness.memory.TensorMemory`) from before
    ``on_train_start`` to the last optimizer step; the result then has ``tensor_memory`` (peak and
    its breakdown). It costs a Python call per operator: the fit search's probes and tests use it,
    timed runs do not. ``ordered``: batches of consecutive rows as given (no shuffling, no task
    sampler), for probes on chosen rows.
    """

    def __init__(self, model: nn.Module, pm: Any, ctx: TrainState, train_rows: list[dict],
                 collate: Any, track_memory: bool = False, ordered: bool = False):
        self.model, self.pm, self.ctx = model, pm, ctx
        self.track_memory = track_memory
        cfg = ctx.train
        self.generator = torch.Generator().manual_seed(cfg.seed)
        # A suite of several tasks batches its own way (one task per batch, mixed by its rule).
        sampler = None if ordered else getattr(ctx.task, "batch_sampler", lambda *a: None)(
            train_rows, cfg.batch_size, self.generator)
        if ordered:
            self.loader = list(batches(train_rows, collate, cfg.batch_size))
        elif sampler is not None:
            self.loader = DataLoader(train_rows, batch_sampler=sampler, collate_fn=collate)
        else:
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
        tracker = TensorMemory(model, ctx.device, lambda: self.optimizer) if self.track_memory else None
        counting = tracker if tracker is not None else contextlib.nullcontext()
        mark = tracker.mark if tracker is not None else (lambda: None)
        with counting:
            result = self._loop(model, hook, mark)
        hook.on_train_end(model=model, ctx=ctx)
        ctx.extras.pop("_last_loss", None)
        if tracker is not None:
            result["tensor_memory"] = {"peak_bytes": tracker.peak, "start_bytes": tracker.start_bytes,
                                       "breakdown": tracker.breakdown(), "ops": tracker.ops}
            group = dist.group()
            if group is not None:  # data-parallel: the largest device's, so every process decides alike
                everyone = dist.gather(tracker.peak, group)
                result["tensor_memory"].update(peak_bytes=max(everyone), per_device_peak_bytes=everyone)
        return result

    def _loop(self, model: nn.Module, hook: Any, mark: Any) -> dict[str, Any]:
        ctx, cfg = self.ctx, self.ctx.train
        hook.on_train_start(model=model, ctx=ctx)
        memory = PeakMemory(ctx.device)
        memory.start()
        samples = tokens = 0
        loss_sum = torch.zeros((), device=ctx.device)
        losses: list[float] = []
        micro = seen = 0
        opt_state_peak = 0
        group = dist.group()  # data-parallel processes (harness.distributed), None when alone
        start = time.perf_counter()
        while ctx.step < ctx.total_steps:
            for batch in self.loader:
                share = 1.0
                if group is not None:  # this process's rows of the global batch
                    batch, rows, total = dist.shard(batch, group)
                    share = rows / total
                samples += batch["labels"].shape[0]
                if "attention_mask" in batch:
                    tokens += int(batch["attention_mask"].sum())
                batch = to_device(batch, ctx.device)
                ctx.current_task = batch.get("task")  # for methods with per-task modules
                if share > 0:
                    # Data-parallel: dropout's draws differ per process, the global generator
                    # (methods' hooks) stays the same everywhere.
                    rng = contextlib.nullcontext() if group is None else _forked_rng(
                        ctx.device, dist.rng_seed(cfg.seed, ctx.step, seen, group.rank))
                    with rng:
                        with autocast_context(ctx.device):
                            outputs = model(**batch)
                            loss = outputs.loss
                            for extra in hook.extra_loss(model=model, batch=batch, outputs=outputs, ctx=ctx):
                                if extra is not None:
                                    loss = loss + extra
                        if group is None:
                            (loss / cfg.grad_accum).backward()
                        else:  # weighted by the share: summed over processes, the batch's mean
                            (loss * share / cfg.grad_accum).backward()
                    mark()  # gradients now exist (memory counting only)
                    if group is None:
                        loss_sum += loss.detach().float()
                    else:
                        loss_sum += loss.detach().float() * share
                micro += 1
                seen += 1
                if micro % cfg.grad_accum:
                    continue
                if group is not None:  # the global batch's gradient on every process
                    dist.all_reduce_grads(self.params, group)
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
                self.optimizer.step()
                mark()  # optimizer state now exists (memory counting only)
                ctx.step += 1
                hook.on_step(model=model, ctx=ctx)
                if group is not None:
                    dist.check_same(sum(p.numel() for p in model.parameters() if p.requires_grad),
                                    f"the trainable parameter count after step {ctx.step}", group)
                self._set_lr(ctx.step)
                self.optimizer.zero_grad(set_to_none=True)
                if ctx.step == 1:  # optimizer state exists after the first step
                    opt_state_peak = optimizer_state_bytes(self.optimizer)
                # One host sync per 10 steps: NaN is caught without slowing GPU runs.
                if ctx.step % 10 == 0 or ctx.step == ctx.total_steps:
                    if group is not None:  # every process sees the same mean (and stops together)
                        loss_sum = dist.all_reduce_sum(loss_sum, group)
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
        result = {
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
        if group is not None:  # overall throughput, peak memory per device
            result = dist.combine(result, {"rank": group.rank, "device": str(ctx.device), "peak_bytes": peak,
                                           "baseline_bytes": memory.baseline_bytes, "kind": memory.kind,
                                           "samples": samples, "tokens": tokens, "seconds": seconds}, group)
        return result


def _forked_rng(device: torch.device, seed: int) -> Any:
    """A generator fork for one data-parallel micro-batch (`harness.distributed`)."""
    @contextlib.contextmanager
    def forked() -> Iterator[None]:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            yield
    return forked()
