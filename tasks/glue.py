"""GLUE: the nine tasks, read from the original GLUE files or from the Hugging Face hub.

Local layout (``$HARNESS_DATA_DIR`` or ``--data-dir``): ``glue/<task>/<split>.tsv`` where
``<task>`` is our short name (``sst2``) or GLUE's folder name (``SST-2``); a GLUE download folder
itself (``glue_data/SST-2/...``) works too. Files are read with ``csv.QUOTE_NONE`` because MRPC,
RTE, QNLI and CoLA contain literal quote characters. Metrics are GLUE's official ones, computed
with scikit-learn and scipy.
"""
from __future__ import annotations

import csv
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from tasks.base import DataUnavailable, Example, MalformedData, Task, data_root
from tasks.registry import register_task

NLI3 = {"entailment": 0, "neutral": 1, "contradiction": 2}   # as the hub's glue/mnli
NLI2 = {"entailment": 0, "not_entailment": 1}                  # as the hub's glue/qnli, glue/rte


def accuracy(p: np.ndarray, y: np.ndarray) -> dict[str, float]:
    return {"accuracy": float(accuracy_score(y, p))}


def acc_f1(p: np.ndarray, y: np.ndarray) -> dict[str, float]:
    return {"f1": float(f1_score(y, p)), "accuracy": float(accuracy_score(y, p))}


def matthews(p: np.ndarray, y: np.ndarray) -> dict[str, float]:
    return {"matthews": float(matthews_corrcoef(y, p))}


def pearson_spearman(p: np.ndarray, y: np.ndarray) -> dict[str, float]:
    if np.std(p) == 0:  # constant predictions: correlation undefined, count it as none
        return {"pearson": 0.0, "spearman": 0.0}
    return {"pearson": float(pearsonr(p, y)[0]), "spearman": float(spearmanr(p, y)[0])}


@dataclass(frozen=True)
class Columns:
    """Where a split's fields are: header names, or indices for header-less files (CoLA)."""
    text_a: str | int
    text_b: str | int | None
    label: str | int
    header: bool = True


def _label_int(mapping: dict[str, int] | None) -> Callable[[str], int]:
    def convert(v: str) -> int:
        if mapping is not None:
            return mapping[v]
        value = int(v)
        if value not in (0, 1):
            raise ValueError(v)
        return value
    return convert


class GlueTask(Task):
    group: ClassVar[str] = "glue"
    short: ClassVar[str] = ""
    folder: ClassVar[str] = ""                  # GLUE's own folder name
    hub_config: ClassVar[str] = ""
    hub_fields: ClassVar[tuple[str, str | None]] = ("sentence", None)
    hub_splits: ClassVar[dict[str, str]] = {"train": "train", "dev": "validation"}
    columns: ClassVar[Columns]
    label_map: ClassVar[dict[str, int] | None] = None
    metric_fn: ClassVar[Callable[[np.ndarray, np.ndarray], dict[str, float]]] = staticmethod(accuracy)

    def compute_metrics(self, preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        return type(self).metric_fn(preds, labels)

    # -- local files ------------------------------------------------------------------------
    def local_file(self, split: str, data_dir: str | None) -> Path | None:
        root = data_root(data_dir)
        if root is None:
            return None
        for folder in (root / "glue" / self.short, root / "glue" / self.folder,
                       root / self.folder, root / self.short):
            if (folder / f"{split}.tsv").is_file():
                return folder / f"{split}.tsv"
        return None

    def read_tsv(self, path: Path) -> list[Example]:
        cols = self.columns
        convert: Callable[[str], float | int] = float if self.is_regression else _label_int(self.label_map)
        examples = []
        # utf-8-sig drops MRPC's byte-order mark.
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = next(reader) if cols.header else None
            index = {name: i for i, name in enumerate(header)} if header else {}

            def col(key: str | int) -> int:
                if isinstance(key, int):
                    return key
                if key not in index:
                    raise MalformedData(f"{path}: header has no column {key!r} (found {header})")
                return index[key]

            ia, il = col(cols.text_a), col(cols.label)
            ib = col(cols.text_b) if cols.text_b is not None else None
            need = max(i for i in (ia, ib, il) if i is not None) + 1
            for lineno, row in enumerate(reader, start=2 if header else 1):
                if not row:
                    continue
                if len(row) < need:
                    raise MalformedData(f"{path}:{lineno}: expected at least {need} tab-separated "
                                        f"fields, found {len(row)}; fix or remove this line")
                try:
                    label = convert(row[il])
                except (ValueError, KeyError):
                    raise MalformedData(f"{path}:{lineno}: bad label {row[il]!r} for {self.name}") from None
                examples.append(Example(row[ia], row[ib] if ib is not None else None, label))
        if not examples:
            raise MalformedData(f"{path}: no data rows")
        return examples

    # -- hub ---------------------------------------------------------------------------------
    @staticmethod
    def hub_allowed() -> bool:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        return not offline and importlib.util.find_spec("datasets") is not None

    def load_hub(self, split: str) -> list[Example]:
        from datasets import load_dataset  # optional dependency: pip install peft-harness[hub]

        ds = load_dataset("nyu-mll/glue", self.hub_config, split=self.hub_splits[split])
        fa, fb = self.hub_fields
        return [Example(r[fa], r[fb] if fb else None, r["label"]) for r in ds]

    def _missing(self, split: str, data_dir: str | None = None) -> str:
        root = data_root(data_dir)
        where = f"{root}/glue/{self.short}/{split}.tsv" if root else \
            f"$HARNESS_DATA_DIR/glue/{self.short}/{split}.tsv (HARNESS_DATA_DIR is not set)"
        return (f"no {split} data for {self.name}. Put GLUE's {self.folder}/{split}.tsv at {where} "
                f"(or pass --data-dir), or go online with `pip install datasets` to load "
                f"nyu-mll/glue/{self.hub_config} from the Hugging Face hub")

    def load(self, split: str, data_dir: str | None = None) -> list[Example]:
        path = self.local_file(split, data_dir)
        if path is not None:
            return self.read_tsv(path)
        if self.hub_allowed():
            try:
                return self.load_hub(split)
            except Exception as e:  # network, auth, missing config
                raise DataUnavailable(f"{self._missing(split, data_dir)}; the hub load failed: {e}") from e
        raise DataUnavailable(self._missing(split, data_dir))

    def availability(self, data_dir: str | None = None) -> str | None:
        missing = [s for s in (self.train_split, *self.eval_splits) if self.local_file(s, data_dir) is None]
        if not missing:
            return None
        if self.hub_allowed():
            return None  # load() will try the hub and report a failure as the run's reason
        return self._missing(missing[0], data_dir)


@register_task
class CoLA(GlueTask):
    name, short, folder, hub_config = "glue/cola", "cola", "CoLA", "cola"
    # No header: source, label, original label, sentence.
    columns = Columns(3, None, 1, header=False)
    metric_fn = staticmethod(matthews)


@register_task
class SST2(GlueTask):
    name, short, folder, hub_config = "glue/sst2", "sst2", "SST-2", "sst2"
    columns = Columns("sentence", None, "label")


@register_task
class MRPC(GlueTask):
    name, short, folder, hub_config = "glue/mrpc", "mrpc", "MRPC", "mrpc"
    hub_fields = ("sentence1", "sentence2")
    columns = Columns("#1 String", "#2 String", "Quality")
    metric_fn = staticmethod(acc_f1)

    def read_tsv(self, path: Path) -> list[Example]:
        # GLUE's own download script builds train.tsv as msr_paraphrase_train.txt minus the dev
        # ids. Some copies of train.tsv lack a pair; rebuild from the source files when present.
        source, dev_ids = path.parent / "msr_paraphrase_train.txt", path.parent / "dev_ids.tsv"
        if path.name == "train.tsv" and source.is_file() and dev_ids.is_file():
            with open(dev_ids, encoding="utf-8-sig") as f:
                held_out = {tuple(line.strip().split("\t")) for line in f if line.strip()}
            rows = super().read_tsv(source)
            with open(source, encoding="utf-8-sig", newline="") as f:
                reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
                next(reader)
                ids = [(r[1], r[2]) for r in reader if r]
            return [ex for ex, key in zip(rows, ids) if key not in held_out]
        return super().read_tsv(path)


@register_task
class STSB(GlueTask):
    name, short, folder, hub_config = "glue/stsb", "stsb", "STS-B", "stsb"
    num_labels = 1
    hub_fields = ("sentence1", "sentence2")
    columns = Columns("sentence1", "sentence2", "score")
    metric_fn = staticmethod(pearson_spearman)


@register_task
class QQP(GlueTask):
    name, short, folder, hub_config = "glue/qqp", "qqp", "QQP", "qqp"
    hub_fields = ("question1", "question2")
    columns = Columns("question1", "question2", "is_duplicate")
    metric_fn = staticmethod(acc_f1)


@register_task
class MNLI(GlueTask):
    name, short, folder, hub_config = "glue/mnli", "mnli", "MNLI", "mnli"
    num_labels = 3
    hub_fields = ("premise", "hypothesis")
    eval_splits = ("dev_matched", "dev_mismatched")
    hub_splits = {"train": "train", "dev_matched": "validation_matched",
                  "dev_mismatched": "validation_mismatched"}
    columns = Columns("sentence1", "sentence2", "gold_label")
    label_map = NLI3


@register_task
class QNLI(GlueTask):
    name, short, folder, hub_config = "glue/qnli", "qnli", "QNLI", "qnli"
    hub_fields = ("question", "sentence")
    columns = Columns("question", "sentence", "label")
    label_map = NLI2


@register_task
class RTE(GlueTask):
    name, short, folder, hub_config = "glue/rte", "rte", "RTE", "rte"
    hub_fields = ("sentence1", "sentence2")
    columns = Columns("sentence1", "sentence2", "label")
    label_map = NLI2


@register_task
class WNLI(GlueTask):
    name, short, folder, hub_config = "glue/wnli", "wnli", "WNLI", "wnli"
    hub_fields = ("sentence1", "sentence2")
    columns = Columns("sentence1", "sentence2", "label")
