"""Run configuration: profile files, per-method and per-task overrides, command-line ``--set``.

Resolution order, later wins::

    TrainConfig defaults < profile.train < profile.tasks[task] < profile.methods[method]
    < profile.tasks[task].methods[method] < --set key=value < --set method.key=value

(``tasks[task].methods`` is for settings one method needs on one suite only, e.g. a learning rate
for language modelling that differs from the GLUE one.)

A key that names a `TrainConfig` field sets training; a key the method declares in its ``defaults``
is a method hyperparameter; a key the task declares in its ``options`` (``tasks.base.Task``) is a
task option (what a suite evaluates, e.g. the long-context suite's passkey lengths). Anything else
is refused.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class TrainConfig:
    lr: float = 1e-4
    epochs: float = 1.0
    max_steps: int | None = None          # overrides epochs when set
    batch_size: int = 32
    grad_accum: int = 1                   # micro-batches per optimizer step
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0
    max_length: int = 128
    max_train_samples: int | None = None  # first N after a seeded shuffle
    max_eval_samples: int | None = None
    eval_batch_size: int = 64
    seed: int = 42
    merge_check_samples: int = 64
    merge_tolerance: float = 1e-3         # largest |logit difference| accepted after merge
    # Training tensor memory every run must fit in ("2GiB", "1500MiB", "2GB", bytes; None: no
    # budget); harness.budget picks the micro-batch (same effective batch) to fit it.
    memory_budget: str | None = None


TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainConfig)}


@dataclass
class RunConfig:
    method: str
    task: str
    model: str | None = None              # None: the task's default model
    profile: str = "smoke"
    device: str = "auto"
    train: TrainConfig = field(default_factory=TrainConfig)
    method_params: dict[str, Any] = field(default_factory=dict)
    task_params: dict[str, Any] = field(default_factory=dict)   # the task's declared options
    data_dir: str | None = None
    output_dir: str = "results/runs"
    save: bool = False
    # Data-parallel processes training this one run (harness.distributed; launched with accelerate).
    processes: int = 1

    def identity(self) -> dict[str, Any]:
        """What makes two runs the same run (a finished one is skipped on re-run)."""
        train = dataclasses.asdict(self.train)
        if train.get("memory_budget") is None:  # only when set: older run ids stay as they were
            train.pop("memory_budget", None)
        ident = {"method": self.method, "task": self.task, "model": self.model,
                 "profile": self.profile, "train": train, "method_params": self.method_params}
        if self.task_params:  # only when set: run ids of tasks without options stay as they were
            ident["task_params"] = self.task_params
        if self.processes > 1:  # measured differently (throughput, memory per device): its own run
            ident["processes"] = self.processes
        return ident

    def run_id(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True, default=str)
        digest = hashlib.sha256(blob.encode()).hexdigest()[:10]
        return f"{self.task.replace('/', '-')}__{self.method}__{digest}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        d = dict(d)
        d["train"] = TrainConfig(**d.get("train", {}))
        return cls(**d)


class ConfigError(ValueError):
    """A profile, override or hyperparameter that cannot be used."""


def available_profiles() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "profiles").glob("*.yaml"))


def load_profile(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / "profiles" / f"{name_or_path}.yaml"
    if not path.exists():
        raise ConfigError(f"unknown profile {name_or_path!r}; choose one of "
                          f"{', '.join(available_profiles())} or give a YAML file path")
    data = yaml.safe_load(path.read_text()) or {}
    for key in data:
        if key not in ("description", "train", "tasks", "methods"):
            raise ConfigError(f"{path}: unknown section {key!r} (allowed: description, train, tasks, methods)")
    return data


def parse_value(text: str) -> Any:
    """``--set`` values are YAML scalars: ``1e-3`` is a float, ``q,v`` stays a string."""
    for cast in (int, float):  # YAML 1.1 reads 5e-4 (no dot) as a string
        try:
            return cast(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = parse_value(value.strip())
    return out


def _split(params: dict[str, Any], method_defaults: dict[str, Any], where: str,
           method: str, strict: bool = True, task_options: dict[str, Any] | None = None,
           ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    train, meth, task = {}, {}, {}
    task_options = task_options or {}
    for k, v in params.items():
        if k in TRAIN_KEYS:
            train[k] = v
        elif k in method_defaults:
            meth[k] = v
        elif k in task_options:
            task[k] = v
        elif strict:
            opts = f"; task options: {', '.join(sorted(task_options))}" if task_options else ""
            raise ConfigError(
                f"{where}: {k!r} is neither a training setting ({', '.join(sorted(TRAIN_KEYS))}) "
                f"nor a hyperparameter of method {method!r} ({', '.join(sorted(method_defaults)) or 'none'})"
                + opts)
    return train, meth, task


def task_options(task: str) -> dict[str, Any]:
    """The options a registered task declares (``{}`` for unknown names, e.g. tests' synthetic)."""
    from tasks import task_class  # registers the built-in tasks; tasks never import this module

    try:
        cls = task_class(task)  # builds a family member (multitask/sst2+rte) on first use
    except KeyError:
        cls = None
    return dict(getattr(cls, "options", {}) or {}) if cls is not None else {}


def resolve(method: str, task: str, method_defaults: dict[str, Any], profile: str = "smoke",
            overrides: dict[str, Any] | None = None, **run_kwargs: Any) -> RunConfig:
    """Build the full `RunConfig` of one (method, task) cell of a matrix."""
    prof = load_profile(profile)
    train: dict[str, Any] = {}
    meth: dict[str, Any] = dict(method_defaults)
    options = task_options(task)
    task_params: dict[str, Any] = {}
    layers = [("profile train", prof.get("train") or {})]
    task_method_layers = []
    for pattern, params in (prof.get("tasks") or {}).items():
        if task == pattern or task.startswith(pattern.rstrip("/") + "/"):
            params = dict(params or {})
            per_method = params.pop("methods", None) or {}
            layers.append((f"profile tasks.{pattern}", params))
            task_method_layers.append((f"profile tasks.{pattern}.methods.{method}",
                                       per_method.get(method) or {}))
    layers.append((f"profile methods.{method}", (prof.get("methods") or {}).get(method) or {}))
    layers += task_method_layers
    overrides = overrides or {}
    layers.append(("--set", {k: v for k, v in overrides.items() if "." not in k}))
    layers.append((f"--set {method}.*", {k.split(".", 1)[1]: v for k, v in overrides.items()
                                         if k.startswith(method + ".")}))
    for where, params in layers:
        # A global --set of a method hyperparameter applies to the methods that have it.
        t, m, o = _split(params, method_defaults, where, method, strict=where != "--set",
                         task_options=options)
        train.update(t)
        meth.update(m)
        task_params.update(o)
    for key, value in list(train.items()):
        # Numbers from YAML files may arrive as strings ("5e-4"); refuse anything else early.
        kind = TrainConfig.__dataclass_fields__[key].type
        if isinstance(value, str) and ("float" in kind or "int" in kind):
            try:
                train[key] = float(value) if "float" in kind else int(value)
            except ValueError:
                raise ConfigError(f"{key} must be a number, got {value!r}") from None
    if train.get("memory_budget") is not None:
        from harness.memory import parse_size

        try:
            parse_size(train["memory_budget"])
        except ValueError as e:
            raise ConfigError(f"memory_budget: {e}") from None
    try:
        tc = TrainConfig(**train)
    except TypeError as e:  # pragma: no cover - keys are checked above
        raise ConfigError(str(e)) from e
    return RunConfig(method=method, task=task, profile=profile, train=tc, method_params=meth,
                     task_params=task_params, **run_kwargs)
