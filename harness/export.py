"""Saving a run's adapter and exporting it to Hugging Face PEFT's adapter format.

``harness run --save`` writes the merged model (``save_pretrained``) and, under ``harness/`` in
the same folder, the adapted model's own tensors and the run's config. ``harness export RUN_DIR
--format peft`` rebuilds the adapted model from those (base model + the method's ``inject``), asks
the method's ``export_peft`` hook for PEFT names and config, and writes ``adapter_config.json`` and
``adapter_model.safetensors`` that ``PeftModel.from_pretrained(base, dir)`` loads.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.config import RunConfig

STATE_FILE = "harness/adapter_state.safetensors"
CONFIG_FILE = "harness/run_config.json"
PEFT_PREFIX = "base_model.model."


class ExportError(RuntimeError):
    pass


def trained_state(model: nn.Module, plain_keys: set[str]) -> dict[str, torch.Tensor]:
    """Tensors that differ from the base checkpoint's: trainable ones and the method's own."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()
            if k in trainable or k not in plain_keys}


def save_adapter_state(state: dict[str, torch.Tensor], config: RunConfig, out: Path) -> None:
    from safetensors.torch import save_file

    (out / "harness").mkdir(parents=True, exist_ok=True)
    # safetensors refuses tensors sharing memory (a shared frozen pair, tied weights): clone.
    save_file({k: v.clone() for k, v in state.items()}, str(out / STATE_FILE))
    (out / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=1, default=str))


def rebuild(run_dir: str | Path):
    """The adapted model of a saved run: base model, the method's ``inject``, saved tensors."""
    from safetensors.torch import load_file

    from harness.run import prepare

    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).exists():
        raise ExportError(f"{run_dir} is not a saved run (no {CONFIG_FILE}); "
                          f"run `harness run ... --save` and pass results/models/<run_id>")
    config = RunConfig.from_dict(json.loads((run_dir / CONFIG_FILE).read_text()))
    config.device = "cpu"
    prepared = prepare(config, with_data=False)
    state = load_file(str(run_dir / STATE_FILE))
    missing = set(state) - set(prepared.model.state_dict())
    if missing:
        raise ExportError(f"saved tensors do not fit the rebuilt model: {sorted(missing)[:3]}")
    prepared.model.load_state_dict(state, strict=False)
    return prepared


def export_peft(run_dir: str | Path, out_dir: str | Path) -> Path:
    from safetensors.torch import save_file

    from transformers import PreTrainedModel

    prepared = rebuild(run_dir)
    ctx, model = prepared.ctx, prepared.model
    if not isinstance(model, PreTrainedModel):  # a suite's own model (one head per task)
        raise ExportError(f"task {ctx.config.task!r} builds its own model ({type(model).__name__}), "
                          f"which PEFT cannot wrap; use the model saved in {run_dir} instead")
    answer = prepared.pm.hook.export_peft(model=model, ctx=ctx)
    if answer is None:
        raise ExportError(f"method {ctx.config.method!r} has no Hugging Face PEFT format; "
                          f"use the merged model saved in {run_dir} instead")
    tensors = {PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in answer["tensors"].items()}
    tensors.update({k: v.detach().cpu().contiguous() for k, v in answer.get("absolute_tensors", {}).items()})
    heads = [h for h in ctx.head_names]
    for name, p in model.named_parameters():
        if ctx.is_head(name):
            tensors[PEFT_PREFIX + name] = p.detach().cpu().contiguous()
    config: dict[str, Any] = {
        "task_type": "SEQ_CLS" if prepared.task.model_kind == "sequence-classification" else "CAUSAL_LM",
        "base_model_name_or_path": prepared.loaded.path,
        "modules_to_save": heads,
        "inference_mode": True,
        **answer["config"],
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.clone() for k, v in tensors.items()}, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return out
