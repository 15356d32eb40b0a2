"""The multitask suite: several GLUE tasks trained together, one shared backbone, one head per task.

``multitask/sst2+rte+mrpc`` names the members (GLUE short names, ``+``-separated); ``--task
multitask`` runs the default suite, ``multitask/sst2+rte+mrpc``: three tasks whose data is in the
offline folder (one single-sentence task, two sentence-pair tasks, one of them scored with F1 too).
Any other combination is built the first time it is named (a registry *family*).

Data: each member's own reader. ``max_train_samples`` and ``max_eval_samples`` cap *each member*,
with the same seeded draw as that member's single-task run: a multitask run of a profile trains on
the union of the single-task runs' training examples and is scored on the same dev examples, so
the two are comparable figure by figure.

Batches: one member per batch. A collated batch carries its member's short name under ``"task"``
(a string): the model takes it (``task=``) to pick the head, and the core copies it to
``ctx.current_task`` before every forward (methods with per-task modules read it there;
``harness.train.to_device`` passes non-tensor values through). Mixing, the task options ``mixing``
and ``temperature``: a batch's member ``t`` is drawn with probability

- ``proportional``: ``n_t / sum_u n_u`` (``n_t``: its training rows after the cap);
- ``temperature``: ``n_t ** (1/T) / sum_u n_u ** (1/T)`` (temperature-scaled mixing as in T5 and
  multilingual BERT: ``T = 1`` is proportional, a large ``T`` tends to uniform);
- ``uniform``: ``1 / members``.

An epoch is ``sum_t ceil(n_t / batch_size)`` batches; within a member, rows are drawn without
replacement and reshuffled when used up.

Model: `MultiTaskModel`: the backbone (``AutoModel``) under its usual attribute (``bert`` for
MiniLM, so parameter names and the methods' target lists are those of
``BertForSequenceClassification``) and ``heads``, a ``ModuleDict`` of one head per member shaped
like BERT's classification head (dropout, then a linear layer, on the pooled output: the backbone's
pooler when it has one, else the last non-padding token as decoder classifiers do). ``heads`` is
the task head: it trains for every method and counts as head parameters. Loss: cross-entropy, or
mean squared error for a regression member (STS-B).

Metrics: each member's official GLUE metrics, keyed ``<member task>/<metric>`` (``glue/mrpc/f1``);
score: the mean over members of each member's score (the mean of its metrics). A member with two
dev sets (MNLI) is evaluated on the first (matched).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tasks.base import Example, Task, seeded_subset
from tasks.glue import GlueTask
from tasks.registry import TASKS, register_family, register_task

GROUP = "multitask"
DEFAULT_MEMBERS = ("sst2", "rte", "mrpc")
MIXING = ("proportional", "temperature", "uniform")


@dataclass
class TaskExample(Example):
    task: str = ""          # the member's short name


def mixing_probabilities(sizes: dict[str, int], mixing: str, temperature: float) -> dict[str, float]:
    """Probability of drawing each member for the next batch (see the module docstring)."""
    if mixing not in MIXING:
        raise ValueError(f"multitask: mixing must be one of {', '.join(MIXING)}, got {mixing!r}")
    if mixing == "temperature" and not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"multitask: temperature must be a positive number, got {temperature!r}")
    power = {"proportional": 1.0, "temperature": 1.0 / float(temperature), "uniform": 0.0}[mixing]
    weights = {t: float(n) ** power if n > 0 else 0.0 for t, n in sizes.items()}
    total = sum(weights.values())
    return {t: w / total for t, w in weights.items()}


class MixingSampler:
    """A batch sampler: lists of row indices, all from one member, members drawn by ``probs``."""

    def __init__(self, groups: dict[str, list[int]], batch_size: int, probs: dict[str, float],
                 generator: torch.Generator):
        self.groups = {t: list(ix) for t, ix in groups.items() if ix}
        self.batch_size = batch_size
        self.names = list(self.groups)
        self.probs = torch.tensor([probs[t] for t in self.names], dtype=torch.float64)
        self.generator = generator

    def __len__(self) -> int:
        return sum(math.ceil(len(ix) / self.batch_size) for ix in self.groups.values())

    def __iter__(self) -> Iterator[list[int]]:
        g = self.generator
        perms: dict[str, list[int]] = {t: [] for t in self.names}
        for _ in range(len(self)):
            t = self.names[int(torch.multinomial(self.probs, 1, generator=g))]
            rows, size = self.groups[t], min(self.batch_size, len(self.groups[t]))
            batch: list[int] = []
            while len(batch) < size:
                if not perms[t]:  # used up: a fresh shuffle of this member's rows
                    perms[t] = [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]
                take = size - len(batch)
                batch += perms[t][:take]
                perms[t] = perms[t][take:]
            yield batch


class ClassificationHead(nn.Module):
    """Dropout and a linear layer on the pooled output, as ``BertForSequenceClassification``."""

    def __init__(self, hidden: int, num_labels: int, dropout: float, init_std: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_labels)
        nn.init.normal_(self.classifier.weight, std=init_std)  # BERT's _init_weights
        nn.init.zeros_(self.classifier.bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(pooled))


class MultiTaskModel(nn.Module):
    """A shared backbone and one head per task; ``forward(..., task=NAME)`` picks the head."""

    def __init__(self, backbone: nn.Module, num_labels: dict[str, int]):
        super().__init__()
        if not num_labels:
            raise ValueError("a multitask model needs at least one task")
        self.backbone_attr = getattr(backbone, "base_model_prefix", "") or "backbone"
        self.add_module(self.backbone_attr, backbone)
        self.config = backbone.config
        text = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        dropout = getattr(text, "classifier_dropout", None)
        if dropout is None:
            dropout = getattr(text, "hidden_dropout_prob", 0.0)
        std = getattr(text, "initializer_range", 0.02)
        self.num_labels = dict(num_labels)
        self.heads = nn.ModuleDict({t: ClassificationHead(text.hidden_size, n, dropout, std)
                                    for t, n in num_labels.items()})

    @property
    def backbone(self) -> nn.Module:
        return getattr(self, self.backbone_attr)

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def get_output_embeddings(self) -> None:
        return None

    def _task(self, task: str | None) -> str:
        if task is None:
            if len(self.heads) == 1:
                return next(iter(self.heads))
            raise ValueError(f"a multitask model needs task=NAME (one of {', '.join(self.heads)}); "
                             f"the batch carries no 'task'")
        if task not in self.heads:
            raise ValueError(f"unknown task {task!r}; this model has heads for {', '.join(self.heads)}")
        return task

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                task: str | None = None, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput

        name = self._task(task)
        # Only what the caller gave: decoder backbones take no token_type_ids.
        given = {"token_type_ids": token_type_ids, "position_ids": position_ids}
        kwargs.update({k: v for k, v in given.items() if v is not None})
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                            inputs_embeds=inputs_embeds, **kwargs)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:  # no pooler (decoders): the last non-padding token (right padding)
            hidden = out.last_hidden_state
            last = (attention_mask.sum(-1) - 1).clamp(min=0) if attention_mask is not None \
                else torch.full((hidden.shape[0],), hidden.shape[1] - 1, device=hidden.device)
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        logits = self.heads[name](pooled)
        loss = None
        if labels is not None:
            if self.num_labels[name] == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def save_pretrained(self, path: str | Path, **kwargs: Any) -> None:
        """The backbone as Hugging Face saves it, the heads beside it (``heads.safetensors``)."""
        from safetensors.torch import save_file

        path = Path(path)
        self.backbone.save_pretrained(path, **kwargs)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.heads.state_dict().items()},
                  str(path / "heads.safetensors"))
        (path / "multitask.json").write_text(json.dumps({"num_labels": self.num_labels}, indent=1))


class MultiTask(Task):
    """Base of every multitask suite; `suite` makes the class of one member list."""

    group: ClassVar[str] = GROUP
    members: ClassVar[tuple[str, ...]] = DEFAULT_MEMBERS
    options: ClassVar[dict[str, Any]] = {"mixing": "proportional", "temperature": 2.0}

    def __init__(self, options: dict[str, Any] | None = None):
        super().__init__(options)
        mixing_probabilities({"x": 1}, self.params["mixing"], self.params["temperature"])  # validate
        known = glue_tasks()
        self.tasks: dict[str, GlueTask] = {t: known[t]() for t in self.members}

    @property
    def task_names(self) -> list[str]:
        """The members' short names: what batches carry and ``ctx.current_task`` holds."""
        return list(self.members)

    # -- data ---------------------------------------------------------------------------------
    def _split(self, member: GlueTask, split: str) -> str:
        return member.train_split if split == self.train_split else member.eval_splits[0]

    def load(self, split: str, data_dir: str | None = None) -> list[TaskExample]:
        out: list[TaskExample] = []
        for t, member in self.tasks.items():
            out += [TaskExample(e.text_a, e.text_b, e.label, task=t)
                    for e in member.load(self._split(member, split), data_dir)]
        return out

    def availability(self, data_dir: str | None = None) -> str | None:
        for member in self.tasks.values():
            why = member.availability(data_dir)
            if why is not None:
                return why
        return None

    def subset(self, examples: list[TaskExample], n: int | None, seed: int) -> list[TaskExample]:
        return [e for t in self.tasks for e in seeded_subset(_of(examples, t), n, seed)]

    def encode(self, tokenizer: Any, examples: list[TaskExample], max_length: int) -> list[dict[str, Any]]:
        rows = []
        for t, member in self.tasks.items():
            for row in member.encode(tokenizer, _of(examples, t), max_length):
                row["task"] = t
                rows.append(row)
        return rows

    def collator(self, tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        collates = {t: m.collator(tokenizer) for t, m in self.tasks.items()}

        def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
            t = rows[0]["task"]
            if any(r["task"] != t for r in rows):
                raise ValueError("a multitask batch mixes tasks; batch rows of one task at a time")
            batch = collates[t]([{k: v for k, v in r.items() if k != "task"} for r in rows])
            batch["task"] = t
            return batch

        return collate

    def batch_sampler(self, rows: list[dict[str, Any]], batch_size: int,
                      generator: torch.Generator) -> MixingSampler:
        groups: dict[str, list[int]] = {t: [] for t in self.tasks}
        for i, r in enumerate(rows):
            groups[r["task"]].append(i)
        probs = mixing_probabilities({t: len(ix) for t, ix in groups.items()},
                                     self.params["mixing"], self.params["temperature"])
        return MixingSampler(groups, batch_size, probs, generator)

    # -- model --------------------------------------------------------------------------------
    def build_model(self, name: str) -> Any:
        from harness.models import LoadedModel, load_model

        loaded = load_model(name, "backbone")
        model = MultiTaskModel(loaded.model, {t: m.num_labels for t, m in self.tasks.items()})
        # Backbone parts the checkpoint lacked (a pooler) are freshly initialised: head too.
        head = ["heads"] + [f"{model.backbone_attr}.{h}" for h in loaded.head_names]
        return LoadedModel(model, loaded.tokenizer, loaded.model_type, head, loaded.path)

    # -- evaluation ---------------------------------------------------------------------------
    def predictions(self, logits: torch.Tensor) -> np.ndarray:
        # Any member's logits: one column is a regression member (GLUE's num_labels 1).
        logits = logits.float()
        out = logits.squeeze(-1) if logits.shape[-1] == 1 else logits.argmax(-1)
        return out.cpu().numpy()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterator[dict[str, Any]],
                 forward: Callable[[dict[str, Any]], Any]) -> dict[str, float]:
        preds: dict[str, list[np.ndarray]] = {t: [] for t in self.tasks}
        labels: dict[str, list[np.ndarray]] = {t: [] for t in self.tasks}
        for batch in batches:
            t = batch["task"]
            preds[t].append(self.tasks[t].predictions(forward(batch).logits))
            labels[t].append(batch["labels"].cpu().numpy())
        metrics: dict[str, float] = {}
        for t, member in self.tasks.items():
            if preds[t]:
                m = member.compute_metrics(np.concatenate(preds[t]), np.concatenate(labels[t]))
                metrics.update({f"{member.name}/{k}": v for k, v in m.items()})
        return metrics

    def score(self, metrics: dict[str, float]) -> float:
        per_task: dict[str, list[float]] = {}
        for key, value in metrics.items():
            per_task.setdefault(key.rpartition("/")[0], []).append(value)
        return float(np.mean([np.mean(v) for v in per_task.values()]))


def _of(examples: list[TaskExample], task: str) -> list[TaskExample]:
    return [e for e in examples if e.task == task]


def glue_tasks() -> dict[str, type[GlueTask]]:
    """Possible members: the registered GLUE tasks, by short name."""
    return {cls.short: cls for cls in TASKS.values() if isinstance(cls, type) and issubclass(cls, GlueTask)}


def suite(name: str, in_group: bool = False) -> type[MultiTask]:
    """The task class of ``multitask/<member>+<member>+...`` (the registry family's factory).
    Only the default suite is in the ``multitask`` group; others run when named."""
    group, _, spec = name.partition("/")
    known = glue_tasks()
    members = [m.strip() for m in spec.split("+")]
    bad = [m for m in members if m not in known]
    if group != GROUP or not spec or bad:
        raise ValueError(f"bad multitask suite {name!r}: name GLUE tasks by their short names joined "
                         f"by '+', e.g. multitask/sst2+rte+mrpc (known: {', '.join(known)})")
    if len(set(members)) != len(members):
        raise ValueError(f"bad multitask suite {name!r}: a task is named twice")
    return type("MultiTask_" + "_".join(members), (MultiTask,),
                {"name": name, "members": tuple(members), "in_group": in_group, "__module__": __name__})


register_family(GROUP, suite)
register_task(suite(f"{GROUP}/" + "+".join(DEFAULT_MEMBERS), in_group=True))
