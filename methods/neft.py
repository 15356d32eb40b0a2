"""NeFT, neuron-level fine-tuning (Xu et al., 2024, arXiv:2403.11621, COLING 2025).

Paper: a neuron is one row of a weight matrix (the weights into one output unit). The paper
compares each neuron's weights before and after (full) fine-tuning by cosine similarity, picks
the neurons that changed most, with about as many parameters as LoRA trains, and then fine-tunes
only those neurons. (Details of the paper's selection, such as which layers and the exact
fraction, are recalled with low confidence; the rule below is ours and is what is tested.)

Selection rule implemented here, step by step:

1. Candidates: every row of the linear weights matched by ``targets`` (default ``all-linear``:
   every linear layer of the transformer blocks; ``nn.Linear`` rows, for GPT-2's ``Conv1D``, which
   stores ``(in, out)``, the columns). Embeddings, biases, norms, the task head and BERT's pooler
   are not candidates: the pooler sits right under the freshly initialised head, so a probe moves
   its rows far more than any block's and, left in, it took the whole budget (192 of its 384 rows
   on MiniLM); the paper's neurons are those of the transformer layers. The head trains densely as
   for every method.
2. Probe: ``probe_steps`` (default 16) AdamW steps of full fine-tuning of the whole model at
   ``probe_lr`` (default 1e-4, no weight decay, gradient norm clipped to 1) on training batches in
   the data's fixed order (``ctx.train_batches()``, cycled if short). Afterwards every parameter is
   restored to its value before the probe, so training starts from the pretrained model.
3. Score: for each candidate row, ``cos(w_before, w_after)`` in float64.
4. Budget: ``budget`` entries if set, else LoRA's parameter count on the same model with rank
   ``lora_r`` (default 8) on ``lora_targets`` (default ``qv``, query and value):
   ``sum over targets of r * (in + out)`` (73,728 for MiniLM-L6).
5. Pick: sort all candidate rows by similarity, lowest first (ties in the order of the model's
   parameters); take rows in that order while the running total of their entries stays within the
   budget; stop at the first row that would exceed it.

Only the picked rows train: gradients are multiplied by the row mask and weight decay reaches only
the picked rows (`methods._masking`), so every other entry stays bit-identical. The trainable count
is the picked rows' entries (plus the head).

Merge: identity. The trained model is plain; its dense weights are ``W0 + row delta``.
"""
from __future__ import annotations

import itertools
import time
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from harness.lowrank import layer_dims
from harness.state import TrainState
from harness.targets import find_target_modules, resolve_targets
from methods._masking import MaskedMethod

Batch = dict[str, torch.Tensor]


def neuron_weights(model: nn.Module, ctx: TrainState,
                   targets: str = "all-linear") -> dict[str, tuple[nn.Parameter, int]]:
    """Candidate linear weights by parameter name, with the dimension that indexes neurons."""
    out = {}
    modules = dict(model.named_modules())
    names = find_target_modules(model, resolve_targets(ctx.model_type, targets),
                                exclude=ctx.head_names)
    for mname in names:
        module = modules[mname]
        if getattr(module, "weight", None) is None:
            continue
        conv1d = type(module).__name__ == "Conv1D"  # weight stored (in, out)
        out[f"{mname}.weight" if mname else "weight"] = (module.weight, 1 if conv1d else 0)
    return out


def lora_budget(model: nn.Module, ctx: TrainState, r: int, targets: str) -> int:
    """LoRA's trainable parameter count on this model: ``r * (in + out)`` per target module."""
    patterns = resolve_targets(ctx.model_type, targets)
    modules = dict(model.named_modules())
    names = find_target_modules(model, patterns, exclude=ctx.head_names)
    return sum(r * sum(layer_dims(modules[n])) for n in names)


def probe_similarity(model: nn.Module, weights: dict[str, tuple[nn.Parameter, int]],
                     batches: Callable[[], Iterable[Batch]],
                     loss_fn: Callable[[nn.Module, Batch], torch.Tensor], steps: int,
                     lr: float) -> dict[str, torch.Tensor]:
    """Cosine similarity of each neuron before and after a short full fine-tuning; the model's
    parameters, trainable flags and mode are restored afterwards."""
    params = dict(model.named_parameters())
    saved = {n: p.detach().clone() for n, p in params.items()}
    requires = {n: p.requires_grad for n, p in params.items()}
    was_training = model.training
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0)
    model.train()
    try:
        done = 0
        while done < steps:  # cycle through the training batches if they are fewer than steps
            before = done
            for batch in itertools.islice(batches(), steps - done):
                loss_fn(model, batch).backward()
                torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                done += 1
            if done == before:
                raise ValueError("no training batch for the probe")
        with torch.no_grad():
            # Similarity along the input axis: one value per neuron (row, or Conv1D column).
            return {n: F.cosine_similarity(w.detach().double(), saved[n].double(), dim=1 - dim)
                    for n, (w, dim) in weights.items()}
    finally:
        del opt
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
                p.grad = None
                p.requires_grad_(requires[n])
        model.train(was_training)


def select_rows(similarity: dict[str, torch.Tensor], row_size: dict[str, int],
                budget: int) -> dict[str, torch.Tensor]:
    """Neuron indices per tensor: lowest similarity first, until the next would exceed ``budget``."""
    names = list(similarity)
    sims = torch.cat([similarity[n].reshape(-1).double().cpu() for n in names])
    owner = torch.cat([torch.full((similarity[n].numel(),), i) for i, n in enumerate(names)])
    index = torch.cat([torch.arange(similarity[n].numel()) for n in names])
    order = torch.sort(sims, stable=True).indices
    sizes = torch.tensor([row_size[names[i]] for i in owner[order].tolist()])
    within = torch.cumsum(sizes, 0) <= budget  # monotone: a prefix of the order
    picked = order[within]
    out: dict[str, list[int]] = {}
    for o, i in zip(owner[picked].tolist(), index[picked].tolist()):
        out.setdefault(names[o], []).append(i)
    return {n: torch.tensor(sorted(rows)) for n, rows in out.items()}


class NeFT(MaskedMethod):
    name = "neft"
    summary = "train only the weight rows (neurons) a short full fine-tuning probe changes most"
    mergeable = True
    defaults: dict[str, Any] = {"budget": None, "lora_r": 8, "lora_targets": "qv",
                                "probe_steps": 16, "probe_lr": 1e-4,
                                "targets": "all-linear"}

    def choose_masks(self, model: nn.Module, ctx: TrainState) -> dict[str, torch.Tensor]:
        p = self.params
        budget = int(p["budget"]) if p["budget"] else lora_budget(model, ctx, int(p["lora_r"]),
                                                                  p["lora_targets"])
        weights = neuron_weights(model, ctx, p["targets"])
        t0 = time.perf_counter()
        sims = probe_similarity(model, weights, ctx.train_batches, ctx.compute_loss,
                                int(p["probe_steps"]), float(p["probe_lr"]))
        row_size = {n: w.shape[1 - dim] for n, (w, dim) in weights.items()}
        rows = select_rows(sims, row_size, budget)
        if not rows:
            raise ValueError(f"{self.name}: budget {budget} is smaller than one neuron's weights")
        masks = {}
        for n, idx in rows.items():
            w, dim = weights[n]
            mask = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
            mask.index_fill_(dim, idx.to(w.device), True)
            masks[n] = mask
        picked = [float(sims[n][i].max()) for n, i in rows.items()]
        ctx.extras.update({
            "budget_entries": budget,
            "selected_rows": sum(len(i) for i in rows.values()),
            "tensors_with_rows": len(rows),
            "max_selected_similarity": max(picked),
            "probe_steps": int(p["probe_steps"]),
            "probe_seconds": round(time.perf_counter() - t0, 2),
        })
        return masks
