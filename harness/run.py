"""One run: load task and model, apply the method, train, evaluate, merge, check, record."""
from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
import traceback
from pathlib import Path
from typing import Any

import torch
import numpy as np
from torch import nn

from harness.budget import (DoesNotFit, chosen_train, disable_checkpointing, enable_checkpointing,
                            enforce, fit_to_budget)
from harness.config import RunConfig
from harness.distributed import is_main as is_main_process
from harness.models import autocast_context, resolve_device
from harness.measure import count_parameters
from harness.plugins import get_method, make_manager
from harness.export import save_adapter_state, trained_state
from harness.records import new_record, write_record
from harness.state import TrainState
from harness.targets import resolve_targets
from harness.train import Trainer, attach_probes, set_seed, to_device
from harness.train import batches as _batches


@torch.no_grad()
def _logits(model: nn.Module, batches: list[dict[str, torch.Tensor]], ctx: TrainState) -> list[torch.Tensor]:
    """Logits per batch, as rows: one per example (classification), one per real token (language
    models: padded positions dropped). Per batch: a multitask suite's heads differ in width."""
    model.eval()
    out = []
    for b in batches:
        ctx.current_task = b.get("task")
        logits = model(**to_device(b, ctx.device)).logits.float().cpu()
        if logits.dim() == 3:
            mask = b.get("attention_mask")
            logits = logits[mask.bool()] if mask is not None and mask.shape == logits.shape[:2] \
                else logits.reshape(-1, logits.shape[-1])
        out.append(logits)
    return out


def _check_rows(rows: list[dict], n: int) -> list[dict]:
    """The merge check's examples: the first ``n`` of each task (rows of a multitask suite carry
    their task, so every head and per-task module is checked), else the first ``n``."""
    out, seen = [], {}
    for row in rows:
        task = row.get("task")
        if seen.get(task, 0) < n:
            out.append(row)
            seen[task] = seen.get(task, 0) + 1
    return out


@dataclass
class Prepared:
    """A run up to the start of training: data encoded, model loaded, method injected."""
    config: RunConfig
    task: Any
    method_cls: type
    pm: Any
    ctx: TrainState
    model: nn.Module
    loaded: Any
    collate: Any
    plain_keys: set[str]
    train_rows: list[dict] = field(default_factory=list)
    eval_rows: dict[str, list[dict]] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)


def prepare(config: RunConfig, observers: list[Any] = (), with_data: bool = True) -> Prepared:
    """Everything before training; ``with_data=False`` skips the data (rebuilding a saved run)."""
    from tasks import get_task  # registers the built-in tasks

    task = get_task(config.task, config.task_params)
    method_cls = get_method(config.method)
    method = method_cls(config.method_params)
    pm = make_manager(method, observers)
    device = resolve_device(config.device)
    cfg = config.train
    set_seed(cfg.seed)

    train_examples, eval_examples = [], {}
    if with_data:
        # Data first: a missing or malformed file should fail before a slow model load.
        train_examples = task.subset(task.load(task.train_split, config.data_dir), cfg.max_train_samples, cfg.seed)
        eval_examples = {s: task.subset(task.load(s, config.data_dir), cfg.max_eval_samples, 0)
                         for s in task.eval_splits}
        if not train_examples:
            raise ValueError(f"{config.task}: the training split is empty")

    loaded = task.build_model(config.model or task.default_model)
    model, tok = loaded.model.to(device), loaded.tokenizer
    plain_keys = set(model.state_dict().keys())
    collate = task.collator(tok)
    train_rows = task.encode(tok, train_examples, cfg.max_length) if train_examples else []
    eval_rows = {s: task.encode(tok, ex, cfg.max_length) for s, ex in eval_examples.items()}

    targets = config.method_params.get("targets")
    ctx = TrainState(config=config, device=device, targets=resolve_targets(loaded.model_type, targets)
                     if _needs_targets(method) else [], head_names=loaded.head_names,
                     model_type=loaded.model_type, task=task)

    attach_probes(ctx, train_rows, collate)  # methods may select weights from data in inject
    replaced = pm.hook.inject(model=model, ctx=ctx)
    model = (replaced if replaced is not None else model).to(device)
    for name, p in model.named_parameters():
        if ctx.is_head(name):
            p.requires_grad_(True)  # the task head trains for every method
    return Prepared(config, task, method_cls, pm, ctx, model, loaded, collate, plain_keys,
                    train_rows, eval_rows, count_trainable(model, pm, ctx))


def count_trainable(model: nn.Module, pm: Any, ctx: TrainState) -> dict[str, Any]:
    """Trainable elements (the method's answer where it has one), with shares of the total."""
    params = count_parameters(model, ctx.is_head)
    counted = pm.hook.count_trainable(model=model, ctx=ctx)
    if counted is not None:
        params.update(counted)
    params["trainable"] = params["method"] + params["head"]
    params["share"] = params["trainable"] / max(1, params["total"])
    params["method_share"] = params["method"] / max(1, params["total"])
    return params


def execute(config: RunConfig, observers: list[Any] = ()) -> dict[str, Any]:
    """Run one configuration and return its record (status ``ok``); exceptions propagate."""
    record = new_record(config)
    t0 = time.perf_counter()
    # The memory budget: the largest micro-batch that fits, measured on throwaway instances
    # (raises DoesNotFit); the run then starts from a fresh, untouched state.
    fit = fit_to_budget(config, prepare, log=lambda m: print(f"{config.method} on {config.task}: {m}",
                                                              file=sys.stderr))
    record["fit_seconds"] = time.perf_counter() - t0
    p = prepare(dataclasses.replace(config, train=chosen_train(config.train, fit["micro_batch"])),
                observers)
    task, method_cls, pm, ctx, model = p.task, p.method_cls, p.pm, p.ctx, p.model
    train_rows, eval_rows, collate, plain_keys = p.train_rows, p.eval_rows, p.collate, p.plain_keys
    tok, device, cfg = p.loaded.tokenizer, ctx.device, config.train
    record["model_path"] = p.loaded.path
    record["params"] = p.params

    def forward(batch: dict[str, torch.Tensor]) -> Any:
        ctx.current_task = batch.get("task")  # for methods with per-task modules
        with autocast_context(device):
            return model(**to_device(batch, device))

    folder = Path(config.output_dir) / record["run_id"]
    artifacts: dict[str, str | bytes] = {}
    if task.evaluate_before_training:  # the starting point, as the method begins training from it
        t_before = time.perf_counter()
        before, files = _evaluate(task, model, eval_rows, collate, cfg.eval_batch_size, forward)
        record["metrics_before"] = before
        record["eval_before_seconds"] = time.perf_counter() - t_before
        artifacts.update({f"before-{name}": content for name, content in files.items()})

    if fit["checkpointing"]:
        why = enable_checkpointing(model, pm, ctx)
        if why is not None:  # pragma: no cover - the fit's probe turned it on the same way
            raise RuntimeError(f"gradient checkpointing: {why}")
    trainer = Trainer(model, pm, ctx, train_rows, collate)
    undo = enforce(device, fit["budget_bytes"])  # CUDA: over budget fails as on a smaller card
    try:
        record.update(trainer.fit())
    finally:
        undo()
    if fit["checkpointing"]:
        disable_checkpointing(model)
    record["memory"] = memory_record(fit, record["memory"])
    if not is_main_process():  # data-parallel: process 0 evaluates, merges and records
        record.update(status="ok", secondary_process=True)
        return record
    # Count again: methods that restructure during training (a sampling phase that drops
    # layers) train a different set than inject made; the table reports what trained at the end.
    final = count_trainable(model, pm, ctx)
    if (final["method"], final["head"]) != (p.params["method"], p.params["head"]):
        record["params_at_start"] = p.params
        record["params"] = final

    t_eval = time.perf_counter()
    metrics, files = _evaluate(task, model, eval_rows, collate, cfg.eval_batch_size, forward)
    artifacts.update(files)
    record["metrics"] = metrics
    if artifacts:  # beside the record: <output_dir>/<run_id>/[before-]<split>-<name>
        folder.mkdir(parents=True, exist_ok=True)
        for name, content in artifacts.items():
            path = folder / name
            path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        # relative to the folder holding the record, so a results folder can be moved or committed
        record["artifacts"] = sorted(f"{folder.name}/{n}" for n in artifacts)
    record["score"] = task.score(metrics)
    record["eval_seconds"] = time.perf_counter() - t_eval
    record["eval_samples"] = {s: len(r) for s, r in eval_rows.items()}
    record["train_samples"] = len(train_rows)
    if task.data_notes():
        record["data"] = task.data_notes()

    # Merge, then check the plain model predicts what the adapted one did (fp32, no autocast).
    first = _check_rows(next(iter(eval_rows.values())), cfg.merge_check_samples)
    check = list(_batches(first, collate, cfg.eval_batch_size))
    before = _logits(model, check, ctx)
    # What `harness export` needs to rebuild the adapted model (merge may fold it in place).
    adapter_state = trained_state(model, plain_keys) if config.save else None
    merged = pm.hook.merge(model=model, ctx=ctx)
    # mergeable: folds into the original weights. A method that cannot (prompts, routers) may
    # still return an inference-only model (a cached prompt as a buffer): it is checked the same
    # way, but need not have the original architecture's keys.
    merge: dict[str, Any] = {"mergeable": merged is not None and method_cls.mergeable}
    if merged is not None:
        pairs = list(zip(_logits(merged, check, ctx), before))
        diff = max(float((a - b).abs().max()) for a, b in pairs)
        agree = float(np.concatenate([task.predictions(a) == task.predictions(b) for a, b in pairs]).mean())
        plain = set(merged.state_dict().keys()) == plain_keys
        merge.update(max_abs_diff=diff, prediction_agreement=agree, plain=plain,
                     ok=(plain or not method_cls.mergeable) and diff <= cfg.merge_tolerance,
                     samples=len(first))
        if config.save:
            out = Path(config.output_dir).parent / "models" / record["run_id"]
            merged.save_pretrained(out)
            tok.save_pretrained(out)
            record["saved_model"] = str(out)
            save_adapter_state(adapter_state, config, out)
    record["merge"] = merge
    record["extras"] = {k: v for k, v in ctx.extras.items() if not k.startswith("_")}
    record["wall_seconds"] = time.perf_counter() - t0
    if merged is not None and not merge["ok"]:
        record["status"] = "merge_mismatch"
        record["reason"] = (f"merged model differs from the adapted one: max |diff| "
                            f"{merge['max_abs_diff']:.2e} > {cfg.merge_tolerance:g}, plain={merge['plain']}")
    else:
        record["status"] = "ok"
    return record


def _evaluate(task: Any, model: nn.Module, eval_rows: dict[str, list[dict]], collate: Any,
              batch_size: int, forward: Any) -> tuple[dict[str, float], dict[str, str | bytes]]:
    """Metrics over every eval split (suffixed by split when there are several) and the files the
    task produced, named ``<split>-<name>``."""
    model.eval()
    metrics: dict[str, float] = {}
    artifacts: dict[str, str | bytes] = {}
    for split, rows in eval_rows.items():
        m = task.evaluate(model, _batches(rows, collate, batch_size), forward)
        suffix = "" if len(eval_rows) == 1 else "_" + split.removeprefix("dev_")
        metrics.update({k + suffix: v for k, v in m.items()})
        for name, content in task.take_artifacts().items():
            artifacts[f"{split}-{name}"] = content
    return metrics, artifacts


def _needs_targets(method: Any) -> bool:
    return "targets" in method.params


def run_and_record(config: RunConfig, observers: list[Any] = ()) -> dict[str, Any]:
    """`execute`, turning any failure into a recorded ``failed`` status; always writes the record."""
    t0 = time.perf_counter()
    try:
        record = execute(config, observers)
    except DoesNotFit as e:  # a result, not a failure: what it needed is recorded
        record = new_record(config)
        record["status"] = "does_not_fit"
        record["reason"] = str(e)
        record["memory"] = memory_record(e.fit, None)
        record["wall_seconds"] = time.perf_counter() - t0
    except Exception as e:  # recorded, never lost: the matrix goes on
        record = new_record(config)
        record["status"] = "failed"
        record["reason"] = f"{type(e).__name__}: {first_line(e)}"
        record["traceback"] = traceback.format_exc(limit=20)
        record["wall_seconds"] = time.perf_counter() - t0
    if is_main_process() or record["status"] == "failed":  # data-parallel: one record per run
        write_record(record, config.output_dir)
    return record


def memory_record(fit: dict[str, Any], trained: dict[str, Any] | None) -> dict[str, Any]:
    """The record's ``memory``: the fit's measured peak and breakdown at the chosen setting
    (tensor bytes, `harness.memory`), the budget and the choice, and the training loop's own
    figures (``train_*``: the resident-set high-water mark on the CPU, the allocator's peak on
    CUDA) as a cross-check."""
    out: dict[str, Any] = {
        "peak_bytes": fit.get("peak_bytes"), "kind": "tensors", "breakdown": fit.get("breakdown"),
        "budget_bytes": fit.get("budget_bytes"), "budget": fit.get("budget"),
        "micro_batch": fit.get("micro_batch"), "grad_accum": fit.get("grad_accum_used"),
        "checkpointing": bool(fit.get("checkpointing")),
        "fit": {k: fit[k] for k in ("candidates", "tolerance", "probe_steps", "batch_size",
                                    "grad_accum", "needed_bytes", "stopped") if k in fit},
    }
    if trained:
        out["optimizer_state_bytes"] = trained.get("optimizer_state_bytes")
        out.update({f"train_{k}": v for k, v in trained.items() if k != "optimizer_state_bytes"})
    return out


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    if isinstance(e, KeyError) and text.startswith(("'", '"')):
        text = text[1:-1]
    return text.splitlines()[0] if text else type(e).__name__
