"""`TrainState`: what every hook sees about the run in progress."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from harness.config import RunConfig, TrainConfig


@dataclass
class TrainState:
    config: RunConfig
    device: torch.device
    targets: list[str]                      # target module patterns for this architecture
    head_names: list[str]                   # parameter-name prefixes of the task head
    model_type: str                         # Hugging Face config.model_type
    task: Any = None                        # the tasks.Task being trained
    # The task of the batch being run, for suites of several tasks (the batch's "task", a member's
    # short name); None for single-task runs. The core sets it before every forward pass it runs
    # (training, probes, evaluation, merge check); methods with per-task modules read it here.
    current_task: str | None = None
    step: int = 0                           # optimizer steps taken
    total_steps: int = 0
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    # Filled by the loop so methods can run their own probes (Fisher scores, sampling phases).
    train_batches: Callable[[], Iterator[dict[str, torch.Tensor]]] | None = None
    compute_loss: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor] | None = None
    # A method's own figures (kept layers, final ranks, ...), saved in the run record.
    extras: dict[str, Any] = field(default_factory=dict)
    _rebuild: Callable[[], None] | None = None
    rebuilds: int = 0

    @property
    def train(self) -> TrainConfig:
        return self.config.train

    @property
    def method_params(self) -> dict[str, Any]:
        return self.config.method_params

    def rebuild_optimizer(self) -> None:
        """Replace the optimizer from ``param_groups``; frees the state of parameters that left."""
        if self._rebuild is None:
            raise RuntimeError("rebuild_optimizer() is only available during training")
        self._rebuild()
        self.rebuilds += 1

    @property
    def task_names(self) -> list[str]:
        """The tasks batches may carry (a multitask suite's members); empty for a single task."""
        return list(getattr(self.task, "task_names", None) or [])

    def is_head(self, param_name: str) -> bool:
        return any(param_name == h or param_name.startswith(h + ".") for h in self.head_names)
