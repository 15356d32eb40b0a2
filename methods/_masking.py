"""Shared machinery of the methods that train a fixed subset of entries of existing weights.

A method chooses boolean masks ``{parameter name: mask of the parameter's shape}``; `MaskedTraining`
then makes sure only the True entries ever change during training:

- **Gradients**: a tensor hook multiplies each masked parameter's gradient by its mask, so
  clipping sees the masked gradient and Adam's moments of masked entries stay exactly 0 (their
  Adam update is ``0 / (sqrt(0) + eps) = 0``).
- **Weight decay**: AdamW's decoupled decay ``p *= 1 - lr * wd`` would still shrink masked entries.
  Masked tensors therefore sit in groups with ``weight_decay = 0``, and an optimizer step pre-hook
  applies the same decay (same ``lr`` and ``wd``, before the update, as AdamW does) to the selected
  entries only. Which tensors are decayed at all follows the core's default split (no decay on
  biases and norm weights).

The optimizer still holds dense Adam state for every tensor with at least one selected entry:
that is the real memory cost of this simple form, and `state_figures` reports it beside what a
sparse optimizer would need.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from harness.hookspecs import hookimpl
from harness.measure import optimizer_state_bytes
from harness.plugins import Method
from harness.state import TrainState
from harness.train import default_param_groups

MASKED_DECAY_KEY = "masked_weight_decay"  # extra key in a param group; AdamW ignores it


class MaskedTraining:
    """Train only the True entries of ``masks``; everything else in the backbone is frozen."""

    def __init__(self) -> None:
        self.masks: dict[str, torch.Tensor] = {}
        self._flat_index: dict[nn.Parameter, torch.Tensor] = {}  # selected entries, for the decay
        self._handles: list[Any] = []
        self._hooked: torch.optim.Optimizer | None = None
        self._pre_hook: Any = None

    # -- set up -------------------------------------------------------------------------------
    def apply(self, model: nn.Module, masks: dict[str, torch.Tensor], ctx: TrainState) -> None:
        """Freeze the backbone, make masked tensors trainable and mask their gradients."""
        self.remove()
        params = dict(model.named_parameters())
        unknown = sorted(set(masks) - set(params))
        if unknown:
            raise KeyError(f"masks name parameters the model lacks: {unknown[:3]}")
        self.masks, self._flat_index = {}, {}
        for name, p in params.items():
            p.requires_grad_(ctx.is_head(name))
        for name, mask in masks.items():
            p = params[name]
            if ctx.is_head(name):
                continue  # the head trains densely for every method
            if mask.shape != p.shape or mask.dtype != torch.bool:
                raise ValueError(f"mask of {name} must be bool {tuple(p.shape)}, got "
                                 f"{mask.dtype} {tuple(mask.shape)}")
            if not bool(mask.any()):
                continue  # nothing selected: stays frozen, no optimizer state
            mask = mask.to(p.device)
            self.masks[name] = mask
            self._flat_index[p] = mask.reshape(-1).nonzero().squeeze(1)
            p.requires_grad_(True)
            # Multiplying (not indexing) keeps the gradient dense, as the optimizer expects.
            self._handles.append(p.register_hook(lambda g, m=mask: g * m))

    def remove(self) -> None:
        """Drop the gradient hooks and the decay pre-hook (after training, before merge)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._pre_hook is not None:
            self._pre_hook.remove()
            self._pre_hook, self._hooked = None, None

    # -- optimizer ----------------------------------------------------------------------------
    def param_groups(self, model: nn.Module, ctx: TrainState) -> list[dict[str, Any]]:
        """Default groups for dense parameters; masked tensors get ``weight_decay=0`` plus the
        masked decay the pre-hook applies."""
        wd = ctx.train.weight_decay
        decayed = {p for g in default_param_groups(model, wd) if g["weight_decay"] > 0
                   for p in g["params"]}
        masked = {p for p in self._flat_index}
        dense_decay, dense_plain, masked_decay, masked_plain = [], [], [], []
        for _, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if p in masked:
                (masked_decay if p in decayed else masked_plain).append(p)
            else:
                (dense_decay if p in decayed else dense_plain).append(p)
        groups = [{"params": dense_decay, "weight_decay": wd},
                  {"params": dense_plain, "weight_decay": 0.0},
                  {"params": masked_decay, "weight_decay": 0.0, MASKED_DECAY_KEY: wd},
                  {"params": masked_plain, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Register the masked-decay pre-hook on ``optimizer`` (again after any rebuild)."""
        if optimizer is self._hooked:
            return
        if self._pre_hook is not None:
            self._pre_hook.remove()
        self._pre_hook = optimizer.register_step_pre_hook(self._decay_selected)
        self._hooked = optimizer

    @torch.no_grad()
    def _decay_selected(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # Runs at the start of optimizer.step(), i.e. where AdamW applies its own decay, with the
        # group's current (scheduled) lr: the selected entries get exactly AdamW's update.
        for g in optimizer.param_groups:
            wd = g.get(MASKED_DECAY_KEY, 0.0)
            if not wd:
                continue
            factor = 1.0 - g["lr"] * wd
            for p in g["params"]:
                idx = self._flat_index.get(p)
                if idx is not None and p.grad is not None:  # AdamW skips params without grad
                    flat = p.data.view(-1)  # parameters are contiguous; logical order
                    flat[idx] = flat[idx] * factor

    # -- figures ------------------------------------------------------------------------------
    def count(self, model: nn.Module, ctx: TrainState) -> dict[str, int]:
        """Entries that can change: selected entries of masked tensors, whole dense tensors."""
        out = {"method": 0, "head": 0}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            n = int(self.masks[name].sum()) if name in self.masks else p.numel()
            out["head" if ctx.is_head(name) else "method"] += n
        return out

    def state_figures(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, int]:
        """Optimizer state as held (dense moments over masked tensors) and as a sparse one would."""
        selected = sum(int(m.sum()) for m in self.masks.values())
        masked_elements = sum(m.numel() for m in self.masks.values())
        dense_other = sum(p.numel() for p in model.parameters()
                          if p.requires_grad and p not in self._flat_index)
        element = next(iter(model.parameters())).element_size()
        return {
            "selected_entries": selected,
            "masked_tensors": len(self.masks),
            "masked_tensor_elements": masked_elements,
            "optimizer_state_bytes": optimizer_state_bytes(optimizer),
            # Two Adam moments per entry that can move (what a sparse optimizer would keep).
            "optimizer_state_bytes_if_sparse": 2 * element * (selected + dense_other),
        }


class MaskedMethod(Method):
    """Base of the methods that train a fixed mask chosen from data before training.

    A subclass implements `choose_masks`; the hooks here apply the mask, count what can move,
    build the optimizer groups, keep the masked decay attached and report the optimizer state.
    """

    def __init__(self, params: dict[str, Any] | None = None):
        super().__init__(params)
        self.masking = MaskedTraining()

    def choose_masks(self, model: nn.Module, ctx: TrainState) -> dict[str, torch.Tensor]:
        raise NotImplementedError  # pragma: no cover

    @hookimpl
    def inject(self, model: nn.Module, ctx: TrainState) -> None:
        if ctx.train_batches is None or ctx.compute_loss is None:
            raise RuntimeError(f"{self.name} chooses its mask from training data in inject; "
                               "call harness.train.attach_probes(ctx, rows, collate) first")
        self.masking.apply(model, self.choose_masks(model, ctx), ctx)

    @hookimpl
    def count_trainable(self, model: nn.Module, ctx: TrainState) -> dict[str, int]:
        return self.masking.count(model, ctx)

    @hookimpl
    def param_groups(self, model: nn.Module, ctx: TrainState) -> list[dict[str, Any]]:
        return self.masking.param_groups(model, ctx)

    @hookimpl
    def on_train_start(self, model: nn.Module, ctx: TrainState) -> None:
        self.masking.attach(ctx.optimizer)

    @hookimpl
    def on_step(self, model: nn.Module, ctx: TrainState) -> None:
        self.masking.attach(ctx.optimizer)  # no-op unless the optimizer was rebuilt

    @hookimpl
    def on_train_end(self, model: nn.Module, ctx: TrainState) -> None:
        ctx.extras.update(self.masking.state_figures(model, ctx.optimizer))
        self.masking.remove()  # training is over: the model is plain again

    @hookimpl
    def merge(self, model: nn.Module, ctx: TrainState) -> nn.Module:
        self.masking.remove()
        return model  # identity: the dense weights already hold W0 + sparse delta
