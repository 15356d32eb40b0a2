"""The hook specification every method plugin (and every logger or meter) implements.

A run registers exactly one *method* plugin plus any number of *observer* plugins (progress bar,
loggers, measurement) on one `pluggy.PluginManager`. The training loop in `harness.train` calls the
hooks below and nothing else: a method changes training only through them.

Order of calls in one run::

    inject -> [gradient_checkpointing: only when a memory budget needs it] -> param_groups
    -> [optimizer built] -> on_train_start
    for every optimizer step:
        forward -> extra_loss -> backward (x accumulation) -> clip -> optimizer.step()
        -> on_step -> scheduler.step() -> zero_grad()
    on_train_end -> evaluate -> merge -> merge check

Hooks marked *firstresult* return the first non-None answer; a method that has nothing to say
returns None and the core's default applies.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from harness.state import TrainState

PROJECT = "harness"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec(firstresult=True)
def inject(model: "nn.Module", ctx: "TrainState") -> "nn.Module | None":
    """Change the freshly loaded model for this method.

    Called once, before the optimizer exists, with the task model (backbone plus task head) on its
    training device and every parameter still trainable. The method freezes what it does not train
    and adds its modules. ``ctx.method_params`` holds its resolved hyperparameters, ``ctx.targets``
    the architecture's target module names, ``ctx.head_names`` the task head's parameter prefixes
    (the head trains for every method); ``ctx.train_batches()`` and ``ctx.compute_loss`` are
    available for probes that choose what to train from data. Return a replacement model, or None
    when it changed ``model`` in place.
    """


@hookspec(firstresult=True)
def param_groups(model: "nn.Module", ctx: "TrainState") -> "list[dict[str, Any]] | None":
    """Return the optimizer's parameter groups (``torch.optim`` dicts; ``lr`` may be set per group).

    Called after ``inject`` and again whenever ``ctx.rebuild_optimizer()`` is asked for. Groups
    without ``lr`` take ``ctx.train.lr``; groups without ``weight_decay`` take the run's. Return
    None for the default: every parameter with ``requires_grad``, with biases and norm weights
    exempt from weight decay.
    """


@hookspec
def on_train_start(model: "nn.Module", ctx: "TrainState") -> None:
    """Called once after the optimizer is built, before the first batch."""


@hookspec
def extra_loss(model: "nn.Module", batch: "dict[str, torch.Tensor]", outputs: Any,
               ctx: "TrainState") -> "torch.Tensor | None":
    """Return a scalar added to the task loss of this micro-batch (before accumulation scaling).

    Called after every training forward pass with the batch and the model's outputs. Regularisers
    and auxiliary losses (orthogonality penalties, load-balancing losses) live here. Every
    implementation's answer is summed; return None to add nothing.
    """


@hookspec
def on_step(model: "nn.Module", ctx: "TrainState") -> None:
    """Called after every ``optimizer.step()`` and before ``zero_grad()``.

    Gradients of the step are still present in ``.grad``. ``ctx.step`` is the number of optimizer
    steps taken so far (1 after the first). A method may edit weights in place here under
    ``torch.no_grad()``, change which parameters train, and call ``ctx.rebuild_optimizer()`` to
    replace the optimizer (the new one is built from ``param_groups``; state of parameters that
    left it is freed, the learning-rate schedule carries on).
    """


@hookspec
def on_train_end(model: "nn.Module", ctx: "TrainState") -> None:
    """Called once after the last optimizer step, before evaluation."""


@hookspec(firstresult=True)
def merge(model: "nn.Module", ctx: "TrainState") -> "nn.Module | None":
    """Fold the method into a plain model of the original architecture and return it.

    Called after evaluation. The returned model must contain no module of the method, load with
    ``from_pretrained`` after ``save_pretrained``, and predict what the adapted model predicted
    (the core checks and records the largest output difference). Return None when the method
    cannot be folded into weights; the run is then recorded as not mergeable.
    """


@hookspec(firstresult=True)
def count_trainable(model: "nn.Module", ctx: "TrainState") -> "dict[str, int] | None":
    """Count parameters that actually change, as ``{"method": n, "head": n}``.

    Called after ``inject``. Return None for the default: every element of every parameter with
    ``requires_grad``, split into the task head and the rest. Methods that train only part of a
    tensor (masks) answer here so that the table counts what moves, not what is allocated.
    """


@hookspec(firstresult=True)
def export_peft(model: "nn.Module", ctx: "TrainState") -> "dict[str, Any] | None":
    """Describe the trained adapter in Hugging Face PEFT's format, or None if PEFT has none.

    Called by ``harness export`` on the adapted model (before any merge), rebuilt from a saved
    run. Return ``{"config": {...}, "tensors": {name: tensor}}``: ``config`` holds the
    ``adapter_config.json`` fields of the method (``peft_type``, ``r``, ``target_modules``, ...),
    ``tensors`` the adapter weights keyed by module path as PEFT names them without the
    ``base_model.model.`` prefix and without the adapter name (``...query.lora_A.weight``);
    optionally ``absolute_tensors`` with full keys (tensors PEFT keeps outside the wrapped model).
    The core adds the task head (``modules_to_save``), the task type and the prefix.
    """


@hookspec(firstresult=True)
def gradient_checkpointing(model: "nn.Module", ctx: "TrainState") -> "bool | str | None":
    """Turn on gradient checkpointing for this method's model, or refuse it.

    Called by the memory-budget fit (`harness.budget`) only when no micro-batch fits the budget
    without checkpointing, after ``inject`` and before the optimizer exists. Return None for the
    core's default (Hugging Face ``gradient_checkpointing_enable``, non-reentrant checkpoints, on
    the model or its first submodule that supports it), True when the method turned it on itself,
    or a string saying why the method cannot train with recomputed activations (the run is then
    recorded as ``does_not_fit`` if nothing else fits).
    """
