"""Task interface and the sequence-classification machinery GLUE-style suites share."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import numpy as np
import torch

DATA_ENV = "HARNESS_DATA_DIR"


class DataUnavailable(RuntimeError):
    """A task's data is neither in the local data directory nor reachable on the hub."""


class MalformedData(ValueError):
    """A data file has a row the reader cannot use; the message names the file and line."""


def data_root(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The local data directory: the argument, else ``$HARNESS_DATA_DIR``, else None."""
    value = data_dir or os.environ.get(DATA_ENV)
    return Path(value).expanduser() if value else None


def seeded_subset(items: list, n: int | None, seed: int) -> list:
    """The first ``n`` of a seeded shuffle, in their original order (all when ``n`` is None)."""
    if n is None or n >= len(items):
        return list(items)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in sorted(order[:n])]


@dataclass
class Example:
    text_a: str
    text_b: str | None
    label: float | int


class Task:
    """One benchmark task. Subclasses set the class attributes and implement `load`.

    ``model_kind`` tells the core which Hugging Face auto class builds the task model.
    ``options`` declares the task's own settings with their defaults (what a suite evaluates, not
    how training runs); profiles' ``tasks:`` sections and ``--set`` override them, and the instance
    holds the resolved values in ``self.params``. ``evaluate_before_training`` asks the runner to
    evaluate the model once before training too (recorded as ``metrics_before``).
    """

    name: ClassVar[str] = ""
    group: ClassVar[str] = ""
    model_kind: ClassVar[str] = "sequence-classification"
    default_model: ClassVar[str] = "minilm"
    num_labels: ClassVar[int] = 2                  # 1 = regression
    train_split: ClassVar[str] = "train"
    eval_splits: ClassVar[tuple[str, ...]] = ("dev",)
    options: ClassVar[dict[str, Any]] = {}
    evaluate_before_training: bool = False         # class default; a task option may set it
    in_group: ClassVar[bool] = True                # False: runs by name only, not with its group

    def __init__(self, options: dict[str, Any] | None = None):
        unknown = sorted(set(options or {}) - set(self.options))
        if unknown:
            raise ValueError(f"task {self.name!r} has no option {', '.join(map(repr, unknown))}; "
                             f"options: {', '.join(sorted(self.options)) or 'none'}")
        self.params: dict[str, Any] = {**self.options, **(options or {})}

    def load(self, split: str, data_dir: str | None = None) -> list[Example]:  # pragma: no cover
        raise NotImplementedError

    def subset(self, examples: list[Any], n: int | None, seed: int) -> list[Any]:
        """At most ``n`` of ``examples`` (a seeded draw, original order kept); ``max_train_samples``
        and ``max_eval_samples`` go through here. A suite of several tasks caps each member."""
        return seeded_subset(examples, n, seed)

    def build_model(self, name: str) -> Any:
        """The task model (``harness.models.LoadedModel``): backbone ``name`` with this task's head.
        Suites with their own architecture (one head per member task) override this."""
        from harness.models import load_model

        return load_model(name, self.model_kind, num_labels=self.num_labels)

    def batch_sampler(self, rows: list[dict[str, Any]], batch_size: int,
                      generator: torch.Generator) -> Any:
        """Index batches for the training loop (a ``torch.utils.data`` batch sampler), or None for
        the loop's default: shuffled, fixed-size batches."""
        return None

    def availability(self, data_dir: str | None = None) -> str | None:
        """None when train and eval data can be loaded, else the reason they cannot."""
        raise NotImplementedError  # pragma: no cover

    def compute_metrics(self, preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        raise NotImplementedError  # pragma: no cover

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    # -- encoding ---------------------------------------------------------------------------
    def encode(self, tokenizer: Any, examples: list[Example], max_length: int) -> list[dict[str, Any]]:
        """Tokenize once, unpadded; `collate` pads each batch to its longest row."""
        a = [e.text_a for e in examples]
        b = [e.text_b for e in examples] if examples and examples[0].text_b is not None else None
        enc = tokenizer(a, b, truncation=True, max_length=max_length)
        rows = []
        for i, e in enumerate(examples):
            row = {k: enc[k][i] for k in enc.keys()}
            row["labels"] = float(e.label) if self.is_regression else int(e.label)
            rows.append(row)
        return rows

    def collator(self, tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        label_dtype = torch.float32 if self.is_regression else torch.long

        def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
            width = max(len(r["input_ids"]) for r in rows)
            batch: dict[str, torch.Tensor] = {}
            for key in rows[0]:
                if key == "labels":
                    continue
                fill = pad_id if key == "input_ids" else 0
                batch[key] = torch.tensor([r[key] + [fill] * (width - len(r[key])) for r in rows])
            batch["labels"] = torch.tensor([r["labels"] for r in rows], dtype=label_dtype)
            return batch

        return collate

    # -- evaluation -------------------------------------------------------------------------
    def predictions(self, logits: torch.Tensor) -> np.ndarray:
        logits = logits.float()
        if self.is_regression:
            return logits.squeeze(-1).cpu().numpy()
        return logits.argmax(-1).cpu().numpy()

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batches: Iterator[dict[str, torch.Tensor]],
                 forward: Callable[[dict[str, torch.Tensor]], Any]) -> dict[str, float]:
        """Metrics of ``model`` over ``batches``; ``forward`` runs one batch on the right device."""
        preds, labels = [], []
        for batch in batches:
            out = forward(batch)
            preds.append(self.predictions(out.logits))
            labels.append(batch["labels"].cpu().numpy())
        return self.compute_metrics(np.concatenate(preds), np.concatenate(labels))

    def take_artifacts(self) -> dict[str, str | bytes]:
        """Files the last `evaluate` produced for people to read (generations, pictures), by file
        name; the runner writes them beside the run record and forgets them here."""
        out, self._artifacts = getattr(self, "_artifacts", {}), {}
        return out

    def add_artifact(self, name: str, content: str | bytes) -> None:
        self._artifacts = {**getattr(self, "_artifacts", {}), name: content}

    def data_notes(self) -> dict[str, Any]:
        """What encoding dropped or cut (counts per split), kept in the run record as ``data``."""
        return {}

    def score(self, metrics: dict[str, float]) -> float:
        """One number per task: the mean of its metrics (the GLUE leaderboard convention)."""
        return float(np.mean(list(metrics.values())))
