"""Fixed memory budgets: fit every run into the same memory by measuring real training steps.

A run's budget (``memory_budget``: ``--memory-budget 2GiB``, or the profile's default) bounds its
training tensor memory (`harness.memory`: weights, gradients, optimizer state, activations and
temporaries on the training device). Before training, `fit_to_budget` searches for the largest
micro-batch that fits:

1. Candidates: the configured ``batch_size`` B, then B divided by its smallest prime factor, again
   and again, down to 1 (16, 8, 4, 2, 1; 12, 6, 3, 1). Gradient accumulation grows by the same
   factor, so the effective batch (``batch_size * grad_accum`` rows per optimizer step) and with it
   the optimization are unchanged.
2. Each candidate is measured, not estimated: the run is prepared afresh (data, model, the method's
   ``inject``: the state the real run starts from), and ``PROBE_STEPS`` real optimizer steps run
   through the harness's own loop (`harness.train.Trainer`, every method hook included) on the
   longest training rows (the largest padded shape any step can have), with ``min(accumulation,
   2)`` micro-batches per step: the second step runs with the optimizer state AdamW allocated in
   the first, and from the second micro-batch on the gradients are live during the forward pass,
   so the probe meets the steady state's peak. `harness.memory.TensorMemory` counts live tensor
   bytes (on CUDA the caching allocator's peaks too: the larger of the count and
   ``max_memory_allocated`` is reported, and the larger of that and ``max_memory_reserved``, which
   the memory fraction caps, is compared). The candidate fits when that is at most the budget. The probe instance is then thrown away: the real
   run starts from an untouched state.
3. Gradient checkpointing (recompute activations in backward; Hugging Face's
   ``gradient_checkpointing_enable``, non-reentrant) is tried only when no micro-batch fits
   without it, from B down again. A method can refuse it through the ``gradient_checkpointing``
   hook (a key/value prefix does: checkpointed layers drop ``past_key_values``); a probe that fails
   with it on counts as refused.
4. Nothing fits: the run is recorded with status ``does_not_fit`` and the memory it needed (the
   smallest peak measured). The search stops early when the measured state alone (weights,
   gradients, optimizer state at the peak) exceeds the budget, since no micro-batch shrinks it.

Window: counting covers training, from before ``on_train_start`` (a method's sampling phase there
is training) to the last optimizer step. Selection work a method does in ``inject`` before training
(a Fisher pass, a probe run that picks weights) and evaluation are outside it.

Tolerance: the probe's batches are the worst case by shape, so the real steps' peak is at most
the probe's for methods whose memory does not change during training; ``FIT_TOLERANCE`` (5%) is the
stated margin for the rest (memory that changes as a method restructures mid-run). Tests train with
the chosen setting under the counter and check the whole run stays within it.

On CUDA the budget is also enforced during training with
``torch.cuda.set_per_process_memory_fraction(budget / device memory)``: a run that outgrows it
fails with an out-of-memory error, as it would on a card that size. The CPU has no such switch.
"""
from __future__ import annotations

import dataclasses
import gc
import time
from typing import Any, Callable

import torch
from torch import nn

from harness.memory import format_size, parse_size

PROBE_STEPS = 2
FIT_TOLERANCE = 0.05
STATE = ("frozen_weights", "trainable_weights", "buffers", "gradients", "optimizer_state", "other")


class DoesNotFit(RuntimeError):
    """No micro-batch, with or without gradient checkpointing, trains within the budget."""

    def __init__(self, message: str, fit: dict[str, Any]):
        super().__init__(message)
        self.fit = fit


def budget_bytes(train: Any) -> int | None:
    return parse_size(getattr(train, "memory_budget", None))


def micro_batches(batch_size: int) -> list[int]:
    """``batch_size`` and its successive quotients by the smallest prime factor, down to 1."""
    out, b = [int(batch_size)], int(batch_size)
    while b > 1:
        f = next(k for k in range(2, b + 1) if b % k == 0)
        b //= f
        out.append(b)
    return out


def probe_rows(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The ``n`` longest rows (input length), of one task (a multitask suite's batch serves one
    head): the largest padded shape a training batch of ``n`` rows can have."""
    def length(r: dict[str, Any]) -> int:
        ids = r.get("input_ids")
        return len(ids) if ids is not None else 0

    if not rows:
        return []
    task = max(rows, key=length).get("task")
    same = [r for r in rows if r.get("task") == task]
    same = sorted(same, key=length, reverse=True)
    out = same[:n]
    while len(out) < n:  # fewer rows than a probe needs: repeat them (same shape)
        out.append(same[len(out) % len(same)])
    return out


def enable_checkpointing(model: nn.Module, pm: Any, ctx: Any) -> str | None:
    """Turn gradient checkpointing on; None when on, else why it cannot be."""
    answer = pm.hook.gradient_checkpointing(model=model, ctx=ctx)
    if answer is True:
        return None
    if isinstance(answer, str):
        return f"refused by the method: {answer}"
    target = _checkpointable(model)
    if target is None:
        return "the model has no gradient checkpointing (not a Hugging Face model that supports it)"
    kwargs = {"use_reentrant": False}
    if hasattr(target, "activation_checkpointing_enable"):  # transformers 5's name
        target.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return None


def _checkpointable(model: nn.Module) -> nn.Module | None:
    """The model, or its first submodule, that is a Hugging Face model supporting checkpointing."""
    return next((m for m in model.modules() if getattr(m, "supports_gradient_checkpointing", False)
                 and (hasattr(m, "activation_checkpointing_enable")
                      or hasattr(m, "gradient_checkpointing_enable"))), None)


def disable_checkpointing(model: nn.Module) -> None:
    target = _checkpointable(model)
    if target is not None:
        (getattr(target, "activation_checkpointing_disable", None) or target.gradient_checkpointing_disable)()


def chosen_train(train: Any, micro_batch: int) -> Any:
    """The training settings with ``micro_batch`` rows per forward pass, same effective batch."""
    factor = train.batch_size // micro_batch
    return dataclasses.replace(train, batch_size=micro_batch, grad_accum=train.grad_accum * factor)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def measure(config: Any, micro_batch: int, checkpointing: bool,
            prepare: Callable[[Any], Any]) -> dict[str, Any]:
    """One candidate: a fresh prepared run, ``PROBE_STEPS`` counted optimizer steps on the longest
    rows; its peak and breakdown. An out-of-memory error, or any failure with checkpointing on
    (recorded as refused), is a result; other errors are the run's own and propagate."""
    from harness.train import Trainer

    train = chosen_train(config.train, micro_batch)
    probe_accum = min(train.grad_accum, 2)
    probe_train = dataclasses.replace(train, grad_accum=probe_accum, max_steps=PROBE_STEPS,
                                      warmup_ratio=0.0)
    out: dict[str, Any] = {"micro_batch": micro_batch, "grad_accum": train.grad_accum,
                           "checkpointing": checkpointing}
    t0 = time.perf_counter()
    p = None
    try:
        p = prepare(dataclasses.replace(config, train=probe_train))
        device = p.ctx.device
        if checkpointing:
            why = enable_checkpointing(p.model, p.pm, p.ctx)
            if why is not None:
                out.update(fits=False, refused=why)
                return out
        # Every probe step on the same longest rows: each meets the largest shape.
        rows = probe_rows(p.train_rows, micro_batch * probe_accum) * PROBE_STEPS
        free_memory(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        result = Trainer(p.model, p.pm, p.ctx, rows, p.collate, track_memory=True, ordered=True).fit()
        tm = result["tensor_memory"]
        peak = tm["peak_bytes"]
        out.update(peak_bytes=peak, breakdown=tm["breakdown"], probe_rows_length=max(
            len(r.get("input_ids") or []) for r in rows))
        if device.type == "cuda":
            out.update(cuda_max_allocated=int(torch.cuda.max_memory_allocated(device)),
                       cuda_max_reserved=int(torch.cuda.max_memory_reserved(device)))
            # Reported: tensor bytes (the breakdown's, or the allocator's if larger). Compared
            # with the budget: what the allocator reserved, which the memory fraction caps.
            out["peak_bytes"] = max(peak, out["cuda_max_allocated"])
            out["fit_bytes"] = max(out["peak_bytes"], out["cuda_max_reserved"])
    except torch.OutOfMemoryError as e:
        out.update(fits=False, error=f"out of memory: {str(e).splitlines()[0]}")
        if torch.cuda.is_available():
            out["peak_bytes"] = int(torch.cuda.max_memory_reserved())
    except Exception as e:
        if not checkpointing:
            raise  # the run itself is broken (data, model, method): the run records why
        # Fails only with checkpointing on: the method cannot train that way (refused).
        text = str(e).strip()
        out.update(fits=False, refused=f"training with it failed: {type(e).__name__}: "
                                       f"{text.splitlines()[0] if text else ''}")
    finally:
        out["seconds"] = round(time.perf_counter() - t0, 2)
        del p
        free_memory(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    return out


def fit_to_budget(config: Any, prepare: Callable[[Any], Any], log: Callable[[str], None] = lambda m: None
                  ) -> dict[str, Any]:
    """Search the micro-batch (and, only if needed, gradient checkpointing) for ``config``'s
    budget. Returns the fit record; raises `DoesNotFit` (carrying it) when nothing fits.

    Without a budget the configured setting is measured once (for the breakdown) and kept."""
    budget = budget_bytes(config.train)
    fit: dict[str, Any] = {"budget_bytes": budget, "budget": config.train.memory_budget,
                           "tolerance": FIT_TOLERANCE, "probe_steps": PROBE_STEPS,
                           "batch_size": config.train.batch_size,
                           "grad_accum": config.train.grad_accum, "candidates": []}
    sizes = micro_batches(config.train.batch_size) if budget is not None else [config.train.batch_size]
    for checkpointing in (False, True):
        if checkpointing and budget is None:
            break
        for b in sizes:
            cand = measure(config, b, checkpointing, prepare)
            fit["candidates"].append(cand)
            if "peak_bytes" in cand and "fits" not in cand:
                cand["fits"] = budget is None or cand.get("fit_bytes", cand["peak_bytes"]) <= budget
            log(f"fit: micro-batch {b}{' + checkpointing' if checkpointing else ''}: "
                f"{format_size(cand.get('peak_bytes'))} of {format_size(budget)}: "
                f"{'fits' if cand['fits'] else cand.get('refused') or cand.get('error') or 'too large'}")
            if cand["fits"]:
                fit.update(micro_batch=b, grad_accum_used=cand["grad_accum"],
                           checkpointing=checkpointing, peak_bytes=cand["peak_bytes"],
                           breakdown=cand["breakdown"])
                return fit
            if cand.get("refused"):
                break  # checkpointing is off the table for this method
            state = sum((cand.get("breakdown") or {}).get(k, 0) for k in STATE)
            if budget is not None and state > budget:
                fit["stopped"] = (f"the state alone (weights, gradients, optimizer state) takes "
                                  f"{format_size(state)} > {format_size(budget)}")
                break
        if fit.get("stopped"):
            break
    measured = [c for c in fit["candidates"] if c.get("peak_bytes")]
    needed = min((c["peak_bytes"] for c in measured), default=None)
    best = min(measured, key=lambda c: c["peak_bytes"]) if measured else {}
    fit.update(needed_bytes=needed, breakdown=best.get("breakdown"), peak_bytes=needed,
               micro_batch=best.get("micro_batch"), grad_accum_used=best.get("grad_accum"),
               checkpointing=best.get("checkpointing", False))
    refused = next((c["refused"] for c in fit["candidates"] if c.get("refused")), None)
    how = (f"micro-batch {best.get('micro_batch')}" + (" with gradient checkpointing"
                                                       if best.get("checkpointing") else ""))
    msg = (f"needs {format_size(needed)} at {how}, over the budget of {format_size(budget)}"
           if needed is not None else f"no candidate could be measured within {format_size(budget)}")
    if refused:
        msg += f"; gradient checkpointing: {refused}"
    if fit.get("stopped"):
        msg += f"; {fit['stopped']}"
    raise DoesNotFit(msg, fit)


def enforce(device: torch.device, budget: int | None) -> Callable[[], None]:
    """On CUDA, cap this process's allocator at the budget; returns the undo. No-op elsewhere."""
    if budget is None or device.type != "cuda":
        return lambda: None
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), index)
    return lambda: torch.cuda.set_per_process_memory_fraction(1.0, index)


__all__ = ["DoesNotFit", "fit_to_budget", "micro_batches", "probe_rows", "enable_checkpointing",
           "disable_checkpointing", "chosen_train", "enforce", "budget_bytes", "PROBE_STEPS",
           "FIT_TOLERANCE"]
