"""`harness eval`: lm-evaluation-harness tasks on a saved model, offline when the tasks are local.

The model is a run saved with ``harness run --save`` (``results/models/<run_id>``, or that run's
JSON record, which names it), a model alias (``smollm2``), any local directory ``from_pretrained``
reads, or a hub id when online. Tasks are lm-eval task or group names; ``include_path`` adds
folders of task YAML files, so a task over local files (``dataset_path: json`` with
``dataset_kwargs.data_files``) needs no network. lm-eval is an optional dependency:
``pip install 'peft-harness[eval]'``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class EvalError(ValueError):
    """Bad input to `harness eval`: a model, task or folder that cannot be used."""


def resolve_model_path(spec: str) -> str:
    """A model directory (or hub id) from a saved model folder, a run record, or an alias."""
    from harness.models import ALIASES, resolve_model

    path = Path(spec).expanduser()
    if path.suffix == ".json" and path.is_file():
        record = json.loads(path.read_text())
        saved = record.get("saved_model")
        if not saved:
            raise EvalError(f"{spec}: this run record has no saved model; re-run it with --save")
        path = Path(saved)
        if not path.is_dir():
            raise EvalError(f"{spec}: its saved model {saved} does not exist any more")
        return str(path)
    if spec in ALIASES:
        return resolve_model(spec)
    if path.exists():
        if not (path / "config.json").is_file():
            raise EvalError(f"{spec}: not a saved model folder (no config.json); give a folder "
                            f"written by --save or save_pretrained, a run record, or a hub id")
        return str(path)
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise EvalError(f"{spec}: no such folder, and the hub is off (HF_HUB_OFFLINE)")
    return spec  # a hub id: lm-eval's loader will say if it is not one


def task_manager(tasks: list[str], include_path: list[str] | None) -> Any:
    """lm-eval's task index; only the included folders when they hold every task asked for
    (indexing lm-eval's own few thousand YAML files takes seconds)."""
    from lm_eval.tasks import TaskManager

    for folder in include_path or []:
        if not Path(folder).is_dir():
            raise EvalError(f"--include-path {folder}: no such folder")
    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=include_path or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise EvalError(f"unknown lm-eval task(s) {', '.join(unknown)}; list them with "
                        f"`lm-eval ls tasks`, or add a folder of task YAMLs with --include-path")
    return manager


def evaluate(model: str, tasks: list[str], include_path: list[str] | None = None,
             limit: int | float | None = None, num_fewshot: int | None = None,
             batch_size: int = 8, device: str = "auto", apply_chat_template: bool = False,
             log_samples: bool = False) -> dict[str, Any]:
    """Run lm-eval's ``simple_evaluate`` with its Hugging Face backend (fp32) on ``model``."""
    try:
        import lm_eval
    except ImportError:
        raise EvalError("harness eval needs lm-evaluation-harness: "
                        "pip install 'peft-harness[eval]'") from None
    import torch

    if not tasks:
        raise EvalError("--tasks is empty; e.g. --tasks hellaswag or a task from --include-path")
    path = resolve_model_path(model)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    results = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": path, "dtype": "float32"}, tasks=tasks,
        task_manager=task_manager(tasks, include_path), limit=limit, num_fewshot=num_fewshot,
        batch_size=batch_size, device=device, apply_chat_template=apply_chat_template,
        log_samples=log_samples)
    if results is None:  # lm-eval returns None on non-zero ranks of a distributed run
        raise EvalError("lm-eval returned no results")
    results["model_path"] = path
    return results


def to_json(results: dict[str, Any]) -> str:
    from lm_eval.utils import handle_non_serializable

    return json.dumps(results, indent=2, default=handle_non_serializable)


def table(results: dict[str, Any]) -> str:
    from lm_eval.utils import make_table

    return make_table(results)
