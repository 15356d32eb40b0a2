"""Tiny models and one-call method application for fast unit tests (no download, no data)."""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from harness.config import RunConfig, TrainConfig
from harness.plugins import get_method, make_manager
from harness.state import TrainState
from harness.targets import resolve_targets
from harness.train import Trainer, attach_probes


def tiny_bert(num_labels: int = 2, seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2(num_labels: int = 2, seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                     num_labels=num_labels, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0)
    return GPT2ForSequenceClassification(cfg).eval()


def tiny_llama(num_labels: int = 2, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                      num_labels=num_labels, pad_token_id=0)
    return LlamaForSequenceClassification(cfg).eval()


def tiny_multitask(heads: dict[str, int] | None = None, seed: int = 0) -> nn.Module:
    """The multitask suite's model over a tiny BERT: one head per task (1 label = regression)."""
    from transformers import BertConfig, BertModel

    from tasks.multitask import MultiTaskModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return MultiTaskModel(BertModel(cfg), heads or {"a": 2, "b": 3}).eval()


class Suite:
    """A stand-in multitask task for unit tests: its members' names and the suite's batching."""

    def __init__(self, names: list[str], mixing: str = "proportional", temperature: float = 2.0):
        self.task_names = list(names)
        self.mixing, self.temperature = mixing, temperature

    def batch_sampler(self, rows: list[dict[str, Any]], batch_size: int, generator: torch.Generator):
        from tasks.multitask import MixingSampler, mixing_probabilities

        groups = {t: [i for i, r in enumerate(rows) if r["task"] == t] for t in self.task_names}
        probs = mixing_probabilities({t: len(g) for t, g in groups.items()}, self.mixing, self.temperature)
        return MixingSampler(groups, batch_size, probs, generator)


HEADS = {"bert": ["classifier"], "gpt2": ["score"], "llama": ["score"]}


def make_ctx(model: nn.Module, method: str, params: dict[str, Any] | None = None,
             **train: Any) -> TrainState:
    cls = get_method(method)
    mp = {**cls.defaults, **(params or {})}
    config = RunConfig(method=method, task="synthetic", train=TrainConfig(**train), method_params=mp)
    model_type = model.config.model_type
    targets = resolve_targets(model_type, mp.get("targets")) if "targets" in mp else []
    multitask = isinstance(getattr(model, "heads", None), nn.ModuleDict)
    return TrainState(config=config, device=torch.device("cpu"), targets=targets,
                      head_names=["heads"] if multitask else HEADS.get(model_type, ["classifier"]),
                      model_type=model_type, task=Suite(list(model.heads)) if multitask else None)


def apply_method(model: nn.Module, method: str, params: dict[str, Any] | None = None,
                 observers: list[Any] = (), data: list[dict[str, Any]] | None = None, **train: Any):
    """inject + head unfreeze, as the core does; returns (model, ctx, plugin manager).

    ``data``: training rows for methods that choose what to train from data in ``inject``
    (attached as the runner does, through the context's probes)."""
    ctx = make_ctx(model, method, params, **train)
    if data is not None:
        attach_probes(ctx, data, collate)
    pm = make_manager(get_method(method)(ctx.config.method_params), list(observers))
    replaced = pm.hook.inject(model=model, ctx=ctx)
    model = replaced if replaced is not None else model
    for name, p in model.named_parameters():
        if ctx.is_head(name):
            p.requires_grad_(True)
    return model, ctx, pm


def batch(n: int = 4, length: int = 10, seed: int = 1, num_labels: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, length // 2:] = 0  # one padded row
    labels = torch.randint(0, num_labels, (n,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def rows(n: int = 32, seed: int = 2) -> list[dict[str, Any]]:
    """Synthetic classification rows: the label is whether token 7 occurs (learnable)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(4, 12, (1,), generator=g))
        ids = torch.randint(8, 100, (length,), generator=g).tolist()
        label = int(torch.rand(1, generator=g) < 0.5)
        if label:
            ids[int(torch.randint(0, length, (1,), generator=g))] = 7
        out.append({"input_ids": ids, "attention_mask": [1] * length, "labels": label})
    return out


def collate(rs: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rs)
    out = {
        "input_ids": torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in rs]),
        "attention_mask": torch.tensor([r["attention_mask"] + [0] * (width - len(r["attention_mask"])) for r in rs]),
        "labels": torch.tensor([r["labels"] for r in rs]),
    }
    if "task" in rs[0]:  # multitask rows: one task per batch, its name beside the tensors
        assert len({r["task"] for r in rs}) == 1, "a batch mixes tasks"
        out["task"] = rs[0]["task"]
        if isinstance(rs[0]["labels"], float):
            out["labels"] = out["labels"].float()
    return out


def task_rows(tasks: dict[str, int], n: int = 16, seed: int = 2) -> list[dict[str, Any]]:
    """Synthetic rows of several tasks (``{name: num_labels}``; 1 = regression targets), grouped."""
    out = []
    for k, (t, labels) in enumerate(tasks.items()):
        for r in rows(n, seed + k):
            out.append({**r, "task": t, "labels": float(r["labels"]) if labels == 1 else r["labels"] % labels})
    return out


def train(model: nn.Module, method: str, params: dict[str, Any] | None = None,
          n_rows: int = 32, observers: list[Any] = (), **train_kw: Any):
    """Apply ``method`` and run the harness's real training loop on synthetic rows."""
    train_kw = {"batch_size": 8, "lr": 1e-2, "warmup_ratio": 0.0, **train_kw}
    model, ctx, pm = apply_method(model, method, params, observers, **train_kw)
    model.train()
    result = Trainer(model, pm, ctx, rows(n_rows), collate).fit()
    return model, ctx, pm, result


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def changed(before: dict[str, torch.Tensor], model: nn.Module) -> set[str]:
    return {k for k, v in model.named_parameters() if not torch.equal(before[k], v.detach())}


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
