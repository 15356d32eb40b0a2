"""One run: load task and model, apply the method, train, evaluate, merge, check, record."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.config import RunConfig
from harness.models import autocast_context, load_model, resolve_device
from harness.measure import count_parameters
from harness.plugins import get_method, make_manager
from harness.export import save_adapter_state, trained_state
from harness.records import new_record, write_record
from harness.state import TrainState
from harness.targets import resolve_targets
from harness.train import Trainer, attach_probes, set_seed, to_device


def _subset(items: list, n: int | None, seed: int) -> list:
    if n is None or n >= len(items):
        return list(items)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in sorted(order[:n])]


def _batches(rows: list[dict], collate: Any, size: int):
    for i in range(0, len(rows), size):
        yield collate(rows[i:i + size])


@torch.no_grad()
def _logits(model: nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device) -> torch.Tensor:
    """Logits as rows: one per example (classification), one per real token (language models:
    padded positions dropped, so batches of different lengths concatenate)."""
    model.eval()
    out = []
    for b in batches:
        logits = model(**to_device(b, device)).logits.float().cpu()
        if logits.dim() == 3:
            mask = b.get("attention_mask")
            logits = logits[mask.bool()] if mask is not None and mask.shape == logits.shape[:2] \
                else logits.reshape(-1, logits.shape[-1])
        out.append(logits)
    return torch.cat(out)


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

    task = get_task(config.task)
    method_cls = get_method(config.method)
    method = method_cls(config.method_params)
    pm = make_manager(method, observers)
    device = resolve_device(config.device)
    cfg = config.train
    set_seed(cfg.seed)

    train_examples, eval_examples = [], {}
    if with_data:
        # Data first: a missing or malformed file should fail before a slow model load.
        train_examples = _subset(task.load(task.train_split, config.data_dir), cfg.max_train_samples, cfg.seed)
        eval_examples = {s: _subset(task.load(s, config.data_dir), cfg.max_eval_samples, 0)
                         for s in task.eval_splits}
        if not train_examples:
            raise ValueError(f"{config.task}: the training split is empty")

    loaded = load_model(config.model or task.default_model, task.model_kind, num_labels=task.num_labels)
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
    p = prepare(config, observers)
    task, method_cls, pm, ctx, model = p.task, p.method_cls, p.pm, p.ctx, p.model
    train_rows, eval_rows, collate, plain_keys = p.train_rows, p.eval_rows, p.collate, p.plain_keys
    tok, device, cfg = p.loaded.tokenizer, ctx.device, config.train
    record["model_path"] = p.loaded.path
    record["params"] = p.params

    trainer = Trainer(model, pm, ctx, train_rows, collate)
    record.update(trainer.fit())
    # Count again: methods that restructure during training (a sampling phase that drops
    # layers) train a different set than inject made; the table reports what trained at the end.
    final = count_trainable(model, pm, ctx)
    if (final["method"], final["head"]) != (p.params["method"], p.params["head"]):
        record["params_at_start"] = p.params
        record["params"] = final

    t_eval = time.perf_counter()
    model.eval()

    def forward(batch: dict[str, torch.Tensor]) -> Any:
        with autocast_context(device):
            return model(**to_device(batch, device))

    metrics: dict[str, float] = {}
    artifacts: dict[str, str | bytes] = {}
    for split, rows in eval_rows.items():
        m = task.evaluate(model, _batches(rows, collate, cfg.eval_batch_size), forward)
        suffix = "" if len(eval_rows) == 1 else "_" + split.removeprefix("dev_")
        metrics.update({k + suffix: v for k, v in m.items()})
        for name, content in task.take_artifacts().items():
            artifacts[f"{split}-{name}"] = content
    record["metrics"] = metrics
    if artifacts:  # beside the record: <output_dir>/<run_id>/<split>-<name>
        folder = Path(config.output_dir) / record["run_id"]
        folder.mkdir(parents=True, exist_ok=True)
        for name, content in artifacts.items():
            path = folder / name
            path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        record["artifacts"] = sorted(str(folder / n) for n in artifacts)
    record["score"] = task.score(metrics)
    record["eval_seconds"] = time.perf_counter() - t_eval
    record["eval_samples"] = {s: len(r) for s, r in eval_rows.items()}
    record["train_samples"] = len(train_rows)

    # Merge, then check the plain model predicts what the adapted one did (fp32, no autocast).
    first = next(iter(eval_rows.values()))[: cfg.merge_check_samples]
    check = list(_batches(first, collate, cfg.eval_batch_size))
    before = _logits(model, check, device)
    # What `harness export` needs to rebuild the adapted model (merge may fold it in place).
    adapter_state = trained_state(model, plain_keys) if config.save else None
    merged = pm.hook.merge(model=model, ctx=ctx)
    # mergeable: folds into the original weights. A method that cannot (prompts, routers) may
    # still return an inference-only model (a cached prompt as a buffer): it is checked the same
    # way, but need not have the original architecture's keys.
    merge: dict[str, Any] = {"mergeable": merged is not None and method_cls.mergeable}
    if merged is not None:
        after = _logits(merged, check, device)
        diff = float((after - before).abs().max())
        agree = float((task.predictions(after) == task.predictions(before)).mean())
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


def _needs_targets(method: Any) -> bool:
    return "targets" in method.params


def run_and_record(config: RunConfig, observers: list[Any] = ()) -> dict[str, Any]:
    """`execute`, turning any failure into a recorded ``failed`` status; always writes the record."""
    t0 = time.perf_counter()
    try:
        record = execute(config, observers)
    except Exception as e:  # recorded, never lost: the matrix goes on
        record = new_record(config)
        record["status"] = "failed"
        record["reason"] = f"{type(e).__name__}: {first_line(e)}"
        record["traceback"] = traceback.format_exc(limit=20)
        record["wall_seconds"] = time.perf_counter() - t0
    write_record(record, config.output_dir)
    return record


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    if isinstance(e, KeyError) and text.startswith(("'", '"')):
        text = text[1:-1]
    return text.splitlines()[0] if text else type(e).__name__
